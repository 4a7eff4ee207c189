"""Image decoding, the training/eval sample pipeline, collate and the batch samplers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freeanchor.config import DataConfig, ModelConfig
from freeanchor.data.coco import ImageRecord
from freeanchor.data.io import read_image
from freeanchor.data.loader import (
    EvalBatchSampler,
    GroupedBatchSampler,
    Sample,
    SkippedSample,
    build_eval_loader,
    build_train_loader,
    collate,
)
from freeanchor.data.transforms import MEAN, STD, rescale_size

SMALL = ModelConfig(backbone="resnet18", num_classes=3, input_scale=(96, 64))


def make_record(path: Path, w: int, h: int, boxes=((2.0, 3.0, 20.0, 30.0),), image_id=1):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.arange(len(boxes), dtype=torch.int64) % 3
    return ImageRecord(image_id, path.name, path, w, h, boxes, labels)


def write_image(path: Path, w: int, h: int, seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(path)
    return path


# ----------------------------------------------------------------------------- decoding (io.py)


def test_decode_modes(tmp_path):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(10, 12)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    out = read_image(tmp_path / "grey.png")
    assert out.shape == (3, 10, 12) and out.dtype == torch.uint8
    assert all(torch.equal(out[c], torch.from_numpy(grey)) for c in range(3))

    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 3] = 200, 30, 255
    rgba[:, 4:, 3] = 0  # right half transparent: OpenCV (so MMDetection) ignores alpha
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    assert out.shape == (3, 6, 8)
    assert out[:, 0, 0].tolist() == [200, 30, 0] and out[:, 0, 7].tolist() == [200, 30, 0]

    deep = (np.arange(5 * 7, dtype=np.uint16).reshape(5, 7) * 1000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep16.png")
    assert Image.open(tmp_path / "deep16.png").mode.startswith("I")
    out = read_image(tmp_path / "deep16.png")
    assert out.shape == (3, 5, 7)
    # OpenCV's IMREAD_COLOR keeps the high byte of each 16-bit sample
    assert torch.equal(out[0], torch.from_numpy((deep >> 8).astype(np.uint8)))

    Image.new("CMYK", (9, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    out = read_image(tmp_path / "cmyk.jpg")
    assert out.shape == (3, 4, 9)
    r, g, b = out[:, 2, 4].tolist()
    assert r > 200 and g < 60 and b < 60


def test_decode_exif_rotation(tmp_path):
    stored = np.zeros((20, 30, 3), dtype=np.uint8)  # stored 30 wide, 20 high
    stored[:5, :5] = (255, 0, 0)  # red marker at the stored top-left
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored top-left -> displayed top-right
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = read_image(tmp_path / "rot.jpg")
    assert out.shape == (3, 30, 20)
    assert out[0, 1, -2] > 200 and out[1, 1, -2] < 60  # red, top-right
    assert out[0, 1, 1] < 60  # not at top-left any more


# ----------------------------------------------------------------------------- sample pipeline


@pytest.mark.parametrize(
    "w,h,scale,expected",
    [
        ((640, 480, (1333, 800), (1067, 800))),
        ((480, 640, (1333, 800), (800, 1067))),
        ((500, 375, (1333, 800), (1067, 800))),
        ((2000, 500, (1333, 800), (1333, 333))),
        ((640, 480, (1333, 640), (853, 640))),
    ],
)
def test_rescale_size_hand_computed(w, h, scale, expected):
    assert rescale_size(w, h, scale) == expected


def test_eval_sample_resize_boxes_and_normalise(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (640, 480), (100, 150, 200)).save(path)
    boxes = [[10.0, 20.0, 330.5, 240.25], [600.0, 400.0, 700.0, 500.0]]  # second partly outside
    rec = make_record(path, 640, 480, boxes)
    cfg = ModelConfig(backbone="resnet18", num_classes=3)  # (1333, 800)
    sample = build_eval_loader([rec], cfg, DataConfig(), workers=0).dataset[0]
    assert isinstance(sample, Sample)
    assert sample.image.shape == (3, 800, 1067)
    meta = sample.meta
    assert meta.ori_shape == (480, 640) and meta.img_shape == (800, 1067) and not meta.flipped
    w_scale, h_scale = meta.scale_factor
    assert w_scale == 1067 / 640 and h_scale == 800 / 480
    factor = torch.tensor([w_scale, h_scale, w_scale, h_scale], dtype=torch.float32)
    expected = torch.tensor(boxes) * factor
    expected[1] = torch.tensor([1000.3125, 666.6666, 1067.0, 800.0])  # clipped to the image
    torch.testing.assert_close(sample.boxes[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(sample.boxes[1], expected[1], rtol=0, atol=1e-4)
    for c, value in enumerate((100, 150, 200)):  # constant image stays constant after resize
        torch.testing.assert_close(
            sample.image[c], torch.full((800, 1067), (value - MEAN[c]) / STD[c]), rtol=0, atol=1e-6
        )
    assert torch.equal(sample.labels, rec.labels)


def _train_set(tmp_path, n=1, flip_prob=0.5, shorts=(), w=48, h=40):
    records = [
        make_record(write_image(tmp_path / f"{i}.png", w, h, seed=i), w, h, image_id=100 + i)
        for i in range(n)
    ]
    data_cfg = DataConfig(flip_prob=flip_prob, multiscale_short=shorts)
    return build_train_loader(records, SMALL, data_cfg, batch_size=2, seed=3, workers=0).dataset


def test_flip(tmp_path):
    plain = _train_set(tmp_path, flip_prob=0.0)[(0, 0)]
    flipped = _train_set(tmp_path, flip_prob=1.0)[(0, 0)]
    assert not plain.meta.flipped and flipped.meta.flipped
    assert torch.equal(flipped.image, plain.image.flip(-1))
    width = plain.meta.img_shape[1]
    x1, y1, x2, y2 = plain.boxes.unbind(-1)
    torch.testing.assert_close(flipped.boxes, torch.stack([width - x2, y1, width - x1, y2], -1))


def test_flip_rate_and_per_sample_determinism(tmp_path):
    ds = _train_set(tmp_path, n=1, flip_prob=0.5, w=8, h=8)
    ds.records = ds.records * 200  # the same tiny file; randomness depends on the index only
    flips = [ds[(i, 0)].meta.flipped for i in range(200)]
    assert 70 < sum(flips) < 130  # Binomial(200, 0.5): outside this range has p < 2e-5
    assert [ds[(i, 0)].meta.flipped for i in range(0, 200, 7)] == flips[::7]  # any order
    again = [ds[(i, 0)].meta.flipped for i in range(200)]
    assert again == flips
    other_epoch = [ds[(i, 1)].meta.flipped for i in range(200)]
    assert other_epoch != flips


def test_multiscale_short_side(tmp_path):
    ds = _train_set(tmp_path, n=1, shorts=(32, 48, 64), w=60, h=40)
    ds.records = ds.records * 30
    shapes = {ds[(i, 0)].meta.img_shape for i in range(30)}
    # long side capped at 96; short side from the list: (32,48), (48,72), (64,96)
    assert shapes == {(32, 48), (48, 72), (64, 96)}


def test_unreadable_images_skipped_and_reported(tmp_path):
    good = make_record(write_image(tmp_path / "good.png", 40, 30), 40, 30, image_id=1)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    records = [
        good,
        make_record(tmp_path / "corrupt.jpg", 40, 30, image_id=2),
        make_record(tmp_path / "empty.jpg", 40, 30, image_id=3),
        make_record(tmp_path / "missing.jpg", 40, 30, image_id=4),
        make_record(write_image(tmp_path / "size.png", 41, 30), 40, 30, image_id=5),
    ]
    loader = build_eval_loader(records, SMALL, DataConfig(), batch_size=5, workers=0)
    (batch,) = list(loader)
    assert batch.image_ids == [1] and len(batch) == 1 and batch.images.shape[0] == 1
    assert len(batch.skipped) == 4
    for msg, needle in zip(batch.skipped, ("corrupt.jpg", "empty.jpg", "missing.jpg", "size.png")):
        assert needle in msg and "\n" not in msg
    assert "image id 5" in batch.skipped[3] and "41x30" in batch.skipped[3]
    empty = collate([SkippedSample(9, "x")])
    assert len(empty) == 0 and empty.images.shape == (0, 3, 0, 0) and empty.skipped == ["x"]


def test_collate_pads_to_divisor(tmp_path):
    def sample(h, w, value):
        from freeanchor.data.transforms import ImageMeta

        meta = ImageMeta((h, w), (h, w), (1.0, 1.0))
        return Sample(torch.full((3, h, w), value), torch.zeros(0, 4), torch.zeros(0), meta, 7)

    batch = collate([sample(33, 40, 1.0), sample(20, 70, 2.0)], size_divisor=32)
    assert batch.images.shape == (2, 3, 64, 96)
    assert batch.images[0, :, :33, :40].eq(1).all() and batch.images[0, :, 33:].eq(0).all()
    assert batch.images[0, :, :, 40:].eq(0).all() and batch.images[1, :, :20, :70].eq(2).all()
    moved = batch.to("cpu")
    assert moved.image_ids == [7, 7] and torch.equal(moved.images, batch.images)


def test_worker_count_does_not_change_batches(tmp_path):
    records = [
        make_record(write_image(tmp_path / f"{i}.png", 30 + 9 * i, 40, seed=i), 30 + 9 * i, 40,
                    image_id=i)
        for i in range(6)
    ]  # fmt: skip
    data_cfg = DataConfig(flip_prob=0.5, multiscale_short=(48, 64))
    runs = []
    for workers in (0, 2):
        loader = build_train_loader(records, SMALL, data_cfg, 2, seed=5, workers=workers)
        loader.batch_sampler.set_epoch(2)
        runs.append(list(loader))
    assert len(runs[0]) == len(runs[1]) == 3
    for a, b in zip(*runs):
        assert a.image_ids == b.image_ids and torch.equal(a.images, b.images)
        assert all(torch.equal(x, y) for x, y in zip(a.gt_boxes, b.gt_boxes))


# ----------------------------------------------------------------------------- samplers


def _flags(n=23, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)).lt(0.6).tolist()


def test_sampler_deterministic_grouped_complete():
    flags = _flags()
    s = GroupedBatchSampler(flags, batch_size=3, seed=7)
    s.set_epoch(4)
    first = list(s)
    s.set_epoch(4)
    assert list(s) == first and len(first) == len(s) == -(-23 // 3)
    assert all(e == 4 for batch in first for _, e in batch)
    indices = [i for batch in first for i, _ in batch]
    assert sorted(indices) == list(range(23))  # every image once
    mixed = [b for b in first if len({flags[i] for i, _ in b}) > 1]
    assert len(mixed) <= 1 and all(len(b) == 3 for b in first[:-2])  # only leftovers mixed
    s.set_epoch(5)
    assert [i for b in s for i, _ in b] != indices
    assert list(GroupedBatchSampler(flags, 3, seed=8)) != list(GroupedBatchSampler(flags, 3, 7))


def test_sampler_drop_last_length():
    flags = [True] * 7 + [False] * 5
    s = GroupedBatchSampler(flags, batch_size=3, drop_last=True)
    batches = list(s)
    assert len(batches) == len(s) == 4  # 2 + 1 full buckets, leftovers 1 + 2 merged -> 1
    assert all(len(b) == 3 for b in batches)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sampler_distributed_disjoint_equal(world_size):
    flags = _flags(n=25, seed=1)
    single = GroupedBatchSampler(flags, 2, seed=11)
    single.set_epoch(3)
    global_batches = [[i for i, _ in b] for b in single]
    shares = []
    for rank in range(world_size):
        s = GroupedBatchSampler(flags, 2, seed=11, rank=rank, world_size=world_size)
        s.set_epoch(3)
        shares.append([[i for i, _ in b] for b in s])
        assert len(shares[-1]) == len(s)
    assert len({len(share) for share in shares}) == 1  # equal size
    n = len(shares[0]) * world_size
    padded = global_batches + global_batches[: n - len(global_batches)]
    # rank r gets batch positions r, r + W, ...: disjoint, and together exactly the padded list
    for rank, share in enumerate(shares):
        assert share == padded[rank::world_size]
    positions = sorted(p for r in range(world_size) for p in range(r, n, world_size))
    assert positions == list(range(n))


def test_sampler_skip_first_batches():
    flags = _flags()
    s = GroupedBatchSampler(flags, 2, seed=2, rank=1, world_size=2)
    s.set_epoch(6)
    full = list(s)
    s.set_epoch(6, start_batch=4)
    assert list(s) == full[4:] and len(s) == len(full) - 4
    s.set_epoch(7)
    assert len(list(s)) == len(full)


def test_eval_sampler_sharding_without_duplicates():
    seen = []
    for rank in range(3):
        s = EvalBatchSampler(10, batch_size=2, rank=rank, world_size=3)
        batches = list(s)
        assert len(batches) == len(s)
        seen += [i for b in batches for i, _ in b]
        assert [i for b in batches for i, _ in b] == list(range(rank, 10, 3))  # in order
    assert sorted(seen) == list(range(10))
    with pytest.raises(ValueError):
        EvalBatchSampler(10, batch_size=2, rank=3, world_size=3)
