"""The bench commands run end to end (tiny sizes; the numbers themselves go to docs/BENCHMARKS.md)."""

import datetime
import json
import math
import os
import subprocess
import sys
import time

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import REPO, run_resnet
from datamodules.demo import write_bench_dataset
from train.bench import StepTimer, bench_data, bench_model
from train.model import ImageNetClassifier
from train.node_parts import PARTS, _SameBatch
from train.node_report import bench_node


def test_bench_data_times_every_backend_on_the_same_jpegs(demo_copy):
    rows = bench_data(root=str(demo_copy), backends=["pil", "torchvision", "dali", "ffcv"], batch_size=8,
                      num_workers=1, crop_size=32, warmup_batches=1, batches=3)
    assert [r["backend"] for r in rows] == ["pil", "torchvision", "dali", "ffcv"]
    for r in rows:  # 3 batches of 8 crops of 32 px each, timed: the rate is theirs
        assert r["images"] == 24 and r["shape"] == (8, 3, 32, 32), r
        assert r["images_per_sec"] == pytest.approx(24 / r["seconds"])
    assert (demo_copy / "ffcv/train.beton").is_file()  # written on first use


def test_bench_demo_trains_each_condition_and_compares_it_with_the_reference(demo_root, tmp_path):
    out = tmp_path / "variance"
    proc = run_resnet("bench", "demo", "--conditions", "[reference, avx2_kernels]", "--root", str(demo_root),
                      "--output", str(out), "--max_epochs", "1", timeout=600)
    rows = json.loads((out / "demo_variance.json").read_text())
    assert [r["condition"] for r in rows] == ["reference", "avx2_kernels"]
    assert rows[1]["env"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    for r in rows:
        (acc,) = r["curve"]  # one epoch, one validation
        assert 0 <= acc <= 1 and r["best_acc1"] == r["last_acc1"] == acc
        metrics = (out / r["condition"] / "logs/version_0/metrics.csv").read_text()
        assert "val/acc1" in metrics and r["seconds"] > 0
    assert rows[0]["best_acc1_diff_pts"] == 0
    assert rows[1]["best_acc1_diff_pts"] == pytest.approx(100 * (rows[1]["best_acc1"] - rows[0]["best_acc1"]))
    assert "| avx2_kernels |" in (out / "demo_variance.md").read_text() and "avx2_kernels" in proc.stdout
    run_resnet("bench", "demo", "--conditions", "[fast_cpu]", "--output", str(out), expect_rc=2)


def test_bench_model_and_fit(demo_root):
    assert bench_model("resnet18", batch_size=4, crop_size=32, precision="32-true", steps=2, warmup_steps=1) > 0
    # Another recipe than the default one (configs/demo.yaml, ResNet-18): its model is the one timed.
    proc = run_resnet("bench", "fit", "--recipe", "configs/imagenet_r50.yaml", "--steps", "3", "--warmup-steps", "1",
                      "--overrides", f"[--data.root, {demo_root}, --model.num_classes, '6', --trainer.accelerator, cpu, "
                      "--trainer.precision, 32-true, --data.crop_size, '32', --data.batch_size, '8', --data.num_workers, '0']")
    assert "of the synthetic ceiling" in proc.stdout
    assert "model ceiling (training step): resnet50, batch 8, 32px, 32-true" in proc.stdout


def test_bench_recipes_estimates_each_recipe_from_the_measured_rates(tmp_path):
    from train.bench_recipes import TRAIN_IMAGES, bench_recipes

    out = bench_recipes("resnet18", sizes=[160, 192], batch_size=2, precision="32-true", steps=1, warmup_steps=1,
                        gpus=8, accelerator="cpu", output=str(tmp_path / "r.json"))
    rates = {int(k): v for k, v in out["images_per_sec"].items()}
    assert set(rates) == {160, 192} and all(v > 0 for v in rates.values())
    epoch_hours = lambda rate: TRAIN_IMAGES / (8 * rate) / 3600
    # FFCV's 16 epochs: 160 px up to epoch 11, 192 from epoch 12 (progressive resizing).
    assert out["recipes"]["ffcv_rn50_16"]["hours"] == pytest.approx(12 * epoch_hours(rates[160]) + 4 * epoch_hours(rates[192]))
    # 224 px (paper, 120 epochs): the nearest measured side, 192, scaled by the pixel ratio.
    assert out["recipes"]["paper"]["hours"] == pytest.approx(120 * epoch_hours(rates[192] * (192 / 224) ** 2))
    assert json.loads((tmp_path / "r.json").read_text())["recipes"]["mlperf_r50"]["epochs"] == 37

def _check_rows(rows: list[dict]) -> None:
    """Each row ok with a positive, finite images/s (the GPU tests have none) or skipped with a reason; none failed."""
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        assert isinstance(r["seconds"], float) and r["seconds"] >= 0, r
        if r["status"] == "skipped":
            assert r["reason"].strip(), r
        elif r["part"] != "gpu_tests":
            assert math.isfinite(r["images_per_sec"]) and r["images_per_sec"] > 0, r


def test_make_gpu_check_on_a_cpu_writes_the_node_report(tmp_path):
    out = tmp_path / "gpu_check"
    # As a user runs it; CUDA hidden so that a GPU machine checks the CPU path here too (its GPU run is the target itself).
    proc = subprocess.run(["make", "gpu-check", f"GPU_CHECK_OUT={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"Report: {out}/node_report.json and {out}/node_report.md" in proc.stdout
    report = json.loads((out / "node_report.json").read_text())
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["hostname"]
    assert report["machine"]["gpu_count"] == 0 and report["machine"]["gpu_model"] == "none"
    assert set(report["versions"]) == {"python", "torch", "cuda", "cudnn", "lightning", "torchvision", "dali", "ffcv"}
    assert report["versions"]["torch"] == torch.__version__
    assert datetime.datetime.fromisoformat(report["date"]).tzinfo is not None  # UTC, ISO
    assert report["git_commit"] and report["failed"] == []
    rows = report["parts"]
    assert [r["part"] for r in rows] == sorted((r["part"] for r in rows), key=PARTS.index)  # in the parts' order
    assert {r["part"] for r in rows} == set(PARTS)
    _check_rows(rows)
    by_part = lambda part: [r for r in rows if r["part"] == part]
    assert [r["config"]["backend"] for r in by_part("fit")] == ["torchvision", "dali", "ffcv"]
    assert [r["config"]["protocol"] for r in by_part("eval")] == ["center", "10crop", "multiscale"]
    assert all("32px" in r["name"] and "batch 8" in r["name"] for r in by_part("ceiling") + by_part("fit"))  # CPU sizes, named
    ceilings = {r["name"]: r["images_per_sec"] for r in by_part("ceiling") if r["status"] == "ok"}
    assert "resnet50 channels_last eager, batch 8, 32px, 32-true" in ceilings
    for r in by_part("fit"):
        if r["status"] == "ok":
            assert r["ratio_to_ceiling"] == pytest.approx(r["images_per_sec"] / r["ceiling_images_per_sec"])
            # The ceiling of the same model, batch, crop, precision and layout, from the ceiling part's row.
            assert r["ceiling_images_per_sec"] == ceilings[r["ceiling_source"].removeprefix("ceiling row: ")]
    (overhead,) = by_part("overhead")
    ratio = overhead["lightning_images_per_sec"] / overhead["raw_images_per_sec"]
    assert overhead["overhead_pct"] == pytest.approx(100 * (1 - ratio))
    assert overhead["images_per_sec"] == overhead["lightning_images_per_sec"] and overhead["raw_images_per_sec"] > 0
    (gpu_tests,) = by_part("gpu_tests")
    assert (gpu_tests["status"], gpu_tests["reason"]) == ("skipped", "no CUDA GPU")
    markdown = (out / "node_report.md").read_text()
    for title in ("## Machine", "## Versions", "Training-step ceiling", "Full training pipeline", "Loaders alone",
                  "Evaluation protocols", "Lightning's overhead", "GPU tests"):
        assert title in markdown
    assert all(f"| {r['name']} | {r['status']} |" in markdown for r in rows)


def test_bench_node_reports_a_failing_part_and_goes_on(tmp_path, capsys):
    # A model torchvision does not have: that row fails with the exception's type and message, the next one runs.
    with pytest.raises(SystemExit) as stopped:
        bench_node(output=str(tmp_path), parts=["ceiling", "gpu_tests"], models=["resnet9", "resnet18"],
                   layouts=["nchw"], compiled_models=[], batch_size=2, crop_size=32, steps=1, warmup_steps=1, gpu_tests=False)
    assert stopped.value.code == 1
    report = json.loads((tmp_path / "node_report.json").read_text())
    bad, good, gpu_tests = report["parts"][0], report["parts"][1], report["parts"][-1]
    assert (bad["status"], bad["name"]) == ("failed", "resnet9 NCHW eager, batch 2, 32px, " + report["options"]["precision"])
    assert bad["reason"].startswith("ValueError: model.arch='resnet9'") and bad["images_per_sec"] is None
    assert good["status"] == "ok" and good["config"]["arch"] == "resnet18" and good["images_per_sec"] > 0
    assert (gpu_tests["status"], gpu_tests["reason"]) == ("skipped", "--gpu_tests false")
    assert report["failed"] == [f"ceiling: {bad['name']}: {bad['reason']}"]
    assert f"resnet bench node: failed parts:\n  ceiling: {bad['name']}: ValueError" in capsys.readouterr().err
    assert "| failed |" in (tmp_path / "node_report.md").read_text()


def test_bench_node_refuses_bad_options(tmp_path, capsys):
    for options, message in [({"steps": 0}, "--steps 0: must be at least 1"),
                             ({"root": str(tmp_path / "nowhere")},
                              f"--root {tmp_path / 'nowhere'}: expected an ImageNet-layout folder with train/ and val/"),
                             ({"parts": ["ceiling", "speed"]}, "--parts ['speed']: unknown")]:
        with pytest.raises(SystemExit) as stopped:
            bench_node(output=str(tmp_path / "out"), **options)
        assert stopped.value.code == 2
        assert f"resnet bench node: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out/node_report.json").exists()


def test_step_timer_times_the_steps_after_the_warm_up():
    """StepTimer (bench fit, the overhead part): the images of exactly `steps` steps after `warmup`, one batch
    reused on the device, through a real Trainer and ImageNetClassifier."""
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    timer = StepTimer(warmup=2, steps=3)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, max_steps=5, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(ImageNetClassifier("resnet18", num_classes=10, batch_size=4), train_dataloaders=_SameBatch(batch, 5))
    assert timer.images == 3 * 4 and timer.start is not None and timer.rate > 0


def test_bench_dataset_is_the_same_whatever_the_number_of_writer_processes(tmp_path):
    # 33 per class: two shards (32 + 1), written by two processes or one; small images keep it quick.
    one = write_bench_dataset(33, 2, image_size=(64, 48), workers=1, cache=str(tmp_path / "one"))
    two = write_bench_dataset(33, 2, image_size=(64, 48), workers=2, cache=str(tmp_path / "two"))
    files = sorted(p.relative_to(one) for p in one.rglob("*.JPEG"))
    assert len(files) == 6 * (33 + 2) and files == sorted(p.relative_to(two) for p in two.rglob("*.JPEG"))
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)
    assert len({(one / f).read_bytes() for f in files}) == len(files)  # every image drawn differently
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("shard*"))


