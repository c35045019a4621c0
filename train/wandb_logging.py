"""Weights & Biases: the run of a `resnet fit` (stable id across resumes and SLURM requeues, offline without an API
key), its dashboards' extras, and the tables of `resnet evaluate` and `resnet ensemble`. wandb itself is imported
only where a run is made: commands without W&B never load it."""

from __future__ import annotations

import importlib
import netrc
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union
from urllib.parse import urlparse

import lightning.pytorch as pl
import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD
from train.signals import slurm_job_id

DEFAULT_PROJECT = "resnet-imagenet"
RUN_ID_FILE = "wandb_run_id"  # in the run directory: the id a resumed run continues
# Best-value summaries of the run table (`val/acc1.max`, ...) and of each run's overview page.
SUMMARIES = {"val/acc1": "max,last", "val/acc5": "max,last", "val/loss": "min,last", "train/loss_epoch": "min,last",
             "train/acc1_epoch": "max,last"}
EVAL_COLUMNS = ("model", "checkpoint", "protocol", "views", "views_detail", "images", "top1_err", "top5_err", "acc1",
                "acc5", "images_per_sec", "precision", "world_size", "git_commit", "date")


def has_api_key() -> bool:
    """WANDB_API_KEY (or an identity token file) set, or a key for the W&B host in ~/.netrc (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> Literal["online", "offline", "disabled"]:
    """WANDB_MODE when set; otherwise online with an API key, offline without one."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun"):
        return "offline"
    if mode == "disabled":
        return "disabled"
    return "online" if mode in ("online", "run") or has_api_key() else "offline"


def sync_hint(save_dir: Union[str, Path], run_id: str) -> str:
    why = "WANDB_MODE" if os.environ.get("WANDB_MODE") else "no API key: set WANDB_API_KEY or run `wandb login`"
    runs = Path(save_dir) / "wandb"
    return f"W&B is offline ({why}); the run goes to {runs}/. Upload it later with:\n  wandb sync {runs}/offline-run-*-{run_id}"


def run_dir_of(ckpt: Optional[str], output: Optional[str]) -> Path:
    """Where `resnet evaluate` and `resnet ensemble` put W&B's files: a checkpoint's run directory
    (<run>/checkpoints/best.ckpt), beside the training run's; else the output's folder; else here."""
    if ckpt:
        folder = Path(ckpt).resolve().parent
        folder = folder.parent if folder.name == "checkpoints" else folder
        if os.access(folder, os.W_OK):
            return folder
    return Path(output).resolve().parent if output else Path.cwd()


class WandbRunLogger(WandbLogger):
    """The W&B run of a `resnet fit`, next to the CSV logger. The command line fills in save_dir (the run
    directory), id and name; everything else has defaults that work without an API key (offline)."""

    def __init__(
        self,
        project: Optional[str] = None,
        entity: Optional[str] = None,
        name: Optional[str] = None,
        id: Optional[str] = None,
        tags: Optional[list[str]] = None,
        group: Optional[str] = None,
        notes: Optional[str] = None,
        offline: Optional[bool] = None,
        log_model: Union[bool, Literal["all"], None] = None,
        save_dir: str = ".",
    ):
        """
        Args:
            project: W&B project; None: $WANDB_PROJECT, else resnet-imagenet.
            entity: W&B team or user; None: $WANDB_ENTITY, else the API key's default entity.
            name: run name; None: `<arch>-<SLURM job id, or run directory name>`.
            id: run id; None: the one stored in the run directory (a resume continues the run), else
                `<arch>-<SLURM job id>` under SLURM, else `<arch>-<random>`.
            tags: run tags (the arch and the data backend are added).
            group: runs shown together in the W&B UI.
            notes: free text on the run page.
            offline: write the run only to `<save_dir>/wandb/` (upload later with `wandb sync`); None: offline
                unless an API key is found (WANDB_API_KEY, `wandb login`) or WANDB_MODE says otherwise.
            log_model: upload checkpoints as artifacts with aliases `best` and `latest` at the end of training
                (`all`: every checkpoint as it is saved); None: when online.
            save_dir: folder of the run's `wandb/` folder; the command line sets the run directory.
        """
        mode = wandb_mode()
        offline = mode == "offline" if offline is None else offline
        if log_model is None:
            log_model = mode == "online" and not offline
        project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        super().__init__(name=name, save_dir=save_dir, id=id, project=project, entity=entity, tags=tags, group=group,
                         notes=notes, offline=offline, log_model=log_model, job_type="train")
        self._wandb_init.pop("anonymous", None)  # deprecated in wandb: a warning in every run
        self._broken: Optional[str] = None
        if offline and rank_zero_only.rank == 0:
            print(sync_hint(save_dir, id or "<id>"), file=sys.stderr)

    def _guard(self, what: str, call) -> None:
        """W&B never ends a training run: SLURM's SIGTERM (preemption, scancel) reaches W&B's service process too,
        which dies at once while the ranks still save; a lost service then fails every later call. The first failure
        is reported, later calls are skipped; the CSV logger keeps every metric."""
        if self._broken is not None:
            return
        try:
            call()
        except Exception as e:  # whatever the service's failure looks like, training goes on
            self._broken = f"{type(e).__name__}: {e}"
            print(f"W&B: {what} failed ({self._broken}); W&B logging stops here, training continues "
                  "(logs/version_N/metrics.csv has every metric)", file=sys.stderr, flush=True)

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        self._guard("logging metrics", lambda: super(WandbRunLogger, self).log_metrics(metrics, step))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._guard("closing the run", lambda: super(WandbRunLogger, self).finalize(status))

    def finish(self) -> None:
        """Flush and close the run now (before a requeue stops the job), unless W&B already failed."""
        if self._experiment is not None:
            self._guard("closing the run", self._experiment.finish)


