"""The delta (dx, dy, dw, dh) box coder of RetinaNet, as MMDetection's DeltaXYWHBBoxCoder.

Boxes are xyxy with no "+1". Deltas are normalised by `stds` (0.1, 0.1, 0.2, 0.2 for
FreeAnchor). Decoding clamps dw, dh to +-|log(16/1000)| and clips to the image only when a
`max_shape` is given (test time; the loss decodes unclipped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class DeltaXYWHCoder:
    def __init__(
        self,
        stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        wh_ratio_clip: float = 16 / 1000,
    ) -> None:
        self.stds = tuple(float(s) for s in stds)
        self.means = tuple(float(m) for m in means)
        self.max_ratio = abs(math.log(wh_ratio_clip))

    def encode(self, anchors: Tensor, gts: Tensor) -> Tensor:
        """Deltas that take `anchors` to `gts`. Shapes broadcast: [..., 4] -> [..., 4]."""
        anchors, gts = anchors.float(), gts.float()
        pcx = (anchors[..., 0] + anchors[..., 2]) * 0.5
        pcy = (anchors[..., 1] + anchors[..., 3]) * 0.5
        pw = anchors[..., 2] - anchors[..., 0]
        ph = anchors[..., 3] - anchors[..., 1]
        gcx = (gts[..., 0] + gts[..., 2]) * 0.5
        gcy = (gts[..., 1] + gts[..., 3]) * 0.5
        gw = gts[..., 2] - gts[..., 0]
        gh = gts[..., 3] - gts[..., 1]
        deltas = torch.stack(
            [(gcx - pcx) / pw, (gcy - pcy) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1
        )
        means = deltas.new_tensor(self.means)
        stds = deltas.new_tensor(self.stds)
        return (deltas - means) / stds

    def decode(
        self,
        anchors: Tensor,
        deltas: Tensor,
        max_shape: tuple[int, int] | Tensor | None = None,
    ) -> Tensor:
        """Boxes from anchors and deltas, [..., 4] each.

        Args:
            max_shape: (H, W) to clip to; a tensor [..., 2] of per-box (H, W) is also accepted
                (broadcast against the leading dims), so a padded batch decodes in one call.
        """
        d = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        pxy = (anchors[..., :2] + anchors[..., 2:]) * 0.5
        pwh = anchors[..., 2:] - anchors[..., :2]
        dwh = d[..., 2:].clamp(min=-self.max_ratio, max=self.max_ratio)
        gxy = pxy + pwh * d[..., :2]
        gwh = pwh * dwh.exp()
        boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        if max_shape is None:
            return boxes
        if isinstance(max_shape, Tensor):
            hw = max_shape.to(boxes.dtype)
            upper = torch.stack([hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]], dim=-1)
            return torch.minimum(boxes.clamp(min=0), upper)
        h, w = max_shape
        x = boxes[..., 0::2].clamp(min=0, max=w)
        y = boxes[..., 1::2].clamp(min=0, max=h)
        return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
