"""Checkpoints: plain data (weights_only), atomic writes, RNG restore, last/epoch/best files,
checksums, non-finite refusal, a full disk, keep_checkpoints."""

from __future__ import annotations

import errno
import io
import os
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


def test_epoch_and_best_files_are_links_or_copies(tmp_path, monkeypatch):
    """Hard links where the file system has them (same inode as last.pt when written, which a
    later last.pt replaces by rename); byte copies where os.link fails."""
    base = {"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 0, "iteration": 0}
    linked = ck.CheckpointManager(tmp_path / "a")
    linked.save({**base, "iteration": 5}, epoch_done=1, is_best=True)
    inode = (tmp_path / "a" / "last.pt").stat().st_ino
    assert (tmp_path / "a" / "best.pt").stat().st_ino == inode
    assert (tmp_path / "a" / "epoch_1.pt").stat().st_ino == inode
    linked.save({**base, "iteration": 9})
    assert (tmp_path / "a" / "last.pt").stat().st_ino != inode
    assert ck.load_checkpoint(tmp_path / "a" / "best.pt")["iteration"] == 5

    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    copied = ck.CheckpointManager(tmp_path / "b")
    copied.save({**base, "iteration": 5}, is_best=True)
    best, last = tmp_path / "b" / "best.pt", tmp_path / "b" / "last.pt"
    assert best.stat().st_ino != last.stat().st_ino
    assert best.read_bytes() == last.read_bytes()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["best.pt", "last.pt"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.atomic_save({"a": torch.ones(2)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
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


def _tiny_state(**kw):
    model = torch.nn.Linear(3, 2)
    base = {"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 0,
            "iteration": 3}  # fmt: skip
    return {**base, **kw}


def test_checksum_is_written_and_a_flipped_byte_is_refused(tmp_path):
    path = ck.CheckpointManager(tmp_path).save(_tiny_state())
    raw = torch.load(path, weights_only=True)
    assert raw["checksum"].startswith("blake2b-256:") and raw["version"] == 2
    ck.load_checkpoint(path)  # intact: loads
    # Flip one byte inside the weight's payload (found by its value; the zip has no CRC check
    # in torch.load, so only the checksum can tell).
    data = bytearray(path.read_bytes())
    needle = raw["model"]["weight"].numpy().tobytes()
    at = bytes(data).index(needle)
    data[at + 1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="last.pt: checksum mismatch"):
        ck.load_checkpoint(path)


def test_checkpoint_without_checksum_still_loads(tmp_path):
    # version 1 files (before checksums) stay usable
    path = tmp_path / "old.pt"
    torch.save({"format": ck.FORMAT, "version": 1, **_tiny_state()}, path)
    assert ck.load_checkpoint(path)["iteration"] == 3


def test_poisoned_checkpoint_is_refused_with_the_reason(tmp_path):
    state = _tiny_state()
    state["model"]["bias"][0] = float("nan")
    path = ck.CheckpointManager(tmp_path).save(state)  # e.g. written by an older version
    with pytest.raises(ck.CheckpointError, match=r"last.pt: model/bias holds NaN or infinite"):
        ck.load_checkpoint(path)


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from freeanchor import files
    from freeanchor.errors import DiskFullError

    class FillsUp(io.FileIO):
        """A file on a disk that is full after 100 bytes (what ENOSPC looks like to write)."""

        def write(self, b):
            if self.tell() + len(b) > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    monkeypatch.setattr(files, "open", lambda p, mode: FillsUp(p, "w"), raising=False)
    with pytest.raises(DiskFullError) as e:
        ck.CheckpointManager(tmp_path).save(_tiny_state())
    assert str(e.value) == f"no space left on device: {tmp_path / 'last.pt'}"
    assert list(tmp_path.iterdir()) == []  # no partial file, no temp file
    monkeypatch.undo()
    # a writer by path (safetensors, savefig) raising ENOSPC gives the same line
    monkeypatch.setattr(ck.torch, "save", lambda obj, f: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))  # fmt: skip
    with pytest.raises(DiskFullError, match="no space left on device: .*last.pt"):
        ck.atomic_save({}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = ck.CheckpointManager(tmp_path).save(_tiny_state(), epoch_done=1)
        from freeanchor.files import write_text

        text = write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    for p in (path, tmp_path / "epoch_1.pt", text):
        assert (p.stat().st_mode & 0o777) == 0o644, p
    os.umask(0o077)
    try:
        assert (write_text(tmp_path / "b.txt", "x").stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)


def test_stale_temp_files_are_found_by_our_pattern_only(tmp_path):
    from freeanchor.files import remove_stale_temp_files, temp_path_for

    ours = temp_path_for(tmp_path / "last.pt")
    ours.write_bytes(b"half")
    legacy = tmp_path / ".last.pt.ab_c1234.tmp.pt"  # tempfile.mkstemp's names, before
    legacy.write_bytes(b"half")
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "last.pt"]
    for p in keep:
        p.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted([ours, legacy])
    assert sorted(tmp_path.iterdir()) == sorted(keep)


@pytest.mark.parametrize("keep, left", [(0, [1, 2, 3, 4]), (2, [3, 4]), (1, [4])])
def test_keep_checkpoints_keeps_the_newest_epoch_files(tmp_path, keep, left):
    mgr = ck.CheckpointManager(tmp_path, keep=keep)
    for epoch in range(1, 5):
        mgr.save(_tiny_state(iteration=epoch), epoch_done=epoch, is_best=epoch == 1)
    assert [p.name for p in mgr.epoch_files()] == [f"epoch_{e}.pt" for e in left]
    assert ck.load_checkpoint(mgr.best)["iteration"] == 1  # best and last always kept
    assert ck.load_checkpoint(mgr.last)["iteration"] == 4
