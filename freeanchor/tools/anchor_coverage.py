"""How well FreeAnchor's hand-made anchors fit a dataset: the best anchor IoU of every gt box.

Each gt box is taken to the model's input size (keep-ratio resize to `input_scale`, clipped as
training does) and compared with the anchors of the model's `AnchorGenerator` on the padded
image's feature grids. For one anchor shape the IoU only falls as the anchor's centre moves
away from the box's, separately in x and in y, so the best anchor of a shape on a level sits
at the grid point nearest the box centre: 9 anchors per level are enough, exactly.

FreeAnchor does not assign anchors by an IoU threshold (each gt's bag holds its 50 best
anchors), but a gt whose best anchor IoU is under 0.5 gets only poorly placed anchors to
regress from; a large share of those says which anchor setting to change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from freeanchor.config import ModelConfig
from freeanchor.data.records import ImageRecord
from freeanchor.data.transforms import rescale_size, resize_boxes
from freeanchor.models.anchors import AnchorGenerator

SIZE_EDGES = (0, 16, 32, 64, 128, 256, 512, math.inf)  # sqrt(w * h) at the input size
ASPECT_BINS = (  # h / w
    ("very wide (h/w < 1/3)", 0.0, 1 / 3),
    ("wide (1/3..2/3)", 1 / 3, 2 / 3),
    ("square-ish (2/3..3/2)", 2 / 3, 3 / 2),
    ("tall (3/2..3)", 3 / 2, 3.0),
    ("very tall (h/w > 3)", 3.0, math.inf),
)


def anchor_generator(cfg: ModelConfig) -> AnchorGenerator:
    return AnchorGenerator(cfg.strides, cfg.ratios, cfg.octave_base_scale, cfg.scales_per_octave)


def best_anchor_iou(
    boxes: Tensor, padded_hw: tuple[int, int] | Tensor, anchors: AnchorGenerator
) -> Tensor:
    """The largest IoU of each box with any anchor of its image.

    Args:
        boxes: [K, 4] xyxy in input (resized) pixels.
        padded_hw: (H, W) of the padded input, or [K, 2] per box (boxes of many images in one
            call); level l has ceil(H / s_l) x ceil(W / s_l) places.

    Returns:
        [K] float32.
    """
    boxes = boxes.float()
    hw = torch.as_tensor(padded_hw, dtype=torch.float32).expand(boxes.shape[0], 2)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    best = torch.zeros(boxes.shape[0])
    for stride, base in zip(anchors.strides, anchors.base_anchors):
        last = torch.ceil(hw / stride) - 1  # index of the last place in y, x
        gx = torch.minimum((cx / stride).round().clamp(min=0), last[:, 1]) * stride
        gy = torch.minimum((cy / stride).round().clamp(min=0), last[:, 0]) * stride
        cand = base[None] + torch.stack([gx, gy, gx, gy], dim=-1)[:, None]  # [K, 9, 4]
        lt = torch.maximum(boxes[:, None, :2], cand[..., :2])
        rb = torch.minimum(boxes[:, None, 2:], cand[..., 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=-1)
        cand_area = (cand[..., 2] - cand[..., 0]) * (cand[..., 3] - cand[..., 1])
        iou = inter / (area[:, None] + cand_area - inter)
        best = torch.maximum(best, iou.amax(dim=1))
    return best


def boxes_at_input(records: Sequence[ImageRecord], cfg: ModelConfig) -> list[tuple[Tensor, tuple]]:
    """(boxes in input pixels [K, 4], padded (H, W)) per record, as the training resize."""
    out = []
    d = cfg.size_divisor
    for r in records:
        new_w, new_h = rescale_size(r.width, r.height, tuple(cfg.input_scale))
        boxes = resize_boxes(r.boxes, (r.width, r.height), (new_w, new_h))
        out.append((boxes, (-(-new_h // d) * d, -(-new_w // d) * d)))
    return out


def _bin_name(lo: float, hi: float) -> str:
    return f"{lo:g}+ px" if math.isinf(hi) else f"{lo:g}-{hi:g} px"


def anchor_coverage(
    records: Sequence[ImageRecord], cfg: ModelConfig, threshold: float = 0.5
) -> dict[str, Any]:
    """Share of gt boxes whose best anchor IoU is under `threshold`, overall and by size and
    aspect, the worst-covered (size, aspect) cell and a hint which setting to change."""
    gen = anchor_generator(cfg)
    per_image = boxes_at_input(records, cfg)
    boxes = torch.cat([b for b, _ in per_image] or [torch.zeros(0, 4)])
    padded = torch.tensor([hw for b, hw in per_image for _ in range(b.shape[0])]).reshape(-1, 2)
    keep = (boxes[:, 2:] > boxes[:, :2]).all(dim=1)  # still a box after clipping
    boxes, padded = boxes[keep], padded[keep]
    wh = boxes[:, 2:] - boxes[:, :2]
    iou = best_anchor_iou(boxes, padded, gen)  # all images at once: few, large tensor ops
    size, aspect = wh.prod(dim=1).sqrt(), wh[:, 1] / wh[:, 0]
    under = iou < threshold
    sizes_px = [
        cfg.octave_base_scale * s * 2 ** (k / cfg.scales_per_octave)
        for s in cfg.strides
        for k in range(cfg.scales_per_octave)
    ]
    report: dict[str, Any] = {
        "threshold": threshold,
        "boxes": int(iou.numel()),
        "under": int(under.sum()),
        "share_under": float(under.float().mean()) if iou.numel() else 0.0,
        "mean_best_iou": float(iou.mean()) if iou.numel() else 0.0,
        "anchors": {
            "input_scale": list(cfg.input_scale),
            "strides": list(cfg.strides),
            "octave_base_scale": cfg.octave_base_scale,
            "scales_per_octave": cfg.scales_per_octave,
            "ratios": list(cfg.ratios),
            "sizes_px": [min(sizes_px), max(sizes_px)],
        },
        "by_size": [],
        "by_aspect": [],
        "worst": [],
        "hint": "",
    }
    size_bins = list(zip(SIZE_EDGES[:-1], SIZE_EDGES[1:]))
    for lo, hi in size_bins:
        m = (size >= lo) & (size < hi)
        report["by_size"].append(_cell(_bin_name(lo, hi), m, under, iou))
    for name, lo, hi in ASPECT_BINS:
        m = (aspect >= lo) & (aspect < hi)
        report["by_aspect"].append(_cell(name, m, under, iou))
    cells = []
    min_count = max(3, int(0.005 * iou.numel()))
    for lo, hi in size_bins:
        for name, alo, ahi in ASPECT_BINS:
            m = (size >= lo) & (size < hi) & (aspect >= alo) & (aspect < ahi)
            if int(m.sum()) >= min_count and bool(under[m].any()):
                cell = _cell(f"{_bin_name(lo, hi)}, {name}", m, under, iou)
                cell["size_px"], cell["aspect"] = float(size[m].median()), float(aspect[m].median())
                cells.append(cell)
    cells.sort(key=lambda c: (-c["share_under"], -c["boxes"]))
    report["worst"] = cells[:3]
    if cells:
        report["hint"] = _hint(cells[0], cfg, min(sizes_px), max(sizes_px))
    return report


def _cell(name: str, mask: Tensor, under: Tensor, iou: Tensor) -> dict[str, Any]:
    n = int(mask.sum())
    return {
        "bin": name,
        "boxes": n,
        "share_under": float(under[mask].float().mean()) if n else 0.0,
        "mean_best_iou": float(iou[mask].mean()) if n else 0.0,
    }


def _hint(cell: dict[str, Any], cfg: ModelConfig, smallest: float, largest: float) -> str:
    """Which anchor setting to change for the worst-covered cell (one sentence)."""
    size, aspect = cell["size_px"], cell["aspect"]
    base = cfg.octave_base_scale
    head = f"worst covered: {cell['bin']} ({100 * cell['share_under']:.0f}% under the threshold)"
    nearest = min(cfg.ratios, key=lambda r: abs(math.log(aspect / r)))
    if size < smallest / math.sqrt(2):
        fix = (
            f"these boxes (~{size:.0f} px at the input size) are smaller than the smallest "
            f"anchor ({smallest:.0f} px = octave_base_scale {base:g} x stride "
            f"{cfg.strides[0]}): try --set model.octave_base_scale="
            f"{max(1.0, round(base * size / smallest, 1)):g}, or a larger model.input_scale"
        )
    elif size > largest * math.sqrt(2):
        fix = (
            f"these boxes (~{size:.0f} px) are larger than the largest anchor "
            f"({largest:.0f} px): try --set model.octave_base_scale="
            f"{round(base * size / largest, 1):g}"
        )
    elif abs(math.log(aspect / nearest)) > math.log(1.8):
        ratios = sorted({*cfg.ratios, round(aspect, 2)})
        fix = (
            f"their aspect (h/w ~{aspect:.2g}) is far from the anchor ratios "
            f"{list(cfg.ratios)}: try --set model.ratios={','.join(f'{r:g}' for r in ratios)}"
            f" (more anchors per place: the head's last layers change shape)"
        )
    else:
        fix = (
            f"they fall between anchor scales: try --set "
            f"model.scales_per_octave={cfg.scales_per_octave + 1}"
        )
    return f"{head}; {fix}; then run the check again with the same --set to compare"
