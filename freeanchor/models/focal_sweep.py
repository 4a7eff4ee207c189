"""FreeAnchor's dense negative term, swept once over the head's logits where they lie.

Per image, sum over anchors j and classes c of FL_(p_jc * (1 - box_prob_jc)), with
FL_(q) = q^gamma * -log(1 - q) and p = sigmoid(logit). box_prob is zero for all but a few
(anchor, class) pairs (the "keys"), so the dense part is FL_(p) = p^gamma * softplus(x) (as
-log(1 - sigmoid(x)) = softplus(x)), computed with its gradient slice by slice so that each
slice stays in cache and autograd keeps no N x A x C intermediate; the keys are left out of
the sweep and computed exactly on their own.

The logits are read in place: per-level head maps [N, nb*C, H, W] (channel a*C + c, any dense
memory layout) or one flattened [N, A, C] tensor; the gradient is written once, in the same
layout, so nothing of size N x A x C is copied. The same function hands out the logits of the
positive bags' entries, so the positive term's gradient is added into that one buffer rather
than into a second dense gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

# Elements per slice of the CPU sweep: its 4 buffers stay in L2, and ops on fewer than 32768
# elements (torch's parallel grain) run in the calling thread.
_SLICE = 32767


def _flat(x: Tensor) -> Tensor:
    """The memory of a dense tensor as a 1-D view, in memory order."""
    return x.as_strided((x.numel(),), (1,))


class LogitLayout:
    """Where logit (image, anchor, class) lies in the memory of each level.

    Args:
        levels: [N, A, C] (one level, one anchor per "location"), or per-level maps
            [N, nb*C, H, W] whose flattened anchor order is (level, y, x, a).
        num_classes: C.
    """

    def __init__(self, levels: Sequence[Tensor], num_classes: int) -> None:
        self.num_classes = num_classes
        self.levels = []  # (first anchor, anchors, nb, W, strides of the [N, nb*C, H, W] view)
        start = 0
        for x in levels:
            v = x.permute(0, 2, 1).unsqueeze(-1) if x.dim() == 3 else x
            if v.dim() != 4 or v.shape[1] % num_classes:
                raise ValueError(f"logits of shape {tuple(x.shape)} for {num_classes} classes")
            nb = v.shape[1] // num_classes
            count = nb * v.shape[2] * v.shape[3]
            self.levels.append((start, count, nb, v.shape[3], v.stride()))
            start += count
        self.num_anchors = start

    def offsets(self, img: Tensor, anchor: Tensor, cls: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per level: (positions in the given lists, offsets into the level's flat memory)."""
        out = []
        for start, count, nb, w, (s0, s1, s2, s3) in self.levels:
            pos = ((anchor >= start) & (anchor < start + count)).nonzero().squeeze(1)
            r = anchor[pos] - start  # = (y * W + x) * nb + a
            loc, a = r.div(nb, rounding_mode="floor"), r % nb
            y, x = loc.div(w, rounding_mode="floor"), loc % w
            channel = a * self.num_classes + cls[pos]
            out.append((pos, img[pos] * s0 + channel * s1 + y * s2 + x * s3))
        return out


