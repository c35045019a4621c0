"""`resnet prepare imagenet`: the official ILSVRC2012 files arranged into the folder layout the DataModules read."""

from __future__ import annotations


def prepare_imagenet(dst: str) -> None:
    """Placeholder, being written."""
    raise NotImplementedError
