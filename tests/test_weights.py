"""Published weights by name, read from the download caches: torchvision's (a damaged file there is named, with the
fix, instead of a traceback from torch.load) and timm's through the Hugging Face Hub cache. Nothing here downloads:
TORCH_HOME and HF_HOME are temporary folders."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from torchvision.transforms import v2

from datamodules.folder import decode
from datamodules.transforms import normalize_batch
from tests.conftest import run_resnet, write_imagenet_val
from train.weights import load_weights

SPEC = "torchvision:resnet18.IMAGENET1K_V1"


@pytest.fixture
def cache_file(tmp_path, monkeypatch) -> Path:
    """Where torchvision keeps resnet18.IMAGENET1K_V1 under TORCH_HOME=tmp_path/torch_home; downloading fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"the test tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    path = tmp_path / "torch_home/hub/checkpoints" / Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    path.parent.mkdir(parents=True)
    return path


def whole_file() -> bytes:
    torch.manual_seed(0)
    path = Path(torch.hub.get_dir()) / "whole.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path.read_bytes()


@pytest.mark.parametrize(
    "damage, error",
    [
        (lambda data: b"<html>Service Unavailable</html>", "UnpicklingError: invalid load key, '<'."),  # a proxy's page
        (lambda data: data[: len(data) // 2], "RuntimeError: PytorchStreamReader failed reading zip archive"),
        (lambda data: b"", "EOFError: Ran out of input"),
    ],
    ids=["garbage", "truncated", "empty"],
)
def test_a_damaged_cached_download_names_the_file_and_the_fix(cache_file, damage, error):
    cache_file.write_bytes(damage(whole_file()))
    with pytest.raises(ValueError) as raised:
        load_weights(SPEC)
    message = str(raised.value)
    assert message.startswith(f"--weights {SPEC}: cannot read torchvision's cached download {cache_file} ({error}")
    assert message.endswith(
        f"): the file is damaged or incomplete. Delete it (rm {cache_file}) and rerun to download it again"
    )
    assert cache_file.exists()  # the user's to delete: it may be a copy put there on purpose


def test_a_whole_cached_download_loads_and_the_cli_names_a_damaged_one(cache_file, tmp_path):
    cache_file.write_bytes(whole_file())
    assert load_weights(SPEC).arch == "resnet18"
    cache_file.write_bytes(b"\x00" * 1000)
    proc = run_resnet("evaluate", "--weights", SPEC, "--data.root", str(tmp_path / "imagenet"),
                      env={"TORCH_HOME": str(tmp_path / "torch_home")}, expect_rc=2)
    assert proc.stderr.splitlines()[-1].startswith(
        f"resnet evaluate: error: --weights {SPEC}: cannot read torchvision's cached download {cache_file} ("
    )
    assert proc.stderr.splitlines()[-1].endswith(f"Delete it (rm {cache_file}) and rerun to download it again")
    assert "Traceback" not in proc.stderr


def test_without_a_cached_file_a_failed_download_is_a_connection_error(cache_file, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConnectionError, match=rf"cannot download https://\S+/resnet18-f37072fd.pth .*; offline, put "
                                              rf"that file at {cache_file} or pass its path as --weights$"):
        load_weights(SPEC)


def hub_cache_with(home: Path, repo: str, state: dict) -> None:
    """A Hugging Face Hub cache under HF_HOME `home` holding `repo`'s model.safetensors, as `hf download` leaves it."""
    from safetensors.torch import save_file

    model = home / "hub" / f"models--{repo.replace('/', '--')}"
    (model / "refs").mkdir(parents=True)
    (model / "refs/main").write_text("0" * 40)
    (model / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, model / "snapshots" / ("0" * 40) / "model.safetensors")


def test_timm_weights_by_name_from_the_hugging_face_cache(tmp_path):
    import timm

    # Offline (HF_HUB_OFFLINE=1): the Hub cache holds timm's file (random weights under the real repo name).
    offline = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    root = write_imagenet_val(tmp_path / "imagenet")
    args = ["evaluate", "--weights", "timm:resnet18.a1_in1k", "--data.root", str(root), "--data.batch_size", "100",
            "--data.num_workers", "0", "--crop_size", "32", "--resize_size", "36", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--output", str(tmp_path / "r18.pt")]
    proc = run_resnet(*args, env=offline, expect_rc=2)  # not in the cache: said, with the way out
    assert "--weights timm:resnet18.a1_in1k: not in the Hugging Face Hub cache" in proc.stderr and "HF_HOME" in proc.stderr
    torch.manual_seed(0)
    net = timm.create_model("resnet18")
    hub_cache_with(tmp_path / "hf", "timm/resnet18.a1_in1k", net.state_dict())
    proc = run_resnet(*args, env=offline)
    assert "the weights' own protocol resizes to 235 (timm: 224 / crop_pct): add --resize_size 235" in proc.stdout
    summary = json.loads((tmp_path / "r18.json").read_text())
    assert summary["arch"] == "timm:resnet18" and summary["model"] == "timm:resnet18 a1_in1k (timm)"
    result = torch.load(tmp_path / "r18.pt", weights_only=True)
    assert result["probs"].shape == (1000, 1000)
    preprocess = v2.Compose([v2.Resize(36, antialias=True), v2.CenterCrop(32)])
    with torch.no_grad():  # timm's network on the protocol's crops, image by image
        for i in range(0, 1000, 97):
            image = decode(str(root / "val" / result["ids"][i]))
            expected = net.eval()(normalize_batch(preprocess(image)[None])).softmax(1)[0]
            assert torch.allclose(result["probs"][i].float(), expected, atol=1e-3)
    with pytest.raises(ValueError, match="timm has no such pretrained weights; it has resnet18.a1_in1k"):
        load_weights("timm:resnet18.b9_in1k")
    with pytest.raises(ValueError, match="not in timm's ResNet family"):
        load_weights("timm:vit_base_patch16_224.augreg_in21k")
