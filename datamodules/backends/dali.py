"""The NVIDIA DALI backend (`data.backend dali`): nvJPEG decoding and augmentation on the GPU, or the same pipeline
on CPU threads (the pipelines: datamodules/dali.py, imported only when chosen: DALI is a large optional install)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from datamodules.backends.base import LoaderBackend
from datamodules.loaders import LoaderSpec
from datamodules.samples import gather_objects, without_formats_dali_lacks


@dataclass(frozen=True)
class DaliOptions:
    """Options of the DALI backend (`--data.dali.device gpu`).

    Args:
        device: `gpu` decodes with nvJPEG and augments on the GPU, `cpu` runs the same pipeline on CPU threads;
            `auto` = gpu when the model runs on one.
    """

    device: Literal["auto", "cpu", "gpu"] = "auto"


class DaliBackend(LoaderBackend):
    name = "dali"
    options = DaliOptions
    requires, install = "nvidia.dali", "pip install -e '.[dali]'"

    def __init__(self, datamodule, options: DaliOptions = DaliOptions()):
        super().__init__(datamodule, options)
        self._train = None  # the training loader: its pipeline state goes into checkpoints
        self._resume: dict = {}  # rank -> a training pipeline state, from a checkpoint

    def _device(self, spec: LoaderSpec) -> str:
        device = self.opts.device
        return device if device != "auto" else ("gpu" if spec.device.type == "cuda" else "cpu")

    def usable(self, found):
        return without_formats_dali_lacks(found)

    def train_loader(self, spec: LoaderSpec, dataset):
        from datamodules import dali

        self._train = dali.train_loader(spec, device=self._device(spec))
        self._train.restore_pipeline(self._resume.get(spec.rank))
        return self._train

    def val_loader(self, spec: LoaderSpec, dataset):
        from datamodules import dali

        return dali.val_loader(spec, device=self._device(spec))

    def state_dict(self) -> dict:
        if self._train is None:
            return {}
        # every rank's pipeline state: Lightning writes rank 0's checkpoint only
        pipelines = gather_objects(self._train.pipeline_state(), self.dm.trainer_rank)
        return {"dali_pipelines": {rank: p for rank, p in pipelines.items() if p is not None}}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state.get("dali_pipelines") or {}
        if self._train is not None:
            self._train.restore_pipeline(self._resume.get(self.dm.trainer_rank))
