"""The training loop in-process: learning, skipped non-finite steps, stop signals and resume."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from freeanchor.engine.checkpoint import load_checkpoint
from freeanchor.engine.logging import read_jsonl
from freeanchor.engine.trainer import Trainer, train
from freeanchor.errors import TrainingDivergedError
from freeanchor.models.detector import FreeAnchor

from .conftest import REPO, make_coco, small_config


def _weights(work_dir):
    return load_checkpoint(work_dir / "last.pt")["model"]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _patch_loss(monkeypatch, hook):
    """Wrap FreeAnchor.loss; `hook(call_number, losses)` may change or replace the losses."""
    original = FreeAnchor.loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        return hook(calls["n"], original(self, *args, **kwargs))

    monkeypatch.setattr(FreeAnchor, "loss", loss)
    return calls


def test_a_few_iterations_lower_the_loss(tmp_path):
    # One batch of two images seen again and again: the loss must go down.
    ann, img = make_coco(tmp_path / "data", num_images=2, seed=1)
    cfg = small_config(ann, img, tmp_path / "w", epochs=12, lr=0.1, milestones=(),
                       checkpoint_every=0)  # fmt: skip
    losses = train(cfg)["losses"]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.05, losses
    # the written artefacts of a finished run
    work = tmp_path / "w"
    for name in ("last.pt", "epoch_12.pt", "model_final.safetensors", "curves.png"):
        assert (work / name).is_file(), name
    from freeanchor.models.weights import load_model

    final = load_model(work / "model_final.safetensors")
    assert final.extra["cat_ids"] == [1, 2] and final.cfg.classes == ["red", "blue"]
    _assert_same(final.state_dict(), _weights(work))


def test_non_finite_loss_skips_the_step(tmp_path, monkeypatch, tiny_coco):
    ann, img = tiny_coco
    ref = small_config(ann, img, tmp_path / "ref", lr=0.05, max_iters=1, checkpoint_every=0)
    train(ref)

    def nan_on_second(n, losses):
        return {k: v * math.nan for k, v in losses.items()} if n == 2 else losses

    _patch_loss(monkeypatch, nan_on_second)
    cfg = small_config(ann, img, tmp_path / "nan", lr=0.05, max_iters=2, checkpoint_every=0)
    out = train(cfg)
    assert out["skipped_steps"] == 1 and math.isnan(out["losses"][1])
    # the skipped step changed nothing: same weights (and momentum) as after one step
    _assert_same(_weights(tmp_path / "nan"), _weights(tmp_path / "ref"))
    skips = [r for r in read_jsonl(tmp_path / "nan" / "metrics.jsonl") if r["type"] == "skip"]
    assert len(skips) == 1 and skips[0]["iter"] == 2 and "non-finite loss" in skips[0]["reason"]


def test_too_many_bad_steps_stop_with_a_clear_error(tmp_path, monkeypatch, tiny_coco, capsys):
    ann, img = tiny_coco
    _patch_loss(monkeypatch, lambda n, losses: {k: v * math.inf for k, v in losses.items()})
    cfg = small_config(ann, img, tmp_path / "w", max_bad_steps=3, checkpoint_every=0)
    with pytest.raises(TrainingDivergedError, match="3 steps in a row skipped.*iteration 3"):
        train(cfg)
    # through the CLI: one line on stderr, exit code 1
    from freeanchor.cli import main

    code = main(["train", "--model", "freeanchor_r18_fpn_1x", "--train-ann", str(ann),
                 "--train-images", str(img), "--work-dir", str(tmp_path / "cli"),
                 "--device", "cpu", "--set", "model.input_scale=128,96",
                 "--set", "data.workers=0", "--set", "train.max_bad_steps=2"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "2 steps in a row skipped" in err[0]


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    ann, img = make_coco(tmp_path / "data", num_images=6)
    kw = dict(epochs=2, lr=0.05, checkpoint_every=0)  # 3 iterations per epoch
    train(small_config(ann, img, tmp_path / "ref", **kw))

    def term_on_fourth(n, losses):
        if n == 4:  # during iteration 4 (the first of epoch 2)
            os.kill(os.getpid(), signal.SIGTERM)
        return losses

    calls = _patch_loss(monkeypatch, term_on_fourth)
    cfg = small_config(ann, img, tmp_path / "run", **kw)
    with pytest.raises(SystemExit) as stop:
        train(cfg)
    assert stop.value.code == 128 + signal.SIGTERM
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (ckpt["epoch"], ckpt["iter_in_epoch"], ckpt["iteration"]) == (1, 1, 4)
    calls["n"] = 100  # no more signals
    out = Trainer(small_config(ann, img, tmp_path / "run", **kw), resume=True).fit()
    assert out["iterations"] == 6 and len(out["losses"]) == 2
    _assert_same(_weights(tmp_path / "run"), _weights(tmp_path / "ref"))
    # the log holds each iteration once
    iters = [r["iter"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
             if r["type"] == "train"]  # fmt: skip
    assert iters == [1, 2, 3, 4, 5, 6]


def test_sigusr1_writes_a_checkpoint_and_training_goes_on(tmp_path, monkeypatch, tiny_coco):
    ann, img = tiny_coco

    def usr1_on_second(n, losses):
        if n == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return losses

    _patch_loss(monkeypatch, usr1_on_second)
    seen = []
    original = Trainer._save

    def spy(self, *args, **kwargs):
        seen.append(self.pos.iteration)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_save", spy)
    out = train(small_config(ann, img, tmp_path / "w", checkpoint_every=0, max_iters=4))
    assert out["iterations"] == 4
    assert seen == [2, 4]  # on demand after iteration 2, and at the end


def test_checkpoint_every_n_iterations(tmp_path, monkeypatch, tiny_coco):
    ann, img = tiny_coco
    seen = []
    original = Trainer._save

    def spy(self, *args, **kwargs):
        seen.append((self.pos.iteration, kwargs.get("epoch_done")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_save", spy)
    train(small_config(ann, img, tmp_path / "w", epochs=2, checkpoint_iters=3, checkpoint_every=1))
    # 4 iterations per epoch: every 3 iterations, plus each epoch end
    assert seen == [(3, None), (4, 1), (6, None), (8, 2)]


@pytest.mark.parametrize("amp, channels_last", [("bf16", True), ("fp16", False)])
def test_amp_and_channels_last_train(tmp_path, tiny_coco, amp, channels_last):
    ann, img = tiny_coco
    cfg = small_config(ann, img, tmp_path / "w", lr=0.05, max_iters=2, checkpoint_every=0,
                       amp=amp, channels_last=channels_last)  # fmt: skip
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.head.state_dict().items()}
    out = trainer.fit()
    assert out["skipped_steps"] == 0 and all(math.isfinite(v) for v in out["losses"])
    after = trainer.model.head.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it did learn something
    assert all(v.dtype == torch.float32 for v in after.values())  # master weights stay fp32
    saved = load_checkpoint(tmp_path / "w" / "last.pt")
    assert bool(saved["scaler"]) == (amp == "fp16")  # GradScaler state only for fp16


def test_unreadable_images_are_counted_and_reported(tmp_path, capsys):
    ann, img = make_coco(tmp_path / "data", num_images=4)
    (img / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = small_config(ann, img, tmp_path / "w", checkpoint_every=0)
    out = train(cfg)
    assert out["skipped_images"] == 1 and out["iterations"] == 2
    assert "skipped unreadable image" in capsys.readouterr().out
    cfg = small_config(ann, img, tmp_path / "w2", checkpoint_every=0)
    cfg.data.max_bad_images = 0
    with pytest.raises(ValueError, match="unreadable training images.*0002.png"):
        train(cfg)


def test_init_weights_from_a_model_with_other_classes(tmp_path, tiny_coco):
    from freeanchor.config import preset
    from freeanchor.models.weights import save_model

    ann, img = tiny_coco
    other = preset("freeanchor_r18_fpn_1x", num_classes=3)
    other.fpn_channels = other.feat_channels = 64
    torch.manual_seed(123)
    source = FreeAnchor(other)
    path = save_model(source, tmp_path / "src.safetensors", extra={})
    cfg = small_config(ann, img, tmp_path / "w", max_iters=1)
    trainer = Trainer(cfg, init_weights=str(path))
    got, src = trainer.model.state_dict(), source.state_dict()
    assert torch.equal(got["fpn.fpn_convs.0.weight"], src["fpn.fpn_convs.0.weight"])
    cls = "head.retina_cls.weight"
    assert got[cls].shape[0] == 9 * 2 and not torch.equal(got[cls][:18], src[cls][:18])


def test_a_script_holding_the_trainer_exits_with_workers(tmp_path):
    # Workers ignore SIGTERM; at interpreter exit a still-referenced trainer's persistent
    # workers must already be stopped, or multiprocessing's exit hook waits on them forever.
    import subprocess
    import sys

    from .conftest import cli_env

    ann, img = make_coco(tmp_path / "data", num_images=4)
    script = (
        "import sys\n"
        "from tests.engine.conftest import small_config\n"
        "from freeanchor.engine.trainer import Trainer\n"
        "from pathlib import Path\n"
        "cfg = small_config(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), max_iters=2)\n"
        "cfg.data.workers = 1\n"
        "trainer = Trainer(cfg)\n"
        "trainer.fit()\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(ann), str(img), str(tmp_path / "w")],
        env=cli_env(), cwd=str(REPO), timeout=180, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "w" / "model_final.safetensors").is_file()
