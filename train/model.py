"""The LightningModule: a torchvision ResNet with its loss, metrics and optimizer."""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path
from typing import Literal, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from datamodules.folder import DatasetLayoutError
from train.networks import Arch, build_resnet, load_state_dict_file
from train.optim import Schedule, lr_factor, make_optimizer, param_groups, scaled_lr


def is_log_step(trainer: pl.Trainer, step: int, batch_idx: int) -> bool:
    """Whether Lightning sends the values logged for training batch `batch_idx`, which completes optimizer step
    `step` (1-based: `global_step` after the step, `global_step + 1` inside `training_step`), to the loggers: the
    batch that steps the optimizer (gradient accumulation) at every `log_every_n_steps`-th step, or when the
    trainer is stopping. Values needed only there are computed only there: other steps never wait for the GPU."""
    n = trainer.log_every_n_steps
    steps = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
    return n > 0 and steps and (step % n == 0 or trainer.should_stop)


class ImageNetClassifier(pl.LightningModule):
    def __init__(
        self,
        arch: Arch = "resnet50",
        num_classes: Optional[int] = None,
        zero_init_residual: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        pretrained: Optional[str] = None,
        label_smoothing: float = 0.0,
        lr_per_256: float = 0.1,
        batch_size: int = 256,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        weight_decay_norm_and_bias: bool = False,
        optimizer: Literal["sgd", "lars"] = "sgd",
        lars_trust_coefficient: float = 0.001,
        lr_schedule: Schedule = "step",
        lr_milestones: tuple[float, ...] = (30, 60, 80),
        lr_gamma: float = 0.1,
        lr_end_factor: float = 0.0,
        lr_poly_power: float = 2.0,
        warmup_epochs: float = 0.0,
        warmup_start_factor: float = 0.0,
        blurpool: bool = False,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        val_flip_average: bool = False,
    ):
        """
        Args:
            arch: the network (train/networks.py): torchvision's `resnet18` ... `resnet152`, or `timm:<name>` of
                timm's ResNet family (e.g. `timm:resnet50d`, ResNet-D of Bag of Tricks, He et al. 2019).
            num_classes: output classes (1000 for ImageNet-1k); None = the class folders of data.root/train, counted
                by `resnet fit` / `resnet validate` before the model is built.
            zero_init_residual: start the last BatchNorm of each residual block at 0 (Goyal et al. 2017).
            channels_last: NHWC memory format (faster convolutions with tensor cores).
            compile: torch.compile the network.
            pretrained: file with a state dict of this network to start from (torchvision's keys, or timm's for a
                timm network), or a `resnet fit` checkpoint (its network's weights alone, e.g. to fine-tune).
            label_smoothing: cross-entropy label smoothing (0.1 in recent recipes, 0 in the paper).
            lr_per_256: learning rate for a global batch of 256, scaled linearly to `batch_size`.
            batch_size: global batch; linked from `data.batch_size` by the command line.
            momentum: SGD momentum.
            nesterov: Nesterov momentum.
            weight_decay: L2 penalty on conv and linear weights (not on BatchNorm parameters or biases).
            weight_decay_norm_and_bias: decay BatchNorm parameters and biases too (He et al. 2015, torchvision's
                V1 recipe).
            optimizer: `sgd` (with momentum) or `lars` (timm's LARS: layer-wise trust ratio on decayed tensors,
                You et al. 2017; MLPerf's large-batch recipe).
            lars_trust_coefficient: LARS's eta (0.001 in MLPerf's reference).
            lr_schedule: after warmup, `step` (x lr_gamma at each of lr_milestones), `cosine`, `linear` (FFCV's
                ramp down) or `poly` (MLPerf), the last three from the base lr to lr_end_factor x it at the last
                step (train/optim.py: lr_factor).
            lr_milestones: epochs at which the step schedule multiplies the lr by lr_gamma.
            lr_gamma: step schedule factor.
            lr_end_factor: the lr at the last step as a fraction of the base lr (cosine, linear, poly).
            lr_poly_power: exponent of the `poly` schedule (2 in MLPerf).
            warmup_epochs: linear lr warmup length in epochs (5 for large batches, Goyal et al.).
            warmup_start_factor: where the linear warmup starts, as a fraction s of the base lr (Goyal et al.: the
                small-batch lr, 256 / batch; torchvision V2: 0.01; FFCV: 1e-4); its first step gets s + (1 - s) / W
                of W warmup steps (train/optim.py).
            blurpool: BlurPool before each strided convolution of 16+ input channels (FFCV's recipes;
                train/networks.py).
            mixup_alpha: MixUp (Zhang et al. 2018) of training batches with Beta(alpha, alpha) weights; 0 = off.
            cutmix_alpha: CutMix (Yun et al. 2019) with Beta(alpha, alpha) areas; 0 = off. With both, each batch
                gets one of the two at random (torchvision's V2 recipe: 0.2 and 1.0). torchvision.transforms.v2.
            val_flip_average: validation averages the logits of each image and its mirror (FFCV's recipes).
        """
        super().__init__()
        self.save_hyperparameters()
        if optimizer not in ("sgd", "lars"):
            raise ValueError(f"model.optimizer={optimizer!r}: expected sgd or lars")
        if num_classes is None or num_classes < 1:
            raise ValueError(f"model.num_classes={num_classes}: expected the number of classes (the command line counts "
                             "data.root's class folders when it is not set)")
        if min(mixup_alpha, cutmix_alpha) < 0:
            raise ValueError(f"model.mixup_alpha={mixup_alpha}, model.cutmix_alpha={cutmix_alpha}: expected >= 0")
        self.net = build_resnet(arch, num_classes, zero_init_residual, blurpool)
        self.batch_mix = batch_mix(num_classes, mixup_alpha, cutmix_alpha)
        if pretrained:
            load_state_dict_file(self.net, pretrained)
        if channels_last:  # before DDP wraps the model
            self.net.to(memory_format=torch.channels_last)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # Training metrics update on every step without reading a value back to the host (a GPU synchronisation):
        # no NaN scan of the loss (checked on the log steps instead) and no input validation. Training batches are
        # all full, so the unweighted mean of batch losses is the mean over images.
        self.train_loss, self.val_loss = MeanMetric(nan_strategy="disable"), MeanMetric()
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False)
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.val_images = SumMetric()  # proves each validation image was counted exactly once

    def configure_model(self) -> None:
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.net.compile()  # in place: state-dict keys stay those of the plain model
            self._compiled = True

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        classes = getattr(datamodule, "num_classes", None)
        if classes and classes != self.hparams.num_classes:
            names = list(getattr(datamodule, "classes", []))
            odd = [c for c in names if not re.fullmatch(r"n\d{8}", c)][:5]  # not WordNet ids: often the culprits
            where = getattr(datamodule, "root", "the data")
            raise DatasetLayoutError(
                f"model.num_classes={self.hparams.num_classes} but {where}/train holds {classes} class folders"
                + (f", among them {odd} (not WordNet ids)" if odd else f" ({names[:3]}...)")
                + ": set --model.num_classes or remove the extra folders"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        targets = labels
        if self.batch_mix is not None:
            # Soft targets [N, classes]; training accuracy counts the larger of the two mixed labels, as
            # torchvision's reference does. The mixing weights and boxes are drawn from (seed, rank, step): each
            # rank its own (seed_everything gives every rank the same global generator), and the same after a resume.
            seed = np.random.SeedSequence([int(os.environ.get("PL_GLOBAL_SEED", 0)), self.global_rank,
                                           self.global_step]).generate_state(1)[0]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                images, targets = self.batch_mix(images, labels)
            labels = targets.argmax(dim=1)
        logits = self(images)
        loss = self.criterion(logits, targets)
        # Step values are this rank's batch; epoch values are reduced over all ranks by torchmetrics. The progress
        # bar reads its metrics back every step: only when there is one (interactive runs).
        self.train_loss(loss.detach())
        self.train_acc1(logits.detach(), labels)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True,
                 prog_bar=self.trainer.progress_bar_callback is not None)
        self.log("train/acc1", self.train_acc1, on_step=True, on_epoch=True)
        if is_log_step(self.trainer, self.trainer.global_step + 1, batch_idx):
            # One read per log step, where the logger reads the values anyway; agreed by all ranks, which then stop
            # together (one rank raising alone would leave the others waiting in the next gradient all-reduce).
            if self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False):
                raise FloatingPointError(
                    f"train/loss is not finite on a rank (here {loss.item()}) at global step "
                    f"{self.trainer.global_step + 1} (lr "
                    f"{self.optimizers().param_groups[0]['lr']:.4g}): training diverged; resume from "
                    "checkpoints/last.ckpt with a lower model.lr_per_256 or a longer model.warmup_epochs"
                )
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        if self.hparams.val_flip_average:
            logits = (logits + self(images.flip(-1))) / 2
        self.val_loss(self.criterion(logits, labels), weight=labels.numel())
        self.val_acc1(logits, labels)
        self.val_acc5(logits, labels)
        self.val_images(labels.numel())
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)
        self.log("val/acc1", self.val_acc1, on_epoch=True, prog_bar=True)
        self.log("val/acc5", self.val_acc5, on_epoch=True)
        self.log("val/images", self.val_images, on_epoch=True)

    def configure_optimizers(self):
        h = self.hparams
        optimizer = make_optimizer(
            param_groups(self.net, h.weight_decay, h.get("weight_decay_norm_and_bias", False)),
            h.get("optimizer", "sgd"),
            # Lightning averages the loss over accumulated batches: one step sees batch_size x accumulate images.
            lr=scaled_lr(h.lr_per_256, h.batch_size * self.trainer.accumulate_grad_batches),
            momentum=h.momentum,
            nesterov=h.nesterov,
            trust_coefficient=h.get("lars_trust_coefficient", 0.001),
        )
        total_steps = self.trainer.estimated_stepping_batches  # also sets num_training_batches
        if not math.isfinite(total_steps):
            if h.lr_schedule != "step":
                raise ValueError(f"model.lr_schedule={h.lr_schedule} needs trainer.max_epochs or trainer.max_steps")
            total_steps = 0  # unused by the step schedule
        if not math.isfinite(self.trainer.num_training_batches):
            # max_epochs unset (max_steps alone): Lightning has not sized the loader yet; epochs in the schedule
            # (milestones, warmup) still need its length, so load it now, as estimated_stepping_batches otherwise does.
            self.trainer.fit_loop.setup_data()
        steps_per_epoch = max(1, math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches))
        factor = functools.partial(
            lr_factor,
            steps_per_epoch=steps_per_epoch,
            total_steps=int(total_steps),
            schedule=h.lr_schedule,
            milestones=tuple(h.lr_milestones),
            gamma=h.lr_gamma,
            warmup_epochs=h.warmup_epochs,
            warmup_start_factor=h.get("warmup_start_factor", 0.0),
            end_factor=h.get("lr_end_factor", 0.0),
            power=h.get("lr_poly_power", 2.0),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def batch_mix(num_classes: int, mixup_alpha: float, cutmix_alpha: float):
    """torchvision.transforms.v2's MixUp and/or CutMix (one of them at random per batch when both alphas are > 0):
    (images [N, C, H, W], labels [N] int64) -> (mixed images, soft targets [N, classes] float32); None when both
    are 0."""
    from torchvision.transforms import v2

    mixes = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []) + (
        [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else [])
    return None if not mixes else mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
