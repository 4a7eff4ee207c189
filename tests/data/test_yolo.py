"""YOLO reader: data.yaml and labels folders, pixel geometry, filters, one-line errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from freeanchor.cli import main
from freeanchor.data.datasets import load_dataset
from freeanchor.data.yolo import load_yolo
from freeanchor.errors import DatasetError


def _image(path, w=100, h=50, exif_orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (w, h), (90, 120, 150))
    if exif_orientation is None:
        img.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(path, exif=exif)
    return path


def make_yolo(root, labels=None, names="[cat, dog]", extra=""):
    """root/images/{train,val}/*.png (100x50) + labels + data.yaml; labels: {rel: text}."""
    labels = {"train/a": "0 0.5 0.5 0.2 0.4\n1 0.25 0.25 0.1 0.1\n", "train/b": "",
              "val/c": "1 0.5 0.5 1 1\n"} if labels is None else labels  # fmt: skip
    for rel, text in labels.items():
        _image(root / "images" / f"{rel}.png")
        if text is not None:
            (root / "labels" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "labels" / f"{rel}.txt").write_text(text)
    yaml = root / "data.yaml"
    yaml.write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: {names}\n{extra}")
    return yaml


def test_yaml_records_in_pixels(tmp_path):
    d = load_yolo(make_yolo(tmp_path), split="train", train=False)
    assert d.format == "yolo" and d.class_names == ["cat", "dog"] and d.cat_ids == [1, 2]
    assert [(r.image_id, r.file_name, r.width, r.height) for r in d.records] == [
        (1, "a.png", 100, 50), (2, "b.png", 100, 50)]  # fmt: skip
    # cx 0.5 cy 0.5 w 0.2 h 0.4 of 100x50 -> x 40..60, y 15..35
    torch.testing.assert_close(d.records[0].boxes, torch.tensor([[40.0, 15, 60, 35],
                                                                 [20, 10, 30, 15]]))  # fmt: skip
    assert d.records[0].labels.tolist() == [0, 1] and d.records[1].boxes.shape == (0, 4)
    assert d.image_root == tmp_path / "images" / "train" and d.split == "train"
    val = load_yolo(tmp_path / "data.yaml", split="val", train=False)
    assert [r.file_name for r in val.records] == ["c.png"]
    torch.testing.assert_close(val.records[0].boxes, torch.tensor([[0.0, 0, 100, 50]]))


def test_training_filter_and_counts(tmp_path):
    d = load_yolo(make_yolo(tmp_path), split="train", train=True)
    assert [r.file_name for r in d.records] == ["a.png"]
    assert d.skipped == {"img_no_annotations": 1}  # the empty label file
    assert "1 images without annotations" in d.summary()


def test_names_as_dict_and_nc(tmp_path):
    d = load_yolo(make_yolo(tmp_path, names="{0: cat, 1: dog}", extra="nc: 2\n"))
    assert d.class_names == ["cat", "dog"]


@pytest.mark.parametrize(
    "names, extra, needle",
    [("[cat, dog]", "nc: 3\n", "nc 3 but 2 names"),
     ("{1: cat, 2: dog}", "", "'names' keys must be 0..1"),
     ("[cat, cat]", "", "duplicate class names"),
     ("[]", "", "'names' must be a non-empty list")],
)  # fmt: skip
def test_bad_yaml_names(tmp_path, names, extra, needle):
    with pytest.raises(DatasetError, match="data.yaml: " + needle.replace("(", r"\(")):
        load_yolo(make_yolo(tmp_path, names=names, extra=extra))


def test_malformed_yaml_names_the_line(tmp_path):
    yaml = make_yolo(tmp_path)
    yaml.write_text("path: .\ntrain: [images/train\nnames: [a]\n")
    with pytest.raises(DatasetError, match=r"data\.yaml: malformed YAML at line \d+ column \d+"):
        load_yolo(yaml)


def test_missing_split_entry(tmp_path):
    with pytest.raises(DatasetError, match=r"no 'test' entry \(has: train, val\)"):
        load_yolo(make_yolo(tmp_path), split="test")


BAD_LINES = {
    "4 numbers": ("0 0.5 0.5 0.2", "expected 5 numbers (class cx cy w h)", "got 4"),
    "6 numbers": ("0 0.5 0.5 0.2 0.2 0.9", "expected 5 numbers", "got 6"),
    "not a number": ("0 0.5 abc 0.2 0.2", "'abc' is not a number", ""),
    "nan": ("0 0.5 nan 0.2 0.2", "'nan' is not finite", ""),
    "fractional class": ("1.5 0.5 0.5 0.2 0.2", "class '1.5' is not a class index", ""),
    "negative class": ("-1 0.5 0.5 0.2 0.2", "class '-1' is not a class index", ""),
    "class out of range": ("2 0.5 0.5 0.2 0.2", "class 2 not in 0..1 (2 names)", ""),
    "pixel coordinates": ("0 50 25 20 20", "cx 50 outside [0, 1]", "fractions"),
    "negative size": ("0 0.5 0.5 -0.2 0.2", "w -0.2 outside [0, 1]", ""),
    "polygon point": ("0 0.1 0.1 0.9 0.1 0.5 1.2", "y3 1.2 outside [0, 1]", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_label_line_one_line_error(tmp_path, case):
    line, *needles = BAD_LINES[case]
    make_yolo(tmp_path, {"train/a": f"0 0.5 0.5 0.2 0.2\n\n{line}\n", "val/c": ""})
    with pytest.raises(DatasetError) as err:
        load_yolo(tmp_path / "data.yaml")
    msg = str(err.value)
    assert str(tmp_path / "labels" / "train" / "a.txt") + " line 3: " in msg, msg
    assert all(n in msg for n in needles) and "\n" not in msg, msg


def test_not_utf8_label_file(tmp_path):
    make_yolo(tmp_path, {"train/a": "", "val/c": ""})
    (tmp_path / "labels" / "train" / "a.txt").write_bytes(b"0 0.5 0.5 0.1 0.1\xff\n")
    with pytest.raises(DatasetError, match=r"a\.txt: not UTF-8 text"):
        load_yolo(tmp_path / "data.yaml")


def test_polygon_line_gives_its_box(tmp_path):
    make_yolo(tmp_path, {"train/a": "1 0.1 0.2 0.5 0.2 0.3 0.8\n", "val/c": ""})
    d = load_yolo(tmp_path / "data.yaml")
    torch.testing.assert_close(d.records[0].boxes, torch.tensor([[10.0, 10, 50, 40]]))


def test_missing_label_file_orphans_and_unreadable_image(tmp_path):
    make_yolo(tmp_path, {"train/a": "0 0.5 0.5 0.2 0.2\n", "train/nolabel": None, "val/c": ""})
    (tmp_path / "labels" / "train" / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "images" / "train" / "broken.png").write_bytes(b"not a png")
    d = load_yolo(tmp_path / "data.yaml", train=False)
    assert [r.file_name for r in d.records] == ["a.png", "nolabel.png"]
    assert d.skipped == {"img_unreadable": 1, "label_without_image": 1}
    assert "broken.png" in d.examples["img_unreadable"]
    assert "orphan.txt" in d.examples["label_without_image"]
    assert any("1 images without a label file" in n for n in d.notes)


def test_sizes_follow_exif_orientation(tmp_path):
    # Stored 100x50 but rotated 90 degrees by EXIF: the loader decodes 50x100, so must we.
    _image(tmp_path / "images" / "train" / "r.jpg", 100, 50, exif_orientation=6)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "r.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [a]\n")
    r = load_yolo(tmp_path / "data.yaml").records[0]
    assert (r.width, r.height) == (50, 100)
    torch.testing.assert_close(r.boxes, torch.tensor([[12.5, 25, 37.5, 75]]))


def test_labels_folder_with_and_without_classes(tmp_path):
    make_yolo(tmp_path)
    d = load_dataset(tmp_path / "labels" / "train", train=False)
    assert d.format == "yolo" and d.image_root == tmp_path / "images" / "train"
    assert d.class_names == ["class_0", "class_1"]  # from the largest class index seen
    (tmp_path / "labels" / "classes.txt").write_text("cat\ndog\nbird\n")
    d = load_dataset(tmp_path / "labels" / "train", train=False)
    assert d.class_names == ["cat", "dog", "bird"]
    d = load_dataset(tmp_path / "labels" / "train", train=False, classes=["x", "y"])
    assert d.class_names == ["x", "y"]
    with pytest.raises(DatasetError, match=r"class 1 not in 0\.\.0 \(1 names\)"):
        load_dataset(tmp_path / "labels" / "train", classes=["x"])


def test_image_list_files_and_traversal(tmp_path):
    make_yolo(tmp_path)
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text("./../images/train/a.png\nimages/train/b.png\n")
    (tmp_path / "data.yaml").write_text("train: lists/train.txt\nnames: [cat, dog]\n")
    d = load_yolo(tmp_path / "data.yaml", train=False)
    assert [r.file_name for r in d.records] == ["images/train/a.png", "images/train/b.png"]
    assert d.records[0].boxes.shape == (2, 4)
    secret = tmp_path.parent / f"{tmp_path.name}_secret.png"
    _image(secret)
    for line in (str(secret), f"../{secret.name}", f"./../../{secret.name}"):
        lst.write_text(f"images/train/a.png\n{line}\n")
        with pytest.raises(DatasetError, match=r"train\.txt line 2: image file name .* outside"):
            load_yolo(tmp_path / "data.yaml")
        ok = load_yolo(tmp_path / "data.yaml", allow_outside_root=True, train=False)
        assert ok.records[1].path.resolve() == secret.resolve()


def test_split_folder_outside_the_root_is_refused(tmp_path):
    make_yolo(tmp_path / "ds")
    (tmp_path / "ds" / "data.yaml").write_text("path: .\ntrain: ../other\nnames: [a, b]\n")
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError, match="data.yaml: train: image file name '../other'"):
        load_yolo(tmp_path / "ds" / "data.yaml")


def test_cli_bad_label_line_exit_2(tmp_path, capsys):
    make_yolo(tmp_path, {"train/a": "0 0.5 0.5 0.2\n", "val/c": ""})
    assert main(["data", "check", str(tmp_path / "data.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.txt line 1: expected 5 numbers" in err[0], err
