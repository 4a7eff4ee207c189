"""FreeAnchorLoss on non-finite and extreme input: never an exception (the reference's BCE
asserts its input lies in [0, 1], mmdetection#1989); finite where the math is finite,
NaN or inf where it is not, so that a trainer can skip the step. And AMP inputs."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.mmdet_style_loss import mmdet_style_loss
from freeanchor import FreeAnchorLoss
from freeanchor.models.overlaps import top_iou_anchors
from tests.test_loss import logit, random_batch, total

NAN, INF = float("nan"), float("inf")


def run(logits, deltas, anchors, boxes, labels, classes=5):
    """Loss and gradients; backward must not raise either."""
    x, d = logits.clone().requires_grad_(), deltas.clone().requires_grad_()
    out = FreeAnchorLoss(classes)(x, d, anchors, boxes, labels)
    total(out).backward()
    return out, x.grad, d.grad


def finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def bag_and_outside(anchors, boxes):
    """(image 0's first bag anchor of gt 0, an anchor in no bag of image 0)."""
    bags = top_iou_anchors(boxes[0], anchors, 50)
    outside = torch.ones(len(anchors), dtype=torch.bool)
    outside[bags.reshape(-1)] = False
    return int(bags[0, 0]), int(outside.nonzero()[0])


def test_nan_logit_in_a_bag_gives_nan_where_the_reference_raises():
    logits, deltas, anchors, boxes, labels = random_batch(11)
    in_bag, _ = bag_and_outside(anchors, boxes)
    logits[0, in_bag, labels[0][0]] = NAN
    with pytest.raises(RuntimeError, match="between 0 and 1"):
        mmdet_style_loss(logits, deltas, anchors, boxes, labels)
    out, gx, gd = run(logits, deltas, anchors, boxes, labels)
    assert math.isnan(out["positive_bag_loss"].item())
    assert math.isnan(out["negative_bag_loss"].item())
    assert not finite(gx)


def test_nan_logit_outside_every_bag_still_poisons_the_loss():
    logits, deltas, anchors, boxes, labels = random_batch(12)
    _, outside = bag_and_outside(anchors, boxes)
    logits[0, outside, 3] = NAN
    out, gx, _ = run(logits, deltas, anchors, boxes, labels)
    assert math.isfinite(out["positive_bag_loss"].item())  # no NaN entered any bag
    assert math.isnan(out["negative_bag_loss"].item())
    assert torch.isnan(gx[0, outside, 3]) and finite(gx[1])


def test_all_logits_nan_like_a_nan_weight():
    logits, deltas, anchors, boxes, labels = random_batch(13)
    out, gx, gd = run(torch.full_like(logits, NAN), deltas, anchors, boxes, labels)
    assert all(math.isnan(v.item()) for v in out.values())
    assert torch.isnan(gx).all()


def test_inf_logits():
    logits, deltas, anchors, boxes, labels = random_batch(14)
    _, outside = bag_and_outside(anchors, boxes)
    up = logits.clone()
    up[1, outside, 0] = INF  # -log(1 - 1) = inf: the math is infinite
    out, gx, _ = run(up, deltas, anchors, boxes, labels)
    assert out["negative_bag_loss"].item() == INF
    assert not finite(gx)
    # -inf is p = 0: a zero term and a zero gradient, the same loss as a very negative logit
    down, low = logits.clone(), logits.clone()
    down[:, :500] = -INF
    low[:, :500] = -300.0
    got, gx, gd = run(down, deltas, anchors, boxes, labels)
    want, wx, _ = run(low, deltas, anchors, boxes, labels)
    assert finite(total(got), gx, gd)
    for name in got:
        assert got[name].item() == pytest.approx(want[name].item(), rel=1e-6)
    torch.testing.assert_close(gx, wx)


def test_minus_inf_over_a_whole_bag_is_an_infinite_positive_loss():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    logits = torch.full((1, 3, 1), -INF)
    out, _, _ = run(logits, torch.zeros(1, 3, 4), gt.repeat(3, 1), [gt], [torch.tensor([0])], 1)
    assert not math.isfinite(out["positive_bag_loss"].item())  # -log(0)
    assert out["negative_bag_loss"].item() == pytest.approx(0, abs=1e-30)  # q clamped to 1e-12


@pytest.mark.parametrize("where", ["bag", "outside"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_delta_gives_a_nan_loss(where, value):
    logits, deltas, anchors, boxes, labels = random_batch(15)
    in_bag, outside = bag_and_outside(anchors, boxes)
    deltas[0, in_bag if where == "bag" else outside, 2] = value
    out, gx, gd = run(logits, deltas, anchors, boxes, labels)
    # A non-finite delta leaves its predicted box, hence P{a_j -> b_i}, undefined.
    assert math.isnan(out["positive_bag_loss"].item())


def test_huge_logits_are_finite_and_exact():
    # Three anchors equal to the gt (P^loc = 1, every predicted IoU = 1), classes 0 (the gt's)
    # and 1 (no gt).
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    args = (torch.zeros(1, 3, 4), gt.repeat(3, 1), [gt], [torch.tensor([0])])
    logits = torch.tensor([[[-1e4, logit(0.3)]] * 3])
    out, gx, gd = run(logits, *args, classes=2)
    # every x = sigmoid(-1e4) = e^-1e4 (underflows to 0): -log MeanMax = 1e4, times alpha
    assert out["positive_bag_loss"].item() == pytest.approx(0.5 * 1e4, rel=1e-6)
    assert finite(gx, gd)
    logits = torch.tensor([[[1e4, 1e4]] * 3])
    out, gx, gd = run(logits, *args, classes=2)
    # every x = 1: the bag probability is 1 (to the rounding of the normalised weights)
    assert out["positive_bag_loss"].item() == pytest.approx(0, abs=1e-7)
    # class 0: box_prob 1, q = 0; class 1: p = 1, -log(1 - p) = softplus(1e4) = 1e4 on 3
    # anchors, / (n * |B|) = 50 (n = pre_anchor_topk)
    assert out["negative_bag_loss"].item() == pytest.approx(0.5 * 3 * 1e4 / 50, rel=1e-6)
    assert finite(gx, gd)
    assert gx[0, :, 1].tolist() == pytest.approx([0.5 / 50] * 3)  # d/dx p^2 softplus(x) = 1


def test_huge_logits_in_a_real_batch_stay_finite():
    logits, deltas, anchors, boxes, labels = random_batch(16)
    logits[0, ::7] = 1e4
    logits[1, ::5] = -1e4
    out, gx, gd = run(logits, deltas, anchors, boxes, labels)
    assert finite(total(out), gx, gd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_low_precision_inputs(dtype):
    logits, deltas, anchors, boxes, labels = random_batch(17)
    ref = FreeAnchorLoss(5)(logits, deltas, anchors, boxes, labels)
    x = logits.to(dtype).requires_grad_()
    d = deltas.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = FreeAnchorLoss(5)(x, d, anchors, boxes, labels)
    total(out).backward()
    assert all(v.dtype == torch.float32 for v in out.values())
    assert x.grad.dtype == dtype and finite(x.grad.float(), d.grad.float())
    for name in out:  # the rounding of the inputs is the only difference
        assert out[name].item() == pytest.approx(ref[name].item(), rel=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_non_finite_inputs_do_not_raise(dtype):
    logits, deltas, anchors, boxes, labels = random_batch(18)
    in_bag, _ = bag_and_outside(anchors, boxes)
    logits[1, :100] = 1e5  # inf in float16 (max 65504), finite in bfloat16
    logits[0, in_bag] = NAN  # what a too-high learning rate gives
    x = logits.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = FreeAnchorLoss(5)(x, deltas.to(dtype), anchors, boxes, labels)
    total(out).backward()
    assert all(math.isnan(v.item()) for v in out.values())
