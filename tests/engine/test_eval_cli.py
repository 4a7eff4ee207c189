"""`freeanchor eval` output, and one-line errors with exit code 2 for bad input (train, eval)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from freeanchor.cli import main
from freeanchor.config import preset
from freeanchor.models.detector import FreeAnchor
from freeanchor.models.weights import load_model, save_model

from .conftest import make_coco


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    ann, img = make_coco(root / "data", num_images=4)
    cfg = preset("freeanchor_r18_fpn_1x", num_classes=2)
    cfg.classes, cfg.input_scale = ["red", "blue"], (128, 96)
    cfg.fpn_channels = cfg.feat_channels = 64
    cfg.score_thr = 0.0  # an untrained model scores ~0.01: keep its detections to score them
    torch.manual_seed(0)
    weights = save_model(FreeAnchor(cfg), root / "m.safetensors", extra={"cat_ids": [1, 2]})
    return ann, img, weights, root


def test_eval_json_last_line_and_outputs(eval_setup, capsys):
    ann, img, weights, root = eval_setup
    out = root / "out"
    code = main(["eval", "--weights", str(weights), "--ann", str(ann), "--images", str(img),
                 "--device", "cpu", "--workers", "0", "--backend", "pycocotools",
                 "--out", str(out), "--json"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    metrics = json.loads(lines[-1])
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"):
        assert -1.0 <= metrics[key] <= 1.0
    assert set(metrics["per_class"]) == {"red", "blue"} and metrics["images"] == 4
    assert any(line.split()[:2] == ["0", "red"] for line in lines)  # per-class table
    for name in ("results.json", "metrics.json", "pr_curve.png", "per_class.txt"):
        assert (out / name).is_file(), name
    # Independent re-scoring of the written results with pycocotools gives the same numbers.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = json.loads((out / "results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2}
    assert len(results) == 4 * 100  # max_per_img detections for each image at score_thr 0
    gt = COCO(str(ann))
    ev = COCOeval(gt, gt.loadRes(str(out / "results.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert metrics["AP"] == pytest.approx(ev.stats[0], abs=1e-12)
    assert metrics["AP50"] == pytest.approx(ev.stats[1], abs=1e-12)


def _bad_inputs(tmp_path):
    ann, img = make_coco(tmp_path / "data", num_images=2)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    return {
        "missing ann": (tmp_path / "missing.json", img, "annotation file not found"),
        "malformed JSON": (broken, img, "malformed JSON"),
        "missing image dir": (ann, tmp_path / "no_images", "image folder not found"),
    }


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], err[0]


@pytest.mark.parametrize("case", ["missing ann", "malformed JSON", "missing image dir"])
def test_train_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    ann, img, message = _bad_inputs(tmp_path)[case]
    code = main(["train", "--model", "freeanchor_r18_fpn_1x", "--train-ann", str(ann),
                 "--train-images", str(img), "--work-dir", str(tmp_path / "w"),
                 "--device", "cpu"])  # fmt: skip
    _one_line_error(capsys, code, message, ann.name if case != "missing image dir" else "no_images")


@pytest.mark.parametrize("case", ["missing ann", "malformed JSON", "missing image dir"])
def test_eval_bad_input_is_one_line_exit_2(eval_setup, tmp_path, capsys, case):
    weights = eval_setup[2]
    ann, img, message = _bad_inputs(tmp_path)[case]
    code = main(["eval", "--weights", str(weights), "--ann", str(ann), "--images", str(img),
                 "--device", "cpu"])  # fmt: skip
    _one_line_error(capsys, code, message)


def test_other_user_mistakes(eval_setup, tmp_path, capsys):
    ann, img, weights, _ = eval_setup
    code = main(["train", "--train-ann", str(ann), "--train-images", str(img),
                 "--work-dir", str(tmp_path / "empty"), "--resume"])  # fmt: skip
    _one_line_error(capsys, code, "last.pt", "nothing to resume")
    code = main(["train", "--work-dir", str(tmp_path / "w")])
    _one_line_error(capsys, code, "no training data")
    code = main(["train", "--train-ann", str(ann), "--train-images", str(img),
                 "--set", "train.no_such_field=1"])  # fmt: skip
    _one_line_error(capsys, code, "train.no_such_field")
    code = main(["eval", "--weights", str(tmp_path / "none.safetensors"), "--ann", str(ann),
                 "--images", str(img), "--device", "cpu"])  # fmt: skip
    _one_line_error(capsys, code, "none.safetensors")
    # a model without recorded category ids whose class count does not fit the file
    three = json.loads(ann.read_text())
    three["categories"].append({"id": 3, "name": "green"})
    ann3 = tmp_path / "three.json"
    ann3.write_text(json.dumps(three))
    torch.manual_seed(0)
    bare = save_model(load_model(weights), tmp_path / "bare.safetensors", extra={})
    code = main(["eval", "--weights", str(bare), "--ann", str(ann3), "--images", str(img),
                 "--device", "cpu"])  # fmt: skip
    _one_line_error(capsys, code, "2 classes", "3 categories")
    # a model whose category ids are not all in the file
    moved = json.loads(ann.read_text())
    moved["categories"][1]["id"] = 7
    for a in moved["annotations"]:
        a["category_id"] = 7 if a["category_id"] == 2 else a["category_id"]
    ann7 = tmp_path / "moved.json"
    ann7.write_text(json.dumps(moved))
    code = main(["eval", "--weights", str(weights), "--ann", str(ann7), "--images", str(img),
                 "--device", "cpu"])  # fmt: skip
    _one_line_error(capsys, code, "[2]", "moved.json")


def test_eval_json_is_labelled_as_fractions(eval_setup, capsys):
    ann, img, weights, _ = eval_setup
    code = main(["eval", "--weights", str(weights), "--ann", str(ann), "--images", str(img),
                 "--device", "cpu", "--workers", "0", "--json"])  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert json.loads(out[-1])["ap_scale"] == "fraction"
    assert any(line.startswith("AP=") and line.endswith("(COCO, 0-1)") for line in out)
    assert any(line.startswith("per-class AP (COCO, 0-1)") for line in out)


def test_eval_with_the_wrong_image_folder_exits_2(eval_setup, tmp_path, capsys):
    ann, _, weights, _ = eval_setup
    wrong = tmp_path / "val2017"
    wrong.mkdir()
    code = main(["eval", "--weights", str(weights), "--ann", str(ann), "--images", str(wrong),
                 "--device", "cpu", "--workers", "0"])  # fmt: skip
    _one_line_error(capsys, code, "4 of 4 images", str(wrong / "0000.png"), f"--images {wrong}")


def test_eval_with_nothing_to_score_exits_2(eval_setup, tmp_path, capsys):
    ann, img, weights, _ = eval_setup
    data = json.loads(ann.read_text())
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**data, "images": [], "annotations": []}))
    code = main(["eval", "--weights", str(weights), "--ann", str(empty), "--images", str(img),
                 "--device", "cpu", "--workers", "0"])  # fmt: skip
    _one_line_error(capsys, code, "empty.json", "no image to evaluate")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in (p.name for p in img.iterdir()):
        (broken / name).write_text("not an image")
    code = main(["eval", "--weights", str(weights), "--ann", str(ann), "--images", str(broken),
                 "--device", "cpu", "--workers", "0"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "nothing to score" in err[-1] and "4 unreadable" in err[-1], err


def test_eval_progress_bar_on_a_terminal_only(eval_setup, capsys, monkeypatch):
    ann, img, weights, _ = eval_setup
    args = ["eval", "--weights", str(weights), "--ann", str(ann), "--images", str(img),
            "--device", "cpu", "--workers", "0", "--batch-size", "2"]  # fmt: skip
    assert main(args) == 0
    assert "img/s" not in capsys.readouterr().err  # not a terminal: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "eval" in err and "4/4" in err
