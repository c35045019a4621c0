"""The bench commands run end to end (tiny sizes; the numbers themselves go to docs/BENCHMARKS.md)."""

from tests.conftest import run_resnet
from train.bench import bench_data, bench_model


def test_bench_data_times_every_backend_on_the_same_jpegs(demo_copy):
    rows = bench_data(root=str(demo_copy), backends=["pil", "torchvision", "dali", "ffcv"], batch_size=8,
                      num_workers=1, crop_size=32, warmup_batches=1, batches=3)
    assert [r["backend"] for r in rows] == ["pil", "torchvision", "dali", "ffcv"]
    assert all(r["images_per_sec"] > 0 for r in rows)
    assert (demo_copy / "ffcv/train.beton").is_file()  # written on first use


def test_bench_model_and_fit(demo_root):
    assert bench_model("resnet18", batch_size=4, crop_size=32, precision="32-true", steps=2, warmup_steps=1) > 0
    # Another recipe than the default one (configs/demo.yaml, ResNet-18): its model is the one timed.
    proc = run_resnet("bench", "fit", "--recipe", "configs/imagenet_r50.yaml", "--steps", "3", "--warmup-steps", "1",
                      "--overrides", f"[--data.root, {demo_root}, --model.num_classes, '6', --trainer.accelerator, cpu, "
                      "--trainer.precision, 32-true, --data.crop_size, '32', --data.batch_size, '8', --data.num_workers, '0']")
    assert "of the synthetic ceiling" in proc.stdout
    assert "model ceiling (training step): resnet50, batch 8, 32px, 32-true" in proc.stdout
