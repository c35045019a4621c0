"""The networks by name, the one registry training, weights loading and evaluation take: torchvision's ResNets
(`resnet50`: torchvision.models.get_model) and timm's ResNet family (`timm:resnet50d`: the models of
timm.models.resnet, e.g. ResNet-D, SE-ResNet, ResNeXt, ResNet-RS), optionally with BlurPool before strided
convolutions, and a classifier head that computes in float32 under autocast. State-dict keys stay the library's
in every variant."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, get_args

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

# torchvision's networks by name; timm's are `timm:<name>` (check_arch). `Arch` is a string: the timm names come
# from the installed timm (timm.list_models(module="resnet")), 81 in timm 1.0.
TorchvisionArch = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
ARCHS: tuple[str, ...] = get_args(TorchvisionArch)
Arch = str
TIMM = "timm:"


def timm_archs() -> list[str]:
    """timm's ResNet family (the models of timm.models.resnet) as `timm:<name>`."""
    import timm

    return [TIMM + name for name in timm.list_models(module="resnet")]


def check_arch(arch: str) -> str:
    """`arch` when it names a network of the registry.

    Raises:
        ValueError: an unknown name, with the choices (and the nearest timm names for a `timm:` one).
    """
    if arch in ARCHS:
        return arch
    if arch.startswith(TIMM):
        known = timm_archs()
        if arch in known:
            return arch
        import difflib

        if arch.partition(".")[0] in known:  # `timm:resnet50.a1_in1k`: a weights tag, not a network
            raise ValueError(f"model.arch={arch!r}: .{arch.partition('.')[2]} names weights, not a network: use "
                             f"{arch.partition('.')[0]} (pretrained weights: --model.pretrained FILE; to evaluate "
                             f"them: resnet evaluate --weights {arch})")
        near = difflib.get_close_matches(arch, known, n=4, cutoff=0.6)
        raise ValueError(f"model.arch={arch!r}: not in timm's ResNet family ({len(known)} models of "
                         f"timm.models.resnet){'; nearest: ' + ', '.join(near) if near else ''}")
    raise ValueError(f"model.arch={arch!r}: expected one of torchvision's {', '.join(ARCHS)} or timm:<name> of timm's "
                     "ResNet family (e.g. timm:resnet50d)")


def num_outputs(net: nn.Module) -> int:
    """The classes a network scores: its last Linear layer's outputs (torchvision's `fc`, wherever a variant puts
    its classifier).

    Raises:
        ValueError: a network without a Linear layer.
    """
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(net).__name__}: no Linear classifier to count the classes of")
    return linears[-1].out_features


class Float32Head(nn.Linear):
    """The classifier: a Linear layer that computes in float32 whatever autocast or the weights' dtype says, so
    bf16 training and evaluation get float32 logits and softmax (a bf16 logit keeps 8 bits of mantissa: near-equal
    classes would tie). Returns float32 [N, out_features]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


class BlurPoolConv2d(nn.Conv2d):
    """A strided convolution that first blurs its input with a 3x3 binomial filter ([1, 2, 1] x [1, 2, 1] / 16,
    stride 1, zero padding): anti-aliased downsampling (Zhang 2019, "Making Convolutional Networks Shift-Invariant
    Again"), placed as FFCV's ResNet recipes place it. The blur is timm's BlurPool2d; its filter is a
    non-persistent buffer, so the state dict holds only the convolution's own tensors."""

    def __init__(self, conv: nn.Conv2d):
        from timm.layers import BlurPool2d

        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                         bias=conv.bias is not None, padding_mode=conv.padding_mode)
        self.load_state_dict(conv.state_dict())
        self.blur = BlurPool2d(conv.in_channels, filt_size=3, stride=1, pad_mode="constant")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.blur(x))


