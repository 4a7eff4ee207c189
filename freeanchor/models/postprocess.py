"""Test-time post-processing as MMDetection 3.x `predict_by_feat` (spec 2.6).

Per image and level: sigmoid scores; keep the (anchor, class) pairs with score > `score_thr`;
sort them by score and keep the first `nms_pre`; decode those with clipping to the resized image;
concatenate the levels; optionally rescale to the original image (multiply by float32(1 /
scale), as MMDetection's `scale_boxes`); drop boxes whose width or height is not > 0;
class-aware NMS (boxes shifted apart per class, one NMS); keep the `max_per_img` best.

Two forms of these steps, sharing their pieces (`_decode`, `_shift_per_group`):
- `postprocess` (eager) runs them image by image exactly as MMDetection does, down to the order
  of tied scores (the same unstable sorts on the same tensors), so the boxes are MMDetection's
  bit for bit even where scores tie (saturated logits), and an image's detections never depend
  on its batch.
- `postprocess_padded` has fixed shapes so it traces: the ONNX with-NMS graph
  (`freeanchor.export.NMSGraph`) is this function. Its per-level top-k may order exactly tied
  scores differently; otherwise it computes the same detections.
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


def _decode(
    coder: DeltaXYWHCoder, anchors: Tensor, reg: Tensor, anchor_idx: Tensor, img_hw: Tensor
) -> Tensor:
    """Boxes of the chosen anchors, clipped to the resized image.

    Args:
        anchors: [A, 4]; reg: [N, A*4, H, W] deltas; anchor_idx: [N, k]; img_hw: [N, 2] (H, W).

    Returns:
        [N, k, 4] xyxy.
    """
    n = reg.shape[0]
    deltas = reg.float().permute(0, 2, 3, 1).reshape(n, -1, 4)
    deltas = deltas.gather(1, anchor_idx[..., None].expand(-1, -1, 4))
    return coder.decode(anchors[anchor_idx], deltas, max_shape=img_hw[:, None, :])


def _shift_per_group(boxes: Tensor, groups: Tensor) -> Tensor:
    """Boxes moved apart per group (class) so that one NMS never lets two groups interact:
    offset = group * (largest coordinate + 1), as mmcv's `batched_nms` does."""
    return boxes + (groups.to(boxes.dtype) * (boxes.max() + 1))[:, None]


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
        return nms(_shift_per_group(boxes, groups), scores, iou)
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
        all_boxes.append(_decode(coder, anc, reg, anchor_idx, img_hw))
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


def _image_detections(
    scores: Sequence[Tensor],
    bbox_preds: Sequence[Tensor],
    anchors: Sequence[Tensor],
    img_hw: Tensor,
    rescale: Tensor,
    coder: DeltaXYWHCoder,
    score_thr: float,
    nms_pre: int,
    nms_iou: float | None,
    max_per_img: int,
) -> dict[str, Tensor]:
    """One image's detections, step for step as MMDetection's `_predict_by_feat_single`.

    Args:
        scores: per level [A_l*C] probabilities; bbox_preds: per level [1, A*4, H_l, W_l];
        anchors: per level [A_l, 4]; img_hw: [1, 2]; rescale: [1, 2] (x, y) multipliers.
    """
    num_classes = scores[0].shape[0] // anchors[0].shape[0]
    all_boxes, all_scores, all_labels = [], [], []
    for prob, reg, anc in zip(scores, bbox_preds, anchors):
        (pair,) = torch.nonzero(prob > score_thr, as_tuple=True)  # row-major (anchor, class)
        # The same (unstable) sort of the same values as MMDetection: ties come out alike.
        top, order = prob[pair].sort(descending=True)
        keep = order if nms_pre <= 0 else order[:nms_pre]
        pair = pair[keep]
        anchor_idx = torch.div(pair, num_classes, rounding_mode="floor")
        all_boxes.append(_decode(coder, anc, reg, anchor_idx[None], img_hw)[0])
        all_scores.append(top[: len(keep)])
        all_labels.append(pair - anchor_idx * num_classes)
    boxes = torch.cat(all_boxes) * rescale.repeat(1, 2)  # [K, 4]
    top, labels = torch.cat(all_scores), torch.cat(all_labels)
    wh = boxes[:, 2:] - boxes[:, :2]
    ok = (wh > 0).all(dim=1)  # min_bbox_size 0, strict
    boxes, top, labels = boxes[ok], top[ok], labels[ok]
    if not len(top):
        return _empty(boxes.device)
    # mmcv's NMS visits boxes in the order of an unstable descending sort of their scores;
    # torchvision's sorts stably, which keeps an order that is already sorted.
    order = top.sort(descending=True)[1]
    if nms_iou is None:  # the candidates before NMS, by score (test-time augmentation)
        keep = order
    else:
        keep = order[nms(_shift_per_group(boxes, labels)[order], top[order], nms_iou)]
    keep = keep[:max_per_img]
    return {"boxes": boxes[keep], "scores": top[keep], "labels": labels[keep]}


def postprocess(
    cls_scores: Sequence[Tensor],
    bbox_preds: Sequence[Tensor],
    anchors: Sequence[Tensor],
    metas: Sequence[ImageMeta],
    coder: DeltaXYWHCoder,
    rescale: bool = True,
    score_thr: float = 0.05,
    nms_pre: int = 1000,
    nms_iou: float | None = 0.5,
    max_per_img: int = 100,
) -> list[dict[str, Tensor]]:
    """Detections of a batch from raw head outputs, image by image (MMDetection's steps).

    Args:
        cls_scores: per level [N, A*C, H_l, W_l] logits.
        bbox_preds: per level [N, A*4, H_l, W_l] deltas.
        anchors: per level [H_l*W_l*A, 4] (same for every image).
        metas: per image; `img_shape` clips the boxes, `scale_factor` undoes the resize.
        rescale: return boxes in original-image pixels (else in resized-image pixels).
        nms_pre: pairs kept per level before NMS (<= 0: all).
        nms_iou: NMS IoU threshold; None: no NMS (every candidate, by descending score).

    Returns:
        per image a dict: boxes [n, 4] xyxy float32, scores [n] (descending), labels [n] int64.
    """
    device = cls_scores[0].device
    scores = [level_scores(s) for s in cls_scores]
    anchors = [a.to(device) for a in anchors]
    img_hw = torch.tensor([m.img_shape for m in metas], dtype=torch.float32, device=device)
    factors = rescale_factors(metas, rescale, device)
    return [
        _image_detections(
            [s[i] for s in scores],
            [b[i : i + 1] for b in bbox_preds],
            anchors,
            img_hw[i : i + 1],
            factors[i : i + 1],
            coder,
            score_thr,
            nms_pre,
            nms_iou,
            max_per_img,
        )  # fmt: skip
        for i in range(len(metas))
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
