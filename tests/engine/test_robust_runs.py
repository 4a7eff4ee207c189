"""Runs that cannot crash on divergence and never mix, corrupt or lose a run (issue 9).

Through `freeanchor.cli.main` in-process where the point is the user's view: exit code and
exactly one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import urllib.error

import pytest
import torch

from freeanchor.cli import main
from freeanchor.engine.checkpoint import CheckpointManager, load_checkpoint
from freeanchor.engine.logging import read_jsonl
from freeanchor.engine.rundir import LOCK_NAME
from freeanchor.engine.trainer import Trainer
from freeanchor.errors import TrainingDivergedError

from .conftest import make_coco, small_config

TINY = ["--model", "freeanchor_r18_fpn_1x", "--device", "cpu",
        "--set", "model.input_scale=128,96", "--set", "model.fpn_channels=64",
        "--set", "model.feat_channels=64", "--set", "data.workers=0",
        "--set", "data.flip_prob=0", "--set", "train.checkpoint_every=0",
        "--set", "train.scale_lr=false", "--set", "train.warmup_iters=0"]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    # the machine is shared: threads only add contention to these tiny steps
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("robust") / "data", num_images=4)


def _train(data, work, *extra):
    ann, img = data
    return main(["train", "--train-ann", str(ann), "--train-images", str(img),
                 "--work-dir", str(work), *TINY, *extra])  # fmt: skip


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


# ----------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("lr, amp", [("300", "off"), ("1e6", "off"), ("1e6", "bf16"),
                                     ("300", "fp16")])  # fmt: skip
def test_a_diverging_lr_is_skipped_reported_and_stopped(tmp_path, data, capsys, lr, amp):
    # fp16 runs on the CPU too (autocast + GradScaler), so nothing is skipped here
    work = tmp_path / "w"
    steps = ("--set", "train.max_bad_steps=3", "--set", "train.checkpoint_iters=1")
    code = _train(data, work, "--lr", lr, "--amp", amp, "--epochs", "6", *steps)
    err = _one_error_line(capsys)
    assert code == 1
    assert "3 steps in a row skipped" in err and "training diverged" in err
    assert "Lower --lr" in err and "warm-up" in err and "--weights" in err
    skips = [r for r in read_jsonl(work / "metrics.jsonl") if r["type"] == "skip"]
    assert len(skips) == 3 and [s["iter"] for s in skips] == list(
        range(skips[0]["iter"], skips[0]["iter"] + 3)
    )
    assert f"at iteration {skips[-1]['iter']}" in err
    # what was written is finite and resumable
    ckpt = load_checkpoint(work / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_nan_weights_are_skipped_never_written_and_stop(tmp_path, data, capsys):
    ann, img = data
    cfg = small_config(ann, img, tmp_path / "w", epochs=4, max_bad_steps=2, checkpoint_iters=1)
    trainer = Trainer(cfg)
    with torch.no_grad():
        trainer.model.head.retina_cls.weight[0, 0, 0, 0] = math.nan
    with pytest.raises(TrainingDivergedError, match="2 steps in a row skipped.*iteration 2"):
        trainer.fit()
    out = capsys.readouterr().out
    assert "iteration 1: non-finite loss" in out and "iteration 2: non-finite loss" in out
    assert "head.retina_cls.weight is not finite" in out and "last.pt not written" in out
    assert not (tmp_path / "w" / "last.pt").exists()
    assert not (tmp_path / "w" / LOCK_NAME).exists()  # released on the way out


def test_poisoned_weights_are_refused_by_weights_and_resume(tmp_path, data, capsys):
    from freeanchor.config import preset
    from freeanchor.models.detector import FreeAnchor
    from freeanchor.models.weights import save_model

    cfg = preset("freeanchor_r18_fpn_1x", num_classes=2)
    cfg.fpn_channels = cfg.feat_channels = 64
    model = FreeAnchor(cfg)
    with torch.no_grad():
        model.fpn.fpn_convs[0].weight.fill_(math.inf)
    bad = save_model(model, tmp_path / "nan.safetensors", extra={})
    assert _train(data, tmp_path / "a", "--weights", str(bad)) == 2
    err = _one_error_line(capsys)
    assert "nan.safetensors" in err and "fpn.fpn_convs.0.weight holds NaN or infinite" in err
    # a last.pt holding a NaN (an older version's, say) is refused on --resume
    work = tmp_path / "b"
    assert _train(data, work, "--set", "train.max_iters=1") == 0
    ckpt = load_checkpoint(work / "last.pt")
    ckpt["model"]["head.retina_reg.bias"][0] = math.nan
    body = {k: v for k, v in ckpt.items() if k not in ("format", "version", "checksum")}
    CheckpointManager(work).save(body)
    capsys.readouterr()
    assert _train(data, work, "--resume", "--set", "train.max_iters=2") == 2
    err = _one_error_line(capsys)
    assert "last.pt" in err and "head.retina_reg.bias holds NaN or infinite" in err


def test_a_byte_flipped_last_pt_is_refused_on_resume(tmp_path, data, capsys):
    work = tmp_path / "w"
    assert _train(data, work, "--set", "train.max_iters=1") == 0
    raw = torch.load(work / "last.pt", weights_only=True)
    blob = bytearray((work / "last.pt").read_bytes())
    at = bytes(blob).index(raw["model"]["head.retina_cls.weight"].numpy().tobytes()[:64])
    blob[at + 10] ^= 0x01
    (work / "last.pt").write_bytes(bytes(blob))
    capsys.readouterr()
    assert _train(data, work, "--resume") == 2
    assert "last.pt: checksum mismatch, the file is corrupt" in _one_error_line(capsys)


# ----------------------------------------------------------------------------- one run per dir


def test_a_second_run_into_a_used_work_dir_is_refused(tmp_path, data, capsys):
    work = tmp_path / "w"
    assert _train(data, work, "--set", "train.max_iters=1") == 0
    capsys.readouterr()
    before = (work / "metrics.jsonl").read_text()
    assert _train(data, work, "--set", "train.max_iters=1") == 2
    err = _one_error_line(capsys)
    assert "already holds a run" in err and "--resume" in err and "new --work-dir" in err
    assert (work / "metrics.jsonl").read_text() == before  # untouched
    assert not (work / LOCK_NAME).exists()
    (tmp_path / "file").write_text("x")
    assert _train(data, tmp_path / "file") == 2
    assert "--work-dir" in (e := _one_error_line(capsys)) and "is a file, not a folder" in e


def test_the_lock_refuses_a_concurrent_run_and_a_stale_one_is_taken_over(tmp_path, data, capsys):
    import socket

    work = tmp_path / "w"
    work.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (work / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        assert _train(data, work, "--set", "train.max_iters=1") == 2
        err = _one_error_line(capsys)
        assert f"another run (pid {live.pid} on {socket.gethostname()})" in err
        assert not (work / "metrics.jsonl").exists()
    finally:
        live.kill()
        live.wait()
    # the owner is gone (kill -9): the lock is taken over with a warning, removed at the end
    stale = tmp_path / "w" / ".last.pt.0123456789ab.tmp.pt"  # a killed save's temp file
    stale.write_bytes(b"half")
    assert _train(data, work, "--set", "train.max_iters=1") == 0
    out = capsys.readouterr().out
    assert f"taking over the lock of pid {live.pid}, which no longer runs" in out
    assert "removed 1 stale temporary file" in out and not stale.exists()
    assert not (work / LOCK_NAME).exists()


def test_the_lock_is_held_while_the_trainer_lives(tmp_path, data):
    ann, img = data
    trainer = Trainer(small_config(ann, img, tmp_path / "w", max_iters=1))
    owner = json.loads((tmp_path / "w" / LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid()
    with pytest.raises(RuntimeError, match="another run"):
        Trainer(small_config(ann, img, tmp_path / "w", max_iters=1), resume=True)
    trainer.fit()
    assert not (tmp_path / "w" / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- user mistakes


def test_pretrained_torchvision_offline_is_one_line(tmp_path, data, capsys, monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    assert _train(data, tmp_path / "w", "--pretrained", "torchvision") == 2
    err = _one_error_line(capsys)
    assert "--pretrained torchvision: download failed" in err
    assert "https://download.pytorch.org/models/resnet18" in err and "--pretrained PATH" in err


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_epochs_below_one_are_refused(tmp_path, data, capsys, epochs):
    assert _train(data, tmp_path / "w", "--epochs", epochs) == 2
    assert "--epochs" in _one_error_line(capsys)
    assert not (tmp_path / "w").exists()


def test_image_root_and_pixel_limit_reach_the_training_data(tmp_path, capsys):
    ann, img = make_coco(tmp_path / "data", num_images=2)
    coco = json.loads(ann.read_text())
    (tmp_path / "outside.png").write_bytes((img / "0001.png").read_bytes())
    coco["images"][1]["file_name"] = "../../outside.png"
    ann.write_text(json.dumps(coco))
    base = ["--set", "train.max_iters=1"]
    assert _train((ann, img), tmp_path / "a", *base) == 2
    assert "outside" in _one_error_line(capsys)
    assert _train((ann, img), tmp_path / "b", *base, "--set", "data.allow_outside_root=true") == 0
    capsys.readouterr()
    # every image has 128x96 = 12288 pixels: a limit below refuses them as unreadable
    limits = ("--set", "data.max_image_pixels=12000", "--set", "data.max_bad_images=0")
    code = _train(
        (ann, img), tmp_path / "c", *base, "--set", "data.allow_outside_root=true", *limits
    )
    assert code == 2 and "more than the limit of 12,000" in _one_error_line(capsys)


def test_out_naming_a_file_and_bad_config_files_are_one_line(tmp_path, data, capsys):
    ann, img = data
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert main(["eval", "--weights", "w.pt", "--ann", str(ann), "--images", str(img),
                 "--out", str(a_file), "--device", "cpu"]) == 2  # fmt: skip
    assert f"--out {a_file}: is a file, not a folder" in _one_error_line(capsys)
    assert main(["predict", str(img / "0000.png"), "--weights", "w.pt", "--out", str(a_file),
                 "--device", "cpu"]) == 2  # fmt: skip
    assert f"--out {a_file}: is a file, not a folder" in _one_error_line(capsys)
    binary = tmp_path / "cfg.json"
    binary.write_bytes(b"\x00\x01\x02PK")
    for config, problem in ((tmp_path, "a folder"), (binary, "not a text file")):
        assert _train(data, tmp_path / "w", "--config", str(config)) == 2
        assert problem in _one_error_line(capsys)