def _dense(x: Tensor) -> Tensor:
    """x if each image is one block of memory in a dense order (NCHW, NHWC, [N, A, C]), else
    a contiguous copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


class FocalSweep(torch.autograd.Function):
    """(negative sums [N], logits at the bag entries [M]) of per-level logits; see the module."""

    @staticmethod
    def forward(ctx, layout, keys, bags, gamma, *levels):
        img_k, anc_k, cls_k, box_prob = keys
        n = levels[0].shape[0]
        sums = torch.zeros(n, dtype=torch.float64, device=levels[0].device)
        bag_logits = levels[0].new_empty(len(bags[0]))
        bag_at = layout.offsets(*bags)
        grads, tasks, exact = [], [], []
        for i, (x, (kpos, koff), (bpos, boff)) in enumerate(
            zip(levels, layout.offsets(img_k, anc_k, cls_k), bag_at)
        ):
            g = torch.empty_like(x) if ctx.needs_input_grad[4 + i] else None
            koff, order = koff.sort()
            tasks += _slices(_flat(x), None if g is None else _flat(g), n, koff)
            exact.append((x, g, koff, kpos[order]))
            bag_logits[bpos] = _flat(x)[boff]
            grads.append(g)
        _sweep(tasks, sums, gamma)
        for x, g, koff, kpos in exact:
            if len(kpos):
                _exact_keys(_flat(x), g, koff, img_k[kpos], box_prob[kpos], sums, gamma)
        ctx.grads, ctx.bag_at = grads, bag_at
        return sums.to(levels[0].dtype), bag_logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sums: Tensor, grad_bag: Tensor):
        grads, ctx.grads = ctx.grads, None  # freed now; a second backward is refused
        if grads is None:
            raise RuntimeError("FreeAnchor negative loss: backward called twice")
        for g, (bpos, boff) in zip(grads, ctx.bag_at):
            if g is None:
                continue
            flat = _flat(g)
            block = flat.numel() // len(grad_sums)
            for i in range(len(grad_sums)):
                flat[i * block : (i + 1) * block].mul_(grad_sums[i])
            flat.index_put_((boff,), grad_bag[bpos], accumulate=True)
        return (None, None, None, None, *grads)


def _slices(flat: Tensor, gflat: Tensor | None, n: int, koff: Tensor) -> list[tuple]:
    """The sweep's work on one level: (image, logits, gradient, key offsets within) per slice
    of one image's logits (koff: sorted key offsets in the level)."""
    block = flat.numel() // n
    step = block if flat.is_cuda else min(block, _SLICE)
    starts = [s for i in range(n) for s in range(i * block, (i + 1) * block, step)]
    ends = [min(s + step, (s // block + 1) * block) for s in starts]
    bounds = torch.searchsorted(koff, koff.new_tensor(starts + [flat.numel()])).tolist()
    return [
        (s // block, flat[s:e], None if gflat is None else gflat[s:e], koff[k0:k1] - s)
        for s, e, k0, k1 in zip(starts, ends, bounds, bounds[1:])
    ]


def _sweep(tasks: list[tuple], sums: Tensor, gamma: float) -> None:
    """sums[i] += sum of FL_(p) = p^gamma * softplus(x) over the slices of image i but their
    keys; each slice's gradient p^gamma * (gamma * (1 - p) * softplus(x) + p).

    softplus(x) = max(x, 0) - log(max(p, 1 - p)): one vectorised log (log1p is not
    vectorised on the CPU: 10x slower), x - log(p) for x > 0 (so x when p rounds to 1) and
    -log(1 - p) for x <= 0, the reference's own form.

    On the CPU the slices are below torch's parallel grain, so each op runs in its thread, and
    torch.get_num_threads() Python threads take the slices (torch ops release the GIL): some
    5000 tiny OpenMP regions would each wait for a busy core.
    """

    @torch.no_grad()  # grad mode is per thread: off in the pool's too
    def run(tasks: list) -> Tensor:
        part = torch.zeros_like(sums)
        size = max((len(t[1]) for t in tasks), default=0)
        p, q, nll, pg = (sums.new_empty(size, dtype=tasks[0][1].dtype) for _ in range(4))
        for i, x, g, keys in tasks:
            m = len(x)
            p_, q_, nll_, pg_ = p[:m], q[:m], nll[:m], pg[:m]  # reused by every slice
            torch.sigmoid(x, out=p_)
            torch.sigmoid(torch.neg(x, out=q_), out=q_)  # 1 - p, exact where p rounds to 1
            torch.maximum(p_, q_, out=nll_).log_()
            torch.sub(torch.clamp(x, min=0, out=pg_), nll_, out=nll_)
            torch.mul(p_, p_, out=pg_) if gamma == 2.0 else torch.pow(p_, gamma, out=pg_)
            if len(keys):
                pg_[keys] = 0  # keys: computed exactly on their own
            if g is not None:
                torch.addcmul(p_, q_, nll_, value=gamma, out=g).mul_(pg_)
            part[i] += pg_.mul_(nll_).sum()  # cascade sum: ~1e-8, a float32 dot ~1e-6
        return part

    on_gpu = bool(tasks) and tasks[0][1].is_cuda
    workers = 1 if on_gpu else max(1, min(torch.get_num_threads(), len(tasks)))
    if workers == 1:
        sums += run(tasks) if tasks else 0
        return
    groups = [
        tasks[len(tasks) * w // workers : len(tasks) * (w + 1) // workers] for w in range(workers)
    ]
    with ThreadPoolExecutor(workers) as pool:
        for part in pool.map(run, groups):
            sums += part


def _exact_keys(flat, g, koff, img, box_prob, sums, gamma):
    """The key terms FL_(q), q = p * (1 - box_prob) (clamped as MMDetection), and their
    gradient. 1 - q is taken as (1 - p) + p * box_prob where q is large, so it stays exact
    when p rounds to 1."""
    x = flat[koff]
    p, one_minus_p = torch.sigmoid(x), torch.sigmoid(-x)
    q = (p * (1 - box_prob)).clamp(min=1e-12, max=1 - 1e-12)
    small = q < 0.5
    one_minus_q = torch.where(small, 1 - q, one_minus_p + p * box_prob)
    nll = torch.where(small, -torch.log1p(-q), -torch.log(one_minus_q))
    sums.index_add_(0, img, (q.pow(gamma) * nll).double())
    if g is not None:
        df_dq = gamma * q.pow(gamma - 1) * nll + q.pow(gamma) / one_minus_q
        _flat(g)[koff] = df_dq * (1 - box_prob) * p * one_minus_p


def focal_sweep(
    levels: Sequence[Tensor],
    keys: tuple,
    bags: tuple,
    gamma: float,
    num_classes: int,
    num_anchors: int,
) -> tuple[Tensor, Tensor]:
    """Negative sums [N] and bag logits [M] (see the module).

    Args:
        levels: logits, [N, A, C] or per-level [N, nb*C, H, W], float.
        keys: (image, anchor, class, box_prob) of the K unique pairs with box_prob > 0.
        bags: (image, anchor, class) of the M bag entries.
        num_anchors: A, checked against the levels.
    """
    levels = [_dense(x) for x in levels]
    layout = LogitLayout(levels, num_classes)
    if layout.num_anchors != num_anchors or len({x.shape[0] for x in levels}) != 1:
        shapes = [tuple(x.shape) for x in levels]
        raise ValueError(
            f"logits {shapes} do not hold {num_anchors} anchors x {num_classes} classes"
        )
    return FocalSweep.apply(layout, keys, bags, gamma, *levels)