def test_a_row_that_hangs_ends_the_command_within_its_limit():
    """A loader stuck inside DALI or FFCV never returns to Python: past its limit a row ends the process, stacks
    printed, instead of hanging `make gpu-check` forever."""
    # The row's start is printed after the imports (seconds, more on a loaded machine): CLOCK_MONOTONIC is one clock
    # for every process of the machine.
    code = ("import time; from train import node_parts; print('row', time.monotonic(), flush=True); "
            "node_parts.measure_row('data', 'stuck loader', {}, lambda: time.sleep(60), limit_s=2)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    row_start = float(proc.stdout.split("row ", 1)[1].split()[0])
    assert proc.returncode == 1 and time.monotonic() - row_start < 30
    assert "Timeout" in proc.stderr and "time.sleep" not in proc.stdout and "<lambda>" in proc.stderr


def test_bench_checkpoint_times_an_atomic_write_and_names_a_missing_folder(tmp_path):
    from train.bench_checkpoint import bench_checkpoint

    row = bench_checkpoint("resnet18", str(tmp_path), repeats=1, every_minutes=30)
    # ResNet-18: 11.7 M parameters + SGD momentum in float32 (~94 MB) and the BatchNorm buffers.
    assert 90 < row["megabytes"] < 100 and 0 < row["seconds"] < 60
    assert row["share_of_interval"] == pytest.approx(row["seconds"] / 1800, rel=0.01)
    assert list(tmp_path.iterdir()) == []  # written to a temporary folder inside, removed
    with pytest.raises(FileNotFoundError, match="no such folder"):
        bench_checkpoint("resnet18", str(tmp_path / "absent"))
