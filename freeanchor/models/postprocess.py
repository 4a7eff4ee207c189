"""Test-time post-processing as MMDetection 3.x `predict_by_feat` (spec 2.6), batched.

Per image and level: sigmoid scores, keep (anchor, class) pairs with score > `score_thr`, the
`nms_pre` best of them; decode those with clipping to the resized image; concatenate levels;
optionally rescale to the original image (multiply by float32(1 / scale), as MMDetection's
`scale_boxes`); drop boxes whose width or height is not > 0; class-aware NMS; keep the
`max_per_img` best. Everything runs on the whole batch at once: fixed-size per-level top-k
with a validity mask, and one `batched_nms` whose groups are (image, class).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from freeanchor.data.transforms import ImageMeta
from freeanchor.models.box_coder import DeltaXYWHCoder


def _level_candidates(
    cls_score: Tensor, bbox_pred: Tensor, anchors: Tensor, score_thr: float, nms_pre: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """Top `nms_pre` (anchor, class) pairs of one level per image.

    Args:
        cls_score: [N, 9*C, H, W] logits; bbox_pred: [N, 36, H, W]; anchors: [H*W*9, 4].

    Returns:
        scores [N, k], labels [N, k], deltas [N, k, 4], anchors [N, k, 4], valid [N, k]
        (pairs with score > score_thr; the top-k of all pairs, masked, equals MMDetection's
        "filter, sort, keep the first nms_pre" up to ties), or None if no pair is valid.
    """
    n = cls_score.shape[0]
    num_base = anchors.shape[0] // (cls_score.shape[-2] * cls_score.shape[-1])
    num_classes = cls_score.shape[1] // num_base
    scores = cls_score.float().permute(0, 2, 3, 1).reshape(n, -1).sigmoid()  # [N, A_l*C]
    num_valid = int((scores > score_thr).sum(dim=1).max())
    k = num_valid if nms_pre <= 0 else min(nms_pre, num_valid)
    if k == 0:
        return None
    top, idx = scores.topk(k, dim=1)
    anchor_idx = torch.div(idx, num_classes, rounding_mode="floor")
    labels = idx - anchor_idx * num_classes
    deltas = bbox_pred.float().permute(0, 2, 3, 1).reshape(n, -1, 4)
    deltas = deltas.gather(1, anchor_idx[..., None].expand(-1, -1, 4))
    return top, labels, deltas, anchors[anchor_idx], top > score_thr


def postprocess(
    cls_scores: Sequence[Tensor],
    bbox_preds: Sequence[Tensor],
    anchors: Sequence[Tensor],
    metas: Sequence[ImageMeta],
    coder: DeltaXYWHCoder,
    rescale: bool = True,
    score_thr: float = 0.05,
    nms_pre: int = 1000,
    nms_iou: float = 0.5,
    max_per_img: int = 100,
) -> list[dict[str, Tensor]]:
    """Detections of a batch from raw head outputs.

    Args:
        cls_scores: per level [N, 9*C, H_l, W_l] logits.
        bbox_preds: per level [N, 36, H_l, W_l] deltas.
        anchors: per level [H_l*W_l*9, 4] (same for every image).
        metas: per image; `img_shape` clips the boxes, `scale_factor` undoes the resize.
        rescale: return boxes in original-image pixels (else in resized-image pixels).
        nms_pre: pairs kept per level before NMS (<= 0: all).

    Returns:
        per image a dict: boxes [n, 4] xyxy float32, scores [n] (descending), labels [n] int64.
    """
    n = cls_scores[0].shape[0]
    device = cls_scores[0].device
    num_classes = cls_scores[0].shape[1] // (
        anchors[0].shape[0] // (cls_scores[0].shape[-2] * cls_scores[0].shape[-1])
    )
    levels = [
        c
        for c in (
            _level_candidates(s, d, a.to(device), score_thr, nms_pre)
            for s, d, a in zip(cls_scores, bbox_preds, anchors)
        )
        if c is not None
    ]
    if not levels:
        return [_empty(device) for _ in range(n)]
    scores, labels, deltas, priors, valid = (torch.cat(parts, dim=1) for parts in zip(*levels))

    img_hw = torch.tensor([m.img_shape for m in metas], dtype=torch.float32, device=device)
    boxes = coder.decode(priors, deltas, max_shape=img_hw[:, None, :])  # [N, K, 4]
    if rescale:
        # MMDetection multiplies by float32(1 / scale) rather than dividing by the scale.
        inv = torch.tensor(
            [[1 / m.scale_factor[0], 1 / m.scale_factor[1]] * 2 for m in metas],
            dtype=torch.float32,
            device=device,
        )
        boxes = boxes * inv[:, None, :]
    wh = boxes[..., 2:] - boxes[..., :2]
    valid &= (wh > 0).all(dim=-1)  # min_bbox_size 0, strict as MMDetection 3.x

    img_idx = torch.arange(n, device=device)[:, None].expand_as(valid)[valid]
    boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
    # One NMS for the batch: boxes of different images or classes never suppress each other.
    keep = batched_nms(boxes, scores, img_idx * num_classes + labels, nms_iou)  # score-sorted
    keep_img = img_idx[keep]
    out = []
    for i in range(n):
        k = keep[keep_img == i][:max_per_img]
        out.append({"boxes": boxes[k], "scores": scores[k], "labels": labels[k]})
    return out


def _empty(device: torch.device) -> dict[str, Tensor]:
    return {
        "boxes": torch.zeros((0, 4), device=device),
        "scores": torch.zeros((0,), device=device),
        "labels": torch.zeros((0,), dtype=torch.int64, device=device),
    }
