"""RetinaNet's own training loss (Lin et al., ICCV 2017): the IoU-matching baseline of FreeAnchor.

The settings are MMDetection's retinanet_r50_fpn_1x_coco. Assignment (its MaxIoUAssigner with
pos_iou_thr 0.5, neg_iou_thr 0.4, min_pos_iou 0, gt_max_assign_all, match_low_quality), per
image over all anchors, with IoU(b_i, a_j) of gt i and anchor j:

  1. max_i IoU < 0.4: negative; max_i IoU >= 0.5: positive, matched to its argmax gt;
     otherwise ignored (no loss at all);
  2. low-quality matches: for every gt i, each anchor whose IoU with i equals i's best IoU is
     positive and matched to i (the last such gt wins), even below 0.4, so every gt has one.

With n = sum over the images of a chunk of max(1, positives of the image):

  loss_cls  = sum over non-ignored anchors j and classes c of FL(x_jc, [c = y_j]) / n
              (sigmoid focal loss, alpha 0.25, gamma 2; torchvision.ops.sigmoid_focal_loss)
  loss_bbox = sum over positives j of |delta_j - encode(a_j -> b_match(j))|_1 / n
              (RetinaNet's own coder: target stds 1.0, see `retinanet_config`)

and the chunk losses are averaged, as FreeAnchorLoss does (`normalize`, `imgs_per_gpu`).

Known differences, on purpose:
- MMDetection divides by n + 1.2e-7 (float32 eps); we divide by n, as torchvision does.
- A gt whose best IoU is 0 (a degenerate box) gets no low-quality match here; with
  min_pos_iou 0 MMDetection would make every anchor of zero IoU a positive of that gt.
- torchvision's Matcher gives a low-quality anchor to its own argmax gt (MMDetection and we:
  to the gt it is best for), and normalises image by image: ours equals torchvision's
  `RetinaNetHead.compute_loss` for the same matches with `imgs_per_gpu=1`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_iou, sigmoid_focal_loss

from freeanchor.config import ModelConfig
from freeanchor.models.box_coder import DeltaXYWHCoder

NEGATIVE, IGNORED = -1, -2  # match codes of anchors with no gt (gt indices are >= 0)
RETINANET_STDS = (1.0, 1.0, 1.0, 1.0)  # MMDetection's RetinaNet coder and torchvision's


def retinanet_config(cfg: ModelConfig) -> ModelConfig:
    """A copy of `cfg` trained the RetinaNet way: loss "retinanet" and its coder (stds 1.0).

    Everything else (architecture, anchors, test-time settings) is kept, which is what
    MMDetection's retinanet_r50_fpn_1x_coco and freeanchor_r50_fpn_1x_coco have in common.
    """
    return dataclasses.replace(cfg, loss="retinanet", target_stds=RETINANET_STDS)


def max_iou_assign(
    boxes: Tensor,
    valid: Tensor,
    anchors: Tensor,
    pos_iou_thr: float = 0.5,
    neg_iou_thr: float = 0.4,
    low_quality: bool = True,
) -> Tensor:
    """MMDetection's max-IoU assignment for a padded batch of gts (see the module docstring).

    Args:
        boxes: [N, G, 4] xyxy gts, padded; valid: [N, G] bool, False on the padding.
        anchors: [A, 4] xyxy.

    Returns:
        [N, A] int64: the matched gt index (>= 0), NEGATIVE or IGNORED.
    """
    n, g = valid.shape
    if g == 0:
        return torch.full((n, len(anchors)), NEGATIVE, dtype=torch.long, device=anchors.device)
    iou = box_iou(boxes.reshape(-1, 4), anchors).reshape(n, g, -1)
    iou = iou.masked_fill(~valid[:, :, None], -1.0)  # padding matches nothing
    max_iou, argmax = iou.max(dim=1)  # [N, A]
    matched = torch.full_like(argmax, IGNORED)
    matched = torch.where(max_iou < neg_iou_thr, NEGATIVE, matched)
    matched = torch.where(max_iou >= pos_iou_thr, argmax, matched)
    if low_quality:
        best = iou.amax(dim=2, keepdim=True)  # [N, G, 1]: each gt's best IoU
        hit = (iou == best) & (best > 0)
        index = torch.arange(g, device=iou.device)[None, :, None]
        last = torch.where(hit, index, -1).amax(dim=1)  # MMDetection loops gts: the last wins
        matched = torch.where(last >= 0, last, matched)
    return matched


class RetinaNetLoss(nn.Module):
    """RetinaNet's focal classification and L1 box losses for a batch of images.

    Args:
        num_classes: C, foreground classes (sigmoid classification, no background).
        alpha, gamma: of the focal loss.
        pos_iou_thr, neg_iou_thr: of the max-IoU assignment.
        normalize, imgs_per_gpu: "local" = each chunk of `imgs_per_gpu` images is normalised
            by its own positive count (MMDetection's per-GPU avg_factor) and the chunks are
            averaged; "global" = one count for the batch, summed over the processes under
            DDP.
        box_coder: the delta coder (default RetinaNet's, stds 1.0).
    """

    def __init__(
        self,
        num_classes: int,
        alpha: float = 0.25,
        gamma: float = 2.0,
        pos_iou_thr: float = 0.5,
        neg_iou_thr: float = 0.4,
        normalize: str = "local",
        imgs_per_gpu: int = 2,
        box_coder: DeltaXYWHCoder | None = None,
    ) -> None:
        super().__init__()
        if normalize not in ("local", "global"):
            raise ValueError(f"normalize must be 'local' or 'global', got {normalize!r}")
        self.num_classes = num_classes
        self.alpha, self.gamma = alpha, gamma
        self.pos_iou_thr, self.neg_iou_thr = pos_iou_thr, neg_iou_thr
        self.normalize, self.imgs_per_gpu = normalize, imgs_per_gpu
        self.box_coder = box_coder or DeltaXYWHCoder(RETINANET_STDS)

    def forward(
        self,
        cls_logits: Tensor | Sequence[Tensor],
        box_deltas: Tensor | Sequence[Tensor],
        anchors: Tensor,
        gt_boxes: list[Tensor],
        gt_labels: list[Tensor],
        num_gts: float | Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The call of `FreeAnchorLoss.forward`.

        Args:
            cls_logits: [N, A, C] logits or the head's per-level [N, 9*C, H_l, W_l] maps.
            box_deltas: [N, A, 4] or per-level [N, 9*4, H_l, W_l].
            anchors: [A, 4] xyxy, in flattened order (level, y, x, anchor).
            gt_boxes / gt_labels: N tensors [K_i, 4] xyxy / [K_i] 0-based.
            num_gts: only read as a flag: given with "global" (the trainer does so under DDP),
                the positive count is summed over the processes.

        Returns:
            {"loss_cls": scalar, "loss_bbox": scalar}.
        """
        logits = _flatten(cls_logits, self.num_classes)
        deltas = _flatten(box_deltas, 4)
        with torch.autocast(anchors.device.type, enabled=False):
            return self._loss(logits.float(), deltas.float(), anchors.float(), gt_boxes,
                              gt_labels, num_gts)  # fmt: skip

    def _loss(self, logits, deltas, anchors, gt_boxes, gt_labels, num_gts):
        n_img, n_anchor = deltas.shape[:2]
        if (
            anchors.shape != (n_anchor, 4)
            or logits.shape[:2] != (n_img, n_anchor)
            or (len(gt_boxes) != n_img or len(gt_labels) != n_img)
        ):
            raise ValueError(
                f"logits {tuple(logits.shape)}, deltas {tuple(deltas.shape)}, anchors "
                f"{tuple(anchors.shape)} and {len(gt_boxes)} / {len(gt_labels)} gt boxes / "
                f"labels do not match"
            )
        device = deltas.device
        # Pad the gts to one [N, G] batch: one IoU call, no per-image loop.
        boxes = pad_sequence([b.to(device, torch.float32).reshape(-1, 4) for b in gt_boxes],
                             batch_first=True)  # fmt: skip
        labels = pad_sequence([lb.to(device, torch.long).reshape(-1) for lb in gt_labels],
                              batch_first=True)  # fmt: skip
        counts = torch.tensor([len(b) for b in gt_boxes], device=device)
        valid = torch.arange(boxes.shape[1], device=device) < counts[:, None]
        with torch.no_grad():
            matched = max_iou_assign(boxes, valid, anchors, self.pos_iou_thr, self.neg_iou_thr)

        # Classification: every anchor that is not ignored, one-hot targets on the positives.
        img, anc = (matched != IGNORED).nonzero(as_tuple=True)
        gt = matched[img, anc]
        targets = torch.zeros(len(img), self.num_classes, device=device)
        is_pos = gt >= 0
        rows = is_pos.nonzero(as_tuple=True)[0]
        targets[rows, labels[img[rows], gt[rows]]] = 1.0
        focal = sigmoid_focal_loss(logits[img, anc], targets, self.alpha, self.gamma, "none")
        cls_per_img = deltas.new_zeros(n_img).index_add_(0, img, focal.sum(1))

        # Box regression: L1 on the positives against the encoded matched gt.
        img_p, anc_p, gt_p = img[rows], anc[rows], gt[rows]
        box_targets = self.box_coder.encode(anchors[anc_p], boxes[img_p, gt_p])
        l1 = (deltas[img_p, anc_p] - box_targets).abs().sum(1)
        box_per_img = deltas.new_zeros(n_img).index_add_(0, img_p, l1)

        # Normalise: n = sum over the chunk's images of max(1, positives).
        n_pos = torch.zeros(n_img, device=device).index_add_(0, img_p, torch.ones_like(l1))
        factor = n_pos.clamp(min=1)
        if self.normalize == "local":
            chunk = torch.arange(n_img, device=device) // self.imgs_per_gpu
            n_chunks = (n_img - 1) // self.imgs_per_gpu + 1
        else:
            chunk = torch.zeros(n_img, dtype=torch.long, device=device)
            n_chunks = 1

        def per_chunk(v: Tensor) -> Tensor:
            return v.new_zeros(n_chunks).index_add_(0, chunk, v)

        norm = per_chunk(factor)
        if self.normalize == "global" and num_gts is not None and _distributed():
            torch.distributed.all_reduce(norm)
        # Every output stays in the graph (zero weight), as in FreeAnchorLoss: DDP then sees
        # a gradient for the regression branch even in a batch without positives.
        zero = deltas.sum() * 0 + logits.sum() * 0
        loss_cls = (per_chunk(cls_per_img) / norm).mean() + zero
        loss_bbox = (per_chunk(box_per_img) / norm).mean() + zero
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}


def _flatten(x: Tensor | Sequence[Tensor], width: int) -> Tensor:
    """[N, A, width] as it is, or per-level [N, 9*width, H_l, W_l] maps in anchor order."""
    if isinstance(x, Tensor):
        return x
    n = x[0].shape[0]
    return torch.cat([m.permute(0, 2, 3, 1).reshape(n, -1, width) for m in x], dim=1)


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
