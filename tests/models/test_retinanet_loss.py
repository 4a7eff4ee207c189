"""RetinaNetLoss against torchvision's RetinaNet head and MMDetection's assignment rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import box_iou

from freeanchor.models.anchors import AnchorGenerator
from freeanchor.models.box_coder import DeltaXYWHCoder
from freeanchor.models.retinanet_loss import (
    IGNORED,
    NEGATIVE,
    RETINANET_STDS,
    RetinaNetLoss,
    max_iou_assign,
)

NUM_CLASSES = 4


def _anchors(size=(64, 96)) -> tuple[Tensor, list[tuple[int, int]]]:
    gen = AnchorGenerator((8, 16, 32, 64, 128), (0.5, 1.0, 2.0), 4.0, 3)
    sizes = [(math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in (8, 16, 32, 64, 128)]
    return torch.cat(gen.grid_anchors(sizes, "cpu")), sizes


def _gts(gen: torch.Generator, counts: list[int], size=(64, 96)):
    boxes, labels = [], []
    h, w = size
    for k in counts:
        xy = torch.rand(k, 2, generator=gen) * torch.tensor([w * 0.7, h * 0.7])
        wh = 6 + torch.rand(k, 2, generator=gen) * torch.tensor([w * 0.5, h * 0.5])
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(0, NUM_CLASSES, (k,), generator=gen))
    return boxes, labels


def _pad(boxes):
    g = max(len(b) for b in boxes)
    padded = torch.zeros(len(boxes), g, 4)
    valid = torch.zeros(len(boxes), g, dtype=torch.bool)
    for i, b in enumerate(boxes):
        padded[i, : len(b)], valid[i, : len(b)] = b, True
    return padded, valid


def _mmdet_assign(boxes, anchors, pos=0.5, neg=0.4):
    """MMDetection's MaxIoUAssigner.assign_wrt_overlaps for one image, literally (a loop over
    the gts), in our codes (gt index, NEGATIVE, IGNORED); min_pos_iou 0 read as '> 0'."""
    if len(boxes) == 0:
        return torch.full((len(anchors),), NEGATIVE)
    overlaps = box_iou(boxes, anchors)
    out = torch.full((len(anchors),), IGNORED)
    max_overlaps, argmax = overlaps.max(dim=0)
    out[(max_overlaps >= 0) & (max_overlaps < neg)] = NEGATIVE
    out[max_overlaps >= pos] = argmax[max_overlaps >= pos]
    gt_max = overlaps.max(dim=1).values
    for i in range(len(boxes)):
        if gt_max[i] > 0:
            out[overlaps[i] == gt_max[i]] = i
    return out


def test_assignment_is_mmdetections_rule():
    anchors, _ = _anchors()
    gen = torch.Generator().manual_seed(0)
    boxes, _ = _gts(gen, [3, 0, 7, 1])
    padded, valid = _pad(boxes)
    got = max_iou_assign(padded, valid, anchors)
    for i, b in enumerate(boxes):
        assert torch.equal(got[i], _mmdet_assign(b, anchors)), i
    assert (got[1] == NEGATIVE).all()  # an image without gts: all negatives
    for i, b in enumerate(boxes):  # every gt got at least one anchor
        assert set(got[i][got[i] >= 0].tolist()) == set(range(len(b)))


def test_low_quality_match_goes_to_the_gt_it_is_best_for():
    # Anchor 0 overlaps gt 0 best (IoU 81/100) but is gt 1's best anchor (IoU 100/196, anchor
    # 1: 81/196); gt 0's best is anchor 1 (IoU 1). MMDetection (and we) give anchor 0 to gt 1;
    # torchvision's Matcher to its argmax, gt 0, so that gt 1 has no anchor there.
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 9, 9], [50, 50, 60, 60]])
    boxes = torch.tensor([[[0.0, 0, 9, 9], [0, 0, 14, 14]]])
    ours = max_iou_assign(boxes, torch.ones(1, 2, dtype=torch.bool), anchors)[0]
    assert ours.tolist() == [1, 0, NEGATIVE]
    tv = tv_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)(box_iou(boxes[0], anchors))
    assert tv.tolist() == [0, 0, NEGATIVE]


def test_assignment_equals_torchvision_matcher_where_the_rules_agree():
    # Both rules only differ for an anchor that is one gt's best but another gt's argmax;
    # on single-gt images they must agree everywhere (torchvision uses the same codes).
    anchors, _ = _anchors()
    gen = torch.Generator().manual_seed(1)
    matcher = tv_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    for _ in range(5):
        (b,), _ = _gts(gen, [1])
        ours = max_iou_assign(b[None], torch.ones(1, 1, dtype=torch.bool), anchors)[0]
        assert torch.equal(ours, matcher(box_iou(b, anchors)))


def _torchvision_losses(logits, deltas, anchors, boxes, labels, matched):
    head = RetinaNetHead(8, 9, NUM_CLASSES)
    assert head.regression_head._loss_type == "l1"
    assert head.regression_head.box_coder.weights == RETINANET_STDS
    targets = [{"boxes": b, "labels": lb} for b, lb in zip(boxes, labels, strict=True)]
    outputs = {"cls_logits": logits, "bbox_regression": deltas}
    return head.compute_loss(targets, outputs, [anchors] * len(boxes), list(matched))


def test_equals_torchvision_compute_loss_image_by_image():
    anchors, _ = _anchors()
    gen = torch.Generator().manual_seed(2)
    boxes, labels = _gts(gen, [2, 5, 0, 1])
    logits = torch.randn(4, len(anchors), NUM_CLASSES, generator=gen) - 2
    deltas = torch.randn(4, len(anchors), 4, generator=gen) * 0.3
    padded, valid = _pad(boxes)
    matched = max_iou_assign(padded, valid, anchors)
    tv = _torchvision_losses(logits, deltas, anchors, boxes, labels, matched)
    # torchvision normalises each image by its own positive count and averages the images
    ours = RetinaNetLoss(NUM_CLASSES, imgs_per_gpu=1)(logits, deltas, anchors, boxes, labels)
    torch.testing.assert_close(ours["loss_cls"], tv["classification"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["loss_bbox"], tv["bbox_regression"], rtol=1e-5, atol=1e-6)
    assert tv["bbox_regression"] > 0 and tv["classification"] > 0


def test_chunk_normaliser_is_mmdetections_avg_factor():
    # local, 2 images per chunk: sum of the chunk's terms / sum of max(1, positives)
    anchors, _ = _anchors()
    gen = torch.Generator().manual_seed(3)
    boxes, labels = _gts(gen, [3, 1, 0, 2])
    logits = torch.randn(4, len(anchors), NUM_CLASSES, generator=gen) - 2
    deltas = torch.randn(4, len(anchors), 4, generator=gen) * 0.3
    padded, valid = _pad(boxes)
    matched = max_iou_assign(padded, valid, anchors)
    n = (matched >= 0).sum(1).clamp(min=1).double()
    one = [slice(i, i + 1) for i in range(4)]
    per_image = [
        _torchvision_losses(logits[k], deltas[k], anchors, boxes[k], labels[k], matched[k])
        for k in one
    ]
    for key, tv_key in (("loss_cls", "classification"), ("loss_bbox", "bbox_regression")):
        sums = torch.stack([p[tv_key].double() for p in per_image]) * n
        local = (sums[:2].sum() / n[:2].sum() + sums[2:].sum() / n[2:].sum()) / 2
        glob = sums.sum() / n.sum()
        got_local = RetinaNetLoss(NUM_CLASSES)(logits, deltas, anchors, boxes, labels)[key]
        got_global = RetinaNetLoss(NUM_CLASSES, normalize="global")(
            logits, deltas, anchors, boxes, labels
        )[key]
        torch.testing.assert_close(got_local.double(), local, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_global.double(), glob, rtol=1e-5, atol=1e-6)


def test_per_level_maps_give_the_flattened_loss():
    anchors, sizes = _anchors()
    gen = torch.Generator().manual_seed(4)
    boxes, labels = _gts(gen, [2, 3])
    cls_maps = [torch.randn(2, 9 * NUM_CLASSES, h, w, generator=gen) for h, w in sizes]
    box_maps = [torch.randn(2, 36, h, w, generator=gen) for h, w in sizes]
    flat_cls = torch.cat([m.permute(0, 2, 3, 1).reshape(2, -1, NUM_CLASSES) for m in cls_maps], 1)
    flat_box = torch.cat([m.permute(0, 2, 3, 1).reshape(2, -1, 4) for m in box_maps], 1)
    loss = RetinaNetLoss(NUM_CLASSES)
    a = loss(cls_maps, box_maps, anchors, boxes, labels)
    b = loss(flat_cls, flat_box, anchors, boxes, labels)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_no_gts_gives_pure_background_loss_and_gradients_everywhere():
    anchors, _ = _anchors()
    logits = torch.full((2, len(anchors), NUM_CLASSES), -3.0, requires_grad=True)
    deltas = torch.zeros(2, len(anchors), 4, requires_grad=True)
    empty = [torch.zeros(0, 4)] * 2
    out = RetinaNetLoss(NUM_CLASSES)(logits, deltas, anchors, empty, [torch.zeros(0)] * 2)
    p = torch.sigmoid(torch.tensor(-3.0))
    expected = 0.75 * p**2 * -torch.log(1 - p) * len(anchors) * NUM_CLASSES  # per image, n = 1
    torch.testing.assert_close(out["loss_cls"], expected)
    assert out["loss_bbox"] == 0
    sum(out.values()).backward()
    assert deltas.grad is not None and logits.grad is not None


def test_default_coder_is_retinanets():
    assert RetinaNetLoss(3).box_coder.stds == RETINANET_STDS
    assert DeltaXYWHCoder().stds != RETINANET_STDS  # FreeAnchor's differs


@pytest.mark.parametrize("bad", ["batch", "anchors"])
def test_mismatched_shapes_raise(bad):
    anchors, _ = _anchors()
    logits = torch.zeros(2, len(anchors), NUM_CLASSES)
    deltas = torch.zeros(2, len(anchors), 4)
    boxes, labels = [torch.zeros(0, 4)] * 2, [torch.zeros(0)] * 2
    if bad == "batch":
        boxes, labels = boxes[:1], labels[:1]
    else:
        anchors = anchors[:-1]
    with pytest.raises(ValueError, match="do not match"):
        RetinaNetLoss(NUM_CLASSES)(logits, deltas, anchors, boxes, labels)
