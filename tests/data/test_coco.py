"""COCO reading: label mapping, MMDetection's filters and counts, one-line errors for bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from freeanchor.data.coco import DatasetError, load_coco

COCO128 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "coco128"


def _ann(aid, image_id, cat, bbox, **kw):
    area = kw.pop("area", bbox[2] * bbox[3])
    iscrowd = kw.pop("iscrowd", 0)
    return dict(
        id=aid, image_id=image_id, category_id=cat, bbox=bbox, area=area, iscrowd=iscrowd, **kw
    )


def base_dataset() -> dict:
    """Categories deliberately unsorted and non-contiguous; one case per filter rule."""
    return {
        "categories": [
            {"id": 7, "name": "seven"},
            {"id": 1, "name": "one"},
            {"id": 3, "name": "three"},
        ],  # fmt: skip
        "images": [
            {"id": 10, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 11, "file_name": "b.jpg", "width": 64, "height": 64},  # crowd only
            {"id": 12, "file_name": "c.jpg", "width": 50, "height": 40},  # no annotations
            {"id": 13, "file_name": "d.jpg", "width": 100, "height": 31},  # too small (31 < 32)
        ],
        "annotations": [
            _ann(1, 10, 7, [10, 20, 30, 40]),  # usable, label 2
            _ann(2, 10, 1, [90, 70, 20, 20]),  # partly outside: kept, not clipped, label 0
            _ann(3, 10, 3, [5, 5, 10, 10], iscrowd=1),  # crowd
            _ann(4, 10, 3, [5, 5, 10, 10], ignore=1),  # ignore flag
            _ann(5, 10, 3, [100, 10, 10, 10]),  # starts at the right border: no overlap
            _ann(6, 10, 3, [-20, 10, 15, 10]),  # entirely left of the image
            _ann(7, 10, 3, [5, 5, 10, 10], area=0),  # area 0
            _ann(8, 10, 3, [5, 5, 0.5, 10]),  # w < 1
            _ann(9, 10, 3, [5, 5, 10, 0.9]),  # h < 1
            _ann(10, 11, 1, [0, 0, 64, 64], iscrowd=1),
            _ann(11, 13, 1, [0, 0, 10, 10]),
            _ann(12, 10, 3, [1.5, 2.25, 3.0, 4.5]),  # label 1, float coordinates
        ],
    }


def write(tmp_path: Path, data: dict | str, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    (tmp_path / "images").mkdir(exist_ok=True)
    return path


def test_label_mapping_ascending_ids_and_back(tmp_path):
    d = load_coco(write(tmp_path, base_dataset()), tmp_path / "images", train=False)
    assert d.cat_ids == [1, 3, 7]
    assert d.class_names == ["one", "three", "seven"]
    assert d.cat_id_to_label == {1: 0, 3: 1, 7: 2}
    assert d.label_to_cat_id == [1, 3, 7]
    for cat, label in d.cat_id_to_label.items():
        assert d.label_to_cat_id[label] == cat


def test_boxes_filters_and_counts(tmp_path):
    d = load_coco(write(tmp_path, base_dataset()), tmp_path / "images", train=False)
    assert [r.image_id for r in d.records] == [10, 11, 12, 13]  # file order, nothing dropped
    r = d.records[0]
    assert r.path == tmp_path / "images" / "a.jpg" and (r.width, r.height) == (100, 80)
    assert r.boxes.dtype == torch.float32 and r.labels.dtype == torch.int64
    expected = torch.tensor([[10, 20, 40, 60], [90, 70, 110, 90], [1.5, 2.25, 4.5, 6.75]])
    torch.testing.assert_close(r.boxes, expected, rtol=0, atol=0)  # x2 = 110 > 100: not clipped
    assert r.labels.tolist() == [2, 0, 1]
    assert d.records[1].boxes.shape == (0, 4) and d.records[1].labels.shape == (0,)
    assert d.skipped == {
        "ann_crowd": 2,
        "ann_ignore": 1,
        "ann_outside_image": 2,
        "ann_area_le_0": 1,
        "ann_w_or_h_lt_1": 2,
    }
    assert d.num_images == 4 and d.num_annotations == 12 and d.num_boxes == 4


def test_train_image_filter(tmp_path):
    d = load_coco(write(tmp_path, base_dataset()), tmp_path / "images", train=True)
    # crowd-only image 11 is kept (crowd annotations count, as MMDetection's filter_empty_gt)
    assert [r.image_id for r in d.records] == [10, 11]
    assert d.skipped["img_no_annotations"] == 1 and d.skipped["img_too_small"] == 1
    text = d.summary()
    assert "\n" not in text
    for part in ("4 images", "12 annotations", "2 training images with 3 boxes",
                 "1 images without annotations", "1 images with min(w, h) < min_size",
                 "2 crowd boxes"):  # fmt: skip
        assert part in text
    assert [r.image_id for r in load_coco(d.ann_file, tmp_path / "images", True, 20).records] == [
        10, 11, 13,
    ]  # fmt: skip


def _bad(mutate):
    data = base_dataset()
    mutate(data)
    return data


BAD_CASES = {
    "no images key": (lambda d: d.pop("images"), "'images'"),
    "no annotations key": (lambda d: d.pop("annotations"), "'annotations'"),
    "no categories key": (lambda d: d.pop("categories"), "'categories'"),
    "duplicate image id": (lambda d: d["images"].append(dict(d["images"][0])), "image id 10"),
    "duplicate annotation id": (
        lambda d: d["annotations"].append(dict(d["annotations"][0])), "annotation id 1"),
    "duplicate category id": (
        lambda d: d["categories"].append({"id": 3, "name": "x"}), "category id 3"),
    "unknown image_id": (lambda d: d["annotations"][1].update(image_id=99), "annotation id 2"),
    "unknown category_id": (lambda d: d["annotations"][2].update(category_id=2), "annotation id 3"),
    "bbox of 3": (lambda d: d["annotations"][3].update(bbox=[1, 2, 3]), "annotation id 4"),
    "bbox not list": (lambda d: d["annotations"][3].update(bbox="1,2,3,4"), "annotation id 4"),
    "bbox nan": (lambda d: d["annotations"][4].update(bbox=[1, 2, float("nan"), 4]), "id 5"),
    "bbox string": (lambda d: d["annotations"][4].update(bbox=[1, 2, "3", 4]), "id 5"),
    "negative width": (lambda d: d["annotations"][5].update(bbox=[1, 2, -3, 4]), "id 6"),
    "negative height": (lambda d: d["annotations"][5].update(bbox=[1, 2, 3, -4]), "id 6"),
    "missing width": (lambda d: d["images"][1].pop("width"), "image id 11"),
    "missing height": (lambda d: d["images"][2].pop("height"), "image id 12"),
    "zero height": (lambda d: d["images"][2].update(height=0), "image id 12"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_one_line_error(tmp_path, case):
    mutate, record = BAD_CASES[case]
    path = write(tmp_path, _bad(mutate), "bad_ann.json")
    with pytest.raises(DatasetError) as err:
        load_coco(path, tmp_path / "images", train=True)
    msg = str(err.value)
    assert str(path) in msg and record in msg and "\n" not in msg
    assert isinstance(err.value, ValueError)


def test_malformed_json_names_line_and_column(tmp_path):
    text = json.dumps(base_dataset(), indent=1).replace('"width": 64', '"width": 64,,', 1)
    line = text[: text.index(",,")].count("\n") + 1
    path = write(tmp_path, text)
    with pytest.raises(DatasetError, match=rf"ann\.json: malformed JSON at line {line} column"):
        load_coco(path, tmp_path / "images", train=False)


def test_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="nope.json: annotation file not found"):
        load_coco(tmp_path / "nope.json", tmp_path, train=False)
    path = write(tmp_path, base_dataset())
    with pytest.raises(DatasetError, match="no_dir: image folder not found"):
        load_coco(path, tmp_path / "no_dir", train=False)


def test_missing_image_file_is_not_checked_at_load(tmp_path):
    d = load_coco(write(tmp_path, base_dataset()), tmp_path / "images", train=True)
    assert not d.records[0].path.exists() and len(d.records) == 2


def test_input_dict_not_modified(tmp_path):
    data = base_dataset()
    before = copy.deepcopy(data)
    load_coco(write(tmp_path, data), tmp_path / "images", train=True)
    assert data == before


def test_coco128():
    ann = COCO128 / "annotations.json"
    if not ann.is_file():
        pytest.skip(f"coco128 not present: {ann}")
    raw = json.loads(ann.read_text())
    d = load_coco(ann, COCO128 / "images", train=True)
    assert len(d.cat_ids) == 80 and d.cat_ids[0] == 1 and d.cat_ids[-1] == 90
    assert d.cat_id_to_label[13] == 11 and d.cat_id_to_label[90] == 79  # 12 is not a COCO id
    crowd = sum(a["iscrowd"] for a in raw["annotations"])
    assert d.skipped.get("ann_crowd", 0) == crowd > 0
    empty = {i["id"] for i in raw["images"]} - {a["image_id"] for a in raw["annotations"]}
    assert d.skipped["img_no_annotations"] == len(empty) and len(d.records) == 128 - len(empty)
    assert d.num_boxes == len(raw["annotations"]) - crowd
    # spot check one record against the raw file
    rec = d.records[0]
    anns = [a for a in raw["annotations"] if a["image_id"] == rec.image_id and not a["iscrowd"]]
    x, y, w, h = anns[0]["bbox"]
    torch.testing.assert_close(rec.boxes[0], torch.tensor([x, y, x + w, y + h]))
    assert d.label_to_cat_id[int(rec.labels[0])] == anns[0]["category_id"]
    assert all(p.path.is_file() for p in d.records)