def add_blurpool(net: nn.Module) -> int:
    """Replace every convolution with stride > 1 and at least 16 input channels (FFCV's rule: not the RGB stem) by
    a BlurPoolConv2d, in place; returns how many. ResNet-50: the 3x3 and the shortcut 1x1 of the first block of
    layers 2-4 (6)."""
    count = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Conv2d and max(child.stride) > 1 and child.in_channels >= 16:
                setattr(module, name, BlurPoolConv2d(child))
                count += 1
    return count


def _float32_head(net: nn.Module) -> None:
    """Replace the network's last Linear layer (its classifier: `fc` in torchvision's and timm's ResNets) by a
    Float32Head with the same weights, in place."""
    name = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, attr = name.rpartition(".")
    old = getattr(net.get_submodule(parent), attr)
    head = Float32Head(old.in_features, old.out_features, bias=old.bias is not None)
    head.load_state_dict(old.state_dict())
    setattr(net.get_submodule(parent), attr, head)


def build_resnet(arch: Arch, num_classes: int = 1000, zero_init_residual: bool = False, blurpool: bool = False) -> nn.Module:
    """The network `arch` names (check_arch), randomly initialised: torchvision's ResNet (v1.5: stride 2 on the
    bottleneck's 3x3) or timm's model (timm.create_model, its `zero_init_last` set from `zero_init_residual`), with
    a float32 head (Float32Head) and, with `blurpool`, BlurPool before its strided convolutions (add_blurpool).

    Raises:
        ValueError: an unknown `arch` (check_arch).
    """
    check_arch(arch)
    if arch.startswith(TIMM):
        import timm

        net = timm.create_model(arch.removeprefix(TIMM), pretrained=False, num_classes=num_classes,
                                zero_init_last=zero_init_residual)
    else:
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes,
                                           zero_init_residual=zero_init_residual)
    _float32_head(net)
    if blurpool:
        add_blurpool(net)
    return net


def not_a_file(path: str) -> Optional[str]:
    """Why `path` cannot be the file an option asks for ("no such file", "a folder, not a file"), or None."""
    return None if Path(path).is_file() else "a folder, not a file" if Path(path).is_dir() else "no such file"


def read_torch_file(path: str, option: str, weights_only: bool = True, mmap: bool = False, hint: str = ""):
    """`torch.load(path)` on the CPU (`mmap`: memory-mapped where the file allows: not torch's pre-1.6 format), with
    errors that name `option` and `path` (`hint`: added to them).

    Raises:
        ValueError: the file is cut short or damaged (torch says so with zip, pickle, struct or runtime errors
            alike), or holds objects a weights-only load refuses (its cause says which).
    """
    if Path(path).stat().st_size == 0:  # torch would say EOFError with no text
        raise ValueError(f"{option} {path}: an empty file (0 bytes): a copy or a save that did not finish?")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and "mmap" in str(e)):
                raise
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # cut short (a copy, or a job that ended mid-write), not a torch file, or refused objects
        text = str(e).split("WeightsUnpickler error:")[-1]  # a weights-only refusal's cause comes after its advice
        cause = next((line.strip() for line in text.splitlines() if line.strip()), "").split(". ")[0][:200]
        raise ValueError(f"{option} {path}: cannot read it, damaged or cut short?{hint} "
                         f"({type(e).__name__}: {cause})") from e


def network_state_dict(checkpoint: dict) -> dict:
    """The network's weights in a `resnet fit` checkpoint: its state_dict's `net.` keys, without the prefix."""
    return {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}


def load_state_dict_file(net: nn.Module, path: str) -> None:
    """Load a torchvision-format state dict (`conv1.weight`, ..., `fc.bias`) from a file, strictly; a `resnet fit`
    checkpoint's network (its `net.` keys) is taken as well.

    Raises:
        ValueError: no such file, a file torch cannot read (damaged, cut short), or another network's weights.
    """
    if problem := not_a_file(path):
        raise ValueError(f"model.pretrained {path}: {problem}")
    state = read_torch_file(path, "model.pretrained")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and "pytorch-lightning_version" in state:
        state = network_state_dict(state)
    own = net.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path}: not a state dict of this model; missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatch {shapes[:3]}"
        )
    net.load_state_dict(state)
