"""RetinaNet anchors exactly as MMDetection's `AnchorGenerator` makes them (spec 2.4).

Per level of stride S: 3 octave scales `octave_base_scale * 2**(k/3)` times 3 ratios (h/w),
ordered ratio-major (index = 3 * ratio_idx + scale_idx), centred on (0, 0) and shifted to
every multiple of the stride (centre_offset 0, no rounding). Locations are row-major and the
9 anchors of one location are consecutive, matching the head's flattened outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class AnchorGenerator:
    """Grid anchors for a feature pyramid.

    Args:
        strides: stride of each level (also its base size).
        ratios: anchor aspect ratios h/w.
        octave_base_scale: scale of the smallest anchor, in strides.
        scales_per_octave: scales per level, spaced 2**(1/n) apart.
    """

    def __init__(
        self,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        octave_base_scale: float = 4.0,
        scales_per_octave: int = 3,
    ) -> None:
        self.strides = tuple(int(s) for s in strides)
        # Scales are computed in float64 and stored as float32, as MMDetection does via numpy.
        octave = [2 ** (i / scales_per_octave) for i in range(scales_per_octave)]
        self.scales = torch.tensor([o * octave_base_scale for o in octave], dtype=torch.float32)
        self.ratios = torch.tensor(list(ratios), dtype=torch.float32)
        self.base_anchors = [self._base_anchors(s) for s in self.strides]
        # Anchors per (feature-map sizes, device, dtype): the one cache, bounded (multi-scale
        # training sees many sizes). Not part of any state_dict.
        self._cache: dict[tuple, list[Tensor]] = {}

    @property
    def num_base_anchors(self) -> int:
        return len(self.ratios) * len(self.scales)

    def _base_anchors(self, base_size: int) -> Tensor:
        """The anchors of one location, centred on (0, 0): [num_base_anchors, 4] xyxy."""
        h_ratios = torch.sqrt(self.ratios)
        w_ratios = 1 / h_ratios
        ws = (base_size * w_ratios[:, None] * self.scales[None, :]).reshape(-1)
        hs = (base_size * h_ratios[:, None] * self.scales[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    def grid_anchors(
        self,
        featmap_sizes: Sequence[tuple[int, int]],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> list[Tensor]:
        """Anchors of every level, cached per sizes / device / dtype (not while exporting).

        Args:
            featmap_sizes: (H_l, W_l) of each level, in the order of `strides`.

        Returns:
            list of [H_l * W_l * 9, 4] xyxy tensors in input pixels (shared: do not modify).
        """
        if len(featmap_sizes) != len(self.strides):
            raise ValueError(f"{len(featmap_sizes)} feature maps for {len(self.strides)} strides")
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            # Traced from the (symbolic) sizes, so an exported graph keeps dynamic shapes.
            return self._grid(featmap_sizes, device, dtype)
        key = (tuple((int(h), int(w)) for h, w in featmap_sizes), str(device), dtype)
        if key not in self._cache:
            if len(self._cache) >= 64:
                self._cache.clear()
            # Normal tensors even under inference_mode, so the cache also serves training.
            with torch.inference_mode(False):
                self._cache[key] = self._grid(featmap_sizes, device, dtype)
        return self._cache[key]

    def _grid(self, featmap_sizes, device, dtype) -> list[Tensor]:
        out = []
        for (h, w), stride, base in zip(featmap_sizes, self.strides, self.base_anchors):
            shift_x = torch.arange(w, device=device).to(dtype) * stride
            shift_y = torch.arange(h, device=device).to(dtype) * stride
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack([xx, yy, xx, yy], dim=-1)
            out.append((base.to(device=device, dtype=dtype)[None] + shifts[:, None]).reshape(-1, 4))
        return out

    def __call__(
        self, featmap_sizes: Sequence[tuple[int, int]], device: torch.device | str | None = None
    ) -> Tensor:
        """All levels concatenated: [A, 4]."""
        return torch.cat(self.grid_anchors(featmap_sizes, device), dim=0)
