"""The shared record type: image paths stay under the image root, records <-> COCO dict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from freeanchor.cli import main
from freeanchor.data.coco import load_coco
from freeanchor.data.records import ImageRoot, box_skip_reason
from freeanchor.errors import DatasetError
from freeanchor.eval.coco import COCOEvaluator

from .test_coco import base_dataset, write


@pytest.fixture
def tree(tmp_path):
    """root/images/{a.jpg, sub/b.jpg, in_link -> a.jpg, out_link -> ../secret.txt}."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.jpg").write_bytes(b"a")
    (images / "sub" / "b.jpg").write_bytes(b"b")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(images / "a.jpg", images / "in_link.jpg")
    os.symlink(tmp_path / "secret.txt", images / "out_link.jpg")
    os.symlink(tmp_path, images / "up")  # a folder link leading out
    return images


@pytest.mark.parametrize("name", ["a.jpg", "sub/b.jpg", "sub/../a.jpg", "in_link.jpg", "new.jpg"])
def test_names_inside_the_root(tree, name):
    assert ImageRoot(tree).path(name, "rec") == tree / name


def test_absolute_name_inside_the_root_is_fine(tree):
    assert ImageRoot(tree).path(str(tree / "a.jpg"), "rec") == tree / "a.jpg"


@pytest.mark.parametrize(
    "name", ["../secret.txt", "sub/../../secret.txt", "..", "out_link.jpg", "up/secret.txt",
             "/etc/hostname", "../../../etc/passwd"],
)  # fmt: skip
def test_names_leading_out_are_refused(tree, name):
    with pytest.raises(DatasetError) as err:
        ImageRoot(tree).path(name, "ann.json: image id 7")
    msg = str(err.value)
    assert msg.startswith("ann.json: image id 7:") and repr(name) in msg and "\n" not in msg
    assert "allow_outside_root" in msg  # says how to opt out
    # the opt-out takes the name as written
    assert ImageRoot(tree, allow_outside_root=True).path(name, "x") == tree / name


def test_symlinked_root_itself_is_fine(tmp_path, tree):
    os.symlink(tree, tmp_path / "link_to_images")
    root = ImageRoot(tmp_path / "link_to_images")
    assert root.path("a.jpg", "rec") == tmp_path / "link_to_images" / "a.jpg"


@pytest.mark.parametrize("name", ["/etc/hostname", "../../../etc/passwd"])
def test_coco_file_name_outside_is_refused(tmp_path, name):
    data = base_dataset()
    data["images"][2]["file_name"] = name
    ann = write(tmp_path, data)
    with pytest.raises(DatasetError, match=rf"ann\.json: image id 12: image file name '{name}'"):
        load_coco(ann, tmp_path / "images", train=False)
    ok = load_coco(ann, tmp_path / "images", train=False, allow_outside_root=True)
    assert ok.records[2].path == tmp_path / "images" / name
    # the CLI says it in one line, exit 2
    code = main(["data", "check", str(ann), "--images", str(tmp_path / "images"), "--no-hash"])
    assert code == 2


def test_box_filter_first_hit():
    assert box_skip_reason((0, 0, 10, 10), 20, 20) is None
    assert box_skip_reason((0, 0, 10, 10), 20, 20, ignore=True) == "ann_ignore"
    assert box_skip_reason((20, 0, 30, 10), 20, 20) == "ann_outside_image"  # touches the edge
    assert box_skip_reason((0, 0, 10, 10), 20, 20, area=0) == "ann_area_le_0"
    assert box_skip_reason((0, 0, 0.5, 10), 20, 20) == "ann_w_or_h_lt_1"
    assert box_skip_reason((-5, -5, 25, 25), 20, 20) is None  # larger than the image: kept


def test_records_to_coco_and_back(tmp_path):
    d = load_coco(write(tmp_path, base_dataset()), tmp_path / "images", train=False)
    doc = d.to_coco()
    assert [c["id"] for c in doc["categories"]] == [1, 3, 7]
    crowd = [a for a in doc["annotations"] if a["iscrowd"]]
    assert len(crowd) == 2 == d.skipped["ann_crowd"]  # crowd boxes kept as ignored
    back = load_coco(write(tmp_path, doc, "back.json"), tmp_path / "images", train=False)
    assert [r.image_id for r in back.records] == [r.image_id for r in d.records]
    for a, b in zip(d.records, back.records):
        assert a.file_name == b.file_name and (a.width, a.height) == (b.width, b.height)
        for key in ("boxes", "labels", "ignore_boxes", "ignore_labels"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert back.skipped == {"ann_crowd": 2}


def test_evaluator_scores_a_coco_source_against_its_file(tmp_path):
    # A COCO source keeps MMDetection's scoring: its own file, with every crowd annotation.
    ann = write(tmp_path, base_dataset())
    d = load_coco(ann, tmp_path / "images", train=False)
    assert d.ground_truth() == ann
    dets = [{"image_id": 10, "boxes": torch.tensor([[10.0, 20, 40, 60]]),
             "scores": torch.tensor([0.9]), "labels": torch.tensor([2])}]  # fmt: skip
    from_file = COCOEvaluator(ann).evaluate(dets)
    from_data = COCOEvaluator(d).evaluate(dets)
    assert from_file == from_data and from_file["AP"] > 0
    assert json.loads(ann.read_text()) == base_dataset()  # nothing written back


def test_summary_is_one_line_and_names_ignored(tmp_path):
    d = load_coco(write(tmp_path, base_dataset()), tmp_path / "images", train=True)
    text = d.summary()
    assert "\n" not in text and "kept as ignored" in text and "2 crowd boxes" in text
    assert Path(d.ann_file) == d.source and d.cat_id_to_label == {1: 0, 3: 1, 7: 2}
