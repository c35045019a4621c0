"""FFCV backend: .beton files (`resnet prepare ffcv`) and their training and validation loaders."""

from __future__ import annotations


def prepare_ffcv(root: str, dst: str) -> None:
    """Placeholder, being written."""
    raise NotImplementedError
