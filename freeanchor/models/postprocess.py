"""Test-time post-processing as MMDetection 3.x `predict_by_feat` (spec 2.6), batched.

Per image and level: sigmoid scores, the `nms_pre` best (anchor, class) pairs; decode those with
clipping to the resized image; concatenate levels; optionally rescale to the original image
(multiply by float32(1 / scale), as MMDetection's `scale_boxes`); drop pairs with score not
> `score_thr` or a box whose width or height is not > 0; class-aware NMS; keep the
`max_per_img` best.

One implementation, `postprocess_padded`, with fixed shapes so it traces: the ONNX with-NMS graph
(`freeanchor.export.NMSGraph`) is this function. `postprocess` is the eager form: it only picks a
data-dependent top-k per level (so that few invalid pairs reach NMS) and cuts each image's rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import nms

from freeanchor.config import ModelConfig
from freeanchor.data.transforms import ImageMeta
from freeanchor.models.anchors import AnchorGenerator
from freeanchor.models.box_coder import DeltaXYWHCoder


def exporting() -> bool:
    """True while the TorchScript tracer or the dynamo exporter traces the code."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def level_scores(cls_score: Tensor) -> Tensor:
    """[N, A*C, H, W] logits -> [N, H*W*A*C] probabilities, in the anchors' flattening order."""
    n = cls_score.shape[0]
    return cls_score.float().permute(0, 2, 3, 1).reshape(n, -1).sigmoid()


def class_aware_nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, valid: Tensor, iou: float
) -> Tensor:
    """Indices kept by NMS within each group, by descending score; invalid rows score lowest.

    Eagerly: one NMS per group over its valid rows (exact: no group's result depends on
    another's, so an image's detections do not depend on its batch). While exporting: one NMS
    over all rows shifted apart per group (a fixed graph; the shift rounds coordinates by up to
    an ulp of the largest shift, so a pair at IoU ~ `iou` may decide differently).
    """
    if exporting():
        offset = groups.to(boxes.dtype) * (boxes.max() + 1)
        return nms(boxes + offset[:, None], scores, iou)
    kept = torch.zeros_like(valid)
    for g in torch.unique(groups[valid]).tolist():
        (idx,) = torch.where((groups == g) & valid)
        kept[idx[nms(boxes[idx], scores[idx], iou)]] = True
    (keep,) = torch.where(kept)
    return keep[scores[keep].argsort(descending=True, stable=True)]


