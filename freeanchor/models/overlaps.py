"""Box overlaps for FreeAnchor's matching: the IoU of gts with anchors or predicted boxes,
computed only where it can be non-zero.

A gt overlaps few of the ~180k anchors of an 800x1216 image. The boxes are cut into runs of
`RUN` consecutive boxes (consecutive anchors are neighbours on the grid); a run whose bounding
box does not overlap a gt holds only boxes of IoU exactly 0 with it, so the IoU is computed on
the other runs alone. Both uses give the reference's exact result:

- `matched_pairs` (IoU > t > 0) needs only the runs whose bounds overlap a gt by more than t
  of its width and of its height (IoU <= overlap width / gt width);
- `top_iou_anchors`: torch's CPU top-k (for rows of >= 64 k entries) is a heap select that a
  value no larger than the heap's minimum never changes, so a row made of its first k entries
  and then its non-zero-IoU runs, in order, selects the same anchors as the whole row,
  including among the IoU ties that the anchor grid makes common.
"""

from __future__ import annotations

import torch
from torch import Tensor

RUN = 32  # boxes per run
_PAIRS = 4096  # (gt, run) pairs per IoU slice


def _iou(a: list[Tensor], b: list[Tensor], eps: float) -> Tensor:
    """IoU of boxes given as broadcastable coordinate tensors (x1, y1, x2, y2), MMDetection's
    formula (no "+1", union clamped to eps), in one fixed order of operations: every caller
    gets the same bits for the same pair of boxes."""
    area1 = (a[2] - a[0]) * (a[3] - a[1])
    area2 = (b[2] - b[0]) * (b[3] - b[1])
    w = (torch.min(a[2], b[2]) - torch.max(a[0], b[0])).clamp_(min=0)
    h = (torch.min(a[3], b[3]) - torch.max(a[1], b[1])).clamp_(min=0)
    overlap = w.mul_(h)
    union = (area1 + area2 - overlap).clamp_(min=eps)
    return overlap.div_(union)


def pairwise_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU as MMDetection computes it (no "+1", union clamped to eps).

    Args:
        boxes1: [..., G, 4] xyxy.  boxes2: [..., A, 4] xyxy (leading dims broadcast).

    Returns:
        [..., G, A].
    """
    # One contiguous [..., G, A] tensor per step (not [..., G, A, 2] strided views): ~2x faster.
    a = [c.unsqueeze(-1) for c in boxes1.unbind(-1)]
    b = [c.unsqueeze(-2) for c in boxes2.unbind(-1)]
    return _iou(a, b, eps)


def _run_ious(
    gts: Tensor, boxes: Tensor, min_overlap: float = 0.0, first_runs: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """The IoU of each gt with the boxes of every run whose bounds overlap it by more than
    `min_overlap` of its width and of its height (and of the first `first_runs` runs):
    (gt [P], run [P], IoU [P, RUN]), sorted by gt, then run.

    A box whose overlap passes a threshold in float passes it for its run's wider bounds too
    (min and max are exact, the subtraction is monotone), so no box that passes is missed.
    """
    pad = -len(boxes) % RUN
    inert = boxes.new_tensor([float("inf")] * 2 + [float("-inf")] * 2).expand(pad, 4)
    runs = torch.cat([boxes, inert]).reshape(-1, RUN, 4)  # the padding has IoU 0 with any box
    lo, hi = runs[..., :2].amin(1).t(), runs[..., 2:].amax(1).t()  # [2, R] each
    g = gts.t()[..., None]  # [4, G, 1]
    w = torch.min(hi[0], g[2]) - torch.max(lo[0], g[0])
    h = torch.min(hi[1], g[3]) - torch.max(lo[1], g[1])
    hit = (w > min_overlap * (g[2] - g[0])) & (h > min_overlap * (g[3] - g[1])) & (w > 0) & (h > 0)
    hit[:, :first_runs] = True
    gt, run = hit.nonzero(as_tuple=True)
    iou = boxes.new_empty(len(gt), RUN)
    for s in range(0, len(gt), _PAIRS):
        e = s + _PAIRS
        iou[s:e] = pairwise_iou(gts[gt[s:e], None, :], runs[run[s:e]])[:, 0]
    return gt, run, iou


def matched_pairs(gts: Tensor, boxes: Tensor, thr: float) -> tuple[Tensor, Tensor, Tensor]:
    """(gt, box, IoU) of every pair with IoU(gts[gt], boxes[box]) > thr (thr > 0).

    Args:
        gts: [G, 4] xyxy.  boxes: [A, 4] xyxy (e.g. the predicted boxes).
    """
    if gts.is_cuda or thr <= 0:
        iou = pairwise_iou(gts, boxes)
        gt, box = (iou > thr).nonzero(as_tuple=True)
        return gt, box, iou[gt, box]
    # IoU <= overlap width / gt width (and height): IoU > thr needs both > thr (less a margin
    # for the rounding of the IoU).
    gt, run, iou = _run_ious(gts, boxes, min_overlap=thr * (1 - 1e-4))
    p, j = (iou > thr).nonzero(as_tuple=True)
    return gt[p], run[p] * RUN + j, iou[p, j]


def top_iou_anchors(gts: Tensor, anchors: Tensor, k: int) -> Tensor:
    """[G, k] indices of the k anchors of largest IoU with each gt: the same anchors as
    `pairwise_iou(gts, anchors).topk(k, dim=1)` (which MMDetection uses), ties included."""
    n = anchors.shape[0]
    if gts.is_cuda or n < 64 * k or not len(gts):
        return pairwise_iou(gts, anchors).topk(k, dim=1, sorted=False).indices
    first = -(-k // RUN)  # the runs that hold the row's first k entries
    gt, run, iou = _run_ious(gts, anchors, first_runs=first)
    ends = torch.bincount(gt, minlength=len(gts)).cumsum(0).tolist()
    pad = iou.new_zeros(64 * k)  # keeps the row on the heap-select path (zeros change nothing)
    out, start = [], 0
    for end in ends:
        row = iou[start:end].reshape(-1)
        top = torch.cat([row, pad[: max(0, 64 * k - len(row))]]).topk(k, sorted=False).indices
        out.append(run[start + top // RUN] * RUN + top % RUN)
        start = end
    return torch.stack(out)
