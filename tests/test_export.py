"""ONNX export: onnxruntime parity with PyTorch, metadata, with-NMS graph, predict --onnx."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from freeanchor.cli import main
from freeanchor.config import to_dict
from freeanchor.data.synthetic import make_dataset
from freeanchor.data.transforms import ImageMeta
from freeanchor.export import export_onnx, read_metadata, sample_input
from freeanchor.models.weights import save_model
from tests.test_predict import CAT_IDS, tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = tiny_model(seed=1)
    weights = save_model(model, root / "tiny.safetensors")
    code = main(["export", "--weights", str(weights), "--out", str(root / "raw.onnx"), "--dynamic"])
    assert code == 0
    return root, model, weights


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_raw_graph_matches_pytorch_on_other_sizes_and_batches(exported, capsys):
    root, model, _ = exported
    session = _session(root / "raw.onnx")
    for batch, size in ((1, (96, 96)), (2, (64, 128))):
        x = sample_input(model.cfg, size, batch) + 0.1 * torch.randn(batch, 3, *size)
        got = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            cls_scores, bbox_preds = model(x)
        assert len(got) == 10
        for g, e in zip(got, [*cls_scores, *bbox_preds]):
            assert g.shape == tuple(e.shape)
            assert np.abs(g - e.numpy()).max() <= 1e-4
    assert [o.name for o in session.get_outputs()][:2] == ["cls_score_p3", "cls_score_p4"]


def test_metadata_holds_what_deployment_needs(exported):
    root, model, _ = exported
    cfg, extra, kind = read_metadata(_session(root / "raw.onnx"))
    assert to_dict(cfg) == to_dict(model.cfg)
    assert extra == {"cat_ids": CAT_IDS} and kind == "raw"


def test_export_reports_parity_and_exporter(tmp_path):
    model = tiny_model(seed=2)
    report = export_onnx(model, tmp_path / "m.onnx", size=(64, 96))
    assert report.exporter in ("dynamo", "torchscript")
    assert 0 <= report.max_abs_diff <= 1e-4
    assert report.input_size == (64, 96)
    session = _session(tmp_path / "m.onnx")
    assert session.get_inputs()[0].shape == [1, 3, 64, 96]  # fixed without --dynamic
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary files left
    with pytest.raises(ValueError, match="multiples of 32"):
        export_onnx(model, tmp_path / "bad.onnx", size=(60, 96))


def test_torchscript_exporter_also_matches(tmp_path, capsys):
    weights = save_model(tiny_model(seed=4), tmp_path / "w.safetensors")
    out = tmp_path / "ts.onnx"
    assert main(["export", "--weights", str(weights), "--out", str(out), "--size", "64x64",
                 "--exporter", "torchscript"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "torchscript exporter" in printed and "max abs diff" in printed
    session = _session(out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = tiny_model(seed=4)(x)
    for g, e in zip(session.run(None, {"images": x.numpy()}), [*expected[0], *expected[1]]):
        assert np.abs(g - e.numpy()).max() <= 1e-4


def test_with_nms_graph_equals_postprocess(tmp_path):
    from freeanchor.models.postprocess import postprocess, rescale_factors

    model = tiny_model(seed=3)
    export_onnx(model, tmp_path / "nms.onnx", with_nms=True, size=(96, 96), score_thr=0.05)
    session = _session(tmp_path / "nms.onnx")
    assert [i.name for i in session.get_inputs()] == ["images", "img_hw", "rescale"]
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "labels", "num_dets"]
    x = sample_input(model.cfg, (96, 96), batch=1) * 0.5
    hw = np.array([[90.0, 80.0]], dtype=np.float32)  # the image before padding
    # an original image of 64 x 112 (w x h): scale factors (w, h) = (80/64, 90/112)
    meta = ImageMeta((112, 64), (90, 80), (80 / 64, 90 / 112))
    rescale = rescale_factors([meta], True).numpy()
    boxes, scores, labels, num = session.run(
        None, {"images": x.numpy(), "img_hw": hw, "rescale": rescale}
    )
    assert boxes.shape == (1, 100, 4) and scores.shape == (1, 100)
    with torch.no_grad():
        cls_scores, bbox_preds = model(x)
        (ref,) = postprocess(
            cls_scores, bbox_preds, model.anchors([tuple(s.shape[-2:]) for s in cls_scores], "cpu"),
            [meta], model.box_coder, rescale=True, score_thr=0.05, nms_pre=model.cfg.nms_pre,
            nms_iou=model.cfg.nms_iou, max_per_img=model.cfg.max_per_img,
        )  # fmt: skip
    n = int(num[0])
    assert 0 < n == len(ref["scores"]) < 100
    assert (labels[0, n:] == -1).all() and (scores[0, n:] == 0).all()
    np.testing.assert_allclose(scores[0, :n], ref["scores"].numpy(), atol=1e-5)
    np.testing.assert_allclose(boxes[0, :n], ref["boxes"].numpy(), atol=1e-3)
    np.testing.assert_array_equal(labels[0, :n], ref["labels"].numpy())
    # clipped to img_hw, then rescaled to the original 64 x 112
    assert boxes[0, :n, 2].max() <= 64 + 1e-3 and boxes[0, :n, 3].max() <= 112 + 1e-3


@pytest.mark.parametrize("graph", ["raw", "nms"])
def test_predict_onnx_gives_the_pytorch_detections(exported, tmp_path, capsys, graph):
    root, _, weights = exported
    data = make_dataset(tmp_path / "data", num_train=1, num_val=3, image_size=(96, 80), seed=5)
    onnx_path = root / "raw.onnx"
    if graph == "nms":
        onnx_path = tmp_path / "nms.onnx"
        assert main(["export", "--weights", str(weights), "--out", str(onnx_path), "--with-nms",
                     "--score-thr", "0.05", "--dynamic"]) == 0  # fmt: skip
    common = [str(data.val_images), "--score-thr", "0.1", "--batch-size", "2"]
    assert main(["predict", "--weights", str(weights), *common, "--out", str(tmp_path / "pt")]) == 0
    assert main(["predict", "--onnx", str(onnx_path), *common, "--out", str(tmp_path / "ox")]) == 0
    capsys.readouterr()
    pt = json.loads((tmp_path / "pt" / "predictions.json").read_text())
    ox = json.loads((tmp_path / "ox" / "predictions.json").read_text())
    assert len(pt) == len(ox) > 0
    for a, b in zip(pt, ox):
        assert (a["image_id"], a["category_id"], a["category_name"]) == (
            b["image_id"], b["category_id"], b["category_name"],
        )  # fmt: skip
        assert a["score"] == pytest.approx(b["score"], abs=2e-5)
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=0.02)
    index_pt = json.loads((tmp_path / "pt" / "images.json").read_text())
    index_ox = json.loads((tmp_path / "ox" / "images.json").read_text())
    assert index_pt == index_ox
