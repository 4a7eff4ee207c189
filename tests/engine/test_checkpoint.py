"""Checkpoints: plain data (weights_only), atomic writes, RNG restore, last/epoch/best files."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from freeanchor.engine import checkpoint as ck


def _draws():
    return (random.random(), float(np.random.rand()), float(torch.rand(())))


def test_rng_state_restores_every_generator():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()
    state = ck.capture_rng_state()
    expected = _draws() + (random.gauss(0, 1),)
    _draws()  # move every generator on
    ck.restore_rng_state(state)
    assert _draws() + (random.gauss(0, 1),) == expected


def test_checkpoint_is_plain_data_and_round_trips(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {"x": 1},
             "epoch": 2, "iteration": 17, "rng": ck.capture_rng_state(),
             "scaler": torch.amp.GradScaler("cpu", enabled=True).state_dict()}  # fmt: skip
    path = ck.CheckpointManager(tmp_path).save(state)
    # weights_only=True refuses anything but tensors and plain containers
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == ck.FORMAT and raw["iteration"] == 17
    loaded = ck.load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    opt2 = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(loaded["optimizer"])
    buf = opt2.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(buf, opt.state_dict()["state"][0]["momentum_buffer"])


def test_manager_writes_epoch_and_best_copies(tmp_path):
    mgr = ck.CheckpointManager(tmp_path)
    base = {"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 0, "iteration": 0}
    mgr.save({**base, "iteration": 5}, epoch_done=1, is_best=True)
    mgr.save({**base, "iteration": 9}, epoch_done=2)
    mgr.save({**base, "iteration": 11})
    it = {p.name: ck.load_checkpoint(p)["iteration"] for p in tmp_path.glob("*.pt")}
    assert it == {"last.pt": 11, "epoch_1.pt": 5, "epoch_2.pt": 9, "best.pt": 5}
    assert not list(tmp_path.glob("*.tmp"))  # no temp files left behind


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.atomic_save({"a": torch.ones(2)}, path)

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_save({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ck.CheckpointError, match="cannot read checkpoint"):
        ck.load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ck.CheckpointError, match="not a freeanchor training checkpoint"):
        ck.load_checkpoint(other)


def test_signals_set_flags_and_restore_handlers():
    import os
    import signal

    before = signal.getsignal(signal.SIGUSR1)
    with ck.CheckpointSignals() as sig:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert sig.save and sig.stop == signal.SIGTERM
    assert signal.getsignal(signal.SIGUSR1) == before
