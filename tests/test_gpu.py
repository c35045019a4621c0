"""On a CUDA GPU: training in bf16-mixed with channels_last learns, torch.compile computes what eager does, and
`resnet evaluate` on the GPU gives the CPU's numbers (float32) or nearly (bf16). Skipped where there is no GPU
(tests/conftest.py); run on a lent GPU machine with `pytest -m gpu tests/test_gpu.py` (~2 min on an H100)."""

from __future__ import annotations

import csv
import math
import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from datamodules.demo import write_demo_dataset
from tests.conftest import REPO, last_metrics, run_resnet, tiny_fit_args
from train.evaluate import evaluate

pytestmark = pytest.mark.gpu

GPU = ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]
# configs/eval/demo.yaml's geometry: the ImageNet protocols scaled to the demo's 48-pixel crops.
DEMO_EVAL = dict(crop_size=48, resize_size=55, scales=[48, 55, 82, 103, 137])


@pytest.fixture(scope="module")
def demo_full(tmp_path_factory) -> Path:
    """The full demo set (6 classes, 960 train / 240 val JPEGs), what `make demo` trains on."""
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo_full")


@pytest.fixture(scope="module")
def gpu_run(demo_full, tmp_path_factory) -> Path:
    """configs/demo.yaml trained on the GPU in bf16-mixed with channels_last (12 epochs of ResNet-18)."""
    run_dir = tmp_path_factory.mktemp("gpu") / "run"
    run_resnet(
        "fit", "--config", str(REPO / "configs/demo.yaml"), "--data.root", str(demo_full), *GPU,
        "--trainer.precision", "bf16-mixed", "--model.channels_last", "true", "--data.num_workers", "4",
        "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false", timeout=400,
    )
    return run_dir


@pytest.fixture(scope="module")
def eval_root(demo_full, tmp_path_factory) -> Path:
    """The first 20 val images of each demo class (120): the CPU side of the comparisons stays quick."""
    root = tmp_path_factory.mktemp("eval")
    for folder in sorted((demo_full / "val").iterdir()):
        (root / "val" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:20]:
            shutil.copy(image, root / "val" / folder.name / image.name)
    return root


def history(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "logs/version_0/history.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def step_losses(run_dir: Path) -> dict[int, float]:
    """train/loss_step by global step, from the run's metrics.csv (logged every step)."""
    with open(run_dir / "logs/version_0/metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")}


