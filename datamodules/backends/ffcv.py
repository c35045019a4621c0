"""The FFCV backend (`data.backend ffcv`): loaders over the .beton files `resnet prepare ffcv` writes (the loaders:
datamodules/ffcv.py, imported only when chosen: FFCV's import compiles numba code)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from datamodules.backends.base import LoaderBackend
from datamodules.loaders import LoaderSpec


@dataclass(frozen=True)
class FfcvOptions:
    """Options of the FFCV backend (`--data.ffcv.dir /data/imagenet/ffcv`).

    Args:
        dir: folder with `train.beton` and `val.beton`; None = `<data.root>/ffcv`.
        order: training order: `random` (a full shuffle, the torchvision backend's) or `quasi_random` (FFCV's
            shuffle within memory-sized chunks: for datasets larger than RAM; one process only, no repeats).
        os_cache: let the OS page cache hold the .beton (it fits in RAM) instead of FFCV's own page reads.
    """

    dir: Optional[str] = None
    order: Literal["random", "quasi_random"] = "random"
    os_cache: bool = True


class FfcvBackend(LoaderBackend):
    name = "ffcv"
    options = FfcvOptions
    requires, install = "ffcv", "pip install -e '.[ffcv]', needs libturbojpeg and OpenCV"

    def __init__(self, datamodule, options: FfcvOptions = FfcvOptions()):
        super().__init__(datamodule, options)
        self.dir = Path(options.dir or datamodule.root / "ffcv")  # where the .beton files are read (a staged copy)

    def check(self, hp: dict) -> None:
        super().check(hp)
        if hp["repeated_augmentation"] > 1 and self.opts.order == "quasi_random":
            raise ValueError(f"data.repeated_augmentation={hp['repeated_augmentation']} with data.ffcv.order="
                             "quasi_random: FFCV's page-local order has no repeats; use data.ffcv.order random or "
                             "data.repeated_augmentation 1")

    def data_dir(self, root: Path) -> Path:
        return self.dir

    def stage_plan(self, root: Path, stage: str, stage_dir: str, manifest: Optional[str]):
        from datamodules import staging

        return staging.beton_plan(self.dir, staging.stage_root(stage_dir, self.dir, "ffcv"),
                                  ("train", "val") if stage == "fit" else ("val",))

    def use_staged(self, copy: Path, root: Path, manifest: Optional[str]) -> tuple[Path, Optional[str]]:
        self.dir = copy  # the images are still listed from the folders (or manifest) for labels and counts
        return root, manifest

    def train_loader(self, spec: LoaderSpec, dataset):
        from datamodules import ffcv

        return ffcv.train_loader(spec, self.dir / "train.beton", order=self.opts.order, os_cache=self.opts.os_cache)

    def val_loader(self, spec: LoaderSpec, dataset):
        from datamodules import ffcv

        return ffcv.val_loader(spec, self.dir / "val.beton", os_cache=self.opts.os_cache)
