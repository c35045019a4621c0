"""`resnet`: LightningCLI (`fit`, `validate`) over ImageNetClassifier and ImageNetDataModule, plus
`resnet prepare ...`, `resnet evaluate ...` (ILSVRC protocols) and `resnet ensemble ...`."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from jsonargparse import ArgumentParser, Namespace, auto_cli
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from datamodules import ImageNetDataModule
from datamodules.backends import BACKENDS
from datamodules.prepare_io import disk_full
from datamodules.folder import CorruptImageError, DatasetLayoutError, find_classes
from datamodules.transforms import ProgressiveResizing
from train.evaluate import evaluate_main, exit_with_error
from train.commands import BENCH, COMMANDS, PREPARE, functions, overview, read_renamed_keys, renamed_options, underscore_options
from train.predict import predict_main
from train.results import ensemble
from train.callbacks import ImagesPerSecond, SaveConfigAndCommit, TrainingReport
from train.model import ImageNetClassifier
from train.networks import not_a_file, read_torch_file
from train.checkpointing import (AtomicCheckpointIO, BestAndLastCheckpoint, CheckpointSpaceError, close_process_group,
                                 resume_path)
from train.requeue import RequeueOnSignal
from train.signals import Preempted, Requeued, end_on_job_signal, ignore_job_signals
from train.wandb_logging import configure_wandb, log_ensemble, log_safely, run_dir_of, wanted


class ResNetCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit and validate: Lightning's `test` and `predict` have no data behind them here (`resnet predict` is a
        command of its own)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """The command line as given; then Lightning replaces the model settings with those of an explicit
        `--ckpt_path FILE` (LightningCLI's rule): the ones that change are said, not dropped silently."""
        super().parse_arguments(parser, args)
        try:
            self.checkpoint_overrides = checkpoint_overrides(self.config)
        except ValueError as e:  # before Lightning reads the file: its error would be a traceback
            self.subcommand = self.config.get("subcommand")
            self.usage_error(str(e))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The module scales its lr by the global batch, which only the data config sets.
        parser.link_arguments("data.batch_size", "model.batch_size")
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
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
        parser.add_lightning_class_args(RequeueOnSignal, "requeue")
        parser.add_argument(
            "--random_weights", type=bool, default=False,
            help="validate: evaluate randomly initialised weights on purpose (without it, `resnet validate` needs "
                 "--ckpt_path or --model.pretrained)",
        )

    def before_instantiate_classes(self) -> None:
        """Everything of a run lives under trainer.default_root_dir: checkpoints/ (fixed, so `--ckpt_path last`
        finds them across restarts) and logs/version_N/ (config.yaml, metrics.csv, history.csv, curves.png)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if getattr(self, "checkpoint_overrides", None):
            rank_zero_info(f"resnet {self.subcommand}: the model settings of {config.ckpt_path} replace the "
                           f"configuration's (Lightning's rule for --ckpt_path): {'; '.join(self.checkpoint_overrides)}")
        root = Path(config.trainer.default_root_dir or "runs/default")
        config.trainer.default_root_dir = str(root)
        if config.trainer.enable_progress_bar is None:
            # Interactive runs only: in a batch job (sbatch, docker without -t, a pipe) the bar fills the log, and
            # reading its metrics each step synchronises the GPU with the host.
            config.trainer.enable_progress_bar = sys.stderr.isatty()
        for name, backend in BACKENDS.items():  # data.<backend>: a mapping of its options' fields (YAML can give a list)
            given = config.data.get(name)
            if backend.options is not None and given is not None and not isinstance(given, (Namespace, dict)):
                fields = ", ".join(f.name for f in dataclasses.fields(backend.options))
                self.usage_error(f"data.{name}: expected a mapping of {backend.options.__name__}'s fields ({fields}), "
                                 f"got {given!r}")
        resizing = config.data.get("progressive_resizing")
        if resizing is not None:  # its own checks, as a usage error rather than a traceback from instantiation
            try:
                ProgressiveResizing(**{k: v for k, v in vars(resizing).items() if not k.startswith("_")})
            except (TypeError, ValueError) as e:
                self.usage_error(str(e))
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(root / "checkpoints")
        ckpt_dir = Path(config.checkpoint.dirpath)
        try:
            if self.subcommand == "fit":
                config.ckpt_path = resume_path(root, ckpt_dir, config.ckpt_path)
            elif config.get("ckpt_path") == "last":
                config.ckpt_path = resume_path(root, ckpt_dir, "last")
        except (FileExistsError, FileNotFoundError) as e:
            self.usage_error(str(e))
        if config.get("ckpt_path") and config.model.pretrained:
            # The weights come from the checkpoint: its run's --model.pretrained (set by LightningCLI from the
            # checkpoint, or kept on a requeued job's command line) need not be there any more
            config.model.pretrained = None
        if self.subcommand == "validate" and not (
            config.ckpt_path or config.model.pretrained or config.random_weights
        ):
            self.usage_error(
                "validate: no weights given, the accuracy would be that of a random initialisation: pass --ckpt_path "
                "(e.g. runs/imagenet_r50/checkpoints/best.ckpt, or `last`), --model.pretrained FILE, or "
                "--random_weights true to evaluate random weights on purpose"
            )
        if config.model.num_classes is None:
            config.model.num_classes = self._num_classes(config)
        if config.trainer.logger is not False:  # False: no logging at all
            # The CSV logger first: trainer.log_dir is the first logger's (logs/version_N/: config.yaml, the report).
            # Other loggers (e.g. configs/logger/wandb.yaml) come after it.
            loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
            loggers = [lg for lg in loggers if isinstance(lg, Namespace)]  # None, True: the default, CSV alone
            if not any(lg.class_path.endswith(".CSVLogger") for lg in loggers):
                csv = Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=str(root), name="logs"))
                loggers.insert(0, csv)
            config.trainer.logger = loggers
            # W&B loggers: run directory, run id (kept by a resumed run, new for a fresh one), name; dashboards callback
            configure_wandb(config, root, resumed=bool(config.get("ckpt_path")))

    def _num_classes(self, config: Namespace) -> int:
        """An unset model.num_classes: the checkpoint's (validate --ckpt_path), else the data's class folders
        (train/, or val/ on a machine that holds only the validation split), counted before the model is built."""
        ckpt = config.get("ckpt_path")
        if self.subcommand == "validate" and ckpt and Path(ckpt).is_file():
            hparams = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True).get("hyper_parameters", {})
            if hparams.get("num_classes"):
                return int(hparams["num_classes"])
        root = Path(config.data.root)
        split = "train" if (root / "train").is_dir() or not (root / "val").is_dir() else "val"
        try:
            return len(find_classes(root / split))
        except DatasetLayoutError as e:
            self.usage_error(f"model.num_classes from data.root: {e}")

    def usage_error(self, message: str) -> None:
        """A usage error of `resnet fit` / `resnet validate`, named as such (the top-level parser's usage line would
        read `resnet [-c CONFIG] {fit,validate}`); exit status 2, as argparse's."""
        exit_with_error(f"resnet {self.subcommand or 'fit'}", f"{message}\n(options: resnet {self.subcommand or 'fit'} --help)")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:  # a constructor's check of its settings (naming the key): a usage error, no traceback
            self.usage_error(str(e))
        global _TRAINER
        _TRAINER = self.trainer
        if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make it atomic
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def prepare_main(args: list[str]) -> None:
    args = underscore_options(args)
    # FFCV's numba and the devkit reader load only when their subcommand may run.
    registry = {"demo": PREPARE["demo"]} if args[:1] == ["demo"] else PREPARE
    try:
        result = auto_cli(functions(registry), args=args, as_positional=False, prog="resnet prepare",
                          allow_abbrev=False)
        if args[:1] == ["demo"]:  # the other subcommands report as they go
            counts = {split: sum(1 for _ in Path(result, split).glob("*/*.JPEG")) for split in ("train", "val")}
            print(f"resnet prepare demo: {counts['train']} train / {counts['val']} val images in {result}")
    except (ValueError, OSError) as e:  # bad input: name the cause, no traceback
        exit_with_error("resnet prepare", e)


def bench_main(args: list[str]) -> None:
    args = underscore_options(args)
    try:
        auto_cli(functions(BENCH), args=args, as_positional=False, prog="resnet bench", allow_abbrev=False)
    except (Requeued, Preempted) as saved:  # a benchmark's fit got the job's signal: stop the benchmark, not a row
        print(f"resnet bench: stopped by a job signal ({type(saved).__name__}: {saved})", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except (ValueError, OSError) as e:  # bad input: name the cause, no traceback
        exit_with_error("resnet bench", e)


def ensemble_main(args: list[str]) -> None:
    parser = ArgumentParser(prog="resnet ensemble", allow_abbrev=False, description=ensemble.__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="result files of `resnet evaluate --output`")
    parser.add_argument("--weights", type=Optional[str], help="one weight per file, e.g. 1,1,2 (default: equal)")
    parser.add_argument("--output", type=Optional[str], help="Markdown table to write (e.g. results/ensemble.md); JSON beside it")
    parser.add_argument("--wandb", type=Optional[bool], help="log the table to a W&B run of its own (job type ensemble); "
                        "default: when the files come from checkpoints trained with W&B")
    cfg = parser.parse_args(args)
    try:
        weights = [float(w) for w in cfg.weights.split(",")] if cfg.weights else None
        out = ensemble(cfg.files, weights, cfg.output)
    except (ValueError, OSError) as e:  # bad input: name the cause, no traceback
        exit_with_error("resnet ensemble", e)
    if wanted(cfg.wandb, out["wandb_runs"]):
        log_safely("ensemble table", log_ensemble, out, cfg.files, weights, run_dir_of(None, cfg.output))


# What a validation's numbers depend on; the other model settings (optimizer, schedule, ...) only act in training.
VALIDATION_KEYS = ("arch", "num_classes", "blurpool", "val_flip_average", "channels_last", "compile")


# What a checkpoint saved as a folder holds: torch.distributed.checkpoint's (sharded FSDP, ModelParallel) and
# DeepSpeed's files
SHARDED_MARKERS = (".metadata", "meta.pt", "latest", "checkpoint")


# Model settings linked from the data's (add_arguments_to_parser): the link sets them, not the checkpoint.
LINKED = ("batch_size",)


def _plain(value):
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def checkpoint_overrides(config: Namespace) -> list[str]:
    """The model settings that an explicit `--ckpt_path FILE` will replace (LightningCLI loads the checkpoint's
    hyper_parameters over the parsed configuration), as "model.KEY: configured -> checkpoint's" lines; for
    `validate` only those that change its numbers (VALIDATION_KEYS). Empty without a checkpoint file.

    Raises:
        ValueError: `ckpt_path` names no file, or one torch cannot read (damaged, cut short).
    """
    subcommand = config.get("subcommand")
    ckpt = config[subcommand].get("ckpt_path") if subcommand else None
    # Lightning's names (last, best, hpc, registry[:...]) and URLs (s3://...): Lightning resolves them
    if not ckpt or ckpt in ("last", "best", "hpc") or ckpt.lower().startswith("registry") or "://" in ckpt:
        return []
    if Path(ckpt).is_dir():
        if (Path(ckpt) / "checkpoints").is_dir():  # a run's folder given for one of its checkpoints
            raise ValueError(f"--ckpt_path {ckpt}: a run's folder; its checkpoints are in {Path(ckpt) / 'checkpoints'} "
                             f"(or resume it with --trainer.default_root_dir {ckpt} --ckpt_path last)")
        if any((Path(ckpt) / name).exists() for name in SHARDED_MARKERS):
            return []  # a checkpoint saved as a folder: Lightning's strategy reads it
    if problem := not_a_file(ckpt):
        raise ValueError(f"--ckpt_path {ckpt}: {problem}; a run's checkpoints are in its checkpoints/ folder "
                         "(or --ckpt_path last)")
    hparams = read_torch_file(ckpt, "--ckpt_path", mmap=True).get("hyper_parameters", {})  # as LightningCLI reads it
    model = _plain(config[subcommand].model)
    return [f"model.{key} {model[key]!r} -> {value!r}" for key, value in hparams.items()
            if key in model and key not in LINKED and model[key] is not None and _plain(value) != model[key]
            and (subcommand != "validate" or key in VALIDATION_KEYS)]  # None: unset, follows the checkpoint


_TRAINER = None  # the Trainer of this `resnet fit` / `validate`, once built: its launcher started the local ranks


def end_ranks() -> None:
    """Before one rank's one-line exit: end the ranks its launcher started on this machine (Lightning does so on
    Ctrl-C alone; left running, each prints a traceback of the lost connection after the message), then leave the
    process group. Ranks of other nodes: `srun --kill-on-bad-exit` ends them."""
    launcher = getattr(getattr(_TRAINER, "strategy", None), "launcher", None)
    if launcher is not None:
        launcher.kill(signal.SIGKILL)  # a no-op where it started none (every rank but the first, SLURM's)
    close_process_group()


def lost_peer(error: BaseException) -> bool:
    """A collective that failed because another rank ended (gloo's lost connection, torch.distributed's network
    errors): that rank's own message says why."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and (
        isinstance(error, dist.DistNetworkError) or bool(re.search(r"Connection (closed|reset) by peer", str(error))))


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
        # No abbreviated option names (argparse's default would read `--data.back dali` as `--data.backend dali`):
        # a misspelt key is an error that names it.
        parser_kwargs={"allow_abbrev": False, "fit": {"allow_abbrev": False}, "validate": {"allow_abbrev": False}},
        args=args,
        run=run,
    )


def main(args: Optional[list[str]] = None) -> None:
    # Lightning 2.6 calling torch APIs that torch 2.14 deprecates: noise in every run, nothing for users to fix.
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|all_gather is deprecated)")
    if "SLURM_JOB_ID" not in os.environ:
        # Lightning's hint to launch with srun, printed by every command wherever srun exists (a login node): it only
        # helps inside an allocation, where it stays.
        warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    argv = underscore_options(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview(), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    commands = {"prepare": prepare_main, "evaluate": evaluate_main, "ensemble": ensemble_main, "bench": bench_main,
                "predict": predict_main}
    if argv[0] in commands:
        try:
            return commands[argv[0]](argv[1:])
        except KeyboardInterrupt:  # Ctrl-C: said in one line (outputs are written whole or not at all), no traceback
            print(f"\nresnet {argv[0]}: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as e:  # a full disk under another error (torch's, FFCV's): one line as well
            if disk_full(e) is None:
                raise
            exit_with_error(f"resnet {argv[0]}", e)
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        print(f"resnet: error: no command {argv[0]!r}\n\n{overview()}", file=sys.stderr)
        raise SystemExit(2)
    if argv[0].startswith("-") and not {"fit", "validate"} & set(argv):  # `resnet --config X`: LightningCLI's error
        # would offer fit and validate alone
        example = f"resnet fit {' '.join(argv[:2])}" if argv[0] in ("-c", "--config") else "resnet fit --help"
        print(f"resnet: error: no command before {argv[0]} (e.g. {example})\n\n{overview()}", file=sys.stderr)
        raise SystemExit(2)
    argv = renamed_options(argv)
    read_renamed_keys()
    command = next((a for a in argv if a in ("fit", "validate")), "fit")  # `resnet -c X fit` too
    try:
        if args is None:  # the command line itself, respelled: Lightning's DDP launcher re-runs sys.argv
            sys.argv[1:] = argv
        build_cli(None if args is None else argv)
    except (Requeued, Preempted) as saved:  # saved on a job signal (or nothing yet to save): this life ends here
        ignore_job_signals()
        close_process_group()
        end_on_job_signal(saved)  # requeue (SIGUSR1) or exit 143 (SIGTERM: SLURM requeues a preempted job)
    except (DatasetLayoutError, CorruptImageError) as e:  # the data, not the code: its path and the fix, no traceback
        end_ranks()
        exit_with_error(f"resnet {command}", _worker_cause(e))
    except MisconfigurationException as e:  # Lightning's check of settings against each other or a checkpoint's
        end_ranks()
        exit_with_error(f"resnet {command}", e)
    except CheckpointSpaceError as e:  # the disk, not the code or the data: what to free, and how to resume
        end_ranks()
        print(f"resnet {command}: error: {e.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as e:  # a full disk elsewhere (metrics.csv, history.csv, config.yaml, ...): one line too
        if lost_peer(e):  # on other nodes, until srun ends this rank too
            print(f"resnet {command}: rank {os.environ.get('RANK', '?')} stops: another rank ended (its error is in "
                  f"the job's log)", file=sys.stderr)
            raise SystemExit(1) from None
        if disk_full(e) is None:
            raise
        end_ranks()
        exit_with_error(f"resnet {command}", e, "resume the run with --ckpt_path last" if command == "fit"
                        else "run the same command again")
    close_process_group()


def _worker_cause(error: Exception) -> str:
    """The message of an error a DataLoader worker raised, without the traceback text the loader wraps around it."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last)


if __name__ == "__main__":
    main()
