"""A per-image FreeAnchor loss computed the way MMDetection 3.x's FreeAnchorRetinaHead does.

Independent of freeanchor.models.loss (its own IoU, coder calls and per-class max), it is the
second opinion for the parity tests on fresh inputs, and the STAND-IN peer of
benchmarks/loss_speed.py when MMDetection's venv is absent: a Python loop over images, a sparse
(gt, class) tensor summed to find the classes and anchors with a matched-box probability, a
dense [A, C] box_prob per image, and the negative term left to autograd. It keeps the
reference's edge behaviour (NaN when a best IoU equals bbox_thr, the BCE range assert on NaN).
As a speed peer it is 1.6-1.8x slower than MMDetection 3.3's real loss on the same inputs
(2026-12-02, 2-core CPU), so ratios against it overstate a speed-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

STDS = (0.1, 0.1, 0.2, 0.2)
MAX_RATIO = 4.135166556742356


def _iou(a: Tensor, b: Tensor) -> Tensor:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    x1 = torch.max(a[:, None, 0], b[None, :, 0])
    y1 = torch.max(a[:, None, 1], b[None, :, 1])
    x2 = torch.min(a[:, None, 2], b[None, :, 2])
    y2 = torch.min(a[:, None, 3], b[None, :, 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    union = torch.max(area_a[:, None] + area_b[None, :] - inter, inter.new_tensor([1e-6]))
    return inter / union


def _decode(anchors: Tensor, deltas: Tensor) -> Tensor:
    d = deltas * deltas.new_tensor(STDS)
    ctr = (anchors[:, :2] + anchors[:, 2:]) * 0.5
    size = anchors[:, 2:] - anchors[:, :2]
    c = ctr + size * d[:, :2]
    s = size * d[:, 2:].clamp(-MAX_RATIO, MAX_RATIO).exp()
    return torch.cat([c - s * 0.5, c + s * 0.5], dim=1)


def _encode(anchors: Tensor, gts: Tensor) -> Tensor:
    ctr_a = (anchors[..., :2] + anchors[..., 2:]) * 0.5
    size_a = anchors[..., 2:] - anchors[..., :2]
    ctr_g = (gts[..., :2] + gts[..., 2:]) * 0.5
    size_g = gts[..., 2:] - gts[..., :2]
    d = torch.cat([(ctr_g - ctr_a) / size_a, torch.log(size_g / size_a)], dim=-1)
    return d / d.new_tensor(STDS)


def _image_terms(cls_prob, deltas, anchors, boxes, labels, topk, thr, alpha, beta, weight):
    num_anchors, num_classes = cls_prob.shape
    with torch.no_grad():
        if len(boxes) == 0:
            box_prob = cls_prob.new_zeros(num_anchors, num_classes)
        else:
            iou = _iou(boxes, _decode(anchors, deltas))
            t2 = iou.max(dim=1, keepdim=True).values.clamp(min=thr + 1e-12)
            match = ((iou - thr) / (t2 - thr)).clamp(min=0, max=1)
            index = torch.stack([torch.arange(len(labels)), labels])
            per_class = torch.sparse.sum(torch.sparse_coo_tensor(index, match), dim=0).to_dense()
            nz = torch.nonzero(per_class).t()
            if nz.numel() == 0:
                box_prob = cls_prob.new_zeros(num_anchors, num_classes)
            else:
                same = labels[:, None] == nz[0]
                vals = torch.where(same, match[:, nz[1]], match.new_zeros(1)).max(dim=0).values
                box_prob = torch.sparse_coo_tensor(
                    nz.flip(0), vals, size=(num_anchors, num_classes)
                ).to_dense()
    bag = torch.topk(_iou(boxes, anchors), topk, dim=1, sorted=False).indices
    p_cls = torch.gather(cls_prob[bag], 2, labels.view(-1, 1, 1).repeat(1, topk, 1)).squeeze(2)
    bag_anchors = anchors[bag]
    target = _encode(bag_anchors, boxes[:, None, :].expand_as(bag_anchors))
    diff = (deltas[bag] - target).abs()
    sl1 = weight * torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
    x = p_cls * torch.exp(-sl1.sum(-1))
    w = 1 / torch.clamp(1 - x, 1e-12, None)
    w = w / w.sum(dim=1, keepdim=True)
    bag_prob = (w * x).sum(dim=1)
    pos = alpha * F.binary_cross_entropy(bag_prob, torch.ones_like(bag_prob), reduction="none")
    return box_prob, pos


def mmdet_style_loss(
    cls_logits: Tensor,
    box_deltas: Tensor,
    anchors: Tensor,
    gt_boxes: list[Tensor],
    gt_labels: list[Tensor],
    pre_anchor_topk: int = 50,
    bbox_thr: float = 0.6,
    gamma: float = 2.0,
    alpha: float = 0.5,
    beta: float = 0.11,
    bbox_weight: float = 0.75,
) -> dict[str, Tensor]:
    """One per-GPU batch: [N, A, C] logits, [N, A, 4] deltas, [A, 4] anchors."""
    cls_prob = torch.sigmoid(cls_logits)
    box_probs, positives = [], []
    for i in range(cls_logits.shape[0]):
        bp, pos = _image_terms(
            cls_prob[i], box_deltas[i], anchors, gt_boxes[i], gt_labels[i].long(),
            pre_anchor_topk, bbox_thr, alpha, beta, bbox_weight,
        )  # fmt: skip
        box_probs.append(bp)
        positives.append(pos)
    num_pos = sum(len(b) for b in gt_boxes)
    positive = torch.cat(positives).sum() / max(1, num_pos)
    q = (cls_prob * (1 - torch.stack(box_probs))).clamp(min=1e-12, max=1 - 1e-12)
    neg = (1 - alpha) * q**gamma * F.binary_cross_entropy(q, torch.zeros_like(q), reduction="none")
    negative = neg.sum() / max(1, num_pos * pre_anchor_topk)
    if num_pos == 0:
        positive = box_deltas.sum() * 0
    return {"positive_bag_loss": positive, "negative_bag_loss": negative}
