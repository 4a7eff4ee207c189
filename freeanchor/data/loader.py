"""Dataset, collate and batch samplers for training and evaluation (spec 3.1).

Training sample: read -> keep-ratio resize (MMDetection rounding and OpenCV's bytes; optional
random short side) -> boxes scaled per axis and clipped -> horizontal flip with prob `flip_prob`
-> normalise. Evaluation sample: `freeanchor.inference.preprocess`, the test-time pipeline's own
step, so `eval` and `predict` feed the network identical tensors; the eval sampler batches only
images of one padded size (`inference.group_batches`), so no image is padded for a neighbour.
Padding to `size_divisor` happens in `collate`. All randomness of sample `i` in epoch `e`
comes from its own generator seeded by (seed, e, i), so a run is reproducible and resumes
exactly whatever the number of workers or processes.

The batch samplers yield lists of `(index, epoch)` keys: the epoch travels with the index, so
persistent workers need no epoch hook. Unusable images (unreadable, more than `max_pixels`,
an aspect ratio that leaves a side of 0 pixels, a size other than the annotated one) become
`SkippedSample`s that `collate` drops; their messages ride along in `Batch.skipped` for the
engine to count.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from freeanchor.config import DataConfig, ModelConfig
from freeanchor.data.coco import ImageRecord
from freeanchor.data.io import DEFAULT_MAX_PIXELS, ImageReadError, read_image
from freeanchor.data.transforms import (
    ImageMeta,
    check_resizable,
    hflip,
    normalize,
    pad_batch,
    rescale_size,
    resize,
    resize_boxes,
)
from freeanchor.errors import OptionError
from freeanchor.inference import group_batches, input_size, preprocess

Key = tuple[int, int]  # (dataset index, epoch)


@dataclass
class Sample:
    image: Tensor  # [3, h, w] float32, normalised, not padded
    boxes: Tensor  # [K, 4] float32 xyxy in resized (and flipped) pixels
    labels: Tensor  # [K] int64
    meta: ImageMeta
    image_id: int


@dataclass
class SkippedSample:
    image_id: int
    message: str  # names the file and the reason


@dataclass
class Batch:
    images: Tensor  # [N, 3, H, W] float32, zero-padded to a multiple of size_divisor
    gt_boxes: list[Tensor]  # N x [K_i, 4]
    gt_labels: list[Tensor]  # N x [K_i]
    metas: list[ImageMeta]
    image_ids: list[int]
    skipped: list[str] = field(default_factory=list)  # messages of dropped samples

    def __len__(self) -> int:
        return len(self.image_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = functools.partial(torch.Tensor.to, device=device, non_blocking=non_blocking)
        boxes, labels = [move(b) for b in self.gt_boxes], [move(x) for x in self.gt_labels]
        return dataclasses.replace(self, images=move(self.images), gt_boxes=boxes, gt_labels=labels)

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        self.images = self.images.pin_memory()
        return self


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for one sample, independent of worker count and iteration order."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class DetectionDataset(Dataset):
    """Records -> `Sample`s (or `SkippedSample` for an unreadable image).

    Indexing with an int uses epoch `self.epoch`; the samplers pass `(index, epoch)`.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        cfg: ModelConfig,
        data_cfg: DataConfig,
        train: bool,
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.records = list(records)
        self.cfg, self.data_cfg, self.train, self.seed = cfg, data_cfg, train, seed
        self.max_pixels = max_pixels
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def landscape(self) -> list[bool]:
        """Aspect group of each record: w >= h (from the annotation file's sizes)."""
        return [r.width >= r.height for r in self.records]

    def __getitem__(self, key: int | Key) -> Sample | SkippedSample:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        rec = self.records[index]
        try:
            image = read_image(rec.path, self.max_pixels)
        except ImageReadError as e:
            return SkippedSample(rec.image_id, f"image id {rec.image_id}: {e}")
        h, w = int(image.shape[1]), int(image.shape[2])
        if (w, h) != (rec.width, rec.height):
            # Boxes are in the annotated geometry; training on them would be silently wrong.
            return SkippedSample(
                rec.image_id,
                f"image id {rec.image_id}: {rec.path}: decoded size {w}x{h} differs from the "
                f"annotated {rec.width}x{rec.height}",
            )
        if not self.train:  # the test-time pipeline's own step
            try:
                tensor, meta = preprocess(image, self.cfg, str(rec.path))
            except ImageReadError as e:
                return SkippedSample(rec.image_id, f"image id {rec.image_id}: {e}")
            boxes = resize_boxes(rec.boxes, (w, h), meta.img_shape[::-1])
            return Sample(tensor, boxes, rec.labels.clone(), meta, rec.image_id)
        scale = tuple(self.cfg.input_scale)
        gen = sample_generator(self.seed, epoch, index)
        shorts = self.data_cfg.multiscale_short
        pick = int(torch.randint(max(len(shorts), 1), (1,), generator=gen))
        flip = bool(torch.rand((), generator=gen) < self.data_cfg.flip_prob)
        if shorts:
            scale = (max(self.cfg.input_scale), shorts[pick])
        try:
            check_resizable(w, h, scale, str(rec.path))
        except ImageReadError as e:
            return SkippedSample(rec.image_id, f"image id {rec.image_id}: {e}")
        new_w, new_h = rescale_size(w, h, scale)
        image = resize(image, (new_w, new_h))
        boxes = resize_boxes(rec.boxes, (w, h), (new_w, new_h))
        if flip:
            image, boxes = hflip(image, boxes)
        meta = ImageMeta((h, w), (new_h, new_w), (new_w / w, new_h / h), flip)
        image = normalize(image, self.cfg.mean, self.cfg.std)
        return Sample(image, boxes, rec.labels.clone(), meta, rec.image_id)


