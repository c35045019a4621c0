"""`resnet evaluate`: a checkpoint or published weights under an ILSVRC protocol (center, 10-crop, multi-scale),
on 1 or N processes with identical numbers; saves per-image probabilities for `resnet ensemble`."""

from __future__ import annotations

import datetime
import hashlib
import inspect
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Literal, Optional, Union

import lightning.pytorch as pl
import torch
from jsonargparse import ActionConfigFile
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from rich.table import Table
from torch import nn

from datamodules.evaluation import EvalDataModule, ViewBatch
from datamodules.prepare_io import disk_full
from datamodules.transforms import PAPER_SCALES, EvalViews, Protocol, normalize_batch
from train.callbacks import git_commit
from train.results import console as results_console, save_result, topk_accuracy
from train.networks import num_outputs
from train.weights import LoadedModel, load_checkpoint, load_weights
from train.wandb_logging import log_evaluation, log_safely, run_dir_of, wanted

# Views through the network per forward, in pixels: 640 views of 224x224 (~32M pixels), i.e. the default batch
# of 64 images x 10 crops in one forward, or ~58 views of 640x853 at multiscale's largest scale. ResNet-50 in
# bf16: ~1 GiB per activation tensor of the first stages, a few GiB at peak.
DEFAULT_MAX_PIXELS = 640 * 224 * 224
# The Trainer options that matter to an evaluation (the rest are about training).
TRAINER_OPTIONS = {"accelerator", "strategy", "devices", "num_nodes", "precision", "plugins", "enable_progress_bar"}


