"""Feature pyramid P3..P7 as MMDetection's FPN with `add_extra_convs="on_input"` (spec 2.2).

Laterals are 1x1 convs on C3..C5, merged top-down with nearest upsampling to the exact lateral
size, then a 3x3 conv each. P6 is a 3x3 stride-2 conv on C5 (not on P5, unlike the official
code), P7 a 3x3 stride-2 conv on P6 with no ReLU in between. No norm, no activation anywhere.

Module names are MMDetection's minus its `.conv.` wrapper level: `lateral_convs.{i}` and
`fpn_convs.{i}` (weights.py maps `neck.fpn_convs.3.conv.weight` <-> `fpn.fpn_convs.3.weight`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """Args:
    in_channels: channels of C3, C4, C5 (e.g. [512, 1024, 2048]).
    out_channels: channels of every output level.
    num_outs: number of outputs; levels beyond the laterals come from stride-2 convs, the
        first on C5, the others on the previous output.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_outs: int = 5):
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs={num_outs} < {len(in_channels)} input levels")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        convs = [nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels]
        for i in range(num_outs - len(in_channels)):
            c_in = in_channels[-1] if i == 0 else out_channels
            convs.append(nn.Conv2d(c_in, out_channels, 3, stride=2, padding=1))
        self.fpn_convs = nn.ModuleList(convs)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """[C3, C4, C5] -> [P3 [N, 256, H/8, W/8], P4, P5, P6, P7] (stride-2 convs: ceil)."""
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            up = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + up
        n = len(laterals)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(n)]
        for i, conv in enumerate(self.fpn_convs[n:]):
            # MMDetection's "on_input": the first extra level reads C5, with no ReLU after.
            outs.append(conv(feats[-1] if i == 0 else outs[-1]))
        return outs