def test_bf16_channels_last_training_on_the_gpu_learns(gpu_run):
    rows = history(gpu_run)
    assert len(rows) == 12
    losses = [r["train/loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses  # from ~ln 6 = 1.8 down
    metrics = last_metrics(gpu_run)
    assert metrics["val/images"] == 240
    # The CPU demo (fp32) reaches ~96%; chance is 1/6.
    assert metrics["val/acc1"] >= 0.85, metrics
    assert math.isfinite(metrics["val/loss"]) and metrics["train/images_per_sec"] > 0
    state = torch.load(gpu_run / "checkpoints/best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    assert next(v for k, v in state.items() if k == "net.fc.weight").dtype == torch.float32  # mixed: fp32 weights


def test_compiled_model_computes_the_eager_losses(demo_root, tmp_path):
    options = [*GPU, "--trainer.precision", "bf16-mixed", "--model.channels_last", "true", "--trainer.max_steps", "3",
               "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0"]
    losses = {}
    for compiled in ("false", "true"):
        run_dir = tmp_path / f"compile_{compiled}"
        run_resnet(*tiny_fit_args(demo_root, run_dir, *options, "--model.compile", compiled), timeout=600)
        losses[compiled] = step_losses(run_dir)
        if compiled == "true":  # compiled in place: the checkpoint's keys are the plain model's
            state = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
            assert not any("_orig_mod" in k for k in state) and "net.fc.weight" in state
    eager, compiled = losses["false"], losses["true"]
    assert sorted(eager) == sorted(compiled) == [0, 1, 2]
    assert all(math.isfinite(v) for v in [*eager.values(), *compiled.values()])
    # Same seed, same batches: the first step sees the same weights and images; bf16 rounding differs with fusion.
    assert compiled[0] == pytest.approx(eager[0], rel=1e-2)
    assert compiled[2] == pytest.approx(eager[2], rel=5e-2)


@pytest.fixture
def full_float32():
    """No TensorFloat-32 in cuDNN convolutions or matrix products (torch runs convolutions in TF32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run_evaluate(ckpt: Path, root: Path, protocol: str, accelerator: str, precision: str) -> dict:
    return evaluate(
        ckpt=str(ckpt), protocol=protocol, **DEMO_EVAL,
        data={"root": str(root), "batch_size": 16, "num_workers": 4},
        trainer={"accelerator": accelerator, "devices": 1, "precision": precision, "enable_progress_bar": False},
    )


@pytest.mark.parametrize("protocol", ["center", "10crop", "multiscale"])
def test_gpu_evaluation_equals_the_cpu_evaluation(gpu_run, eval_root, protocol, full_float32):
    ckpt = gpu_run / "checkpoints/best.ckpt"
    cpu = run_evaluate(ckpt, eval_root, protocol, "cpu", "32-true")
    gpu = run_evaluate(ckpt, eval_root, protocol, "gpu", "32-true")  # channels_last on the GPU by default
    assert gpu["ids"] == cpu["ids"] and torch.equal(gpu["labels"], cpu["labels"]) and gpu["images"] == 120
    cpu_probs, gpu_probs = cpu["probs"].float(), gpu["probs"].float()
    assert (gpu_probs - cpu_probs).abs().max() < 2e-3  # float16 as saved: 5e-4 steps near 1
    # Same top-1 prediction for every image whose best two classes are not within float noise of each other.
    top2 = cpu_probs.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2e-3
    assert torch.equal(gpu_probs.argmax(1)[clear], cpu_probs.argmax(1)[clear])
    if bool(clear.all()):
        assert gpu["acc1"] == cpu["acc1"] and gpu["acc5"] == cpu["acc5"]
    assert cpu["acc1"] >= 80.0  # a trained model: the comparison is not between near-uniform outputs


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_gpu_evaluation_stays_close_to_float32(gpu_run, eval_root, precision):
    ckpt = gpu_run / "checkpoints/best.ckpt"
    fp32 = run_evaluate(ckpt, eval_root, "10crop", "cpu", "32-true")
    bf16 = run_evaluate(ckpt, eval_root, "10crop", "gpu", precision)
    assert bf16["precision"] == precision
    assert (bf16["probs"].float() - fp32["probs"].float()).abs().max() < 0.1  # bfloat16: ~3 significant digits
    assert abs(bf16["acc1"] - fp32["acc1"]) <= 100 * 2 / 120 + 1e-9  # at most 2 of 120 images change
    assert abs(bf16["acc5"] - fp32["acc5"]) <= 100 * 2 / 120 + 1e-9


class SyncsPerStep(pl.Callback):
    """CUDA synchronisations torch reports (its sync debug mode) from one training batch's start to the next one's:
    the step, its hooks, Lightning's logging and the next fetch and copy, by the global step the batch completed."""

    def __init__(self) -> None:
        self.steps: dict[int, list[str]] = {}
        self._caught = None

    def _close(self, step: int) -> None:
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._caught.__exit__(None, None, None)
            self.steps[step] = [str(w.message) for w in self._records if "synchroniz" in str(w.message)]
            self._caught = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close(trainer.global_step)
        self._caught = warnings.catch_warnings(record=True)
        self._records = self._caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close(trainer.global_step)


def test_training_steps_between_log_steps_never_synchronise_the_gpu(demo_root, tmp_path):
    from train.cli import build_cli

    args = tiny_fit_args(demo_root, tmp_path / "run", *GPU, "--trainer.precision", "bf16-mixed",
                         "--model.channels_last", "true", "--data.num_workers", "2", "--trainer.max_epochs", "1",
                         "--trainer.log_every_n_steps", "4", "--trainer.limit_val_batches", "0")[1:]
    cli = build_cli(args, run=False)
    probe = SyncsPerStep()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert sorted(probe.steps) == list(range(1, 10))
    # Step 1 includes start-up (cuDNN, the allocator); 4 and 8 are log steps; 9 ends the epoch.
    quiet = {step: syncs for step, syncs in probe.steps.items() if step not in (1, 4, 8, 9)}
    assert quiet and all(not syncs for syncs in quiet.values()), quiet
    assert probe.steps[4], "the log step reads values back: the probe sees synchronisations"
