"""Transform presets on uint8 CHW tensors (torchvision.transforms.v2). Normalisation happens per batch on the
device (`normalize_batch`): workers ship uint8, a quarter of the bytes of float32."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal, Sequence, get_args

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


@dataclass(frozen=True)
class ProgressiveResizing:
    """The training crop side by epoch, FFCV's rule (ffcv-imagenet's `get_resolution`): `min_size` up to epoch
    `start_epoch` (0-based), `max_size` from `end_epoch` on, in between the linear interpolation rounded to a
    multiple of 32 (half to even). FFCV's ResNet-50 recipes: 160 -> 192, e.g. epochs 65 -> 76 of 88."""

    min_size: int = 160
    max_size: int = 192
    start_epoch: int = 0
    end_epoch: int = 0

    def __post_init__(self):
        if not (0 < self.min_size <= self.max_size and 0 <= self.start_epoch <= self.end_epoch):
            raise ValueError(f"data.progressive_resizing={self}: expected 0 < min_size <= max_size and "
                             "0 <= start_epoch <= end_epoch")

    def at(self, epoch: int) -> int:
        """The training crop side in pixels for 0-based `epoch`."""
        if epoch <= self.start_epoch:
            return self.min_size
        if epoch >= self.end_epoch:
            return self.max_size
        size = self.min_size + (self.max_size - self.min_size) * (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return int(round(size / 32)) * 32


def train_transform(
    *,
    crop_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    scale_jitter: tuple[int, int] | None = None,
    hflip: bool = True,
    lighting_std: float = 0.0,
    trivial_augment: bool = False,
    random_erasing: float = 0.0,
) -> v2.Compose:
    """RandomResizedCrop (default, torchvision/Inception style) or, with `scale_jitter=(256, 480)`, He et al.'s
    shorter side random in the range then a random crop; optional flip, TrivialAugmentWide (Mueller & Hutter
    2021), PCA lighting, and RandomErasing with probability `random_erasing` (Zhong et al. 2020; the erased box
    takes the mean pixel, which normalisation maps to 0 as in torchvision's recipe, where erasing follows it)."""
    if scale_jitter is None:
        ops: list[v2.Transform] = [v2.RandomResizedCrop(crop_size, scale=scale, antialias=True)]
    else:
        low, high = scale_jitter
        ops = [v2.RandomShortestSize(list(range(low, high + 1)), antialias=True), v2.RandomCrop(crop_size)]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if trivial_augment:
        ops.append(v2.TrivialAugmentWide())
    if lighting_std > 0:
        ops.append(Lighting(lighting_std))
    if random_erasing > 0:
        ops.append(v2.RandomErasing(random_erasing, value=[round(255 * m) for m in IMAGENET_MEAN]))
    return v2.Compose(ops)


class EpochTransform:
    """A training transform whose crop side follows a ProgressiveResizing schedule: `for_epoch(epoch)` is the
    transform of that epoch (ImageFolderDataset asks with the epoch of each sample key)."""

    def __init__(self, schedule: ProgressiveResizing, **train_kwargs):
        self.schedule, self.train_kwargs = schedule, train_kwargs
        self._by_size: dict[int, v2.Compose] = {}

    def for_epoch(self, epoch: int) -> v2.Compose:
        size = self.schedule.at(epoch)
        if size not in self._by_size:
            self._by_size[size] = train_transform(crop_size=size, **self.train_kwargs)
        return self._by_size[size]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:  # without an epoch: the first one's
        return self.for_epoch(0)(image)


def val_transform(*, crop_size: int = 224, resize_size: int = 256) -> v2.Compose:
    """Shorter side to `resize_size` (bilinear, antialiased), centre crop `crop_size`: torchvision's protocol."""
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(crop_size)])


