"""torchvision's published weights by name, read from its download cache: a damaged file there is named, with the
fix, instead of a traceback from torch.load. Nothing here downloads: TORCH_HOME is a temporary folder."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from tests.conftest import run_resnet
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
