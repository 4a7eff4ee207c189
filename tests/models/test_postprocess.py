"""Post-processing: MMDetection's `predict_by_feat` fixtures and hand-checked small cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from freeanchor.data.transforms import ImageMeta
from freeanchor.models.anchors import AnchorGenerator
from freeanchor.models.box_coder import DeltaXYWHCoder
from freeanchor.models.postprocess import postprocess

GOLDEN = Path(__file__).resolve().parents[2] / ".." / "shared" / "golden"


def golden_file(rel: str) -> Path:
    path = GOLDEN / rel
    if not path.is_file():
        pytest.skip(f"golden fixture not present: {path}")
    return path


@pytest.fixture(scope="module")
def medium():
    inputs = torch.load(golden_file("loss/medium_inputs.pt"), weights_only=True)
    ref = torch.load(golden_file("postprocess/medium_predict.pt"), weights_only=True)
    return inputs, ref


def _assert_same_detections(got: dict, ref: dict) -> None:
    """Golden README tolerances: labels equal in order, IoU >= 0.99 per rank, scores 1e-4."""
    assert torch.equal(got["labels"], ref["labels"])
    assert got["boxes"].dtype == torch.float32 and got["labels"].dtype == torch.int64
    assert box_iou(got["boxes"], ref["bboxes"]).diagonal().min() >= 0.99
    torch.testing.assert_close(got["scores"], ref["scores"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["boxes"], ref["bboxes"], rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    "key, kwargs",
    [
        ("results", {}),
        ("results_no_rescale", {"rescale": False}),
        ("results_nms_pre_30", {"nms_pre": 30}),
    ],
)
def test_medium_fixture(medium, key, kwargs):
    inputs, ref = medium
    anchors = AnchorGenerator().grid_anchors(inputs["featmap_sizes"])
    assert torch.equal(torch.cat(anchors), inputs["anchors"])
    metas = [ImageMeta(m["ori_shape"], m["img_shape"], m["scale_factor"]) for m in ref["img_metas"]]
    test_cfg = ref["test_cfg"]
    settings = dict(
        rescale=True,
        score_thr=test_cfg["score_thr"],
        nms_pre=test_cfg["nms_pre"],
        nms_iou=test_cfg["nms"]["iou_threshold"],
        max_per_img=test_cfg["max_per_img"],
    )
    settings.update(kwargs)
    out = postprocess(
        inputs["cls_scores"], inputs["bbox_preds"], anchors, metas, DeltaXYWHCoder(), **settings
    )
    assert len(out) == len(ref[key]) == 2
    for got, want in zip(out, ref[key]):
        _assert_same_detections(got, want)


# ----------------------------------------------------------------------------- hand cases
# One level of 1 x 2 locations with one anchor each and C = 2 classes; deltas zero, so every
# box is its anchor (clipped). Anchors 0 and 1 overlap with IoU 90 / 110 = 0.818 > 0.5.

ANCHORS = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]])
META = ImageMeta(ori_shape=(40, 20), img_shape=(20, 20), scale_factor=(1.0, 0.5))


def _run(logits: list[list[float]], anchors=ANCHORS, metas=(META,), **kw):
    """logits[n][a*C + c] for image n -> postprocess output."""
    cls = torch.tensor(logits).reshape(len(logits), 1, 2, 2).permute(0, 3, 1, 2)  # [N, C, 1, 2]
    cls = cls.contiguous()  # channel c at location (0, a): one anchor per location
    deltas = torch.zeros(len(logits), 4, 1, 2)
    return postprocess([cls], [deltas], [anchors], list(metas), DeltaXYWHCoder(), **kw)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_class_aware_nms_and_rescale():
    # anchor 0: class 0 logit 2; anchor 1: class 0 logit 1 (suppressed), class 1 logit 0.
    (out,) = _run([[2.0, -9.0, 1.0, 0.0]])
    assert out["labels"].tolist() == [0, 1]
    torch.testing.assert_close(out["scores"], torch.tensor([_sig(2.0), 0.5]))
    # rescale: x / 1.0, y / 0.5
    torch.testing.assert_close(out["boxes"], torch.tensor([[0, 0, 10, 20], [1, 0, 11, 20.0]]))


def test_no_rescale_keeps_input_pixels():
    (out,) = _run([[2.0, -9.0, 1.0, 0.0]], rescale=False)
    torch.testing.assert_close(out["boxes"], torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10.0]]))


def test_images_never_suppress_each_other():
    metas = (META, META)
    out = _run([[2.0, -9.0, -9.0, -9.0], [-9.0, -9.0, 3.0, -9.0]], metas=metas)
    assert [o["labels"].tolist() for o in out] == [[0], [0]]
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[0, 0, 10, 20.0]]))
    torch.testing.assert_close(out[1]["boxes"], torch.tensor([[1, 0, 11, 20.0]]))
    torch.testing.assert_close(out[1]["scores"], torch.tensor([_sig(3.0)]))


def test_score_threshold_is_strict_and_overridable():
    thr_logit = math.log(0.05 / 0.95)  # sigmoid = 0.05 (up to rounding)
    (out,) = _run([[thr_logit - 1e-3, -9.0, -9.0, thr_logit + 0.1]])
    assert out["labels"].tolist() == [1]
    (out,) = _run([[2.0, -9.0, -9.0, 0.5]], score_thr=0.7)
    assert out["labels"].tolist() == [0]


def test_nms_pre_and_max_per_img():
    (out,) = _run([[2.0, 1.5, -9.0, 0.0]], nms_pre=1)  # only the best pair of the level
    assert out["labels"].tolist() == [0] and len(out["scores"]) == 1
    (out,) = _run([[2.0, 1.5, -9.0, 0.0]], max_per_img=2)
    # candidates: (a0, c0) 0.88, (a0, c1) 0.82, (a1, c1) 0.5 -> the best two survive
    assert out["labels"].tolist() == [0, 1]
    torch.testing.assert_close(out["scores"], torch.tensor([_sig(2.0), _sig(1.5)]))


def test_clipping_and_empty_boxes_dropped():
    anchors = torch.tensor([[-5.0, 15.0, 8.0, 30.0], [25.0, 0.0, 35.0, 10.0]])
    (out,) = _run([[2.0, -9.0, 3.0, -9.0]], anchors=anchors, rescale=False)
    # anchor 1 lies right of the 20-px-wide image: clipped to zero width, dropped
    assert out["labels"].tolist() == [0]
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 15.0, 8.0, 20.0]]))


def test_nothing_above_threshold_gives_empty_results():
    out = _run([[-9.0] * 4, [-8.0] * 4], metas=(META, META))
    for o in out:
        assert o["boxes"].shape == (0, 4) and o["scores"].shape == (0,)
        assert o["labels"].dtype == torch.int64


def test_tied_scores_come_out_in_mmdetections_order():
    """Raw outputs whose scores tie thousands of times (integer and saturated logits): our
    detections equal MMDetection 3.3's `predict_by_feat` bit for bit (fixture made with the
    real MMDetection by benchmarks/make_tie_fixture.py), whichever boxes the ties pick."""
    fixture = torch.load(
        Path(__file__).resolve().parents[1] / "fixtures" / "postprocess_ties.pt", weights_only=True
    )
    cls_scores = [c.float() for c in fixture["cls_scores_int8"]]
    bbox_preds = [r.float() for r in fixture["bbox_preds_fp16"]]
    sizes = [tuple(c.shape[-2:]) for c in cls_scores]
    anchors = AnchorGenerator().grid_anchors(sizes)
    metas = [
        ImageMeta(tuple(m["ori_shape"]), tuple(m["img_shape"]), tuple(m["scale_factor"]))
        for m in fixture["metas"]
    ]
    got = postprocess(cls_scores, bbox_preds, anchors, metas, DeltaXYWHCoder(), rescale=True,
                      **fixture["test_cfg"])  # fmt: skip
    for det, ref in zip(got, fixture["results"], strict=True):
        # The case is what it claims: the kept detections themselves have tied scores.
        assert len(ref["scores"]) - len(ref["scores"].unique()) > 50
        assert torch.equal(det["labels"], ref["labels"])
        assert torch.equal(det["scores"], ref["scores"])
        # Boxes to float32 rounding: `exp` in the decode is vectorised differently per CPU
        # (AVX2 / AVX-512), 1 ulp apart; a tie broken the other way moves a box by pixels.
        torch.testing.assert_close(det["boxes"], ref["bboxes"], rtol=0, atol=1e-4)
