"""`Results`: numpy-style indexing and filtering, iteration, `plot()` as an image array, and the
one default score threshold of `model.predict` and `freeanchor predict`."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from freeanchor.cli import build_parser
from freeanchor.models.detector import FreeAnchor
from freeanchor.results import SCORE_THR, Detection, Results


def _results(image: torch.Tensor | None = None) -> Results:
    return Results(
        boxes=torch.tensor([[5.0, 6.0, 25.0, 30.0], [30.0, 2.0, 45.0, 20.0], [1.0, 1.0, 9.0, 9.0],
                            [10.0, 10.0, 20.0, 20.0]]),
        scores=torch.tensor([0.9, 0.6, 0.4, 0.1]),
        labels=torch.tensor([1, 0, 1, 2]),
        names=["dog", "cat", "dog", "bird"],
        path="/photos/a.jpg",
        orig_shape=(40, 50),
        image=image,
    )  # fmt: skip


def test_boolean_mask_keeps_the_matching_detections_in_order():
    r = _results()
    high = r[r.scores > 0.5]
    assert isinstance(high, Results) and len(high) == 2
    assert high.names == ["dog", "cat"] and high.scores.tolist() == pytest.approx([0.9, 0.6])
    assert torch.equal(high.boxes, r.boxes[:2]) and high.labels.tolist() == [1, 0]
    assert high.path == r.path and high.orig_shape == r.orig_shape
    dogs = r[r.labels == 1]
    assert dogs.names == ["dog", "dog"] and dogs.scores.tolist() == pytest.approx([0.9, 0.4])
    assert len(r[np.array([False, False, False, True])]) == 1  # numpy masks too
    assert len(r[r.scores > 2]) == 0 and r[r.scores > 2].boxes.shape == (0, 4)
    with pytest.raises(IndexError):
        r[torch.tensor([True, False])]  # a mask of the wrong length


def test_slices_and_index_lists():
    r = _results()
    assert r[:3].names == ["dog", "cat", "dog"] and len(r[:0]) == 0
    assert r[::-1].scores.tolist() == pytest.approx([0.1, 0.4, 0.6, 0.9])
    assert r[[3, 0]].names == ["bird", "dog"] and r[torch.tensor([2])].labels.tolist() == [1]
    assert len(r[[]]) == 0
    assert len(r) == 4  # the original is unchanged


def test_an_integer_gives_one_detection_and_iteration_yields_them_all():
    r = _results()
    d = r[1]
    assert isinstance(d, Detection) and d.box == [30.0, 2.0, 45.0, 20.0]
    assert (d.label, d.name) == (0, "cat")
    assert d.score == pytest.approx(0.6) and isinstance(d.score, float)
    box, score, label, name = r[-1]
    assert (box, label, name) == ([10.0, 10.0, 20.0, 20.0], 2, "bird")
    assert score == pytest.approx(0.1) and r[np.int64(0)].name == "dog"
    assert [det.name for det in r] == r.names
    assert [det.score for det in r] == pytest.approx(r.scores.tolist())
    with pytest.raises(IndexError):
        r[4]


def test_plot_returns_an_hwc_uint8_rgb_array_with_the_boxes_drawn():
    image = torch.zeros(3, 40, 50, dtype=torch.uint8)
    r = _results(image)[:1]  # the box [5, 6, 25, 30]
    drawn = r.plot()
    assert isinstance(drawn, np.ndarray) and drawn.dtype == np.uint8 and drawn.shape == (40, 50, 3)
    assert drawn[6, 10:20].sum() > 0 and drawn[10:25, 5].sum() > 0  # top and left edges
    assert drawn[35:, 30:].sum() == 0  # far from the box and its label: untouched
    assert image.sum() == 0  # the source image is not modified
    empty = _results(image)[_results().scores > 2].plot()
    assert empty.shape == (40, 50, 3) and empty.sum() == 0


def test_one_default_threshold_for_the_api_and_the_command():
    assert 0 < SCORE_THR < 1
    args = build_parser().parse_args(["predict", "--weights", "w", "a.jpg"])
    assert args.score_thr == SCORE_THR
    assert inspect.signature(FreeAnchor.predict).parameters["score_thr"].default == SCORE_THR


def test_predict_by_default_keeps_exactly_the_detections_above_the_threshold():
    from freeanchor.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", num_classes=3, fpn_channels=16, feat_channels=16,
                      stacked_convs=1, input_scale=(64, 64), frozen_stages=0)  # fmt: skip
    model = FreeAnchor(cfg).eval()
    torch.nn.init.normal_(model.head.retina_cls.weight, std=0.5)  # spread-out scores
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=torch.Generator())
    (everything,) = model.predict(image, score_thr=0.0)
    (default,) = model.predict(image)
    assert (everything.scores > SCORE_THR).any() and (everything.scores <= SCORE_THR).any()
    expected = everything[everything.scores > SCORE_THR]
    assert len(default) == len(expected) and torch.equal(default.labels, expected.labels)
    torch.testing.assert_close(default.scores, expected.scores)
    torch.testing.assert_close(default.boxes, expected.boxes)
