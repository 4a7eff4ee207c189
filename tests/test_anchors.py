"""AnchorGenerator against MMDetection's anchors (golden) and the formula by hand."""

from __future__ import annotations

import math

import torch

from freeanchor.models.anchors import AnchorGenerator
from tests.conftest import GOLDEN, need


def test_anchors_equal_mmdet_800x1088():
    ref = torch.load(need(GOLDEN / "anchors" / "anchors_800x1088.pt"), weights_only=True)
    gen = AnchorGenerator()
    ours = gen.grid_anchors([tuple(s) for s in ref["featmap_sizes"]])
    assert len(ours) == 5
    for got, want in zip(ours, ref["anchors"]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    for got, want in zip(gen.base_anchors, ref["base_anchors"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_base_anchor_sizes_and_order_by_hand():
    gen = AnchorGenerator()
    base = gen.base_anchors[0]  # stride 8
    w, h = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
    scales = [4 * 2 ** (k / 3) for k in range(3)]
    for r_idx, r in enumerate((0.5, 1.0, 2.0)):
        for s_idx, s in enumerate(scales):
            i = 3 * r_idx + s_idx  # ratio-major, scale fastest
            assert math.isclose(w[i], 8 * s / math.sqrt(r), rel_tol=1e-6)
            assert math.isclose(h[i], 8 * s * math.sqrt(r), rel_tol=1e-6)
    assert torch.equal((base[:, :2] + base[:, 2:]) / 2, torch.zeros(9, 2))  # centred on 0


def test_grid_is_row_major_with_centres_on_stride_multiples():
    gen = AnchorGenerator()
    anchors = gen.grid_anchors([(2, 3)] * 5)[1]  # stride 16
    centres = ((anchors[:, :2] + anchors[:, 2:]) / 2).reshape(2, 3, 9, 2)
    for y in range(2):
        for x in range(3):
            assert torch.allclose(centres[y, x], torch.tensor([x * 16.0, y * 16.0]))
    assert gen([(2, 3)] * 5).shape == (5 * 6 * 9, 4)
