"""DeltaXYWHCoder against MMDetection's DeltaXYWHBBoxCoder (golden) and its invariants."""

from __future__ import annotations

import math

import torch

from freeanchor.models.box_coder import DeltaXYWHCoder
from tests.conftest import GOLDEN, need


def golden():
    return torch.load(need(GOLDEN / "coder" / "delta_xywh.pt"), weights_only=True)


def test_encode_equals_mmdet():
    ref = golden()
    got = DeltaXYWHCoder().encode(ref["encode_anchors"], ref["encode_gts"])
    torch.testing.assert_close(got, ref["encode_deltas"], rtol=1e-5, atol=1e-4)


def test_decode_equals_mmdet_with_and_without_clipping():
    ref = golden()
    coder = DeltaXYWHCoder()
    got = coder.decode(ref["decode_anchors"], ref["decode_deltas"])
    torch.testing.assert_close(got, ref["decode_boxes"], rtol=1e-5, atol=1e-4)
    clipped = coder.decode(ref["decode_anchors"], ref["decode_deltas"], max_shape=ref["max_shape"])
    torch.testing.assert_close(clipped, ref["decode_boxes_clipped"], rtol=1e-5, atol=1e-4)
    # per-box (H, W) tensor form gives the same result
    hw = torch.tensor(ref["max_shape"]).expand(len(got), 2)
    torch.testing.assert_close(
        coder.decode(ref["decode_anchors"], ref["decode_deltas"], max_shape=hw), clipped
    )


def test_round_trip_and_clamp():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 500
    anchors = torch.cat([xy, xy + 4 + torch.rand(500, 2, generator=g) * 300], 1)
    gts = anchors + torch.randn(500, 4, generator=g) * 10
    gts[:, 2:] = torch.maximum(gts[:, 2:], gts[:, :2] + 1)
    coder = DeltaXYWHCoder()
    torch.testing.assert_close(
        coder.decode(anchors, coder.encode(anchors, gts)), gts, atol=1e-3, rtol=1e-5
    )
    assert math.isclose(coder.max_ratio, 4.135166556742356, rel_tol=1e-12)
    # a raw dw of 100 (scaled 20) is clamped to exp(4.135...) = 62.5x the anchor width
    box = coder.decode(
        torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 100.0, 0.0]])
    )
    assert math.isclose(float(box[0, 2] - box[0, 0]), 625.0, rel_tol=1e-5)
