"""FreeAnchorLoss: hand-computed vectors (spec 1.9), MMDetection golden values and gradients,
fresh random inputs against an independent per-image reference, and the edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.mmdet_style_loss import mmdet_style_loss
from freeanchor import FreeAnchorLoss
from freeanchor.models.anchors import AnchorGenerator
from freeanchor.models.overlaps import pairwise_iou
from tests.conftest import GOLDEN, need

CASES = ["small", "small_zero_gt", "medium", "medium_all_zero_gt"]


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def focal_neg(q: float) -> float:
    return q * q * -math.log(1 - q)


def total(out: dict) -> torch.Tensor:
    return out["positive_bag_loss"] + out["negative_bag_loss"]


# ----------------------------------------------------------------------------- hand-computed


def test_mean_max_bag_and_negative_by_hand():
    # Three anchors equal to the gt: every P^loc = 1 (deltas 0), every predicted IoU = 1.
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = gt.repeat(3, 1)
    logits = torch.tensor([[[logit(0.9), logit(0.3)], [logit(0.5), logit(0.3)],
                            [logit(0.1), logit(0.3)]]])  # fmt: skip
    loss = FreeAnchorLoss(2, pre_anchor_topk=3)
    out = loss(logits, torch.zeros(1, 3, 4), anchors, [gt], [torch.tensor([0])])
    # spec 1.9: MeanMax([0.9, 0.5, 0.1]) = 0.771186440678, alpha * -log = 0.129912558974
    assert out["positive_bag_loss"].item() == pytest.approx(0.129912558974, rel=1e-6)
    # class 0: box_prob 1 -> q = 0; class 1 (no gt): q = 0.3 on 3 anchors; / (n * |B|) = 3
    expected = 0.5 * 3 * focal_neg(0.3) / 3
    assert out["negative_bag_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_saturated_linear_and_negative_element_by_hand():
    # Predicted boxes with IoU 0.5, 0.7, 0.8 to the gt -> P{a -> b} = 0, 0.5, 1 (t = 0.6).
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 7.0], [0.0, 0.0, 10.0, 8.0]])
    logits = torch.full((1, 3, 1), logit(0.3))
    out = FreeAnchorLoss(1, pre_anchor_topk=3)(
        logits, torch.zeros(1, 3, 4), anchors, [gt], [torch.tensor([0])]
    )
    # q = 0.3 * (1 - [0, 0.5, 1]) = [0.3, 0.15, 0]; spec 1.9: q=0.15 -> 0.003656675914
    assert focal_neg(0.15) == pytest.approx(0.003656675914, rel=1e-9)
    expected = 0.5 * (focal_neg(0.3) + focal_neg(0.15)) / 3
    assert out["negative_bag_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_smooth_l1_localisation_probability_by_hand():
    # One anchor = gt, residual [0.05, -0.2, 0, 0.3]: P^loc = 0.7400610 (spec 1.9).
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    deltas = torch.tensor([[[0.05, -0.2, 0.0, 0.3]]])
    out = FreeAnchorLoss(1, pre_anchor_topk=1)(
        torch.zeros(1, 1, 1), deltas, gt, [gt], [torch.tensor([0])]
    )
    assert out["positive_bag_loss"].item() == pytest.approx(0.5 * -math.log(0.5 * 0.7400610), 1e-6)


# ----------------------------------------------------------------------------- golden (MMDetection)


def flatten(inp: dict, requires_grad: bool = False):
    c = inp["num_classes"]
    cls = [x.clone().requires_grad_(requires_grad) for x in inp["cls_scores"]]
    box = [x.clone().requires_grad_(requires_grad) for x in inp["bbox_preds"]]
    n = cls[0].shape[0]
    logits = torch.cat([x.permute(0, 2, 3, 1).reshape(n, -1, c) for x in cls], 1)
    deltas = torch.cat([x.permute(0, 2, 3, 1).reshape(n, -1, 4) for x in box], 1)
    return cls, box, logits, deltas


@pytest.mark.parametrize("case", CASES)
def test_golden_values_and_gradients(case):
    inp = torch.load(need(GOLDEN / "loss" / f"{case}_inputs.pt"), weights_only=True)
    ref = torch.load(GOLDEN / "loss" / f"{case}_mmdet.pt", weights_only=True)
    cls, box, logits, deltas = flatten(inp, requires_grad=True)
    loss = FreeAnchorLoss(inp["num_classes"], imgs_per_gpu=logits.shape[0])
    out = loss(logits, deltas, inp["anchors"], inp["gt_bboxes"], inp["gt_labels"])
    for name in ("positive_bag_loss", "negative_bag_loss"):
        assert out[name].item() == pytest.approx(ref["losses"][name], rel=1e-5, abs=1e-12)
    total(out).backward()
    for got, want in zip(
        [x.grad for x in cls + box], ref["grad_cls_scores"] + ref["grad_bbox_preds"]
    ):
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale + 1e-12)


@pytest.mark.parametrize("case", ["small", "medium"])
def test_bags_equal_mmdet_selection(case):
    inp = torch.load(need(GOLDEN / "loss" / f"{case}_inputs.pt"), weights_only=True)
    bags = torch.load(GOLDEN / "loss" / f"{case}_bags.pt", weights_only=True)
    for gts, rec in zip(inp["gt_bboxes"], bags["images"]):
        ours = pairwise_iou(gts[None], inp["anchors"][None])[0].topk(50, dim=1, sorted=False)
        for row, want in zip(ours.indices, rec["bag_indices"]):
            assert set(row.tolist()) == set(want.tolist())


# ----------------------------------------------------------------------------- fresh inputs


def random_batch(seed: int, n: int = 2, size=(192, 256), classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    anchors = AnchorGenerator()([(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64, 128)])
    a = anchors.shape[0]
    logits = torch.randn(n, a, classes, generator=g) - 3.0
    deltas = torch.randn(n, a, 4, generator=g) * 0.3
    boxes, labels = [], []
    for i in range(n):
        k = int(torch.randint(1, 8, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.9, h * 0.9]) - 10  # may leave
        wh = 8 + torch.rand(k, 2, generator=g) * 120
        b = torch.cat([xy, xy + wh], 1)
        lab = torch.randint(0, classes, (k,), generator=g)
        # a same-class near-duplicate of the first gt
        b = torch.cat([b, b[:1] + 2.0])
        lab = torch.cat([lab, lab[:1]])
        boxes.append(b)
        labels.append(lab)
        # logits high near the gts, so some predictions match (IoU > t) and some do not
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        near = ((centres[:, None] - (b[None, :, :2] + b[None, :, 2:]) / 2).abs() < 16).all(-1)
        hit = near.any(1)
        logits[i, hit, lab[near[hit].float().argmax(1)]] += 4.0
        deltas[i, hit] *= 0.1
    return logits, deltas, anchors, boxes, labels


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fresh_inputs_equal_reference(seed):
    logits, deltas, anchors, boxes, labels = random_batch(seed)
    if seed == 3:  # an image without gts next to one with
        boxes[0], labels[0] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    results = []
    for fn in (FreeAnchorLoss(5), mmdet_style_loss):
        x, d = logits.clone().requires_grad_(), deltas.clone().requires_grad_()
        out = fn(x, d, anchors, boxes, labels)
        total(out).backward()
        results.append((out, x.grad, d.grad))
    (ours, gx, gd), (ref, rx, rd) = results
    for name in ours:
        assert ours[name].item() == pytest.approx(ref[name].item(), rel=1e-5)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-5 * float(rx.abs().max()))
    torch.testing.assert_close(gd, rd, rtol=1e-4, atol=1e-5 * float(rd.abs().max()) + 1e-12)


def test_matching_probability_actually_exercised():
    # Guard for the test above: the fresh inputs must contain matched (box_prob > 0) anchors
    # and gts whose best predicted IoU is at or below bbox_thr.
    logits, deltas, anchors, boxes, labels = random_batch(1)
    from freeanchor.models.box_coder import DeltaXYWHCoder

    best = [
        pairwise_iou(b, DeltaXYWHCoder().decode(anchors, d)).amax(1) for b, d in zip(boxes, deltas)
    ]
    best = torch.cat(best)
    assert (best > 0.6).any() and (best <= 0.6).any()


def test_batch_without_any_gt_keeps_regression_in_graph():
    logits, deltas, anchors, _, _ = random_batch(4)
    empty = [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2
    x, d = logits.clone().requires_grad_(), deltas.clone().requires_grad_()
    out = FreeAnchorLoss(5)(x, d, anchors, *empty)
    ref = mmdet_style_loss(logits, deltas, anchors, *empty)
    assert out["positive_bag_loss"].item() == 0
    assert out["negative_bag_loss"].item() == pytest.approx(ref["negative_bag_loss"].item(), 1e-5)
    total(out).backward()
    assert d.grad is not None and torch.count_nonzero(d.grad) == 0


# ------------------------------------------------------------------------ better than reference


def test_best_iou_equal_to_threshold_is_finite_where_reference_is_nan():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 6.0], [0.0, 0.0, 10.0, 3.0]])  # IoU 0.6 and 0.3
    logits = torch.full((1, 2, 1), logit(0.3))
    args = (logits, torch.zeros(1, 2, 4), anchors, [gt], [torch.tensor([0])])
    with pytest.raises(RuntimeError, match="between 0 and 1"):  # the reference's 0/0 -> NaN
        mmdet_style_loss(*args, pre_anchor_topk=2)
    out = FreeAnchorLoss(1, pre_anchor_topk=2)(*args)
    # best IoU <= t: nothing matched, both anchors pay the full negative term
    assert out["negative_bag_loss"].item() == pytest.approx(0.5 * 2 * focal_neg(0.3) / 2, 1e-5)


def test_saturated_logits_stay_finite():
    logits, deltas, anchors, boxes, labels = random_batch(5)
    logits[:, :50] = 40.0  # sigmoid rounds to 1: the reference's BCE would clamp/crash
    x = logits.clone().requires_grad_()
    out = FreeAnchorLoss(5)(x, deltas, anchors, boxes, labels)
    total(out).backward()
    assert torch.isfinite(total(out)) and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- normalisation, AMP


def test_local_normalisation_averages_chunks_and_global_pools_them():
    logits, deltas, anchors, boxes, labels = random_batch(6, n=4)
    local = FreeAnchorLoss(5, imgs_per_gpu=2)(logits, deltas, anchors, boxes, labels)
    halves = [
        FreeAnchorLoss(5, imgs_per_gpu=2)(logits[s], deltas[s], anchors, boxes[s], labels[s])
        for s in (slice(0, 2), slice(2, 4))
    ]
    for name in local:
        expected = (halves[0][name] + halves[1][name]) / 2
        assert local[name].item() == pytest.approx(expected.item(), rel=1e-5)
    glob = FreeAnchorLoss(5, normalize="global")(logits, deltas, anchors, boxes, labels)
    ref = mmdet_style_loss(logits, deltas, anchors, boxes, labels)  # one batch, one count
    for name in glob:
        assert glob[name].item() == pytest.approx(ref[name].item(), rel=1e-5)


def test_autocast_inputs_are_computed_in_float32():
    logits, deltas, anchors, boxes, labels = random_batch(7)
    ref = FreeAnchorLoss(5)(logits, deltas, anchors, boxes, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FreeAnchorLoss(5)(logits.bfloat16(), deltas.bfloat16(), anchors, boxes, labels)
    assert out["negative_bag_loss"].dtype == torch.float32
    assert out["positive_bag_loss"].item() == pytest.approx(
        ref["positive_bag_loss"].item(), rel=0.05
    )


def test_bad_normalize_option():
    with pytest.raises(ValueError, match="normalize"):
        FreeAnchorLoss(3, normalize="batch")


def test_global_count_from_outside_sums_over_ranks_even_without_local_gts():
    # Two "ranks" of 2 images, the second without any gt: with the global gt count passed in,
    # the per-rank losses add up to the one-batch "global" loss (what DDP's sum of rank
    # gradients times world size needs).
    logits, deltas, anchors, boxes, labels = random_batch(8, n=4)
    for i in (2, 3):
        boxes[i], labels[i] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    loss = FreeAnchorLoss(5, normalize="global")
    whole = loss(logits, deltas, anchors, boxes, labels)
    n = sum(len(b) for b in boxes)
    parts = [loss(logits[s], deltas[s], anchors, boxes[s], labels[s], num_gts=n)
             for s in (slice(0, 2), slice(2, 4))]  # fmt: skip
    for name in whole:
        summed = parts[0][name] + parts[1][name]
        assert summed.item() == pytest.approx(whole[name].item(), rel=1e-5)