# The ILSVRC evaluation protocols (EvalViews): the one list that `resnet evaluate`, the benchmarks and the SLURM
# scripts (through `resnet evaluate`'s own check) take.
Protocol = Literal["center", "10crop", "multiscale"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
# He et al. 2015, Table 4: the fully-convolutional test averages shorter sides {224, 256, 384, 480, 640}.
PAPER_SCALES = (224, 256, 384, 480, 640)


class EvalViews:
    """The views of one image that an ILSVRC evaluation protocol averages, each a uint8 CHW tensor:
    - `center`: shorter side to `resize_size`, the centre `crop_size` square (1 view, torchvision's protocol);
    - `10crop`: shorter side to `resize_size`, then the four corner crops and the centre crop, then the same five
      mirrored. `ten_crop_region="image"` takes the corners of the whole resized image (torchvision's TenCrop);
      `"center_square"` those of its central `resize_size` square, as AlexNet's "standard 10-crop" did on its
      256 x 256 images (Krizhevsky et al. 2012), the protocol He et al. cite for Table 3;
    - `multiscale`: the whole image with its shorter side at each of `scales`, uncropped, and mirrored if `flip`
      (the fully-convolutional test of He et al. Table 4; global average pooling absorbs the size).
    Resizing is bilinear with antialiasing, as in torchvision's weights' own transforms."""

    def __init__(
        self,
        protocol: Protocol = "center",
        *,
        crop_size: int = 224,
        resize_size: int = 256,
        scales: Sequence[int] = PAPER_SCALES,
        flip: bool = True,
        ten_crop_region: Literal["image", "center_square"] = "image",
    ):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        if ten_crop_region not in ("image", "center_square"):
            raise ValueError(f"ten_crop_region={ten_crop_region!r}: expected image or center_square")
        self.ten_crop_region = ten_crop_region
        if protocol != "multiscale" and resize_size < crop_size:
            raise ValueError(f"resize_size={resize_size} is smaller than crop_size={crop_size}")
        if protocol == "multiscale" and (not scales or min(scales) < 32):
            raise ValueError(f"scales={list(scales)}: expected one or more shorter sides of at least 32 pixels")
        self.protocol, self.flip, self.scales = protocol, flip, tuple(int(s) for s in scales)
        self.crop_size, self.resize_size = crop_size, resize_size
        self._resize = v2.Resize(resize_size, antialias=True)
        self._crops = v2.CenterCrop(crop_size) if protocol == "center" else v2.TenCrop(crop_size)

    @property
    def views_per_image(self) -> int:
        return {"center": 1, "10crop": 10}.get(self.protocol, len(self.scales) * (2 if self.flip else 1))

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        if self.protocol == "center":
            return [self._crops(self._resize(image))]
        if self.protocol == "10crop":
            resized = self._resize(image)
            if self.ten_crop_region == "center_square":
                resized = v2.functional.center_crop(resized, [min(resized.shape[-2:])] * 2)
            return list(self._crops(resized))
        views = []
        for scale in self.scales:
            view = v2.functional.resize(image, scale, antialias=True)
            views += [view, view.flip(-1)] if self.flip else [view]
        return views

    def describe(self) -> str:
        if self.protocol == "multiscale":
            return f"multiscale: shorter side {list(self.scales)}{', + flips' if self.flip else ''}"
        square = ", corners of the central square" if self.protocol == "10crop" and self.ten_crop_region == "center_square" else ""
        return f"{self.protocol}: resize {self.resize_size}, crop {self.crop_size}{square}"


def normalize_batch(
    images: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 NCHW batch to float32, scaled to 0-1 and normalised per channel."""
    x = images.float().div_(255.0)
    m, s = _channel_constants(tuple(mean), tuple(std), x.device)
    return x.sub_(m).div_(s)


@functools.lru_cache(maxsize=16)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1) float32 mean and std on `device`, made once: a tensor built from Python numbers on a GPU is a
    synchronous host-to-device copy, which would stall every training step."""
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    return as_tensor(mean), as_tensor(std)
