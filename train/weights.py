"""Networks to evaluate: our Lightning checkpoints, torchvision's published weights by name, or a state-dict file."""

from __future__ import annotations

import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torchvision
from torch import nn

from train.networks import ARCHS, build_resnet

# Residual blocks per stage and block type of each depth (He et al. 2015, Table 1).
_LAYOUTS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}


@dataclass
class LoadedModel:
    net: nn.Module
    arch: str
    name: str  # what the results table shows: the checkpoint path or the weights' name
    classes: Optional[list[str]]  # output order by class name; None = sorted folder names of the data
    resize_size: Optional[int] = None  # the resize of the weights' published number (torchvision V2 R50: 232)
    published: dict = field(default_factory=dict)  # the weights' published single-crop acc@1/acc@5
    wandb_run: dict = field(default_factory=dict)  # the W&B run that trained it (id, project, entity), if any
    hparams: dict = field(default_factory=dict)  # a checkpoint's model hyperparameters
    config: str = ""  # a checkpoint's resolved training config (YAML)


def infer_arch(state: dict[str, torch.Tensor]) -> str:
    """The torchvision ResNet depth a state dict belongs to, from its blocks per stage."""
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    arch = _LAYOUTS.get((blocks, "layer1.0.conv3.weight" in state))
    if arch is None:
        raise ValueError(f"not a torchvision ResNet state dict: blocks per stage {blocks}")
    return arch


def _net_from_state(state: dict[str, torch.Tensor], arch: str, source: str, blurpool: bool = False) -> nn.Module:
    """The network a state dict belongs to. `blurpool` (a checkpoint's hyperparameter): BlurPool's filters are not
    in the state dict, so only the checkpoint can say the network had them; a plain state-dict file is taken as a
    plain ResNet."""
    if "fc.weight" not in state:
        raise ValueError(f"{source}: no fc.weight in the state dict; expected torchvision ResNet keys (conv1.weight ... fc.bias)")
    net = build_resnet(arch, num_classes=state["fc.weight"].shape[0], blurpool=blurpool)
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{source}: not a {arch} state dict; missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    return net


def _load(path: str, option: str, weights_only: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # torch reports a bad file as pickle, zip, struct or runtime errors alike
        hint = " (a Lightning checkpoint? evaluate it with --ckpt)" if option == "--weights" else ""
        raise ValueError(f"{option} {path}: cannot read it{hint} ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def load_checkpoint(path: str) -> LoadedModel:
    """The network of a `resnet fit` checkpoint, with the class names it was trained on."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--ckpt {path}: no such file")
    ckpt = _load(path, "--ckpt", weights_only=False)  # our own file: hparams hold plain Python
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"--ckpt {path}: not a Lightning checkpoint of `resnet fit` (no state_dict/hyper_parameters)")
    hp = ckpt["hyper_parameters"]
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net = _net_from_state(state, hp["arch"], path, blurpool=bool(hp.get("blurpool", False)))
    classes = ckpt.get("ImageNetDataModule", {}).get("classes")  # absent from checkpoints of older versions
    run = Path(path).resolve().parent
    run = run.parent if run.name == "checkpoints" else run  # <run dir>/checkpoints/best.ckpt -> "<run dir>/best"
    return LoadedModel(net, hp["arch"], f"{hp['arch']} {run.name}/{Path(path).stem}", classes or None,
                       wandb_run=ckpt.get("wandb_run") or {}, hparams=dict(hp), config=ckpt.get("config") or "")


def load_weights(spec: str) -> LoadedModel:
    """`torchvision:resnet50.IMAGENET1K_V1` (through torchvision's download cache) or a state-dict file.

    Raises:
        FileNotFoundError: a state-dict file that does not exist.
        ValueError: an unknown model or weights name, a file that is no ResNet state dict, or a damaged file in
            torchvision's download cache (named, with the fix: delete it and rerun).
        ConnectionError: torchvision's weights neither in the cache nor downloadable.
    """
    if not spec.startswith("torchvision:"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"--weights {spec}: no such file (or use torchvision:<arch>.<weights>, e.g. torchvision:resnet50.IMAGENET1K_V2)")
        state = _load(spec, "--weights", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and "pytorch-lightning_version" in state:
            raise ValueError(f"--weights {spec}: a Lightning checkpoint; evaluate it with --ckpt {spec}")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"--weights {spec}: not a state dict of tensors (a torchvision-format .pth file)")
        arch = infer_arch(state)
        return LoadedModel(_net_from_state(state, arch, spec), arch, f"{arch} ({Path(spec).name})", None)
    arch, _, tag = spec.removeprefix("torchvision:").partition(".")
    if arch not in ARCHS:
        raise ValueError(f"--weights {spec}: unknown model {arch!r}; expected one of {', '.join(ARCHS)}")
    enum = torchvision.models.get_model_weights(arch)
    if tag not in enum.__members__:
        raise ValueError(f"--weights {spec}: {arch} has weights {', '.join(enum.__members__)}, not {tag!r}")
    weights = enum[tag]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        state = weights.get_state_dict(progress=True)
    except Exception as e:  # torch.load reports a bad file as pickle, zip, EOF or runtime errors alike
        if cached.is_file():  # read from the cache (or just downloaded into it): that file is bad, not the network
            reason = (str(e).strip().splitlines() or [""])[0][:120]
            raise ValueError(
                f"--weights {spec}: cannot read torchvision's cached download {cached} ({type(e).__name__}: {reason}): "
                f"the file is damaged or incomplete. Delete it (rm {cached}) and rerun to download it again"
            ) from e
        if isinstance(e, (urllib.error.URLError, OSError)):
            raise ConnectionError(
                f"--weights {spec}: cannot download {weights.url} ({e}); offline, put that file at {cached} "
                "or pass its path as --weights"
            ) from e
        raise
    net = _net_from_state(state, arch, spec)
    transforms = weights.transforms()
    return LoadedModel(
        net, arch, f"{arch} {weights.name} (torchvision)", None,
        resize_size=transforms.resize_size[0],
        published={**weights.meta["_metrics"]["ImageNet-1K"], "resize_size": transforms.resize_size[0]},
    )
