"""Transform presets on uint8 CHW tensors (torchvision.transforms.v2). Normalisation happens per batch on the
device (`normalize_batch`): workers ship uint8, a quarter of the bytes of float32."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Principal components of ImageNet RGB pixels (0-1 scale), as used for AlexNet's "lighting" noise
# (Krizhevsky et al. 2012) and by He et al. 2015; values as published with fb.resnet.torch.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


class Lighting(v2.Transform):
    """AlexNet PCA colour noise: adds eigvec @ (alpha * eigval), alpha ~ N(0, std), to every pixel."""

    def __init__(self, std: float = 0.1):
        super().__init__()
        self.std = std

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        alpha = torch.randn(3) * self.std
        rgb = torch.tensor(PCA_EIGVEC) @ (alpha * torch.tensor(PCA_EIGVAL))
        return {"rgb": rgb}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or inpt.ndim < 3:
            return inpt
        if inpt.dtype == torch.uint8:  # shift on the 0-255 scale, round and clamp back
            out = inpt.float() + 255.0 * params["rgb"].view(3, 1, 1)
            return out.round_().clamp_(0, 255).to(torch.uint8)
        return inpt + params["rgb"].view(3, 1, 1).to(inpt.dtype)


def train_transform(
    *,
    crop_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    scale_jitter: tuple[int, int] | None = None,
    hflip: bool = True,
    lighting_std: float = 0.0,
) -> v2.Compose:
    """RandomResizedCrop (default, torchvision/Inception style) or, with `scale_jitter=(256, 480)`, He et al.'s
    shorter side random in the range then a random crop; optional flip and PCA lighting."""
    if scale_jitter is None:
        ops: list[v2.Transform] = [v2.RandomResizedCrop(crop_size, scale=scale, antialias=True)]
    else:
        low, high = scale_jitter
        ops = [v2.RandomShortestSize(list(range(low, high + 1)), antialias=True), v2.RandomCrop(crop_size)]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if lighting_std > 0:
        ops.append(Lighting(lighting_std))
    return v2.Compose(ops)


def val_transform(*, crop_size: int = 224, resize_size: int = 256) -> v2.Compose:
    """Shorter side to `resize_size` (bilinear, antialiased), centre crop `crop_size`: torchvision's protocol."""
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(crop_size)])


def normalize_batch(
    images: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 NCHW batch to float32, scaled to 0-1 and normalised per channel."""
    x = images.float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)
