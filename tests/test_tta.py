"""Test-time augmentation: one plain pass is plain inference bit for bit; flipped passes map back
to the image exactly; the merge is one class-aware NMS; scales and options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freeanchor.config import ModelConfig, preset
from freeanchor.errors import OptionError
from freeanchor.inference import Pipeline, Prediction, load_image
from freeanchor.models.detector import FreeAnchor
from freeanchor.tta import (
    OFFICIAL_SCALES,
    TTAConfig,
    TTADetector,
    TTAPipeline,
    default_scales,
    merge,
    mirror,
    parse_scales,
)

SCALE = (128, 96)  # (long, short); 128 and 96 are multiples of 32: no padding at this size
THR = 0.05  # the score threshold of both paths


@pytest.fixture(scope="module")
def model() -> FreeAnchor:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", num_classes=3, classes=["a", "b", "c"],
                      fpn_channels=32, feat_channels=32, stacked_convs=1, input_scale=SCALE,
                      frozen_stages=0, norm_eval=False, score_thr=0.05)  # fmt: skip
    m = FreeAnchor(cfg)
    # Spread the untrained scores so that many pairs pass the threshold and NMS has work.
    torch.nn.init.normal_(m.head.retina_cls.weight, std=0.3)
    return m.eval()


def photo(w: int, h: int, seed: int) -> torch.Tensor:
    """Random uint8 RGB [3, h, w] with blocky structure."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.integers(0, 256, (3, max(h // 8, 1), max(w // 8, 1)),
                                          dtype=np.uint8))  # fmt: skip
    return small.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :h, :w].contiguous()


def _equal(a: dict, b) -> None:
    assert torch.equal(a["boxes"], b.boxes)
    assert torch.equal(a["scores"], b.scores)
    assert torch.equal(a["labels"], b.labels)


@pytest.mark.parametrize("size", [(200, 150), (90, 130), (128, 96)])
def test_one_plain_pass_is_plain_inference_bitwise(model, size):
    image = photo(*size, seed=sum(size))
    tta = TTADetector(model, TTAConfig((SCALE,), flip=False))
    (plain,) = model.predict(image, batch_size=1, score_thr=THR)
    assert len(plain.scores) == model.cfg.max_per_img  # NMS and the cut both did something
    _equal(tta(image, THR), plain)
    # Through the pipelines too (file-like inputs, skips, order).
    outs = [o for o in TTAPipeline(tta).run([image, image.flip(-1)], THR)
            if isinstance(o, Prediction)]  # fmt: skip
    ref = list(Pipeline(model.cfg, lambda b, m, t: model.detect(b, m, score_thr=t)).run(
        [image, image.flip(-1)], THR))  # fmt: skip
    for o, r in zip(outs, ref, strict=True):
        assert torch.equal(o.boxes, r.boxes) and torch.equal(o.scores, r.scores)
        assert o.meta == r.meta


def test_flipped_pass_maps_back_exactly(model):
    # At the model's own size there is no resize and no padding, so the flipped pass sees exactly
    # the mirrored input: its candidates are the plain ones of the mirrored image, mirrored.
    tta = TTADetector(model, TTAConfig((SCALE,), flip=True))
    image = photo(128, 96, seed=3)
    (flipped,) = tta.candidates(image.flip(-1), SCALE, (True,))
    (plain,) = tta.candidates(image, SCALE, (False,))
    assert len(plain["scores"]) > 100
    assert torch.equal(flipped["scores"], plain["scores"])
    assert torch.equal(flipped["labels"], plain["labels"])
    assert torch.equal(flipped["boxes"], mirror(plain["boxes"], 128.0))


def test_symmetric_image_flip_only_gives_mirrored_boxes(model):
    left = photo(64, 96, seed=5)
    image = torch.cat([left, left.flip(-1)], dim=2)  # [3, 96, 128], mirror-symmetric
    assert torch.equal(image, image.flip(-1))
    tta = TTADetector(model, TTAConfig((SCALE,), flip=True))
    plain, flipped = tta.candidates(image, SCALE, (False, True))
    assert torch.equal(flipped["scores"], plain["scores"])
    assert torch.equal(flipped["boxes"], mirror(plain["boxes"], 128.0))
    # Merged: every kept box of the union is a plain box or the mirror of one.
    out = tta(image)
    both = torch.cat([plain["boxes"], flipped["boxes"]])
    assert all((both == b).all(1).any() for b in out["boxes"])


def test_multi_scale_and_flip_runs_and_stays_in_the_image(model):
    image = photo(150, 110, seed=7)
    tta = TTADetector(model, TTAConfig(((96, 64), SCALE, (192, 144)), flip=True))
    out = tta(image)
    assert 0 < len(out["scores"]) <= model.cfg.max_per_img
    assert (out["scores"][:-1] >= out["scores"][1:]).all()
    assert (out["boxes"][:, 0::2] >= 0).all() and (out["boxes"][:, 0::2] <= 150).all()
    assert (out["boxes"][:, 1::2] >= 0).all() and (out["boxes"][:, 1::2] <= 110).all()


