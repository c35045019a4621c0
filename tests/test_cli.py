"""The front door: `resnet --help` lists every command, usage lines name the whole command, one option spelling."""

from __future__ import annotations

import yaml

from tests.conftest import REPO, run_resnet
from train.commands import BENCH, COMMANDS, PREPARE


def test_help_lists_every_command_once_with_a_line():
    out = run_resnet("--help").stdout
    names = [n for n, what in COMMANDS.items() if isinstance(what, str)]
    names += [f"prepare {n}" for n in PREPARE] + [f"bench {n}" for n in BENCH]
    assert {"fit", "validate", "evaluate", "ensemble", "predict", "prepare ffcv", "bench node"} <= set(names)
    listed = [line.split("  ")[1].strip() for line in out.splitlines() if line.startswith("  ") and "  " in line[2:]]
    assert listed == names
    assert all(len(line.split(None, 2 if line.split()[0] in ("prepare", "bench") else 1)) > 1 for line in
               (ln.strip() for ln in out.splitlines() if ln.startswith("  ")))  # each with its line
    for name in ("fit", "evaluate", "predict", "prepare check", "bench demo"):  # each command answers --help
        usage = run_resnet(*name.split(), "--help").stdout.splitlines()[0].replace(" [options]", "")
        assert usage.startswith(f"usage: resnet {name}"), usage
    assert "--a_b or --a-b" in out
    assert "resnet COMMAND" in run_resnet(expect_rc=2).stderr  # no command: the same list, an error status


def test_lightnings_test_and_predict_are_not_offered():
    proc = run_resnet("test", "--config", "configs/demo.yaml", expect_rc=2)
    assert "resnet: error: no command 'test'" in proc.stderr
    # Options before any command: every command is offered, not LightningCLI's fit and validate alone
    for args in (["--config", "configs/demo.yaml"], ["-c", "configs/demo.yaml", "test"]):
        err = run_resnet(*args, expect_rc=2).stderr
        assert err.startswith(f"resnet: error: no command before {args[0]} (e.g. resnet fit {' '.join(args[:2])})")
        assert "\n  evaluate " in err and "\n  predict " in err
    assert run_resnet("-c", "configs/demo.yaml", "fit", "--print_config").stdout.startswith("# lightning.pytorch==")


def test_usage_and_errors_name_the_whole_command():
    err = run_resnet("bench", "data", "--bogus", "1", expect_rc=2).stderr
    assert "usage: resnet bench [options] data" in err and "run: resnet bench data --help" in err
    err = run_resnet("prepare", "demo", "--sizes", "1", expect_rc=2).stderr
    assert "run: resnet prepare demo --help" in err


def test_dashes_and_underscores_alike(tmp_path):
    out = run_resnet("fit", "--config", str(REPO / "configs/demo.yaml"), "--trainer.max-epochs", "3",
                     "--data.batch-size", "32", "--print_config").stdout
    config = yaml.safe_load(out)
    assert config["trainer"]["max_epochs"] == 3 and config["data"]["batch_size"] == 32


def test_spelling_stops_at_a_bare_double_dash():
    from train.commands import underscore_options

    assert underscore_options(["--max-resolution", "512", "--", "--my-photo.jpg"]) == [
        "--max_resolution", "512", "--", "--my-photo.jpg"]


def test_no_srun_hint_outside_a_slurm_allocation(demo_root, tmp_path):
    # srun exists here (the test cluster's packages): Lightning's "srun is available" hint would print on every
    # command, as on a login node. The installed script, with Python's default warning filters.
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    assert shutil.which("srun"), "the SLURM packages (make slurm-packages) put srun on PATH"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("SLURM_", "PYTHONWARNINGS"))}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "resnet"), "validate", "--config", "configs/demo.yaml", "--data.root",
         str(demo_root), "--data.crop_size", "32", "--data.val_resize_size", "36", "--data.num_workers", "0",
         "--random_weights", "true", "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar",
         "false"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "The `srun` command is available" not in proc.stderr and "val/acc1" in proc.stdout


def test_backend_options_sit_under_the_backends_name_and_old_spellings_still_run(tmp_path):
    out = run_resnet("fit", "--config", str(REPO / "configs/demo.yaml"), "--data", str(REPO / "configs/data/ffcv.yaml"),
                     "--data.dali.device", "cpu", "--data.ffcv.order", "quasi_random", "--print_config").stdout
    data = yaml.safe_load(out)["data"]
    assert data["backend"] == "ffcv" and data["dali"] == {"device": "cpu"}
    assert data["ffcv"] == {"dir": None, "order": "quasi_random", "os_cache": True}
    proc = run_resnet("fit", "--config", str(REPO / "configs/demo.yaml"), "--data.dali-device=gpu",
                      "--data.ffcv_dir", "/x", "--print_config")
    data = yaml.safe_load(proc.stdout)["data"]
    assert data["dali"]["device"] == "gpu" and data["ffcv"]["dir"] == "/x"
    assert "--data.dali_device is now --data.dali.device" in proc.stderr
    # YAML of the old schema: a --data file, and a whole config as earlier runs saved it (config.yaml of their logs)
    old = tmp_path / "old.yaml"
    old.write_text("backend: dali\ndali_device: cpu\n")
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump({"data": {"root": "/d", "ffcv_dir": "/b", "ffcv_order": "random",
                                              "ffcv_os_cache": False}}))
    for config, expected in ((["--data", str(old)], {"dali": {"device": "cpu"}}),
                             (["--config", str(saved)], {"ffcv": {"dir": "/b", "order": "random", "os_cache": False}})):
        proc = run_resnet("fit", "--config", str(REPO / "configs/demo.yaml"), *config, "--print_config")
        data = yaml.safe_load(proc.stdout)["data"]
        assert {k: data[k] for k in expected} == expected and not {"dali_device", "ffcv_dir"} & data.keys()
        assert f"config key data.{'dali_device' if 'dali' in expected else 'ffcv_dir'} is now" in proc.stderr
    err = run_resnet("fit", "--config", str(REPO / "configs/demo.yaml"), "--data.backend", "pil", expect_rc=2).stderr
    assert "torchvision" in err and "ffcv" in err  # the registry's names offered
    # A backend's options as something other than a mapping (jsonargparse lets a list through to instantiation)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  ffcv: [1, 2]\n")
    err = run_resnet("fit", "--config", str(REPO / "configs/demo.yaml"), "--config", str(bad), "--data.root",
                     str(tmp_path), "--model.num_classes", "6", expect_rc=2).stderr
    assert ("resnet fit: error: data.ffcv: expected a mapping of FfcvOptions's fields (dir, order, os_cache), got "
            "[1, 2]") in err and "Traceback" not in err


