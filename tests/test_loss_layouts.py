"""The fast paths of FreeAnchorLoss against the plain computations they replace: logits read
in place from per-level maps (any dense layout), the IoU computed only on runs of boxes that can
overlap a gt (top-k identical to the full row's, ties included), and the MMDetection golden
case fed as per-level maps."""

from __future__ import annotations

import pytest
import torch

from freeanchor import FreeAnchorLoss
from freeanchor.models.anchors import AnchorGenerator
from freeanchor.models.focal_sweep import LogitLayout
from freeanchor.models.head import flatten_head_outputs
from freeanchor.models.overlaps import matched_pairs, pairwise_iou, top_iou_anchors
from tests.conftest import GOLDEN, need
from tests.test_loss import CASES, total


def level_maps(seed: int, n: int = 2, size=(256, 320), classes: int = 5):
    """Per-level head outputs [N, 9C, H, W] / [N, 36, H, W], their anchors and some gts."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    sizes = [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64, 128)]
    cls = [torch.randn(n, 9 * classes, *hw, generator=g) - 3.0 for hw in sizes]
    box = [torch.randn(n, 36, *hw, generator=g) * 0.3 for hw in sizes]
    boxes, labels = [], []
    for _ in range(n):
        xy = torch.rand(6, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        boxes.append(torch.cat([xy, xy + 16 + torch.rand(6, 2, generator=g) * 150], 1))
        labels.append(torch.randint(0, classes, (6,), generator=g))
    return cls, box, AnchorGenerator()(sizes), boxes, labels


def loss_and_grads(cls, box, anchors, boxes, labels, prepare):
    cls = [c.clone().requires_grad_() for c in cls]
    box = [b.clone().requires_grad_() for b in box]
    out = FreeAnchorLoss(5)(*prepare(cls, box), anchors, boxes, labels)
    total(out).backward()
    return out, [t.grad for t in cls + box]


LAYOUTS = {
    "flattened": lambda c, b: flatten_head_outputs(c, b, 5),
    "channels_last": lambda c, b: ([x.to(memory_format=torch.channels_last) for x in c], b),
    "strided": lambda c, b: ([torch.stack([x, x], -1)[..., 0] for x in c], b),  # not dense
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_per_level_maps_equal_the_flattened_tensor(layout):
    cls, box, anchors, boxes, labels = level_maps(1)
    ref, ref_grads = loss_and_grads(cls, box, anchors, boxes, labels, lambda c, b: (c, b))
    out, grads = loss_and_grads(cls, box, anchors, boxes, labels, LAYOUTS[layout])
    for name in ref:
        assert out[name].item() == pytest.approx(ref[name].item(), rel=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_layout_offsets_address_the_flattened_element():
    cls, *_ = level_maps(2)
    flat, _ = flatten_head_outputs(cls, [torch.zeros(2, 36, *c.shape[2:]) for c in cls], 5)
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 2, (500,), generator=g)
    anchor = torch.randint(0, flat.shape[1], (500,), generator=g)
    c = torch.randint(0, 5, (500,), generator=g)
    for maps in (cls, [x.to(memory_format=torch.channels_last) for x in cls], [flat]):
        got = torch.full((500,), float("nan"))
        for x, (pos, off) in zip(maps, LogitLayout(maps, 5).offsets(img, anchor, c)):
            got[pos] = x.as_strided((x.numel(),), (1,))[off]
        assert torch.equal(got, flat[img, anchor, c])


def test_shapes_that_do_not_match_are_refused():
    cls, box, anchors, boxes, labels = level_maps(3)
    with pytest.raises(ValueError, match="anchors"):
        FreeAnchorLoss(5)(cls[:4], box, anchors, boxes, labels)
    with pytest.raises(ValueError, match="do not match"):
        FreeAnchorLoss(5)(cls, box, anchors[:-9], boxes, labels)


def test_second_backward_is_refused():
    cls, box, anchors, boxes, labels = level_maps(4)
    cls = [c.requires_grad_() for c in cls]
    out = total(FreeAnchorLoss(5)(cls, box, anchors, boxes, labels))
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward called twice"):
        out.backward()


@pytest.mark.parametrize("case", CASES)
def test_golden_case_as_per_level_maps(case):
    inp = torch.load(need(GOLDEN / "loss" / f"{case}_inputs.pt"), weights_only=True)
    ref = torch.load(GOLDEN / "loss" / f"{case}_mmdet.pt", weights_only=True)
    cls = [x.clone().requires_grad_() for x in inp["cls_scores"]]
    box = [x.clone().requires_grad_() for x in inp["bbox_preds"]]
    loss = FreeAnchorLoss(inp["num_classes"], imgs_per_gpu=cls[0].shape[0])
    out = loss(cls, box, inp["anchors"], inp["gt_bboxes"], inp["gt_labels"])
    for name in ("positive_bag_loss", "negative_bag_loss"):
        assert out[name].item() == pytest.approx(ref["losses"][name], rel=1e-5, abs=1e-12)
    total(out).backward()
    for got, want in zip(
        [x.grad for x in cls + box], ref["grad_cls_scores"] + ref["grad_bbox_preds"]
    ):
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale + 1e-12)


# ----------------------------------------------------------------------------- overlaps


def grid_gts():
    """Gts on the anchor grid (many exact IoU ties), degenerate, outside and at the origin."""
    g = torch.Generator().manual_seed(5)
    aligned = torch.tensor([[64.0, 64.0, 128.0, 128.0], [96.0, 32.0, 160.0, 224.0],
                            [0.0, 0.0, 40.0, 40.0], [8.0, 8.0, 24.0, 16.0]])  # fmt: skip
    odd = torch.tensor([[50.0, 50.0, 50.0, 90.0], [-80.0, -80.0, -10.0, -10.0],
                        [400.0, 10.0, 700.0, 300.0], [0.0, 0.0, 320.0, 256.0]])  # fmt: skip
    xy = torch.rand(40, 2, generator=g) * 250
    rand = torch.cat([xy, xy + 4 + torch.rand(40, 2, generator=g) * 200], 1)
    return torch.cat([aligned, odd, rand])


@pytest.mark.parametrize("k", [1, 9, 50, 64, 100])
def test_top_iou_anchors_equal_the_full_row_topk(k):
    anchors = AnchorGenerator()([(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)])
    gts = grid_gts()
    full = pairwise_iou(gts, anchors).topk(k, dim=1, sorted=False).indices
    assert len(anchors) >= 64 * k  # the runs path, not its fallback
    assert torch.equal(top_iou_anchors(gts, anchors, k), full)  # same anchors, same order


def test_top_iou_anchors_meet_real_ties():
    # The guard: the grid gts above must produce ties at the k-th place, which a top-k of
    # per-slice top-ks would break differently.
    anchors = AnchorGenerator()([(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)])
    top = pairwise_iou(grid_gts(), anchors).topk(51, dim=1).values
    assert (top[:, 49] == top[:, 50]).any()


@pytest.mark.parametrize("thr", [0.3, 0.6, 0.9])
def test_matched_pairs_equal_the_dense_threshold(thr):
    g = torch.Generator().manual_seed(6)
    anchors = AnchorGenerator()([(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)])
    pred = anchors + torch.randn(anchors.shape, generator=g) * 2
    gts = grid_gts()
    pred[5000 : 5000 + len(gts)] = gts + torch.rand(gts.shape, generator=g)  # good predictions
    pred[100] = float("nan")
    iou = pairwise_iou(gts, pred)
    want = (iou > thr).nonzero()
    gt, box, value = matched_pairs(gts, pred, thr)
    got = torch.stack([gt, box], 1)
    order = (got[:, 0] * len(pred) + got[:, 1]).argsort()
    assert len(want) > 0
    assert torch.equal(got[order], want)
    assert torch.equal(value[order], iou[want[:, 0], want[:, 1]])
