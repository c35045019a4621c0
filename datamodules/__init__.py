"""Images on disk to tensors on device: ImageNet-layout folders, transforms, the demo dataset."""

from datamodules.imagenet import ImageNetDataModule

__all__ = ["ImageNetDataModule"]
