"""Distributed runs: rank info from the environment, process-group setup, small collectives.

We never spawn processes; a launcher does and sets the environment:

    # one machine, 8 GPUs
    torchrun --nproc-per-node 8 -m freeanchor train --model freeanchor_r50_fpn_1x_coco ...
    # two machines (run on each, NODE = 0 or 1)
    torchrun --nnodes 2 --node-rank NODE --master-addr HOST0 --master-port 29500 \
        --nproc-per-node 8 -m freeanchor train ...
    # SLURM: one task per GPU
    srun --ntasks 16 --ntasks-per-node 8 --gpus-per-task 1 python -m freeanchor train ...

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Under `srun` without
torchrun we read SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and take MASTER_ADDR from the first
host of SLURM_NODELIST (MASTER_PORT defaults to 29500). Backend: NCCL on GPUs, gloo on the CPU.
Every helper here also works, as the identity, in a plain single-process run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist

from freeanchor.errors import OptionError

DEFAULT_PORT = "29500"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: str = DEFAULT_PORT
    source: str = "none"  # torchrun | slurm | none

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03', 'a,b' -> 'a'."""
    # Split on the first comma that is outside brackets.
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    start = re.split(r"[,-]", ranges, maxsplit=1)[0]  # keeps zero padding: '03'
    return f"{prefix}{start}{suffix}"


def dist_info(env: Mapping[str, str] | None = None) -> DistInfo:
    """Rank information from torchrun's variables, else SLURM's, else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=env.get("MASTER_PORT", DEFAULT_PORT),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            world_size=int(env["SLURM_NTASKS"]),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_NODELIST", "")),
            master_port=env.get("MASTER_PORT", DEFAULT_PORT),
            source="slurm",
        )
    return DistInfo()


def init_distributed(device_type: str, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group when the environment describes more than one process.

    Args:
        device_type: "cuda" (NCCL; also selects GPU LOCAL_RANK) or "cpu" (gloo).
    """
    info = dist_info()
    if not info.distributed or torch_dist.is_initialized():
        return info
    if not info.master_addr:
        raise OptionError("distributed run: cannot tell the master address (set MASTER_ADDR)")
    # env:// reads these; SLURM does not set them.
    os.environ.setdefault("MASTER_ADDR", info.master_addr)
    os.environ.setdefault("MASTER_PORT", info.master_port)
    backend = "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
        backend = "nccl"
    torch_dist.init_process_group(
        backend,
        init_method="env://",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return info


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or a single process): the only one that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over all ranks (identity in a single process); returns `tensor`."""
    if is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def sum_over_ranks(values: Sequence[float | torch.Tensor], device: torch.device) -> list[float]:
    """Each value summed over all ranks, as floats (one small all-reduce; plain in one process).

    `device` must suit the backend (the GPU for NCCL).
    """
    t = torch.stack(
        [torch.as_tensor(v).detach().to(device, torch.float64).reshape(()) for v in values]
    )
    return all_reduce_sum(t).tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (pickled; used for evaluation detections)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if is_initialized():
        torch_dist.destroy_process_group()


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this process's GPU if there is one, else the CPU; 'cuda' -> cuda:LOCAL_RANK."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise OptionError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"device {spec!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


class _LossForward(torch.nn.Module):
    """What DDP wraps: its forward is the detector's loss, so DDP's hooks see the pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, gt_boxes: list[torch.Tensor],
                gt_labels: list[torch.Tensor], num_gts: float | None = None):  # fmt: skip
        return self.model.loss(images, gt_boxes, gt_labels, num_gts)


def loss_module(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """A module whose forward is `model.loss`: DDP-wrapped in a distributed run."""
    module = _LossForward(model)
    if not info.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # BN is frozen (norm_eval): no buffers to broadcast
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
