import pytest
import torch

from train.model import build_resnet
from train.optim import lr_factor, param_groups, scaled_lr


def test_weight_decay_groups_by_rank_not_name():
    net = build_resnet("resnet50")
    decay, no_decay = param_groups(net, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    names = {n for n, p in net.named_parameters() if id(p) in ids}
    bn = {n for m_name, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d) for n in (f"{m_name}.weight", f"{m_name}.bias")}
    assert names == bn | {"fc.bias"}
    assert {"layer1.0.downsample.1.weight", "layer1.0.downsample.1.bias", "fc.bias"} <= names
    decay_names = {n for n, p in net.named_parameters() if id(p) not in ids}
    assert "fc.weight" in decay_names and "layer1.0.downsample.0.weight" in decay_names
    assert all(n.endswith("weight") and net.get_parameter(n).ndim in (2, 4) for n in decay_names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


def test_linear_scaling():
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    assert scaled_lr(0.1, 1024) == pytest.approx(0.4)
    assert scaled_lr(0.1, 8192) == pytest.approx(3.2)  # Goyal et al.'s largest batch


def test_step_schedule_with_warmup():
    f = lambda step: lr_factor(step, steps_per_epoch=100, total_steps=9000, milestones=(30, 60, 80), warmup_epochs=5)
    assert f(0) == pytest.approx(1 / 500)
    assert f(249) == pytest.approx(0.5)
    assert f(499) == pytest.approx(1.0)  # warmup's last step reaches the base lr
    assert f(500) == 1.0
    assert f(2999) == 1.0 and f(3000) == pytest.approx(0.1)
    assert f(5999) == pytest.approx(0.1) and f(6000) == pytest.approx(0.01)
    assert f(7999) == pytest.approx(0.01) and f(8000) == pytest.approx(0.001)
    assert f(8999) == pytest.approx(0.001)


def test_cosine_schedule():
    f = lambda step: lr_factor(step, steps_per_epoch=10, total_steps=100, schedule="cosine", warmup_epochs=2)
    assert f(19) == pytest.approx(1.0)
    assert f(20) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    fractional = [lr_factor(s, steps_per_epoch=15, total_steps=150, warmup_epochs=0.5) for s in range(10)]
    assert max(fractional) == 1.0 and fractional[6] == pytest.approx(7 / 7.5)
    no_warmup = lr_factor(0, steps_per_epoch=10, total_steps=100, schedule="cosine")
    assert no_warmup == 1.0
