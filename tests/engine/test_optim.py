"""The lr schedule against hand-computed values (spec 3.2) and the optimizer's parameter set."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from freeanchor.config import TrainConfig
from freeanchor.engine.optim import build_optimizer, build_scheduler, scaled_lr, schedule_warnings


def _opt(lr=0.01):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # a frozen tensor must not reach the optimizer
    cfg = TrainConfig(lr=lr)
    return model, cfg, build_optimizer(model, cfg, lr)


@pytest.mark.parametrize(
    "iteration, epoch, expected",
    [
        (0, 0, 0.01 * 0.001),  # warmup starts at ratio 0.001
        (250, 0, 0.01 * (0.001 + 0.999 * 0.5)),  # 0.005005
        (499, 0, 0.01 * (0.001 + 0.999 * 499 / 500)),
        (500, 0, 0.01),
        (5000, 7, 0.01),  # epoch 8 (1-based) still full lr
        (60000, 8, 0.001),  # after epoch 8
        (80000, 10, 0.001),
        (81000, 11, 0.0001),  # after epoch 11
        (100, 8, 0.001 * (0.001 + 0.999 * 100 / 500)),  # warmup and decay multiply
    ],
)
def test_schedule_values(iteration, epoch, expected):
    _, cfg, opt = _opt()
    sched = build_scheduler(opt, cfg)
    sched.step(iteration, epoch)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)


def test_optimizer_hyperparameters_and_params():
    model, cfg, opt = _opt()
    (group,) = opt.param_groups
    assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in group["params"]} == trainable
    assert id(model[0].weight) not in {id(p) for p in group["params"]}
    # biases get weight decay too (no paramwise config in the FreeAnchor configs)
    assert any(p is model[1].bias for p in group["params"])


def test_adamw_option_and_unknown_optimizer():
    model = nn.Sequential(nn.Linear(3, 4))
    opt = build_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.05), 1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="train.optimizer"):
        build_optimizer(model, TrainConfig(optimizer="lamb"), 1e-3)


def test_linear_scaling_rule():
    cfg = TrainConfig(lr=0.01, batch_size=2, base_batch_size=16)
    assert scaled_lr(cfg, world_size=8) == pytest.approx(0.01)  # 8 x 2 = the reference
    assert scaled_lr(cfg, world_size=1) == pytest.approx(0.00125)
    assert scaled_lr(TrainConfig(lr=0.01, batch_size=4), world_size=8) == pytest.approx(0.02)
    assert scaled_lr(TrainConfig(lr=0.01, scale_lr=False), world_size=1) == 0.01


def test_scheduler_state_round_trip():
    _, cfg, opt = _opt()
    sched = build_scheduler(opt, cfg)
    sched.step(123, 9)
    state = sched.state_dict()
    _, _, opt2 = _opt()
    sched2 = build_scheduler(opt2, cfg)
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for it, ep in [(124, 9), (600, 11)]:
        sched.step(it, ep)
        sched2.step(it, ep)
        assert sched.get_last_lr() == sched2.get_last_lr()
    # plain data: survives a weights_only round trip
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == state


def _tc(**kw) -> TrainConfig:
    tc = TrainConfig()
    for k, v in kw.items():
        setattr(tc, k, v)
    return tc


def test_schedule_warnings():
    # the case: 16 images, batch 2 -> 8 iterations, the 1x recipe's 500 warm-up steps
    (warm,) = schedule_warnings(_tc(epochs=1, milestones=()), 8, 8)
    assert "train.warmup_iters=500" in warm and "8 iterations" in warm
    assert "--set train.warmup_iters=0" in warm and "never reaching train.lr=0.01" in warm
    (late,) = schedule_warnings(_tc(epochs=12, warmup_iters=0), 48, 8)
    assert "[8, 11]" in late and "6 epochs" in late and "train.milestones=4,6" in late
    assert schedule_warnings(_tc(), 12 * 7330, 7330) == []  # COCO 1x fits


@pytest.mark.parametrize("warmup, share", [(30, "30%"), (26, "26%")])
def test_warmup_share_warning(warmup, share):
    (w,) = schedule_warnings(_tc(epochs=10, warmup_iters=warmup, milestones=()), 100, 10)
    assert share in w and "train.warmup_iters=10" in w