def test_merge_is_one_nms_per_class_over_the_union():
    a = {"boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]]),
         "scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([0, 0])}  # fmt: skip
    b = {"boxes": torch.tensor([[1.0, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]]),
         "scores": torch.tensor([0.95, 0.8, 0.3]), "labels": torch.tensor([0, 1, 0])}  # fmt: skip
    out = merge([a, b], nms_iou=0.5, max_per_img=100)
    # class 0: the 0.95 box (other pass) suppresses the 0.9 one; 0.4 suppresses 0.3; class 1 kept
    assert out["scores"].tolist() == pytest.approx([0.95, 0.8, 0.4])
    assert out["labels"].tolist() == [0, 1, 0]
    assert merge([a, b], 0.5, max_per_img=2)["scores"].tolist() == pytest.approx([0.95, 0.8])
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
             "labels": torch.zeros(0, dtype=torch.long)}  # fmt: skip
    assert len(merge([empty], 0.5, 100)["scores"]) == 0


def test_scales_default_and_parsing():
    coco = preset("freeanchor_r50_fpn_1x_coco", num_classes=80)
    assert default_scales(coco) == OFFICIAL_SCALES
    assert OFFICIAL_SCALES[2] == (1333, 800)  # the plain scale is one of them
    small = ModelConfig(backbone="resnet18", num_classes=1, input_scale=(128, 128))
    assert default_scales(small) == ((77, 77), (102, 102), (128, 128), (154, 154), (179, 179),
                                     (205, 205))  # fmt: skip
    assert parse_scales("480:800, 640", coco) == ((800, 480), (1066, 640))
    for bad in ("", "a", "0", "1:2:3", "-5"):
        with pytest.raises(OptionError):
            parse_scales(bad, coco)
    with pytest.raises(OptionError):
        TTAConfig(())
    assert TTAConfig((SCALE, (64, 48)), flip=True).passes() == [
        (SCALE, False), (SCALE, True), ((64, 48), False), ((64, 48), True)]  # fmt: skip


def test_image_a_scale_cannot_resize_is_skipped_with_one_line(model):
    tta = TTADetector(model, TTAConfig((SCALE, (4, 1)), flip=False))
    wide = load_image(photo(400, 8, seed=1))
    outs = list(TTAPipeline(tta).run([wide, photo(100, 80, seed=2)]))
    assert [type(o).__name__ for o in outs] == ["Skipped", "Prediction"]
    assert "input 0" in outs[0].message


def test_eval_and_predict_cli_with_one_plain_pass_equal_plain(tmp_path, capsys):
    import json

    from PIL import Image

    from freeanchor.cli import main
    from freeanchor.models.weights import save_model

    images, anns = [], []
    for i in range(1, 4):
        Image.fromarray(photo(128 + 24 * i, 96, seed=i).permute(1, 2, 0).numpy()).save(
            tmp_path / f"{i}.png"
        )
        images.append({"id": i, "file_name": f"{i}.png", "width": 128 + 24 * i, "height": 96})
        anns.append({"id": i, "image_id": i, "category_id": 1 + i % 3, "bbox": [10, 10, 40, 30],
                     "area": 1200, "iscrowd": 0})  # fmt: skip
    cats = [{"id": k, "name": n} for k, n in ((1, "a"), (2, "b"), (3, "c"))]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", num_classes=3, classes=["a", "b", "c"],
                      fpn_channels=32, feat_channels=32, stacked_convs=1, input_scale=SCALE,
                      frozen_stages=0, norm_eval=False, score_thr=0.0)  # fmt: skip
    weights = save_model(FreeAnchor(cfg), tmp_path / "m.safetensors", extra={"cat_ids": [1, 2, 3]})
    # Batches of one: a batch of two images of one padded size may differ in the last bits.
    common = ["--weights", str(weights), "--device", "cpu", "--batch-size", "1"]
    outs = {}
    for name, extra in (("plain", []), ("tta", ["--tta", "--tta-scales", "96", "--no-tta-flip"])):
        code = main(["eval", *common, "--ann", str(ann), "--images", str(tmp_path), "--workers",
                     "0", "--json", "--out", str(tmp_path / f"eval_{name}"), *extra])  # fmt: skip
        assert code == 0
        metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        code = main(["predict", *common, str(tmp_path / "*.png"), "--score-thr", "0.01",
                     "--out", str(tmp_path / f"pred_{name}"), *extra])  # fmt: skip
        assert code == 0
        outs[name] = (metrics, (tmp_path / f"eval_{name}" / "results.json").read_text(),
                      (tmp_path / f"pred_{name}" / "predictions.json").read_text())  # fmt: skip
    assert outs["plain"][2].count("image_id") > 100
    assert outs["tta"] == outs["plain"]
    code = main(["eval", *common, "--ann", str(ann), "--images", str(tmp_path), "--workers", "0",
                 "--tta", "--tta-scales", "64,128"])  # fmt: skip
    assert code == 0  # two scales and their flips run end to end
    assert main(["predict", *common, str(tmp_path), "--tta", "--tta-scales", "x"]) == 2
