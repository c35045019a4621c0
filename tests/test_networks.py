"""The network variants of the recipes (train/networks.py) and the batch mixing of the model, against direct
computations."""

import json

import pytest
import torch
import torchvision
from torch.nn import functional as F

from train.model import ImageNetClassifier, batch_mix
from train.networks import BlurPoolConv2d, build_resnet


def test_blurpool_sits_before_each_strided_convolution_and_blurs_as_ffcv_does():
    plain, blurred = build_resnet("resnet50"), build_resnet("resnet50", blurpool=True)
    wrapped = sorted(n for n, m in blurred.named_modules() if isinstance(m, BlurPoolConv2d))
    # FFCV's rule: stride > 1 and 16+ input channels: not the RGB stem; the 3x3 and the shortcut of layers 2-4.
    assert wrapped == sorted(f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv2", "downsample.0"))
    assert blurred.state_dict().keys() == plain.state_dict().keys()  # torchvision's keys: weights load both ways
    blurred.load_state_dict(plain.state_dict())
    conv = blurred.layer2[0].conv2
    x = torch.randn(2, conv.in_channels, 12, 12)
    kernel = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16  # FFCV's filter, zero padding 1, stride 1
    blur = F.conv2d(x, kernel.expand(conv.in_channels, 1, 3, 3), padding=1, groups=conv.in_channels)
    expected = F.conv2d(blur, plain.layer2[0].conv2.weight, stride=2, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-5)
    assert blurred(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_head_computes_in_float32_under_bf16_autocast():
    net = build_resnet("resnet18", num_classes=10).eval()
    features = torch.randn(4, 512)
    exact = features.double() @ net.fc.weight.double().T + net.fc.bias.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net.fc(features)
        plain = torchvision.models.resnet18(num_classes=10).fc
        plain.load_state_dict(net.fc.state_dict())
        assert plain(features).dtype == torch.bfloat16  # what the head would otherwise give
        assert net(torch.randn(1, 3, 32, 32)).dtype == torch.float32
    assert logits.dtype == torch.float32 and torch.allclose(logits.double(), exact, atol=1e-5)


def test_mixup_and_cutmix_targets_equal_the_formulas():
    torch.manual_seed(0)
    images, labels = torch.rand(6, 3, 16, 16), torch.arange(6)
    mixed, targets = batch_mix(10, 0.2, 0.0)(images, labels)
    lam = targets[0, 0].item()  # image 0 keeps lam of its label 0 and takes 1 - lam of image 5's label 5
    onehot = F.one_hot(labels, 10).float()
    assert torch.allclose(targets, lam * onehot + (1 - lam) * onehot.roll(1, 0))
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)
    mixed, targets = batch_mix(10, 0.0, 1.0)(images, labels)
    from_rolled = (mixed == images.roll(1, 0)).all(dim=1) & (mixed != images).any(dim=1)  # [N, H, W]
    lam = 1 - from_rolled[0].float().mean().item()  # CutMix's lam: the share of the image kept
    assert torch.allclose(targets, lam * onehot + (1 - lam) * onehot.roll(1, 0), atol=1e-6)
    assert batch_mix(10, 0.0, 0.0) is None


def test_model_with_mixing_and_blurpool_trains_on_soft_targets():
    model = ImageNetClassifier(arch="resnet18", num_classes=4, mixup_alpha=0.2, cutmix_alpha=1.0, blurpool=True)
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    mixed, targets = model.batch_mix(images, labels)
    assert targets.shape == (4, 4) and torch.allclose(targets.sum(1), torch.ones(4))
    loss = model.criterion(model(mixed), targets)
    loss.backward()
    assert torch.isfinite(loss) and model.net.fc.weight.grad is not None
    with pytest.raises(ValueError, match="model.optimizer='adam'"):
        ImageNetClassifier(arch="resnet18", optimizer="adam")


def test_the_class_count_is_the_last_linear_layers_wherever_it_sits():
    from torch import nn

    from train.networks import ARCHS, num_outputs

    assert ARCHS == ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    assert num_outputs(build_resnet("resnet18", 6)) == 6
    assert num_outputs(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 5), nn.Linear(5, 7))) == 7
    with pytest.raises(ValueError, match="Sequential: no Linear classifier"):
        num_outputs(nn.Sequential(nn.Conv2d(3, 8, 3)))


def test_timm_resnets_are_networks_of_the_registry():
    import timm

    from train.networks import check_arch, timm_archs

    assert {"timm:resnet50d", "timm:seresnext50_32x4d", "timm:resnetrs50"} <= set(timm_archs())
    net = build_resnet("timm:resnet50d", num_classes=6, zero_init_residual=True, blurpool=True)
    assert type(net.fc).__name__ == "Float32Head" and net.fc.out_features == 6
    assert all(not b.bn3.weight.detach().any() for s in (net.layer1, net.layer4) for b in s)  # zero_init_last
    reference = timm.create_model("resnet50d", num_classes=6)  # timm's keys, BlurPool's filter not among them
    assert net.state_dict().keys() == reference.state_dict().keys()
    net.load_state_dict(reference.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(torch.randn(2, 3, 64, 64)).dtype == torch.float32
    with pytest.raises(ValueError, match="nearest: timm:resnet50, timm:resnet50t"):
        check_arch("timm:resnet50x")
    with pytest.raises(ValueError, match=r"torchvision's resnet18, .* or timm:<name>"):
        check_arch("vgg16")


def test_a_timm_network_trains_evaluates_and_predicts_by_name(demo_root, tmp_path):
    from tests.conftest import run_resnet, tiny_fit_args
    from train.weights import load_checkpoint

    run = tmp_path / "run"
    run_resnet(*tiny_fit_args(demo_root, run, "--model.arch", "timm:resnet18d", "--trainer.max_epochs", "1"))
    loaded = load_checkpoint(str(run / "checkpoints/last.ckpt"))
    assert loaded.arch == "timm:resnet18d" and loaded.net.fc.out_features == 6
    assert "conv1.0.weight" in loaded.net.state_dict()  # ResNet-D's deep stem: timm's network, not torchvision's
    out = tmp_path / "eval.pt"
    run_resnet("evaluate", "--ckpt", str(run / "checkpoints/last.ckpt"), "--data.root", str(demo_root),
               "--data.num_workers", "0", "--crop_size", "32", "--resize_size", "36", "--trainer.accelerator", "cpu",
               "--trainer.enable_progress_bar", "false", "--output", str(out))
    assert json.loads(out.with_suffix(".json").read_text())["arch"] == "timm:resnet18d"
    proc = run_resnet(*tiny_fit_args(demo_root, tmp_path / "bad", "--model.arch", "timm:resnet50x"), expect_rc=2)
    assert "model.arch='timm:resnet50x': not in timm's ResNet family" in proc.stderr
