"""Rank information from launcher environments; single-process collectives are identities."""

from __future__ import annotations

import pytest
import torch

from freeanchor.engine import dist


def test_torchrun_env():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.2",
           "MASTER_PORT": "1234", "SLURM_PROCID": "9", "SLURM_NTASKS": "16"}  # fmt: skip
    info = dist.dist_info(env)
    assert (info.rank, info.local_rank, info.world_size) == (3, 1, 4)
    assert (info.master_addr, info.master_port, info.source) == ("10.0.0.2", "1234", "torchrun")
    assert info.distributed and not info.is_main


def test_slurm_env():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_NODELIST": "gpu[03-05,9],cpu1"}  # fmt: skip
    info = dist.dist_info(env)
    assert (info.rank, info.local_rank, info.world_size) == (5, 1, 8)
    assert info.master_addr == "gpu03" and info.master_port == "29500"
    assert info.source == "slurm"


def test_single_process_env():
    assert dist.dist_info({}) == dist.DistInfo()
    # a one-task SLURM allocation is not a distributed run
    assert not dist.dist_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).distributed


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node17", "node17"),
        ("a,b,c", "a"),
        ("node[01-04]", "node01"),
        ("node[7,9-11]", "node7"),
        ("rack[2-3]-gpu,other", "rack2-gpu"),
        ("x[008-010],y[1-2]", "x008"),
    ],
)
def test_first_slurm_host(nodelist, host):
    assert dist.first_slurm_host(nodelist) == host


def test_single_process_collectives():
    assert not dist.is_initialized()
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and dist.is_main_process()
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object([1, 2]) == [1, 2]
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    dist.barrier()
    dist.cleanup()


def test_resolve_device():
    assert dist.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert dist.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            dist.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        dist.resolve_device("tpu7")
