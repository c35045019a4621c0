"""W&B: real offline runs (no API key, as on a compute node), read back with wandb's own reader of `.wandb` files
(`wandb leet inspect --json`)."""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from tests.conftest import REPO, run_resnet, tiny_fit_args
from train import wandb_logging
from train.cli import build_cli
from train.evaluate import evaluate, evaluate_parser
from train.wandb_logging import WandbDashboards, WandbRunLogger, run_identity

WANDB = str(Path(sys.executable).parent / "wandb")
W_AND_B = ("--config", str(REPO / "configs/logger/wandb.yaml"))


@pytest.fixture(scope="module")
def no_login(tmp_path_factory):
    """No WANDB_API_KEY, no `wandb login` (~/.netrc), no WANDB_MODE: the automatic offline path."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR", "SLURM_JOB_ID",
                    "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
            mp.delenv(var, raising=False)
        mp.setenv("HOME", str(home))  # wandb's settings, cache and artifact staging too
        mp.setenv("NETRC", str(home / ".netrc"))
        yield


def offline_runs(root: Path) -> list[Path]:
    return sorted((root / "wandb").glob("offline-run-*"))


def records(run: Path, *flags: str):
    """The records of an offline run's `.wandb` file, decoded by wandb itself."""
    (log,) = run.glob("run-*.wandb")
    out = subprocess.run([WANDB, "leet", "inspect", "--json", *flags, str(log)], capture_output=True, text=True,
                         check=True, cwd=run).stdout  # the CLI writes ./wandb/debug-cli.*.log
    return json.loads(out) if flags else [json.loads(line) for line in out.splitlines() if line.strip()]


def history(run: Path) -> list[dict]:
    return [r["history"]["item"] for r in records(run) if r["type"] == "history"]


def logged(rows: list[dict], key: str) -> list[dict]:
    """Rows holding `key`; media and tables appear as `key._type`, `key.path`, ..."""
    return [r for r in rows if key in r or f"{key}._type" in r]


