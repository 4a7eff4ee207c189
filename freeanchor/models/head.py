"""RetinaNet head shared over the pyramid levels (spec 2.3), MMDetection layout.

Two towers of `stacked_convs` 3x3 conv + ReLU (separate weights for classification and box
regression), then `retina_cls` (9*C sigmoid logits, no background) and `retina_reg` (9*4
deltas). Channel `a*C + c` is anchor `a`, class `c`. Module names follow MMDetection minus its
`.conv.` wrapper: `cls_convs.{i}`, `reg_convs.{i}`, `retina_cls`, `retina_reg`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class RetinaHead(nn.Module):
    """Args:
    num_classes: foreground classes C.
    in_channels / feat_channels: FPN channels / tower width.
    stacked_convs: convs per tower.
    num_anchors: anchors per location (9).
    prior_prob: initial foreground probability; sets the `retina_cls` bias to
        -log((1 - p) / p) (focal-loss init, -4.595 for p = 0.01).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        num_anchors: int = 9,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors = num_anchors

        def tower() -> nn.ModuleList:
            chans = [in_channels] + [feat_channels] * stacked_convs
            return nn.ModuleList(
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1) for i in range(stacked_convs)
            )

        self.cls_convs = tower()
        self.reg_convs = tower()
        last = feat_channels if stacked_convs > 0 else in_channels
        self.retina_cls = nn.Conv2d(last, num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(last, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward_single(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One level [N, 256, H, W] -> ([N, 9*C, H, W] logits, [N, 36, H, W] deltas)."""
        cls_feat, reg_feat = x, x
        # In place: the conv outputs are used only by the ReLU (and its backward needs only
        # its own output), so this saves one feature map of memory traffic per conv.
        for conv in self.cls_convs:
            cls_feat = torch.relu_(conv(cls_feat))
        for conv in self.reg_convs:
            reg_feat = torch.relu_(conv(reg_feat))
        return self.retina_cls(cls_feat), self.retina_reg(reg_feat)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Levels P3..P7 -> (cls_scores per level, bbox_preds per level)."""
        outs = [self.forward_single(f) for f in feats]
        return [o[0] for o in outs], [o[1] for o in outs]


def flatten_head_outputs(
    cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor], num_classes: int
) -> tuple[Tensor, Tensor]:
    """Concatenate the levels in anchor order, as MMDetection does before the loss.

    Per level `x.permute(0, 2, 3, 1).reshape(N, H*W*9, C)`, so row `offset_l + (y*W + x)*9 + a`
    is anchor `a` at location (y, x) of level l: the order of `AnchorGenerator`.

    Returns:
        logits [N, A, C] and deltas [N, A, 4].
    """
    n = cls_scores[0].shape[0]
    logits = torch.cat([s.permute(0, 2, 3, 1).reshape(n, -1, num_classes) for s in cls_scores], 1)
    deltas = torch.cat([d.permute(0, 2, 3, 1).reshape(n, -1, 4) for d in bbox_preds], 1)
    return logits, deltas
