"""`resnet`: LightningCLI over ImageNetClassifier and ImageNetDataModule, plus `resnet prepare ...`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from jsonargparse import Namespace, auto_cli
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules import ImageNetDataModule
from datamodules.demo import write_demo_dataset
from train.callbacks import ImagesPerSecond, SaveConfigAndCommit, TrainingReport
from train.model import ImageNetClassifier


class ResNetCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The module scales its lr by the global batch, which only the data config sets.
        parser.link_arguments("data.batch_size", "model.batch_size")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc1",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(ImagesPerSecond, "throughput")
        parser.add_lightning_class_args(TrainingReport, "report")

    def before_instantiate_classes(self) -> None:
        """Everything of a run lives under trainer.default_root_dir: checkpoints/ (fixed, so `--ckpt_path last`
        finds them across restarts) and logs/version_N/ (config.yaml, metrics.csv, history.csv, curves.png)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(config.trainer.default_root_dir or "runs/default")
        config.trainer.default_root_dir = str(root)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(root / "checkpoints")
        last = Path(config.checkpoint.dirpath) / "last.ckpt"
        # A fresh fit into a folder holding a run would replace its best.ckpt and last.ckpt; a SLURM requeue
        # (hpc_ckpt_*.ckpt present) resumes by itself.
        if self.subcommand == "fit" and config.ckpt_path is None and last.exists() and not any(root.glob("hpc_ckpt_*.ckpt")):
            self.parser.error(
                f"{last} exists: resume that run with --ckpt_path last, or start a new one in another "
                "--trainer.default_root_dir"
            )
        if config.trainer.logger in (None, True):
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=str(root), name="logs")
            )


def prepare_main(args: list[str]) -> None:
    auto_cli({"demo": write_demo_dataset}, args=args, as_positional=False)


def build_cli(args: Optional[list[str]] = None, run: bool = True) -> ResNetCLI:
    """The training command line; `run=False` parses and instantiates without a subcommand (for tests)."""
    return ResNetCLI(
        ImageNetClassifier,
        ImageNetDataModule,
        save_config_callback=SaveConfigAndCommit,
        save_config_kwargs={"overwrite": True},
        # The DataModule shards itself: Lightning's DistributedSampler would pad validation with duplicates.
        trainer_defaults={"use_distributed_sampler": False},
        seed_everything_default=0,
        args=args,
        run=run,
    )


def main(args: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["prepare"]:
        return prepare_main(argv[1:])
    build_cli(args)


if __name__ == "__main__":
    main()
