import pytest
import yaml

from datamodules import ImageNetDataModule
from tests.conftest import REPO, run_resnet
from train.cli import build_cli
from train.evaluate import evaluate_parser
from train.model import ImageNetClassifier
from train.optim import scaled_lr

# Training recipes; a per-model delta is used on top of its base (`--config base --config delta`).
BASES = {"demo_r34.yaml": "demo.yaml"}
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
EVAL_CONFIGS = sorted((REPO / "configs/eval").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_instantiates(config, demo_root, tmp_path):
    chain = [REPO / "configs" / BASES[config.name], config] if config.name in BASES else [config]
    args = [a for c in chain for a in ("--config", str(c))]
    # Data where the demo configs count their classes (model.num_classes unset); a fresh clone has no .cache/.
    cli = build_cli([*args, "--trainer.default_root_dir", str(tmp_path), "--data.root", str(demo_root)], run=False)
    assert isinstance(cli.model, ImageNetClassifier) and isinstance(cli.datamodule, ImageNetDataModule)
    # The model's lr scales with the global batch that only the data config sets.
    assert cli.model.hparams.batch_size == cli.datamodule.batch_size
    merged = {}
    for c in chain:
        merged.update(yaml.safe_load(c.read_text())["trainer"])
    assert cli.trainer.max_epochs == merged["max_epochs"]
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")
    if config.name == "demo_r34.yaml":
        assert cli.model.hparams.arch == "resnet34" and cli.model.hparams.lr_per_256 == 0.4
    assert cli.model.hparams.num_classes == (6 if config.name.startswith("demo") else 1000)


@pytest.mark.parametrize("config", EVAL_CONFIGS, ids=lambda p: p.name)
def test_eval_config_parses(config):
    cfg = evaluate_parser().parse_args(["--config", str(config), "--ckpt", "x.ckpt", "--protocol", "multiscale"])
    assert cfg.data.root and cfg.protocol == "multiscale"
    assert cfg.crop_size <= cfg.resize_size and len(cfg.scales) == 5 and min(cfg.scales) == cfg.crop_size


@pytest.mark.parametrize("n", [50, 101, 152])
def test_imagenet_recipes(n):
    cli = build_cli(["--config", str(REPO / f"configs/imagenet_r{n}.yaml"), "--data.batch_size", "1024"], run=False)
    h = cli.model.hparams
    assert (h.arch, h.num_classes, h.lr_schedule, tuple(h.lr_milestones)) == (f"resnet{n}", 1000, "step", (30, 60, 80))
    assert (h.momentum, h.weight_decay, h.lr_per_256) == (0.9, 1e-4, 0.1)
    assert cli.trainer.precision == "bf16-mixed"
    assert scaled_lr(h.lr_per_256, h.batch_size) == pytest.approx(0.4)


def test_unknown_key_is_an_error_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs/demo.yaml").read_text() + "  crop_sise: 96\n")  # a typo under `data:`
    with pytest.raises(SystemExit) as exit_:
        build_cli(["--config", str(bad)], run=False)
    assert exit_.value.code != 0 and "crop_sise" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        build_cli(["--config", str(REPO / "configs/demo.yaml"), "--model.lr_per_265", "1"], run=False)
    assert exit_.value.code != 0 and "lr_per_265" in capsys.readouterr().err


def test_bad_progressive_resizing_is_a_usage_error_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_cli(["--config", str(REPO / "configs/demo.yaml"), "--data.progressive_resizing",
                   "{min_size: 192, max_size: 160}"], run=False)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "data.progressive_resizing=" in err and "min_size <= max_size" in err
    assert "Traceback" not in err


def test_print_config_is_the_resolved_recipe():
    out = run_resnet("fit", "--config", "configs/imagenet_r152.yaml", "--data.root", "/elsewhere", "--print_config").stdout
    config = yaml.safe_load(out)
    assert config["model"]["arch"] == "resnet152" and config["data"]["root"] == "/elsewhere"
    assert config["trainer"]["use_distributed_sampler"] is False
    assert config["checkpoint"]["monitor"] == "val/acc1"


@pytest.mark.parametrize("data", sorted((REPO / "configs/data").glob("*.yaml")), ids=lambda p: p.name)
def test_data_backend_configs_compose_with_the_recipes(data):
    for n in (50, 101, 152):
        cli = build_cli(["--config", str(REPO / f"configs/imagenet_r{n}.yaml"), "--data", str(data)], run=False)
        hp = cli.datamodule.hparams
        assert hp.backend == yaml.safe_load(data.read_text())["backend"]
        assert hp.root == "/data/imagenet" and hp.batch_size == 256 and cli.model.hparams.arch == f"resnet{n}"
