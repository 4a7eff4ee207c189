"""The FreeAnchor loss: learning to match anchors to objects (Zhang et al., NeurIPS 2019).

For a batch with gt boxes b_i (labels y_i), anchors a_j with class probabilities P_j^cls and
box deltas, and bag size n = `pre_anchor_topk`:

    L = alpha / |B|      * sum_i  -log MeanMax(X_i)                                  (positive)
      + (1 - alpha) / (n|B|) * sum_j sum_c  FL_(P^cls_jc * (1 - P{a_j in A+}_c))       (negative)

  X_i       = { P^cls_{j, y_i} * P^loc_ij  :  a_j in A_i },  A_i = the n anchors of largest
              IoU(b_i, a_j) (the "bag" of b_i)
  P^loc_ij  = exp(-bbox_weight * SmoothL1_beta(delta_j - encode(a_j -> b_i)))
  MeanMax(X) = sum_x x/(1-x) / sum_x 1/(1-x)
  P{a_j in A+}_c = max over gts i of class c of the saturated-linear
              clamp((IoU(b_i, decode(a_j)) - t) / (max_j IoU(b_i, decode(a_j)) - t), 0, 1)
              (t = bbox_thr; 0 for a gt whose best predicted IoU is <= t; no gradient)
  FL_(p)    = p^gamma * -log(1 - p)

The numbers are MMDetection 3.x's (FreeAnchorRetinaHead). Where the reference gives NaN (a
best IoU exactly equal to t: 0/0) or crashes (a bag probability rounding above 1, or NaN
logits: its binary cross-entropy asserts its input lies in [0, 1]), this module returns what
the formula means: -log MeanMax is computed in log space, so it is finite for every finite
input (even when the bag probability underflows) and NaN or inf, never an exception, when a
logit or delta is NaN or inf. It is plug-and-play: any dense detector that yields per-anchor
class logits and box deltas can use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from freeanchor.models.box_coder import DeltaXYWHCoder
from freeanchor.models.focal_sweep import focal_sweep
from freeanchor.models.overlaps import matched_pairs, top_iou_anchors


class FreeAnchorLoss(nn.Module):
    """FreeAnchor's positive (bag) and negative losses for a batch of images.

    Args:
        num_classes: C, foreground classes (sigmoid classification, no background).
        pre_anchor_topk: n, anchors per gt bag.
        bbox_thr: t of the saturated-linear matched-box probability.
        gamma: focal exponent of the negative term.
        alpha: weight of the positive term (1 - alpha for the negative term).
        beta: SmoothL1 beta of P^loc.  bbox_weight: lambda of P^loc = exp(-lambda * SmoothL1).
        normalize: "local" = the reference: every chunk of `imgs_per_gpu` images is normalised
            by its own gt count and the chunk losses are averaged (what per-GPU losses under
            DDP amount to); "global" = one gt count for the whole batch.
        box_coder: the delta coder (FreeAnchor's stds 0.1, 0.1, 0.2, 0.2 by default).
    """

    def __init__(
        self,
        num_classes: int,
        pre_anchor_topk: int = 50,
        bbox_thr: float = 0.6,
        gamma: float = 2.0,
        alpha: float = 0.5,
        beta: float = 0.11,
        bbox_weight: float = 0.75,
        normalize: str = "local",
        imgs_per_gpu: int = 2,
        box_coder: DeltaXYWHCoder | None = None,
    ) -> None:
        super().__init__()
        if normalize not in ("local", "global"):
            raise ValueError(f"normalize must be 'local' or 'global', got {normalize!r}")
        self.num_classes = num_classes
        self.pre_anchor_topk = pre_anchor_topk
        self.bbox_thr = bbox_thr
        self.gamma = gamma
        self.alpha = alpha
        self.beta = beta
        self.bbox_weight = bbox_weight
        self.normalize = normalize
        self.imgs_per_gpu = imgs_per_gpu
        self.box_coder = box_coder or DeltaXYWHCoder()

    def forward(
        self,
        cls_logits: Tensor | Sequence[Tensor],
        box_deltas: Tensor | Sequence[Tensor],
        anchors: Tensor,
        gt_boxes: list[Tensor],
        gt_labels: list[Tensor],
        num_gts: float | Tensor | None = None,
    ) -> dict[str, Tensor]:
        """
        Args:
            cls_logits: [N, A, C] raw class logits, or the head's per-level maps
                [N, 9*C, H_l, W_l] (channel a*C + c, any dense memory layout): these are used
                in place, which saves flattening 2 x N*A*C floats per step.
            box_deltas: [N, A, 4] normalised (dx, dy, dw, dh), or per-level [N, 9*4, H_l, W_l].
            anchors: [A, 4] xyxy, the same for every image, in flattened order (level, y, x,
                anchor).
            gt_boxes: N tensors [K_i, 4] xyxy in input pixels.
            gt_labels: N tensors [K_i], 0-based.
            num_gts: "global" only: the gt count to normalise by (e.g. summed over all
                processes); default the count of this batch.

        Returns:
            {"positive_bag_loss": scalar, "negative_bag_loss": scalar}: NaN or inf (never an
            exception) where a logit or delta is NaN or inf.
        """
        levels = [cls_logits] if isinstance(cls_logits, Tensor) else list(cls_logits)
        if isinstance(box_deltas, Tensor):
            deltas = box_deltas
        else:  # the deltas are small (4 per anchor): flattened in anchor order
            n = box_deltas[0].shape[0]
            deltas = torch.cat([d.permute(0, 2, 3, 1).reshape(n, -1, 4) for d in box_deltas], 1)
        with torch.autocast(anchors.device.type, enabled=False):
            return self._loss([x.float() for x in levels], deltas.float(), anchors.float(),
                              gt_boxes, gt_labels, num_gts)  # fmt: skip

    def _box_prob(self, boxes, labels, anchors, deltas) -> tuple[Tensor, Tensor]:
        """Step A for one image: (keys anchor * C + class, P{a_j in A+}_c) where it is > 0.

        P{a_j -> b_i} is the saturated-linear IoU of b_i with the predicted box of a_j, > 0
        only where the IoU passes t; its max over the gts of each class is taken."""
        t = self.bbox_thr
        gt, anc, iou = matched_pairs(boxes, self.box_coder.decode(anchors, deltas), t)
        best = iou.new_full((len(boxes),), t).scatter_reduce_(0, gt, iou, "amax")
        match = ((iou - t) / (best[gt] - t)).clamp_(0, 1)
        keys, inverse = (anc * self.num_classes + labels[gt]).unique(return_inverse=True)
        prob = match.new_zeros(len(keys))
        return keys, prob.scatter_reduce_(0, inverse, match, "amax", include_self=False)

    def _loss(self, levels, deltas, anchors, gt_boxes, gt_labels, num_gts):
        n_img, n_anchor = deltas.shape[:2]
        n_cls = self.num_classes
        if anchors.shape != (n_anchor, 4) or len(gt_boxes) != n_img or len(gt_labels) != n_img:
            raise ValueError(
                f"deltas {tuple(deltas.shape)}, anchors {tuple(anchors.shape)} and "
                f"{len(gt_boxes)} / {len(gt_labels)} gt boxes / labels do not match"
            )
        k = min(self.pre_anchor_topk, n_anchor)
        device = deltas.device
        boxes = [b.to(device, torch.float32).reshape(-1, 4) for b in gt_boxes]
        labels = [lb.to(device, torch.long).reshape(-1) for lb in gt_labels]
        counts = torch.tensor([len(b) for b in boxes], device=device)

        # Steps A and B (no gradient), image by image: no padded gts, no [N, G, A] tensor.
        keys, box_prob, bag_img, bag_anchor, bag_cls, bag_box = [], [], [], [], [], []
        with torch.no_grad():
            for i, (b, lab) in enumerate(zip(boxes, labels)):
                if not len(b):
                    continue
                with record_function("FreeAnchorLoss.A_box_prob"):
                    key, prob = self._box_prob(b, lab, anchors, deltas[i].detach())
                keys.append(key + i * n_anchor * n_cls)
                box_prob.append(prob)
                # B: the bag of each gt = its k anchors of largest IoU (all anchors count).
                with record_function("FreeAnchorLoss.B_bags"):
                    bag = top_iou_anchors(b, anchors, k)
                bag_img.append(torch.full_like(bag, i))
                bag_anchor.append(bag)
                bag_cls.append(lab[:, None].expand_as(bag))
                bag_box.append(b)
        empty = torch.zeros(0, dtype=torch.long, device=device)
        keys = torch.cat(keys) if keys else empty
        box_prob = torch.cat(box_prob) if box_prob else deltas.new_zeros(0)
        bags = [torch.cat(v) if v else empty.reshape(0, k) for v in (bag_img, bag_anchor, bag_cls)]
        bag_img, bag_anchor, bag_cls = bags  # [T, k] each, T = all gts of the batch

        # Step D (and the bag logits of step C, so that both terms' gradients land in one
        # buffer): focal negative term over every anchor and class, per image.
        img_k, rest = keys // (n_anchor * n_cls), keys % (n_anchor * n_cls)
        with record_function("FreeAnchorLoss.D_negative"):
            neg_sums, bag_logits = focal_sweep(
                levels,
                (img_k, rest // n_cls, rest % n_cls, box_prob),
                (bag_img.reshape(-1), bag_anchor.reshape(-1), bag_cls.reshape(-1)),
                self.gamma,
                n_cls,
                n_anchor,
            )
        neg_per_img = (1 - self.alpha) * neg_sums

        # Step C: positive bag likelihood -log MeanMax(P^cls * P^loc) per gt, in log space.
        pos_per_img = deltas.new_zeros(n_img)
        if bag_anchor.numel():
            gt_box = torch.cat(bag_box)
            targets = self.box_coder.encode(anchors[bag_anchor], gt_box[:, None, :])  # [T,k,4]
            diff = (deltas[bag_img, bag_anchor] - targets).abs()
            smooth_l1 = torch.where(
                diff < self.beta, 0.5 * diff * diff / self.beta, diff - 0.5 * self.beta
            )
            log_x = F.logsigmoid(bag_logits.reshape(bag_anchor.shape)) - self.bbox_weight * (
                smooth_l1.sum(-1)
            )  # log(P^cls * P^loc), finite for any finite logit
            x = log_x.exp()
            weight = 1 / torch.clamp(1 - x, min=1e-12)
            weight = weight / weight.sum(dim=1, keepdim=True)
            # -log sum_j w_j x_j = -(m + log sum_j w_j exp(log x_j - m)), m = max_j log x_j:
            # the sum is >= w_max >= 1/k, so it cannot underflow, and m cancels in the gradient.
            m = log_x.detach().amax(dim=1, keepdim=True)
            neg_log_bag = -(m + torch.log((weight * torch.exp(log_x - m)).sum(1, keepdim=True)))
            pos = self.alpha * neg_log_bag.squeeze(1).clamp(min=0)  # rounding can pass 1
            pos_per_img = pos_per_img.index_add(0, bag_img[:, 0], pos)

        # Step E: normalise by the gt count of each chunk (local) or of the batch (global).
        if self.normalize == "local":
            chunk = torch.arange(n_img, device=device) // self.imgs_per_gpu
        else:
            chunk = torch.zeros(n_img, dtype=torch.long, device=device)
        n_chunks = (n_img - 1) // self.imgs_per_gpu + 1 if self.normalize == "local" else 1

        def per_chunk(v: Tensor) -> Tensor:
            return v.new_zeros(n_chunks).index_add_(0, chunk, v)

        n_pos = per_chunk(counts.to(deltas.dtype))
        if num_gts is not None and self.normalize == "global":
            n_pos = torch.as_tensor(num_gts, dtype=deltas.dtype, device=device).reshape(1)
        # Every delta stays in the graph with a zero weight: so a chunk without gts still
        # gives the regression branch a (zero) gradient, as the reference does for DDP, and
        # a NaN or inf delta anywhere makes the loss NaN (it made P{a_j -> b_i} undefined).
        zero = per_chunk(deltas.sum(dim=(1, 2))) * 0
        positive = torch.where(n_pos > 0, per_chunk(pos_per_img) / n_pos.clamp(min=1), 0) + zero
        negative = per_chunk(neg_per_img) / (n_pos * self.pre_anchor_topk).clamp(min=1)
        return {"positive_bag_loss": positive.mean(), "negative_bag_loss": negative.mean()}
