"""The loader backends by name, the values of `data.backend`. A new backend is one file in this package (a
`LoaderBackend` subclass, with its options dataclass if it has any) and one line here; a backend with options also
gets them as a DataModule argument named after it (`data.<name>`: datamodules/imagenet.py)."""

from __future__ import annotations

from typing import Literal

from datamodules.backends.base import LoaderBackend
from datamodules.backends.dali import DaliBackend, DaliOptions
from datamodules.backends.ffcv import FfcvBackend, FfcvOptions
from datamodules.backends.torchvision import TorchvisionBackend

BACKENDS: dict[str, type[LoaderBackend]] = {
    "torchvision": TorchvisionBackend,  # the reference: DataLoader, torchvision.transforms.v2
    "dali": DaliBackend,  # NVIDIA DALI: nvJPEG on the GPU, or its CPU pipeline
    "ffcv": FfcvBackend,  # FFCV .beton files (`resnet prepare ffcv`)
}

BackendName = Literal[tuple(BACKENDS)]  # type: ignore[valid-type]  # the registry's names, for the config schema

__all__ = ["BACKENDS", "BackendName", "DaliOptions", "FfcvOptions", "LoaderBackend"]