def csv_rows(root: Path, version: int) -> list[dict]:
    with open(root / f"logs/version_{version}/metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def trained(no_login, demo_root, tmp_path_factory) -> Path:
    """One epoch of the tiny fit with configs/logger/wandb.yaml, no API key."""
    root = tmp_path_factory.mktemp("wandb") / "run"
    proc = run_resnet(*tiny_fit_args(demo_root, root, "--trainer.max_epochs", "1", *W_AND_B))
    assert f"wandb sync {root}/wandb/offline-run-*-" in proc.stderr  # how to upload, said once at the start
    return root


def test_offline_run_holds_what_the_csv_logger_got(trained):
    (run,) = offline_runs(trained)
    run_id = (trained / "wandb_run_id").read_text().strip()
    assert run.name.endswith(f"-{run_id}") and run_id.startswith("resnet18-")
    rows = history(run)
    for row in csv_rows(trained, 0):  # every value the CSV logger wrote, at the same step
        for key in ("train/loss_step", "train/loss_epoch", "train/acc1_epoch", "val/acc1", "val/acc5", "train/lr",
                    "train/images_per_sec", "train/loader_wait_share", "train/epoch_time_s"):
            if key in row:
                same_step = [r for r in rows if r.get("trainer/global_step") == row["step"] and key in r]
                assert same_step and same_step[0][key] == pytest.approx(row[key], rel=1e-6), (key, row)
    assert all(0 <= r["train/loader_wait_share"] <= 1 for r in logged(rows, "train/loader_wait_share"))
    assert logged(rows, "train/epoch_time_s")[0]["train/epoch_time_s"] > 0
    assert not logged(rows, "train/gpu_mem_peak_gib")  # CUDA only

    (grid,) = logged(rows, "train/augmented_images")  # once, at the first step
    assert grid["trainer/global_step"] == 0 and "n9000000" in grid["train/augmented_images.captions"][0]
    (png,) = run.glob("files/media/images/train/augmented_images_*.png")
    assert Image.open(png).size == (8 * (32 + 2) + 2, 32 + 4)  # the 8 images of rank 0's batch, 32-pixel crops

    info = records(run, "--summary")
    assert info["run_id"] == run_id and info["name"] == "resnet18-run"  # <arch>-<run directory>: no SLURM job
    assert info["project"] == "resnet-imagenet" and {"resnet18", "torchvision"} <= set(info["tags"])
    config = info["config"]  # the full resolved config, as in the checkpoint
    assert config["model"]["arch"] == "resnet18" and config["data"]["batch_size"] == 8 and config["git_commit"]
    val = [r["val/acc1"] for r in csv_rows(trained, 0) if "val/acc1" in r]
    assert info["summary"]["val/acc1"]["max"] == pytest.approx(max(val))  # best-value summary
    assert info["summary"]["val/loss"]["min"] > 0
    ckpt = torch.load(trained / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["wandb_run"]["id"] == run_id and ckpt["wandb_run"]["project"] == "resnet-imagenet"


def test_resume_evaluate_and_ensemble_log_into_the_same_run(trained, demo_root, tmp_path):
    root = Path(shutil.copytree(trained, tmp_path / "run"))
    run_id = (root / "wandb_run_id").read_text().strip()
    run_resnet(*tiny_fit_args(demo_root, root, "--trainer.max_epochs", "2", "--ckpt_path", "last", *W_AND_B))
    _, resumed = offline_runs(root)
    assert resumed.name.endswith(f"-{run_id}")  # the same run continued, not a second one
    rows = history(resumed)
    assert not logged(rows, "train/augmented_images")  # once per run, not once per resume
    assert min(r["trainer/global_step"] for r in logged(rows, "train/loss_step")) >= 9  # continues after epoch 0
    val = [r for r in csv_rows(root, 1) if "val/acc1" in r]
    assert [r["val/acc1"] for r in logged(rows, "val/acc1")] == pytest.approx([r["val/acc1"] for r in val])

    evals = tmp_path / "eval"
    args = ["evaluate", "--data.root", str(demo_root), "--data.batch_size", "8", "--data.num_workers", "0",
            "--crop_size", "32", "--resize_size", "36", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    run_resnet(*args, "--ckpt", str(root / "checkpoints/best.ckpt"), "--protocol", "10crop", "--output", str(evals / "10crop.pt"))
    evaluate(ckpt=str(root / "checkpoints/last.ckpt"), output=str(evals / "center.pt"), crop_size=32, resize_size=36,
             wandb=False, data={"root": str(demo_root), "num_workers": 0}, trainer={"accelerator": "cpu", "enable_progress_bar": False})
    *_, evaluated = offline_runs(root)
    assert len(offline_runs(root)) == 3 and evaluated.name.endswith(f"-{run_id}")  # --wandb false: no run
    info = records(evaluated, "--summary")
    result = json.loads((evals / "10crop.json").read_text())
    assert info["run_id"] == run_id and info["summary"]["eval/10crop/top1_err"] == pytest.approx(result["top1_err"])
    (table,) = evaluated.glob("files/media/table/eval/10crop_*.table.json")
    table = json.loads(table.read_text())
    row = dict(zip(table["columns"], table["data"][0]))
    assert row["protocol"] == "10crop" and row["views"] == 10 and row["images"] == 30
    assert row["top1_err"] == pytest.approx(result["top1_err"]) and row["checkpoint"].endswith("best.ckpt")

    run_resnet("ensemble", str(evals / "10crop.pt"), str(evals / "center.pt"), "--output", str(evals / "ens.md"))
    (ensemble_run,) = offline_runs(evals)  # its own run, beside the table
    info = records(ensemble_run, "--summary")
    assert info["project"] == "resnet-imagenet" and info["config"]["source_runs"] == [run_id, run_id]
    (table,) = ensemble_run.glob("files/media/table/ensemble_*.table.json")
    rows = json.loads(table.read_text())["data"]
    ensemble_rows = json.loads((evals / "ens.json").read_text())["rows"]
    assert [r[0] for r in rows] == [r["model"] for r in ensemble_rows] and len(rows) == 3
    assert info["summary"]["ensemble/top1_err"] == pytest.approx(ensemble_rows[-1]["top1_err"])


def test_ddp_makes_one_run_named_after_the_slurm_job(no_login, demo_root, tmp_path):
    root = tmp_path / "ddp"
    run_resnet(*tiny_fit_args(demo_root, root, "--trainer.max_epochs", "1", "--trainer.devices", "2",
                              "--trainer.strategy", "ddp", *W_AND_B), env={"SLURM_JOB_ID": "12345"})
    (run,) = offline_runs(root)  # rank 1 made none
    info = records(run, "--summary")
    assert info["run_id"].startswith("resnet18-12345-") and info["name"] == "resnet18-12345"
    assert (root / "wandb_run_id").read_text().strip() == info["run_id"]
    assert len(logged(history(run), "train/augmented_images")) == 1
    assert info["summary"]["val/images"] == 30  # each val image once over both ranks, as in the CSV


@pytest.mark.parametrize("n", [50, 101, 152])
def test_wandb_config_composes_with_the_recipes(n, tmp_path, monkeypatch):
    """What the SLURM scripts run: `--config configs/imagenet_rNN.yaml --config configs/logger/wandb.yaml`."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cli = build_cli(["--config", str(REPO / f"configs/imagenet_r{n}.yaml"), *W_AND_B, "--trainer.default_root_dir", str(tmp_path)], run=False)
    csv_logger, wandb_logger = cli.trainer.loggers  # the CSV logger first: logs/version_N/ is the run's log folder
    assert isinstance(csv_logger, CSVLogger) and isinstance(wandb_logger, WandbRunLogger)
    assert cli.trainer.log_dir == str(tmp_path / "logs/version_0")
    assert wandb_logger.save_dir == str(tmp_path) and wandb_logger.version.startswith(f"resnet{n}-4242-")
    assert wandb_logger._name == f"resnet{n}-4242" and wandb_logger._project == "resnet-imagenet"
    assert wandb_logger._offline and not wandb_logger._log_model  # no API key: offline, no artifacts
    assert sum(isinstance(c, WandbDashboards) for c in cli.trainer.callbacks) == 1
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_PROJECT", "elsewhere")
    cli = build_cli(["--config", str(REPO / f"configs/imagenet_r{n}.yaml"), *W_AND_B, "--trainer.default_root_dir", str(tmp_path)], run=False)
    online = cli.trainer.loggers[1]
    assert not online._offline and online._log_model is True and online._project == "elsewhere"


def test_run_identity_is_stable_per_run_directory(tmp_path, monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    first = run_identity(tmp_path / "a", "resnet50")
    assert first == run_identity(tmp_path / "a", "resnet50") and first[1] == "resnet50-a"  # read back, not new
    assert run_identity(tmp_path / "b", "resnet50")[0] != first[0]
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    run_id, name = run_identity(tmp_path / "c", "resnet152")
    assert name == "resnet152-777" and re.fullmatch(r"resnet152-777-[0-9a-f]{8}", run_id)
    assert run_identity(tmp_path / "a", "resnet50")[0] == first[0]  # a resume in a later job: the same run
    assert run_identity(tmp_path / "a", "resnet50", "mine")[0] == "mine" == run_identity(tmp_path / "a", "resnet50")[0]
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "700")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_identity(tmp_path / "d", "resnet101")[0].startswith("resnet101-700_3-")
    assert re.fullmatch(r"timm-resnet50d-700_3-[0-9a-f]{8}", run_identity(tmp_path / "t", "timm:resnet50d")[0])
    monkeypatch.setattr(wandb_logging.rank_zero_only, "rank", 1)
    assert run_identity(tmp_path / "e", "resnet50")[0].startswith("resnet50-700_3-")
    assert not (tmp_path / "e").exists()  # only rank 0 writes


def test_api_key_decides_online_and_commands_without_wandb_do_not_import_it(demo_root, tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert wandb_logging.wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    assert wandb_logging.wandb_mode() == "online"  # `wandb login` wrote the key
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_logging.wandb_mode() == "offline"
    assert evaluate_parser().parse_args(["--ckpt", "x.ckpt", "--data.root", "d", "--wandb", "false"]).wandb is False
    assert evaluate_parser().parse_args(["--ckpt", "x.ckpt", "--data.root", "d"]).wandb is None  # as the checkpoint says
    code = ("import sys; from train.cli import build_cli; import train.evaluate, train.results; "
            f"build_cli(['--config', 'configs/demo.yaml', '--trainer.default_root_dir', {str(tmp_path / 'r')!r}, "
            f"'--data.root', {str(demo_root)!r}], run=False); "
            "assert 'wandb' not in sys.modules, 'wandb imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