def run_identity(root: Path, arch: str, run_id: Optional[str] = None, resumed: bool = True) -> tuple[str, str]:
    """(id, name) of the W&B run of the run directory `root`. The id (`run_id` when given) is written to
    `root/wandb_run_id` and read back by later commands, so that `--ckpt_path last` and SLURM requeues continue
    the same run. A fresh training run (`resumed=False`) gets a new id even where an old run left its file (its
    curves must not join the old run's): `<arch>-<job id>-<random>` under SLURM, else `<arch>-<random>` (only rank
    0 makes a run: other ranks' ids are unused)."""
    job = slurm_job_id()
    arch = arch.replace(":", "-")  # timm:resnet50d -> timm-resnet50d: W&B run ids take no colon
    name = f"{arch}-{job or root.resolve().name}"
    stored = root / RUN_ID_FILE
    known = stored.read_text().strip() if stored.is_file() and resumed else ""
    run_id = run_id or known or "-".join(filter(None, (arch, job, secrets.token_hex(4))))
    if run_id != known and rank_zero_only.rank == 0:  # other ranks never make a run: their id is unused
        root.mkdir(parents=True, exist_ok=True)
        partial = stored.with_name(f".{RUN_ID_FILE}.partial")
        partial.write_text(run_id + "\n")
        os.replace(partial, stored)
    return run_id, name


def is_wandb_logger(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, WandbLogger)


def configure_wandb(config: Namespace, root: Path, resumed: bool = True) -> None:
    """For `trainer.logger` entries that are W&B loggers: save_dir (the run directory), id (the run directory's
    when `resumed`, else a new one) and name filled in where not given, and the WandbDashboards callback added
    once. Runs on every rank; only rank 0 makes a run."""
    loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
    found = False
    for logger in loggers:
        if not (isinstance(logger, Namespace) and is_wandb_logger(logger.class_path)):
            continue
        found = True
        args = logger.init_args
        if args.get("save_dir") in (None, "."):
            args.save_dir = str(root)
        run_id, name = run_identity(root, config.model.arch, args.get("id"), resumed)
        args.id, args.name = run_id, args.get("name") or name
    callbacks = list(config.trainer.callbacks or [])
    dashboards = f"{__name__}.{WandbDashboards.__name__}"
    if found and not any(isinstance(c, Namespace) and c.class_path == dashboards for c in callbacks):
        callbacks.append(Namespace(class_path=dashboards, init_args=Namespace()))
        config.trainer.callbacks = callbacks


def wandb_logger(trainer: pl.Trainer) -> Optional[WandbLogger]:
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


def upload_config(trainer: pl.Trainer, config: dict, git_commit: str) -> None:
    """The full resolved config (`model.arch`, `data.batch_size`, ...) and the git commit into the W&B run's
    config, where the run table can filter and group by them. Rank 0 only."""
    logger = wandb_logger(trainer)
    if logger is not None:
        logger.experiment.config.update({**config, "git_commit": git_commit}, allow_val_change=True)


