"""What a loader backend is to the DataModule: `LoaderBackend`, subclassed once per backend (one file each in this
package, named in the registry of `datamodules/backends/__init__.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from datamodules.loaders import LoaderSpec

if TYPE_CHECKING:  # the DataModule imports the registry: no import back at run time
    from datamodules.folder import ImageFolderDataset
    from datamodules.imagenet import ImageNetDataModule
    from datamodules.samples import Samples
    from datamodules.staging import Plan

# The DataModule's augmentations that only the torchvision backend implements, with their "off" values.
TORCHVISION_ONLY = {"train_augmentation": "random_resized_crop", "lighting_std": 0.0, "trivial_augment": False,
                    "random_erasing": 0.0}


class LoaderBackend:
    """One way of turning the ImageNet folders (or files made from them) into batches, under the contract of
    datamodules/loaders.py: the torchvision backend's labels, training order, sharding and validation crops; batches
    of (images NCHW uint8 or normalised float, labels int64 (N,)).

    A backend with options declares them as a frozen dataclass in `options` (e.g. `DaliOptions`); the DataModule
    takes them as the argument named after the backend (`--data.dali.device gpu`) and passes them here.

    Attributes:
        name: the value of `data.backend` that selects it.
        options: the dataclass of its options, or None.
        augmentations: the DataModule's torchvision-only augmentation settings it implements as well (by name, see
            TORCHVISION_ONLY); any other set to a non-off value is refused.
        requires: the module an optional extra provides (tests and benchmarks skip the backend without it), and
            `install` how to get it.
    """

    name: ClassVar[str]
    options: ClassVar[Optional[type]] = None
    augmentations: ClassVar[frozenset[str]] = frozenset()
    requires: ClassVar[Optional[str]] = None
    install: ClassVar[str] = ""

    @classmethod
    def available(cls) -> bool:
        """Whether its optional extra is installed (found, not imported: DALI and FFCV take seconds to import)."""
        import importlib.util

        if cls.requires is None:
            return True
        try:
            return importlib.util.find_spec(cls.requires) is not None
        except ModuleNotFoundError:  # a parent package (nvidia) absent
            return False

    def __init__(self, datamodule: "ImageNetDataModule", options: Any = None):
        self.dm = datamodule
        self.opts = options

    def check(self, hp: dict) -> None:
        """Refuses, with a ValueError naming the keys, settings this backend lacks; called by the DataModule's
        constructor, before any data is read."""
        lacking = {k: hp[k] for k, off in TORCHVISION_ONLY.items() if k not in self.augmentations and hp[k] != off}
        if lacking:
            given = " / ".join(f"data.{k}={v}" for k, v in lacking.items())
            offs = ", ".join(f"{k} {TORCHVISION_ONLY[k]}" for k in lacking)
            raise ValueError(f"data.backend={self.name}: {given} exist in the torchvision backend only (use {offs})")

    def data_dir(self, root: Path) -> Path:
        """What the loaders read, shown in the per-rank start-up line: the image folders by default."""
        return root

    def stage_plan(self, root: Path, stage: str, stage_dir: str, manifest: Optional[str]) -> "Plan":
        """What `data.stage_dir` copies to each node: the usable images of train/ and val/ by default."""
        from datamodules import staging

        return staging.folder_plan(root, staging.stage_root(stage_dir, root, "folders"), manifest)

    def use_staged(self, copy: Path, root: Path, manifest: Optional[str]) -> tuple[Path, Optional[str]]:
        """(root, manifest) the run reads once the stage plan's copy exists at `copy`: the copy carries the source's
        manifest over, if any."""
        return copy, None

    def usable(self, found: "Samples") -> "Samples":
        """The samples this backend can read, from those found: all by default."""
        return found

    def train_loader(self, spec: LoaderSpec, dataset: "ImageFolderDataset"):
        raise NotImplementedError

    def val_loader(self, spec: LoaderSpec, dataset: "ImageFolderDataset"):
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Extra entries of the DataModule's checkpoint state (e.g. DALI's pipeline states); called on every rank."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """The DataModule's checkpoint state, as state_dict wrote it."""