def postprocess_padded(
    scores: Sequence[Tensor],
    bbox_preds: Sequence[Tensor],
    anchors: Sequence[Tensor],
    img_hw: Tensor,
    rescale: Tensor,
    coder: DeltaXYWHCoder,
    topk: Sequence[int],
    score_thr: float,
    nms_iou: float,
    max_per_img: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Detections of a batch with fixed output shapes (traceable).

    Args:
        scores: per level [N, H_l*W_l*A*C] probabilities (`level_scores`).
        bbox_preds: per level [N, A*4, H_l, W_l] deltas.
        anchors: per level [H_l*W_l*A, 4].
        img_hw: [N, 2] float (H, W) of each resized image: boxes are clipped to it.
        rescale: [N, 2] float (x, y) multipliers to original-image pixels (1 = no rescale).
        topk: per level, the pairs to consider (<= H_l*W_l*A*C; MMDetection's nms_pre).

    Returns:
        boxes [N, M, 4], scores [N, M], labels [N, M] (int64), num [N]: image i's detections
        are the first num[i] rows, by descending score; the rest is 0 (label -1). M = max_per_img.
    """
    n = img_hw.shape[0]
    num_classes = scores[0].shape[1] // anchors[0].shape[0]
    all_boxes, all_scores, all_labels = [], [], []
    for prob, reg, anc, k in zip(scores, bbox_preds, anchors, topk):
        top, idx = prob.topk(k, dim=1)  # [N, k], sorted
        anchor_idx = torch.div(idx, num_classes, rounding_mode="floor")
        deltas = reg.float().permute(0, 2, 3, 1).reshape(n, -1, 4)
        deltas = deltas.gather(1, anchor_idx[..., None].expand(-1, -1, 4))
        all_boxes.append(coder.decode(anc[anchor_idx], deltas, max_shape=img_hw[:, None, :]))
        all_scores.append(top)
        all_labels.append(idx - anchor_idx * num_classes)
    boxes = torch.cat(all_boxes, 1) * rescale.repeat(1, 2)[:, None, :]  # [N, K, 4]
    scores_, labels = torch.cat(all_scores, 1), torch.cat(all_labels, 1)  # [N, K]
    wh = boxes[..., 2:] - boxes[..., :2]
    valid = (scores_ > score_thr) & (wh > 0).all(dim=-1)  # min_bbox_size 0, strict
    # Invalid pairs get score -1: they sort last, so they never suppress a valid box.
    scores_ = torch.where(valid, scores_, torch.full_like(scores_, -1.0))

    k_total = boxes.shape[1]
    image = torch.arange(n, device=boxes.device)[:, None].expand(n, k_total).reshape(-1)
    flat_boxes, flat_scores = boxes.reshape(-1, 4), scores_.reshape(-1)
    flat_labels, flat_valid = labels.reshape(-1), valid.reshape(-1)
    groups = image * num_classes + flat_labels
    keep = class_aware_nms(flat_boxes, flat_scores, groups, flat_valid, nms_iou)
    keep_image, keep_valid = image[keep], flat_valid[keep]
    # Rank of each kept row within its image (rows come by descending score).
    onehot = (keep_image[:, None] == torch.arange(n, device=boxes.device)[None]) & keep_valid[
        :, None
    ]
    rank = onehot.long().cumsum(0).gather(1, keep_image[:, None])[:, 0] - 1
    take = keep_valid & (rank < max_per_img)
    # Rows not taken all go to a spare column per image that is cut off afterwards.
    m = max_per_img
    slot = keep_image * (m + 1) + torch.where(take, rank, torch.full_like(rank, m))
    size = n * (m + 1)
    out_boxes = flat_boxes.new_zeros(size, 4).index_copy(0, slot, flat_boxes[keep])
    kept_scores = torch.where(take, flat_scores[keep], torch.zeros_like(flat_scores[keep]))
    out_scores = flat_scores.new_zeros(size).index_copy(0, slot, kept_scores)
    kept_labels = torch.where(take, flat_labels[keep], torch.full_like(flat_labels[keep], -1))
    out_labels = torch.full_like(flat_labels[:1].expand(size), -1).index_copy(0, slot, kept_labels)
    num = onehot.long().sum(0).clamp(max=m)
    return (
        out_boxes.view(n, m + 1, 4)[:, :m],
        out_scores.view(n, m + 1)[:, :m],
        out_labels.view(n, m + 1)[:, :m],
        num,
    )


def rescale_factors(metas: Sequence[ImageMeta], rescale: bool, device=None) -> Tensor:
    """[N, 2] (x, y) multipliers to original pixels: float32(1 / scale), as MMDetection."""
    if not rescale:
        return torch.ones((len(metas), 2), device=device)
    inv = [[1 / m.scale_factor[0], 1 / m.scale_factor[1]] for m in metas]
    return torch.tensor(inv, dtype=torch.float32, device=device)


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
    """Detections of a batch from raw head outputs (`postprocess_padded`, cut per image).

    Args:
        cls_scores: per level [N, A*C, H_l, W_l] logits.
        bbox_preds: per level [N, A*4, H_l, W_l] deltas.
        anchors: per level [H_l*W_l*A, 4] (same for every image).
        metas: per image; `img_shape` clips the boxes, `scale_factor` undoes the resize.
        rescale: return boxes in original-image pixels (else in resized-image pixels).
        nms_pre: pairs kept per level before NMS (<= 0: all).

    Returns:
        per image a dict: boxes [n, 4] xyxy float32, scores [n] (descending), labels [n] int64.
    """
    device = cls_scores[0].device
    scores = [level_scores(s) for s in cls_scores]
    # The "filter by score, keep the nms_pre best" of MMDetection, as a top-k whose k is the
    # largest number of valid pairs of any image (rows past an image's own count are masked).
    topk = []
    for prob in scores:
        k = int((prob > score_thr).sum(dim=1).max()) if prob.numel() else 0
        topk.append(min(k, nms_pre) if nms_pre > 0 else k)
    levels = [i for i, k in enumerate(topk) if k > 0]
    if not levels:
        return [_empty(device) for _ in metas]
    img_hw = torch.tensor([m.img_shape for m in metas], dtype=torch.float32, device=device)
    boxes, kept_scores, labels, num = postprocess_padded(
        [scores[i] for i in levels], [bbox_preds[i] for i in levels],
        [anchors[i].to(device) for i in levels], img_hw, rescale_factors(metas, rescale, device),
        coder, [topk[i] for i in levels], score_thr, nms_iou, max_per_img,
    )  # fmt: skip
    return [
        {"boxes": boxes[i, :k], "scores": kept_scores[i, :k], "labels": labels[i, :k]}
        for i, k in enumerate(num.tolist())
    ]


def decode_outputs(
    cls_scores: Sequence[Tensor],
    bbox_preds: Sequence[Tensor],
    metas: Sequence[ImageMeta],
    anchor_generator: AnchorGenerator,
    coder: DeltaXYWHCoder,
    cfg: ModelConfig,
    score_thr: float | None = None,
    rescale: bool = True,
) -> list[dict[str, Tensor]]:
    """Raw head outputs -> detections with the model's test settings: the one place they
    are turned into boxes (PyTorch inference, the raw ONNX graph, the export check).

    Args:
        score_thr: minimum score (default `cfg.score_thr`).
    """
    sizes = [tuple(s.shape[-2:]) for s in cls_scores]
    anchors = anchor_generator.grid_anchors(sizes, cls_scores[0].device)
    return postprocess(
        cls_scores, bbox_preds, anchors, metas, coder, rescale=rescale,
        score_thr=cfg.score_thr if score_thr is None else score_thr, nms_pre=cfg.nms_pre,
        nms_iou=cfg.nms_iou, max_per_img=cfg.max_per_img,
    )  # fmt: skip


def _empty(device: torch.device) -> dict[str, Tensor]:
    return {
        "boxes": torch.zeros((0, 4), device=device),
        "scores": torch.zeros((0,), device=device),
        "labels": torch.zeros((0,), dtype=torch.int64, device=device),
    }