class ViewAveraging(pl.LightningModule):
    """Averages the softmax of a network over each image's views and collects the per-image probabilities of all
    ranks, in dataset order, on every rank (`self.result`)."""

    def __init__(self, net: nn.Module, *, channels_last: bool = False, max_pixels_per_forward: int = DEFAULT_MAX_PIXELS):
        super().__init__()
        self.net = net.eval()
        self.channels_last = channels_last
        self.max_pixels_per_forward = max_pixels_per_forward
        self.num_classes = num_outputs(net)
        self.result: Optional[dict[str, torch.Tensor]] = None
        self.images_per_sec = float("nan")

    def configure_model(self) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def average_views(self, groups: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> torch.Tensor:
        """[batch_size, classes] float32: the mean softmax over each image's views. Same-size views go through
        the network together, `max_pixels_per_forward` at a time."""
        total = torch.zeros(batch_size, self.num_classes, device=self.device, dtype=torch.float32)
        counts = torch.zeros(batch_size, device=self.device, dtype=torch.float32)
        dtype = next(self.net.parameters()).dtype
        for views, owners in groups:
            per_forward = max(1, self.max_pixels_per_forward // (views.shape[-2] * views.shape[-1]))
            for chunk, chunk_owners in zip(views.split(per_forward), owners.split(per_forward)):
                x = normalize_batch(chunk).to(dtype)  # bf16-true / 16-true: inputs in the weights' dtype
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                total.index_add_(0, chunk_owners, self.net(x).float().softmax(dim=1))
            counts.index_add_(0, owners, torch.ones_like(owners, dtype=counts.dtype))
        return total / counts[:, None]

    def on_test_start(self) -> None:
        # Every rank scans its own file system (node-local copies of val/ are common): a rank missing a file
        # would pair probabilities with the wrong ids, or hang on unequal batch counts.
        samples = self.trainer.datamodule.dataset.samples
        ids = "\n".join(f"{Path(path).name} {label}" for path, label in samples).encode()
        digest = torch.tensor(int(hashlib.sha1(ids).hexdigest()[:15], 16), device=self.device)
        if not bool((self.all_gather(digest) == digest).all()):
            raise ValueError(
                f"the ranks see different image lists under {self.trainer.datamodule.root} "
                f"(this rank: {len(samples)} images); every node needs the same val/ folder"
            )

    def on_test_epoch_start(self) -> None:
        self._probs, self._labels, self._indices = [], [], []
        self._t_start, self._t_first, self._images = time.perf_counter(), None, [0, 0]

    def test_step(self, batch: ViewBatch, batch_idx: int) -> None:
        groups, labels, indices = batch
        self._probs.append(self.average_views(groups, labels.numel()))
        self._labels.append(labels)
        self._indices.append(indices)
        self._images[0] += labels.numel()
        if self._t_first is None:  # throughput after the first batch: loader start-up and warm-up excluded
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._t_first = time.perf_counter()
        else:
            self._images[1] += labels.numel()

    def on_test_epoch_end(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.trainer.strategy.barrier()  # the slowest rank's time: all images are done only then
        now = time.perf_counter()
        images, after_first = self.trainer.strategy.reduce(torch.tensor(self._images, dtype=torch.float64, device=self.device), reduce_op="sum").tolist()
        # One batch only: the whole loop, start-up included, is all there is to time.
        self.images_per_sec = after_first / (now - self._t_first) if after_first else images / (now - self._t_start)
        probs = torch.cat(self._probs) if self._probs else torch.zeros(0, self.num_classes, device=self.device, dtype=torch.float32)
        labels = torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.long, device=self.device)
        indices = torch.cat(self._indices) if self._indices else torch.zeros(0, dtype=torch.long, device=self.device)
        # all_gather needs equal shapes: pad every rank's shard to the longest (index -1 marks padding).
        longest = int(self.all_gather(torch.tensor(len(indices), device=self.device)).max())
        pad = longest - len(indices)
        probs = torch.cat([probs, probs.new_zeros(pad, self.num_classes)])
        labels = torch.cat([labels, labels.new_full((pad,), -1)])
        indices = torch.cat([indices, indices.new_full((pad,), -1)])
        probs, labels, indices = (self.all_gather(t) for t in (probs, labels, indices))
        probs, labels, indices = probs.reshape(-1, self.num_classes), labels.reshape(-1), indices.reshape(-1)
        keep = indices >= 0
        order = indices[keep].argsort()
        self.result = {k: v[keep][order].cpu() for k, v in (("probs", probs), ("labels", labels), ("indices", indices))}


def _parse_scales(scales: Union[list[int], str]) -> tuple[int, ...]:
    if isinstance(scales, str):
        try:
            return tuple(int(s) for s in scales.replace(" ", "").split(",") if s)
        except ValueError:
            raise ValueError(f"--scales {scales!r}: expected comma-separated integers, e.g. 224,256,384,480,640") from None
    return tuple(int(s) for s in scales)


def evaluate(
    ckpt: Optional[str] = None,
    weights: Optional[str] = None,
    protocol: Protocol = "center",
    scales: Union[list[int], str] = list(PAPER_SCALES),
    crop_size: int = 224,
    resize_size: Optional[int] = None,
    flip: bool = True,
    ten_crop_region: Literal["image", "center_square"] = "image",
    output: Optional[str] = None,
    channels_last: Optional[bool] = None,
    max_pixels_per_forward: int = DEFAULT_MAX_PIXELS,
    wandb: Optional[bool] = None,
    data: Optional[dict] = None,
    trainer: Optional[dict] = None,
) -> Optional[dict]:
    """Evaluate one model under one ILSVRC protocol; prints and (with `output`) saves the result.

    Args:
        ckpt: a `resnet fit` checkpoint (e.g. runs/imagenet_r50/checkpoints/best.ckpt).
        weights: instead of `ckpt`: `torchvision:<arch>.<name>` (e.g. torchvision:resnet50.IMAGENET1K_V1,
            fetched through torchvision's download cache), `timm:<model>.<tag>` (e.g. timm:resnet50.a1_in1k, through
            the Hugging Face Hub cache) or a torchvision-format state-dict file.
        protocol: `center` (1 crop), `10crop` (corners + centre, and flips) or `multiscale` (fully convolutional).
        scales: multiscale shorter sides, e.g. 224,256,384,480,640 (He et al. 2015, Table 4).
        crop_size: center and 10crop crop side.
        resize_size: center and 10crop shorter side before cropping; None = 256 (torchvision's V2 weights
            were published with 232 for ResNet-50: pass it to reproduce their number).
        flip: multiscale: also the mirrored image at every scale.
        ten_crop_region: 10crop: the corners of the whole resized image (`image`, torchvision's TenCrop) or of its
            central square (`center_square`: AlexNet's 10-crop on 256 x 256 images, which He et al. 2015 cite for
            their Table 3).
        output: result file (.pt: per-image float16 probabilities, labels, ids, metrics); a .json of the
            metrics is written beside it.
        channels_last: NHWC network and inputs; None = on a GPU.
        max_pixels_per_forward: views through the network per forward, counted in pixels (bounds GPU memory).
        wandb: log the result to W&B: table `eval/<protocol>` and summaries `eval/<protocol>/top1_err`, ... in the
            checkpoint's training run (a new run for --weights); offline without an API key. None: when the
            checkpoint was trained with W&B.
    """
    if (ckpt is None) == (weights is None):
        raise ValueError("give exactly one of --ckpt PATH or --weights torchvision:<arch>.<weights>|timm:<model>.<tag>|FILE")
    loaded: LoadedModel = load_checkpoint(ckpt) if ckpt else load_weights(weights)
    views = EvalViews(
        protocol, crop_size=crop_size, resize_size=resize_size or 256,
        scales=_parse_scales(scales), flip=flip, ten_crop_region=ten_crop_region,
    )
    datamodule = EvalDataModule(**(data or {}), views=views, classes=loaded.classes)
    trainer_args = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False, "use_distributed_sampler": False, **(trainer or {})}
    cuda = torch.cuda.is_available() and trainer_args.get("accelerator") in (None, "auto", "gpu", "cuda")
    if trainer_args.get("precision") is None:
        trainer_args["precision"] = "bf16-mixed" if cuda else "32-true"
    module = ViewAveraging(
        loaded.net, channels_last=cuda if channels_last is None else channels_last, max_pixels_per_forward=max_pixels_per_forward
    )
    # Lightning's start-up chatter (accelerators, tips) would bury the one table this command prints.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    runner = pl.Trainer(**trainer_args)
    if isinstance(runner.strategy.launcher, _MultiProcessingLauncher):
        raise ValueError(
            f"--trainer.strategy {trainer_args.get('strategy')}: spawned processes cannot hand the result back; "
            "use ddp (or launch one process per device with srun/torchrun)"
        )
    datamodule.trainer = runner  # setup() below reads the world size
    datamodule.setup("test")
    if len(datamodule.classes) != module.num_classes:
        raise ValueError(
            f"{loaded.name} predicts {module.num_classes} classes but {datamodule.root} gives {len(datamodule.classes)} "
            f"({'its sorted class folders' if loaded.classes is None else 'the checkpoint'}): another dataset?"
        )
    if loaded.classes is None and module.num_classes == 1000 and not all(re.fullmatch(r"n\d{8}", c) for c in datamodule.classes):
        odd = [c for c in datamodule.classes if not re.fullmatch(r"n\d{8}", c)][:3]
        raise ValueError(
            f"{loaded.name}: ImageNet-1k weights index the 1000 WordNet ids (n01440764, ...) in sorted order, but "
            f"{datamodule.root} has class folders {odd}: name the folders by their wnids (see README, ImageNet layout)"
        )
    runner.test(module, datamodule=datamodule, verbose=False)
    if not runner.is_global_zero:
        return None
    res = module.result
    if not torch.equal(res["indices"], torch.arange(len(datamodule.dataset))):
        raise RuntimeError(f"evaluation saw {len(res['indices'])} images (with repeats or gaps), expected each of {len(datamodule.dataset)} once")
    metrics = topk_accuracy(res["probs"], res["labels"])  # float32: no float16 ties decide a number
    result = {
        "model": loaded.name, "source": ckpt or weights, "arch": loaded.arch, "protocol": protocol, "views": views.views_per_image,
        "views_detail": views.describe(), **metrics, "images_per_sec": module.images_per_sec,
        "precision": str(trainer_args["precision"]), "world_size": runner.world_size, "published": loaded.published, "weights_resize_size": loaded.resize_size,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
        "ids": datamodule.ids, "labels": res["labels"], "classes": datamodule.classes, "probs": res["probs"].half(),
        "resize_size": views.resize_size, "crop_size": views.crop_size, "scales": list(views.scales),
        "ten_crop_region": views.ten_crop_region,
        "wandb_run": loaded.wandb_run,  # `resnet ensemble` logs into its project
    }
    print_result(result)
    if output:
        save_result(output, result)
        results_console().print(f"wrote {output} and {Path(output).with_suffix('.json')}")
    if wanted(wandb, [loaded.wandb_run]):
        log_safely("evaluation", log_evaluation, result, loaded.wandb_run, run_dir_of(ckpt, output))
    return result


def print_result(result: dict) -> None:
    table = Table(title=f"{result['model']}, {result['views_detail']} (in %)")
    for col in ("images", "views", "top-1 err.", "top-5 err.", "acc1", "acc5", "images/s"):
        table.add_column(col, justify="right")
    table.add_row(
        str(result["images"]), str(result["views"]), f"{result['top1_err']:.2f}", f"{result['top5_err']:.2f}",
        f"{result['acc1']:.2f}", f"{result['acc5']:.2f}", f"{result['images_per_sec']:.1f}",
    )
    console = results_console()
    console.print(table)
    if result["published"]:
        pub = result["published"]
        console.print(f"published (torchvision, center crop, resize {pub['resize_size']}): acc1 {pub['acc@1']}, acc5 {pub['acc@5']}")
        if result["protocol"] != "multiscale" and pub["resize_size"] != result["resize_size"]:
            console.print(f"torchvision's number used resize {pub['resize_size']}: add --resize_size {pub['resize_size']} to match it")
    own = result.get("weights_resize_size")
    if not result["published"] and own and result["protocol"] != "multiscale" and own != result["resize_size"]:
        console.print(f"the weights' own protocol resizes to {own} (timm: 224 / crop_pct): add --resize_size {own} to "
                      "match it")


def evaluate_parser() -> LightningArgumentParser:
    parser = LightningArgumentParser(prog="resnet evaluate", allow_abbrev=False, description=evaluate.__doc__.split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="yaml file with any of the options below")
    parser.add_function_arguments(evaluate, skip={"data", "trainer"})
    parser.add_class_arguments(EvalDataModule, "data", skip={"views", "classes"})
    parser.add_class_arguments(pl.Trainer, "trainer", skip=set(inspect.signature(pl.Trainer).parameters) - TRAINER_OPTIONS)
    parser.set_defaults({"trainer.precision": None})
    return parser


def evaluate_main(args: list[str]) -> None:
    parser = evaluate_parser()
    cfg = parser.parse_args(args)
    options = cfg.as_dict()
    options.pop("config", None)
    try:
        evaluate(**options)
    except (ValueError, OSError) as e:  # bad input: name the cause, no traceback
        exit_with_error("resnet evaluate", e)


def exit_with_error(prog: str, error: BaseException | str,
                    again: str = "run the same command again (files already complete are kept)") -> None:
    """One line on stderr, `PROG: error: ...`, and exit 2 (bad input); or 1 for a full disk or quota (ENOSPC,
    EDQUOT, also under another error), with what to do: free space, then `again`."""
    full = disk_full(error)
    if full is not None:
        where = f" writing {full.filename}" if full.filename else ""
        print(f"{prog}: error: {os.strerror(full.errno)}{where}: that file system, or your quota on it, is full. "
              f"Free space or write elsewhere, then {again}", file=sys.stderr)
        raise SystemExit(1)
    print(f"{prog}: error: {error}", file=sys.stderr)
    raise SystemExit(2)