class WandbDashboards(Callback):
    """What a W&B run gets beyond the logged metrics: best-value summaries (`val/acc1.max`, ...), one grid of
    augmented training images per run, and the run's id in every checkpoint (`checkpoint["wandb_run"]`) so that
    `resnet evaluate` logs into the same run. Added by the command line when a W&B logger is configured."""

    def __init__(self, grid_images: int = 32):
        """
        Args:
            grid_images: training images in the grid logged at the first step of the run (rank 0's batch).
        """
        self.grid_images = grid_images
        self.grid_logged = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = wandb_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        run = logger.experiment
        for key, summary in SUMMARIES.items():
            run.define_metric(key, step_metric="trainer/global_step", summary=summary)
        extra = (pl_module.hparams.get("arch"), getattr(trainer.datamodule, "hparams", {}).get("backend"))
        run.tags = tuple(t for t in dict.fromkeys([*(run.tags or ()), *extra]) if t)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.grid_logged or self.grid_images <= 0:
            return
        self.grid_logged = True  # on every rank: the flag travels in rank 0's checkpoints
        logger = wandb_logger(trainer)
        if logger is not None and trainer.is_global_zero:
            images, labels = batch[0][: self.grid_images], batch[1][: self.grid_images]
            classes = getattr(trainer.datamodule, "classes", None)
            names = [classes[i] if classes else str(i) for i in labels.tolist()]
            logger.log_image(
                "train/augmented_images", [augmented_grid(images)], step=trainer.global_step,
                caption=[f"{len(names)} training images as the network sees them (denormalised), rank 0, "
                         f"step {trainer.global_step}: " + " ".join(names)],
            )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        logger = wandb_logger(trainer)
        if logger is not None and trainer.is_global_zero:  # rank 0 writes the file
            run = logger.experiment
            checkpoint["wandb_run"] = {"id": run.id, "project": run.project, "entity": run.entity or None,
                                       "name": run.name, "dir": str(logger.save_dir)}

    def state_dict(self) -> dict[str, Any]:
        return {"grid_logged": self.grid_logged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.grid_logged = bool(state_dict.get("grid_logged", False))


def augmented_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """CHW float 0-1 grid of a batch as the loaders deliver it: normalised floats (torchvision, DALI, FFCV
    after the DataModule's on_after_batch_transfer) or uint8."""
    import torchvision

    x = images.detach().float().cpu()
    if images.dtype == torch.uint8:
        x = x / 255
    else:
        x = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return torchvision.utils.make_grid(x.clamp(0, 1).contiguous(), nrow=nrow, padding=2)


def wanted(option: Optional[bool], runs: list[dict]) -> bool:
    """`--wandb true/false`, or None: when a source (checkpoint, result file) belongs to a W&B run."""
    return option if option is not None else any(runs)


def _init(run: dict, *, dir: Path, job_type: str, name: str, config: Optional[dict] = None):
    """A W&B run: `run["id"]` resumed (resume="allow") when given, else a new one; mode as for training."""
    import wandb

    dir.mkdir(parents=True, exist_ok=True)
    mode = wandb_mode()
    r = wandb.init(
        id=run.get("id"), resume="allow" if run.get("id") else None, name=run.get("name") or name,
        project=run.get("project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        entity=run.get("entity"), job_type=job_type, dir=str(dir), mode=mode, config=config,
    )
    if mode == "offline":
        print(sync_hint(dir, r.id), file=sys.stderr)
    return r


def log_safely(what: str, log, *args) -> None:
    """W&B failing (network, quota) must not fail a command whose result is already printed and saved."""
    try:
        log(*args)
    except Exception as e:  # wandb raises many kinds: name it, do not exit non-zero after the work is done
        print(f"W&B: could not log the {what} ({type(e).__name__}: {e})", file=sys.stderr)


def log_evaluation(result: dict, run: dict, dir: Path) -> None:
    """Table `eval/<protocol>` (one row: this evaluation) and summaries `eval/<protocol>/top1_err`, ...
    into the training run `run` (resumed), or into a new run (job type `evaluate`) when `run` is empty."""
    import wandb

    protocol = result["protocol"]
    row = {**result, "checkpoint": str(result["source"])}
    with _init(run, dir=dir, job_type="evaluate", name=f"eval-{result['arch']}-{protocol}") as r:
        r.log({f"eval/{protocol}": wandb.Table(columns=list(EVAL_COLUMNS), data=[[row[c] for c in EVAL_COLUMNS]])})
        r.summary.update({f"eval/{protocol}/{k}": result[k] for k in ("top1_err", "top5_err", "acc1", "acc5", "images")})


def log_ensemble(out: dict, files: list[str], weights: Optional[list[float]], dir: Path) -> None:
    """A run of its own (job type `ensemble`): table `ensemble` (a row per model and one for the ensemble) and
    summaries `ensemble/top1_err`, `ensemble/top5_err`; in the project of the first source run."""
    import wandb

    sources = [r for r in out["wandb_runs"] if r]
    job = slurm_job_id()
    name = f"ensemble-{job}" if job else f"ensemble-of-{len(files)}"
    run = {"project": sources[0].get("project"), "entity": sources[0].get("entity")} if sources else {}
    config = {"files": [str(f) for f in files], "weights": weights, "source_runs": [r.get("id") for r in sources]}
    columns = ["model", "protocol", "views", "top1_err", "top5_err", "acc1", "acc5", "images"]
    with _init(run, dir=dir, job_type="ensemble", name=name, config=config) as r:
        r.log({"ensemble": wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in out["rows"]])})
        best = out["rows"][-1]
        r.summary.update({"ensemble/top1_err": best["top1_err"], "ensemble/top5_err": best["top5_err"]})
