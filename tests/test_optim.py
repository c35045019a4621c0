import numpy as np
import pytest
import torch

from train.networks import build_resnet
from train.optim import lr_factor, make_optimizer, param_groups, scaled_lr


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


def test_decay_norm_and_bias_puts_every_parameter_in_the_decayed_group():
    net = build_resnet("resnet18")
    decay, no_decay = param_groups(net, 1e-4, decay_norm_and_bias=True)
    assert len(decay["params"]) == len(list(net.parameters())) and no_decay["params"] == []


def test_linear_and_poly_schedules_end_where_the_recipes_say():
    # FFCV's rn50_16_epochs: lr 1e-4 x base at epoch 0, the base at epoch 2, 0 at epoch 16, linear in between
    # (np.interp over [0, 2, 16]); one step ahead during warmup (our step k ends at (k + 1) / W).
    spe = 312  # 1,281,167 images / 4,096 a step, the last partial batch dropped
    ffcv = lambda epoch: float(np.interp(epoch, [0, 2, 16], [1e-4, 1.0, 0.0]))
    f = lambda step: lr_factor(step, steps_per_epoch=spe, total_steps=16 * spe, schedule="linear",
                               warmup_epochs=2, warmup_start_factor=1e-4)
    for epoch in (2, 3, 8, 12, 15, 16):
        assert f(epoch * spe) == pytest.approx(ffcv(epoch), abs=1e-12)
    assert f(spe) == pytest.approx(ffcv(1), abs=1 / (2 * spe))
    assert f(0) == pytest.approx(1e-4 + (1 - 1e-4) / (2 * spe))
    # MLPerf's polynomial decay: (base - end) (1 - p)^2 + end after 2 warmup epochs, end lr 1e-4 of base 10.5.
    base, end, total, warm = 10.5, 1e-4, 37 * 393, 2 * 393
    g = lambda step: base * lr_factor(step, steps_per_epoch=393, total_steps=total, schedule="poly",
                                      warmup_epochs=2, end_factor=end / base, power=2)
    for step in (warm, 10 * 393, 20 * 393, 36 * 393, total):
        assert g(step) == pytest.approx((base - end) * (1 - (step - warm) / (total - warm)) ** 2 + end)
    assert g(total) == pytest.approx(end)
    # Cosine to a floor.
    assert lr_factor(100, steps_per_epoch=10, total_steps=100, schedule="cosine", end_factor=0.01) == pytest.approx(0.01)


def test_lars_step_equals_the_trust_ratio_formula():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8))
    w.grad, b.grad = torch.randn(8, 4), torch.randn(8)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    lr, wd, eta = 2.0, 5e-5, 0.001
    opt = make_optimizer([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}], "lars",
                         lr=lr, momentum=0.9, trust_coefficient=eta)
    opt.step()
    trust = eta * w0.norm() / (gw.norm() + wd * w0.norm())
    assert torch.allclose(w.detach(), w0 - lr * trust * (gw + wd * w0), atol=1e-6)
    assert torch.allclose(b.detach(), b0 - lr * gb, atol=1e-6)  # no decay: no trust ratio (MLPerf's reference)
    with pytest.raises(ValueError, match="model.optimizer='adam'"):
        make_optimizer([{"params": [w]}], "adam", lr=1.0, momentum=0.0)
