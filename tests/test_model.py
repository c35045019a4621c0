import pytest
import torch

from train.model import ImageNetClassifier
from train.networks import build_resnet

# torchvision's published parameter counts (its weights' documentation).
PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160, "resnet152": 60_192_808}


@pytest.mark.parametrize("arch", PARAMS)
def test_parameter_count_and_gradients(arch):
    net = build_resnet(arch)
    assert sum(p.numel() for p in net.parameters()) == PARAMS[arch]
    torch.manual_seed(0)
    net.train()
    logits = net(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1000)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 999])).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert torch.isfinite(logits).all()


def test_zero_init_residual_and_channels_last():
    model = ImageNetClassifier(arch="resnet50", num_classes=10, zero_init_residual=True, channels_last=True)
    assert model.net.layer1[0].bn3.weight.abs().sum() == 0  # last BN of each bottleneck starts at 0
    assert model.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_pretrained_state_dict_file(tmp_path):
    source = build_resnet("resnet18", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = ImageNetClassifier(arch="resnet18", num_classes=10, pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(model.net.fc.weight, source.fc.weight)
    with pytest.raises(ValueError, match="r18.pth: not a state dict of this model"):
        ImageNetClassifier(arch="resnet34", num_classes=10, pretrained=str(tmp_path / "r18.pth"))
    with pytest.raises(ValueError, match=r"shape mismatch \['fc.weight \(10, 512\) != \(6, 512\)"):
        ImageNetClassifier(arch="resnet18", num_classes=6, pretrained=str(tmp_path / "r18.pth"))
    with pytest.raises(ValueError, match="model.pretrained .*missing.pth: no such file"):
        ImageNetClassifier(arch="resnet18", num_classes=6, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match=f"model.pretrained {tmp_path}: a folder, not a file"):
        ImageNetClassifier(arch="resnet18", num_classes=6, pretrained=str(tmp_path))
    (tmp_path / "cut.pth").write_bytes((tmp_path / "r18.pth").read_bytes()[:4096])  # a copy that did not finish
    with pytest.raises(ValueError, match=r"model.pretrained .*cut.pth: cannot read it, damaged or cut short\? \("):
        ImageNetClassifier(arch="resnet18", num_classes=10, pretrained=str(tmp_path / "cut.pth"))
    with pytest.raises(ValueError, match="model.num_classes=None: expected the number of classes"):
        ImageNetClassifier(arch="resnet18")
