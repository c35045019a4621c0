"""Networks to evaluate: our Lightning checkpoints, torchvision's or timm's published weights by name, or a state-dict
file."""

from __future__ import annotations

import math
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torchvision
from torch import nn

from train.networks import ARCHS, TIMM, build_resnet, check_arch, network_state_dict, not_a_file, read_torch_file

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
    matrices = [v for k, v in state.items() if k.endswith(".weight") and v.ndim == 2]  # the classifier is the last
    if not matrices:
        raise ValueError(f"{source}: no classifier weight in the state dict; expected {arch} keys (conv1.weight ... fc.bias)")
    net = build_resnet(arch, num_classes=matrices[-1].shape[0], blurpool=blurpool)
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{source}: not a {arch} state dict; missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    return net


def load_checkpoint(path: str) -> LoadedModel:
    """The network of a `resnet fit` checkpoint, with the class names it was trained on."""
    if problem := not_a_file(path):
        raise FileNotFoundError(f"--ckpt {path}: {problem}")
    ckpt = read_torch_file(path, "--ckpt", weights_only=False)  # our own file: hparams hold plain Python
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"--ckpt {path}: not a Lightning checkpoint of `resnet fit` (no state_dict/hyper_parameters)")
    hp = ckpt["hyper_parameters"]
    state = network_state_dict(ckpt)
    net = _net_from_state(state, hp["arch"], path, blurpool=bool(hp.get("blurpool", False)))
    classes = ckpt.get("ImageNetDataModule", {}).get("classes")  # absent from checkpoints of older versions
    run = Path(path).resolve().parent
    run = run.parent if run.name == "checkpoints" else run  # <run dir>/checkpoints/best.ckpt -> "<run dir>/best"
    return LoadedModel(net, hp["arch"], f"{hp['arch']} {run.name}/{Path(path).stem}", classes or None,
                       wandb_run=ckpt.get("wandb_run") or {}, hparams=dict(hp), config=ckpt.get("config") or "")


def load_timm_weights(spec: str) -> LoadedModel:
    """`timm:resnet50.a1_in1k`: timm's pretrained weights of a ResNet-family model, through the Hugging Face Hub's
    download cache (HF_HUB_OFFLINE=1 reads the cache alone). `resize_size` is the weights' own resize before the 224
    centre crop, 224 / `crop_pct` (235 for a1_in1k), which `resnet evaluate` suggests (it resizes to 256 unless
    told); timm evaluates with bicubic resizing, this with bilinear.

    Raises:
        ValueError: a model outside timm's ResNet family, a tag timm does not have, or weights normalised with
            other than ImageNet's mean and std.
        ConnectionError: the weights neither in the cache nor downloadable.
    """
    import timm

    name = spec.removeprefix(TIMM)
    arch = TIMM + name.partition(".")[0]
    check_arch(arch)
    if "." not in name and timm.get_pretrained_cfg(name) is not None:  # timm's default weights of the model
        name = f"{name}.{timm.get_pretrained_cfg(name).tag}"
    if name not in timm.list_pretrained(name.partition(".")[0] + ".*"):
        tags = ", ".join(timm.list_pretrained(name.partition(".")[0] + ".*")) or "none"
        raise ValueError(f"--weights {spec}: timm has no such pretrained weights; it has {tags}")
    cfg = timm.get_pretrained_cfg(name)
    if tuple(cfg.mean) != (0.485, 0.456, 0.406) or tuple(cfg.std) != (0.229, 0.224, 0.225):
        raise ValueError(f"--weights {spec}: normalised with mean {cfg.mean} / std {cfg.std}; evaluation here "
                         "normalises with ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)")
    try:
        net = timm.create_model(name, pretrained=True)
    except Exception as e:  # huggingface_hub's offline and HTTP errors have no common base beyond these
        if isinstance(e, (OSError, ConnectionError)) or "offline" in str(e).lower() or "connect" in str(e).lower():
            from huggingface_hub import constants

            raise ConnectionError(
                f"--weights {spec}: not in the Hugging Face Hub cache {constants.HF_HUB_CACHE} and not downloadable "
                f"({type(e).__name__}); download them where there is a network (same HF_HOME) and rerun; "
                "HF_HUB_OFFLINE=1 reads the cache without trying the network"
            ) from e
        raise
    state = net.state_dict()
    loaded = _net_from_state(state, arch, spec)
    return LoadedModel(loaded, arch, f"{arch} {cfg.tag} (timm)", None,
                       resize_size=math.floor(224 / cfg.crop_pct + 1e-9))


def load_weights(spec: str) -> LoadedModel:
    """`torchvision:resnet50.IMAGENET1K_V1` (through torchvision's download cache), `timm:resnet50.a1_in1k`
    (load_timm_weights) or a torchvision-format state-dict file.

    Raises:
        FileNotFoundError: a state-dict file that does not exist.
        ValueError: an unknown model or weights name, a file that is no ResNet state dict, or a damaged file in
            torchvision's download cache (named, with the fix: delete it and rerun).
        ConnectionError: torchvision's weights neither in the cache nor downloadable.
    """
    if spec.startswith(TIMM):
        return load_timm_weights(spec)
    if not spec.startswith("torchvision:"):
        if problem := not_a_file(spec):
            raise FileNotFoundError(f"--weights {spec}: {problem} (or use torchvision:<arch>.<weights>, e.g. torchvision:resnet50.IMAGENET1K_V2, or timm:<model>.<tag>, e.g. timm:resnet50.a1_in1k)")
        state = read_torch_file(spec, "--weights", hint=" (a Lightning checkpoint? evaluate it with --ckpt)")
        if isinstance(state, dict) and "state_dict" in state and "pytorch-lightning_version" in state:
            raise ValueError(f"--weights {spec}: a Lightning checkpoint; evaluate it with --ckpt {spec}")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"--weights {spec}: not a state dict of tensors (a torchvision-format .pth file)")
        arch = infer_arch(state)
        return LoadedModel(_net_from_state(state, arch, spec), arch, f"{arch} ({Path(spec).name})", None)
    arch, _, tag = spec.removeprefix("torchvision:").partition(".")
    tag = tag or "DEFAULT"  # torchvision's recommended weights of the model, as timm's default tag
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