def test_the_datamodule_refuses_an_unknown_backend_and_settings_a_backend_lacks(tmp_path):
    import pytest

    from datamodules.imagenet import ImageNetDataModule

    with pytest.raises(ValueError, match="data.backend='pil': expected one of torchvision, dali, ffcv"):
        ImageNetDataModule(str(tmp_path), backend="pil")
    with pytest.raises(ValueError, match=r"data.backend=ffcv: data.lighting_std=0.1 exist .* \(use lighting_std 0.0\)"):
        ImageNetDataModule(str(tmp_path), backend="ffcv", lighting_std=0.1)
    with pytest.raises(ValueError, match="data.ffcv.order=quasi_random"):
        ImageNetDataModule(str(tmp_path), backend="ffcv", ffcv={"order": "quasi_random"}, repeated_augmentation=2)
    dm = ImageNetDataModule(str(tmp_path), backend="ffcv", ffcv={"dir": "/b"})
    assert str(dm.loaders.dir) == "/b" and dm.loaders.data_dir(tmp_path) == dm.loaders.dir


def test_abbreviated_option_names_are_errors_not_guesses():
    # argparse would read a prefix of one option as that option: a misspelt key must be named, not guessed.
    demo = ["fit", "--config", str(REPO / "configs/demo.yaml")]
    for command, bad in (([*demo, "--data.back", "dali", "--print_config"], "--data.back"),
                         ([*demo, "--trainer.max_epoch", "2", "--print_config"], "--trainer.max_epoch"),
                         (["prepare", "demo", "--train_per", "2"], "--train_per"),
                         (["predict", "--weigh", "x.pth", "y.jpg"], "--weigh")):
        err = run_resnet(*command, expect_rc=2).stderr
        assert "unrecognized arguments: " + bad in err, err[-500:]


def test_of_both_spellings_in_one_config_the_new_one_wins():
    from train.commands import renamed_keys

    config = {"data": {"ffcv_dir": "/a", "ffcv": {"dir": "/b"}, "dali_device": "cpu"}}
    assert renamed_keys(config) == {"data": {"ffcv": {"dir": "/b"}, "dali": {"device": "cpu"}}}
    assert renamed_keys({"backend": "ffcv", "ffcv_order": "random"}) == {"backend": "ffcv", "ffcv": {"order": "random"}}
    assert renamed_keys("dali") == "dali" and renamed_keys([1]) == [1]


def test_ckpt_path_values_lightning_resolves_pass_and_unreadable_files_are_named(tmp_path):
    import pytest
    import torch
    from jsonargparse import Namespace

    from train.cli import checkpoint_overrides

    config = lambda ckpt: Namespace(subcommand="fit", fit=Namespace(ckpt_path=ckpt, model=Namespace(arch="resnet18")))
    (tmp_path / "sharded").mkdir()  # a checkpoint saved as a folder (sharded FSDP): Lightning's to read
    (tmp_path / "sharded" / ".metadata").touch()
    for ckpt in ("last", "best", "hpc", "registry", "registry:model:latest", "s3://bucket/x.ckpt", str(tmp_path / "sharded")):
        assert checkpoint_overrides(config(ckpt)) == [], ckpt
    with pytest.raises(ValueError, match=rf"--ckpt_path {tmp_path}: a folder, not a file; a run's checkpoints are in "):
        checkpoint_overrides(config(str(tmp_path)))
    (tmp_path / "empty.ckpt").touch()
    with pytest.raises(ValueError, match=r"empty.ckpt: an empty file \(0 bytes\): a copy or a save that did not finish"):
        checkpoint_overrides(config(str(tmp_path / "empty.ckpt")))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"--ckpt_path {tmp_path}/run: a run's folder; its checkpoints are in "):
        checkpoint_overrides(config(str(tmp_path / "run")))
    torch.save({"hyper_parameters": {"arch": "resnet50"}, "where": tmp_path}, tmp_path / "odd.ckpt")  # a Path object
    refused = (r"odd.ckpt: cannot read it, damaged or cut short\? \(UnpicklingError: Unsupported global: GLOBAL "
               r"pathlib.PosixPath was not an allowed global by default\)")  # the cause after torch's advice
    with pytest.raises(ValueError, match=refused):
        checkpoint_overrides(config(str(tmp_path / "odd.ckpt")))
    torch.save({"hyper_parameters": {"arch": "resnet50"}}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    assert checkpoint_overrides(config(str(tmp_path / "old.ckpt"))) == ["model.arch 'resnet18' -> 'resnet50'"]
