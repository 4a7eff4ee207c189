"""Pascal VOC reader: layout, 1-based geometry, difficult = ignored, classes, one-line errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from freeanchor.data.datasets import load_dataset
from freeanchor.data.voc import VOC_CLASSES, load_voc
from freeanchor.errors import DatasetError
from freeanchor.eval.coco import COCOEvaluator

from .writers import voc_xml


def make_voc(root, items=None, lists=None, size=(100, 80)):
    """items: {id: [(name, x1, y1, x2, y2 pixel edges, difficult)]}; lists: {split: [ids]}."""
    items = {"a": [("dog", 10, 20, 40, 60, 0), ("cat", 0, 0, 100, 80, 1)],
             "b": [("cat", 5, 5, 15, 15, 0)], "c": []} if items is None else items  # fmt: skip
    for sub in ("Annotations", "JPEGImages"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for stem, objects in items.items():
        Image.new("RGB", size).save(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", *size, objects))
    for split, ids in (lists or {}).items():
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def test_geometry_difficult_and_classes(tmp_path):
    d = load_voc(make_voc(tmp_path), train=False)
    assert d.class_names == list(VOC_CLASSES) and d.cat_ids == list(range(1, 21))
    assert [r.file_name for r in d.records] == ["a.jpg", "b.jpg", "c.jpg"]
    a = d.records[0]
    # written as xmin=11 ymin=21 xmax=40 ymax=60 (1-based, inclusive) -> edges 10, 20, 40, 60
    torch.testing.assert_close(a.boxes, torch.tensor([[10.0, 20, 40, 60]]), rtol=0, atol=0)
    assert a.labels.tolist() == [VOC_CLASSES.index("dog")]
    torch.testing.assert_close(a.ignore_boxes, torch.tensor([[0.0, 0, 100, 80]]))
    assert a.ignore_labels.tolist() == [VOC_CLASSES.index("cat")]
    assert d.skipped == {"ann_difficult": 1} and "1 difficult objects" in d.summary()
    assert any("no ImageSets" in n for n in d.notes)
    t = load_voc(tmp_path, train=True)
    assert [r.file_name for r in t.records] == ["a.jpg", "b.jpg"]  # c has no objects


def test_a_detection_on_a_difficult_object_is_not_a_false_positive(tmp_path):
    d = load_voc(make_voc(tmp_path, {"a": [("dog", 10, 20, 40, 60, 0),
                                           ("dog", 50, 10, 90, 70, 1)]}), train=False)  # fmt: skip
    dog = VOC_CLASSES.index("dog")

    def ap(boxes, scores):
        det = {"image_id": 1, "boxes": torch.tensor(boxes), "scores": torch.tensor(scores),
               "labels": torch.full((len(scores),), dog)}  # fmt: skip
        return COCOEvaluator(d, label_to_cat_id=d.cat_ids).evaluate([det])["per_class"]["dog"]

    hit = [10.0, 20, 40, 60]
    assert ap([hit], [0.5]) == pytest.approx(1.0)
    assert ap([[50.0, 10, 90, 70], hit], [0.9, 0.5]) == pytest.approx(1.0)  # on the difficult
    assert ap([[0.0, 70, 10, 80], hit], [0.9, 0.5]) < 0.9  # a real false positive costs AP


def test_splits_and_list_files(tmp_path):
    make_voc(tmp_path, lists={"train": ["a", "c"], "val": ["b"]})
    assert [r.file_name for r in load_voc(tmp_path, "train", train=False).records] == [
        "a.jpg", "c.jpg"]  # fmt: skip
    val = load_dataset(tmp_path, split="val", train=False)
    assert val.format == "voc" and [r.image_id for r in val.records] == [1]
    lst = tmp_path / "ImageSets" / "Main" / "val.txt"
    assert [r.file_name for r in load_dataset(lst, train=False).records] == ["b.jpg"]
    with pytest.raises(DatasetError, match=r"Main: no test\.txt for split 'test' \(found train"):
        load_voc(tmp_path, "test")
    lst.write_text("b\nzzz\n")
    with pytest.raises(DatasetError, match=r"val\.txt line 2: no annotation file .*zzz\.xml"):
        load_voc(lst)
    lst.write_text("../../secret\n")
    with pytest.raises(DatasetError, match=r"val\.txt line 1: image file name '\.\./\.\./secret"):
        load_voc(lst)


def test_class_lists(tmp_path):
    make_voc(tmp_path, {"a": [("zebra", 1, 1, 9, 9, 0), ("apple", 1, 1, 5, 5, 0)], "b": []},
             lists={"train": ["b"], "val": ["a"]})  # fmt: skip
    # not VOC names: the sorted names of every annotation, whichever split is read
    assert load_voc(tmp_path, "train", train=False).class_names == ["apple", "zebra"]
    (tmp_path / "classes.txt").write_text("zebra\nhorse\n")
    d = load_voc(tmp_path, "val", train=False)
    assert d.class_names == ["zebra", "horse"] and d.records[0].labels.tolist() == [0]
    assert d.skipped == {"ann_unknown_class": 1} and "apple" in d.examples["ann_unknown_class"]
    d = load_voc(tmp_path, "val", train=False, classes=["apple"])
    assert d.class_names == ["apple"] and d.records[0].labels.tolist() == [0]


def test_size_zero_is_read_from_the_image(tmp_path):
    make_voc(tmp_path, {"a": [("dog", 1, 1, 9, 9, 0)]}, size=(64, 48))
    xml = tmp_path / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<width>64</width><height>48</height>",
                                           "<width>0</width><height>0</height>"))  # fmt: skip
    r = load_voc(tmp_path).records[0]
    assert (r.width, r.height) == (64, 48)


def test_filename_outside_the_image_folder(tmp_path):
    make_voc(tmp_path, {"a": [("dog", 1, 1, 9, 9, 0)]})
    xml = tmp_path / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<filename>a.jpg", "<filename>../../etc/passwd"))
    with pytest.raises(DatasetError, match=r"a\.xml: image file name '\.\./\.\./etc/passwd'"):
        load_voc(tmp_path)
    xml.write_text(xml.read_text().replace("../../etc/passwd", "/etc/hostname"))
    with pytest.raises(DatasetError, match="is an absolute path outside the image folder"):
        load_voc(tmp_path)


GOOD = voc_xml("a.jpg", 100, 80, [("dog", 10, 20, 40, 60, 0), ("cat", 5, 5, 30, 30, 0)])
OBJ2 = "<object><name>cat</name>"
BAD_XML = {
    "xmax < xmin": (("<xmax>30</xmax>", "<xmax>2</xmax>"), "object 2: xmax 2 < xmin 6"),
    "ymax < ymin": (("<ymax>30</ymax>", "<ymax>1</ymax>"), "object 2: ymax 1 < ymin 6"),
    "not a number": (("<xmin>6</xmin>", "<xmin>six</xmin>"), "object 2: <xmin> 'six' is not a"),
    "missing ymax": (("<ymax>30</ymax>", ""), "object 2: missing <ymax>"),
    "no bndbox": (("<bndbox><xmin>6</xmin><ymin>6</ymin><xmax>30</xmax><ymax>30</ymax></bndbox>",
                   ""), "object 2: missing <bndbox>"),
    "no name": ((OBJ2, "<object><name> </name>"), "object 2: missing <name>"),
    "difficult 2": ((OBJ2 + "<pose>Unspecified</pose><truncated>0</truncated><difficult>0",
                     OBJ2 + "<pose>Unspecified</pose><truncated>0</truncated><difficult>2"),
                    "object 2: <difficult> must be 0 or 1"),
    "infinite": (("<xmin>6</xmin>", "<xmin>inf</xmin>"), "object 2: <xmin> 'inf' is not finite"),
    "bad width": (("<width>100</width>", "<width>-5</width>"), "<width> must be a positive"),
    "unclosed tag": (("</annotation>", ""), "malformed XML at line 2 column 1: no element found"),
    "root element": (("<annotation>", "<notes>", "</annotation>", "</notes>"), "root element"),
    "billion laughs": (("<annotation>", '<!DOCTYPE a [<!ENTITY a "aaaaaaaaaa"><!ENTITY b '
                        '"&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><annotation>'),
                       "XML with a DTD or entity declarations is refused"),
    "external entity": (("<annotation>", '<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                         "<annotation>"), "XML with a DTD or entity declarations is refused"),
    "undeclared entity": (("<name>dog</name>", "<name>&x;</name>"), "undefined entity"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_XML))
def test_bad_xml_one_line_error(tmp_path, case):
    replacements, needle = BAD_XML[case]
    text = GOOD
    for old, new in zip(replacements[::2], replacements[1::2]):
        assert old in text, old
        text = text.replace(old, new)
    make_voc(tmp_path, {"a": []})
    (tmp_path / "Annotations" / "a.xml").write_text(text)
    with pytest.raises(DatasetError) as err:
        load_voc(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "Annotations" / "a.xml") in msg and needle in msg, msg
    assert "\n" not in msg
