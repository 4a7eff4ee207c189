"""Bilinear resize of uint8 images, bit for bit as OpenCV's `cv2.resize(..., INTER_LINEAR)`.

MMDetection resizes with OpenCV, and a detector trained on those pixels reacts to a one-grey-level
change (see the golden README), so `resize` must give OpenCV's exact bytes. With OpenCV installed
it calls `cv2.resize`; without it, `resize_linear_exact` computes the same bytes in torch. Both
are integer arithmetic, so neither depends on the thread count.

OpenCV's uint8 INTER_LINEAR (imgproc/src/resize.cpp), as re-derived here:

- Source coordinate of output column dx: `fx = float32((dx + 0.5) * scale - 0.5)` with
  `scale = 1 / (new_w / w)` in double; `sx = floor(fx)`, `fx -= sx`. A column left of the image
  (sx < 0) or at/after its last pixel (sx >= w - 1) is clamped, with fx = 0.
- Weights are 11-bit fixed point: `round_half_even(float32(1 - f) * 2048)` and
  `round_half_even(f * 2048)`; they need not sum to 2048.
- Horizontal pass in int32: `a0 * S[sx] + a1 * S[sx + 1]`.
- Rows use the same formula but are *not* clamped with fy = 0: the two source rows are clipped
  into the image and the unclamped weights kept.
- Vertical pass, in 16-bit steps: `((b0 * (R0 >> 4)) >> 16) + ((b1 * (R1 >> 4)) >> 16)`, then
  `(t + 2) >> 2`, saturated to uint8.
- Exactly 2x smaller in both directions goes through OpenCV's area path instead: the rounded
  mean of each 2x2 block, `(a + b + c + d + 2) >> 2`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_BITS = 11
_ONE = 1 << _BITS  # 2048
_DBL_EPSILON = 2.220446049250313e-16

try:  # OpenCV is optional: without it the torch version gives the same bytes
    import cv2
except ImportError:  # pragma: no cover - exercised by the no-OpenCV test in a subprocess
    cv2 = None


def has_opencv() -> bool:
    return cv2 is not None


def _axis(new: int, old: int) -> tuple[Tensor, Tensor]:
    """Source position of each output index along one axis, as OpenCV computes it.

    Returns:
        s: [new] int64 floor of the position (not clamped); f: [new] float32 fraction in [0, 1).
    """
    scale = 1.0 / (new / old)
    pos = (np.arange(new, dtype=np.float64) + 0.5) * scale - 0.5
    f = pos.astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    return torch.from_numpy(s), torch.from_numpy(f)


def _weights(f: Tensor) -> tuple[Tensor, Tensor]:
    """11-bit fixed-point weights (1 - f, f): int32 [n] each."""
    w0 = torch.round((torch.tensor(1.0, dtype=torch.float32) - f) * _ONE).to(torch.int32)
    w1 = torch.round(f * _ONE).to(torch.int32)  # round(): half to even, as cvRound
    return w0, w1


def _is_exact_half(new_w: int, new_h: int, w: int, h: int) -> bool:
    """OpenCV's test for its 2x2 area shortcut: both scales are (within 1 ulp) exactly 2."""
    sx, sy = 1.0 / (new_w / w), 1.0 / (new_h / h)
    return abs(sx - 2) < _DBL_EPSILON and abs(sy - 2) < _DBL_EPSILON


def resize_linear_exact(image: Tensor, size: tuple[int, int]) -> Tensor:
    """OpenCV-exact INTER_LINEAR resize in torch (see the module docstring).

    Args:
        image: uint8 [C, H, W].
        size: (new_width, new_height), both >= 1.

    Returns:
        uint8 [C, new_height, new_width].
    """
    new_w, new_h = size
    c, h, w = image.shape
    if (new_h, new_w) == (h, w):
        return image.clone()
    src = image.to(torch.int32)
    if _is_exact_half(new_w, new_h, w, h):
        blocks = src[:, : 2 * new_h, : 2 * new_w].reshape(c, new_h, 2, new_w, 2)
        return ((blocks.sum(dim=(2, 4)) + 2) >> 2).to(torch.uint8)

    # Columns: clamp outside the image with weight (2048, 0).
    sx, fx = _axis(new_w, w)
    outside = (sx < 0) | (sx >= w - 1)
    fx = torch.where(outside, torch.zeros_like(fx), fx)
    sx = sx.clamp(0, w - 1)
    a0, a1 = _weights(fx)
    # Rows: clip the two source rows, keep the weights.
    sy, fy = _axis(new_h, h)
    b0, b1 = _weights(fy)
    r0, r1 = sy.clamp(0, h - 1), (sy + 1).clamp(0, h - 1)

    def horizontal(rows: Tensor) -> Tensor:  # [C, n, W] -> [C, n, new_w] int32, then >> 4
        out = rows.index_select(2, sx).mul_(a0)
        out += rows.index_select(2, (sx + 1).clamp(max=w - 1)).mul_(a1)
        return out.bitwise_right_shift_(4)

    if 2 * new_h < h:  # shrinking: only the rows that are read
        top, bottom = horizontal(src.index_select(1, r0)), horizontal(src.index_select(1, r1))
    else:  # every row is read at least once: filter each once
        rows = horizontal(src)
        top, bottom = rows.index_select(1, r0), rows.index_select(1, r1)
    t = top.mul_(b0[:, None]).bitwise_right_shift_(16)
    t += bottom.mul_(b1[:, None]).bitwise_right_shift_(16)
    return t.add_(2).bitwise_right_shift_(2).clamp_(0, 255).to(torch.uint8)


def resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """`cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)` of a uint8 [C, H, W] tensor.

    Uses OpenCV when installed (faster), else `resize_linear_exact` (the same bytes).

    Args:
        image: uint8 [C, H, W] (any channel order; channels are independent).
        size: (new_width, new_height).

    Returns:
        uint8 [C, new_height, new_width]; the input itself when the size is unchanged.
    """
    new_w, new_h = size
    if image.shape[-2:] == (new_h, new_w):
        return image
    if new_w < 1 or new_h < 1:
        raise ValueError(f"resize to {new_w}x{new_h}: both sides must be >= 1")
    if cv2 is None or image.shape[0] > 4:
        return resize_linear_exact(image, size)
    hwc = image.permute(1, 2, 0).contiguous().numpy()
    out = cv2.resize(hwc, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    if out.ndim == 2:  # cv2 drops a channel axis of length 1
        out = out[..., None]
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()