def collate(samples: Sequence[Sample | SkippedSample], size_divisor: int = 32) -> Batch:
    """Drop skipped samples (keeping their messages) and pad the rest into one batch.

    A batch whose every sample was skipped has `len(batch) == 0` and images [0, 3, 0, 0].
    """
    kept = [s for s in samples if isinstance(s, Sample)]
    skipped = [s.message for s in samples if isinstance(s, SkippedSample)]
    images = pad_batch([s.image for s in kept], size_divisor) if kept else torch.zeros(0, 3, 0, 0)
    return Batch(
        images,
        [s.boxes for s in kept],
        [s.labels for s in kept],
        [s.meta for s in kept],
        [s.image_id for s in kept],
        skipped,
    )


class GroupedBatchSampler(Sampler[list[Key]]):
    """Aspect-ratio grouped, shuffled batches; deterministic in (seed, epoch).

    As MMDetection's AspectRatioBatchSampler: walk a seeded permutation, fill one bucket for
    w >= h and one for w < h, emit a bucket when it holds `batch_size` images; leftovers of
    both buckets are merged at the end. The grouping is done on the whole dataset, so the set
    of batches of an epoch does not depend on the world size. Rank r takes batches r, r + W,
    ...; the batch list is first padded by repeating its head to a multiple of W, so every
    rank gets the same number of batches (as DistributedSampler pads samples).
    `set_epoch(epoch, start_batch=k)` skips this rank's first k batches (exact resume).
    """

    def __init__(
        self,
        landscape: Sequence[bool],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise OptionError(
                f"bad sampler setup: batch_size={batch_size} rank={rank}/{world_size}"
            )
        self.landscape = torch.tensor(list(landscape), dtype=torch.bool)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of the epoch, all ranks, before padding."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.landscape), generator=g).tolist()
        flags = self.landscape.tolist()
        buckets: tuple[list[int], list[int]] = ([], [])
        batches = []
        for i in order:
            bucket = buckets[int(flags[i])]
            bucket.append(i)
            if len(bucket) == self.batch_size:
                batches.append(bucket[:])
                bucket.clear()
        left = buckets[0] + buckets[1]
        for start in range(0, len(left), self.batch_size):
            chunk = left[start : start + self.batch_size]
            if len(chunk) == self.batch_size or not self.drop_last:
                batches.append(chunk)
        return batches

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of the epoch (all of them, ignoring start_batch)."""
        batches = self.global_batches(epoch)
        if batches and len(batches) % self.world_size:
            pad = self.world_size - len(batches) % self.world_size
            batches += (batches * (pad // len(batches) + 1))[:pad]
        return batches[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[Key]]:
        epoch = self.epoch
        for batch in self.rank_batches(epoch)[self.start_batch :]:
            yield [(i, epoch) for i in batch]

    def num_batches(self) -> int:
        """Batches per epoch on this rank (independent of the permutation)."""
        n_land = int(self.landscape.sum())
        counts = (len(self.landscape) - n_land, n_land)
        full = sum(c // self.batch_size for c in counts)
        rest = sum(c % self.batch_size for c in counts)
        total = full + (rest // self.batch_size if self.drop_last else -(-rest // self.batch_size))
        return -(-total // self.world_size)

    def __len__(self) -> int:
        return max(self.num_batches() - self.start_batch, 0)


class EvalBatchSampler(Sampler[list[Key]]):
    """Batches of this rank's strided share (indices r, r + W, ...); no padding, so every image
    is evaluated exactly once over all ranks.

    With `keys` (one per record, e.g. its padded network input size), a batch holds only records
    of one key, so no image is padded to a neighbour's size: its detections are those it would
    get alone. Batches follow the first appearance of each key, records in order.
    """

    def __init__(
        self,
        size: int,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        keys: Sequence | None = None,
    ):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise OptionError(
                f"bad sampler setup: batch_size={batch_size} rank={rank}/{world_size}"
            )
        indices = list(range(rank, size, world_size))
        share = [0] * len(indices) if keys is None else [keys[i] for i in indices]
        self.batches = [[indices[j] for j in b] for b in group_batches(share, batch_size)]

    def __iter__(self) -> Iterator[list[Key]]:
        for batch in self.batches:
            yield [(i, 0) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


def _loader(
    dataset: Dataset, sampler: Sampler, cfg: ModelConfig, workers: int, pin: bool
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=functools.partial(collate, size_divisor=cfg.size_divisor),
        pin_memory=pin,
        persistent_workers=workers > 0,
    )


def stop_workers(loader: DataLoader) -> None:
    """Stop a loader's persistent workers now.

    Training workers ignore SIGTERM (see `ignore_stop_signals`), so the interpreter's exit,
    which terminates daemon processes with SIGTERM, could otherwise wait on them forever.
    """
    iterator = getattr(loader, "_iterator", None)  # DataLoader keeps persistent workers here
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


def build_train_loader(
    records: Sequence[ImageRecord],
    cfg: ModelConfig,
    data_cfg: DataConfig,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int | None = None,
    pin_memory: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> DataLoader:
    """Training loader; call `loader.batch_sampler.set_epoch(epoch, start_batch)` each epoch.

    Images of more than `max_pixels` pixels (from the header) are skipped as unreadable."""
    dataset = DetectionDataset(records, cfg, data_cfg, train=True, seed=seed,
                               max_pixels=max_pixels)  # fmt: skip
    sampler = GroupedBatchSampler(dataset.landscape(), batch_size, seed, rank, world_size)
    n = data_cfg.workers if workers is None else workers
    return _loader(dataset, sampler, cfg, n, pin_memory)


def build_eval_loader(
    records: Sequence[ImageRecord],
    cfg: ModelConfig,
    data_cfg: DataConfig,
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
    workers: int | None = None,
    pin_memory: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> DataLoader:
    """Evaluation loader: no flip; rank r sees records r, r + W, ..., batched by padded size
    (from the annotated sizes; see `EvalBatchSampler`)."""
    dataset = DetectionDataset(records, cfg, data_cfg, train=False, max_pixels=max_pixels)
    keys = []
    for r in dataset.records:
        try:
            check_resizable(r.width, r.height, cfg.input_scale)
            keys.append(input_size(r.width, r.height, cfg))
        except ImageReadError:
            keys.append(None)  # alone; the dataset reports it
    sampler = EvalBatchSampler(len(dataset), batch_size, rank, world_size, keys)
    n = data_cfg.workers if workers is None else workers
    return _loader(dataset, sampler, cfg, n, pin_memory)
