"""Model EMA: the update rule by hand, skipped steps, evaluation and release, exact resume."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from freeanchor.engine import trainer as trainer_module
from freeanchor.engine.checkpoint import load_checkpoint
from freeanchor.engine.ema import ModelEMA
from freeanchor.engine.trainer import Trainer, train
from freeanchor.models.detector import FreeAnchor

from .conftest import make_coco, small_config


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_update_rule_by_hand():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    w0 = net[0].weight.detach().clone()
    ema = ModelEMA(net, decay=0.9, ramp=10)
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].num_batches_tracked.fill_(7)
    ema.update(net)
    d1 = 0.9 * (1 - math.exp(-1 / 10))
    assert ema.factor(1) == pytest.approx(d1)
    torch.testing.assert_close(ema.module[0].weight, d1 * w0 + (1 - d1) * (w0 + 1))
    assert int(ema.module[1].num_batches_tracked) == 7  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())
    # the ramp: d(n) -> decay
    assert ema.factor(10**6) == pytest.approx(0.9) and ema.factor(1) < ema.factor(2)
    restored = ModelEMA(net, decay=0.9, ramp=10)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1
    assert torch.equal(restored.module[0].weight, ema.module[0].weight)


def _state(work, key):
    ckpt = load_checkpoint(work / "last.pt")
    return ckpt["model"] if key == "model" else ckpt["ema"]["model"]


def test_ema_resume_is_bitwise_exact_and_released(tmp_path, monkeypatch):
    ann, img = make_coco(tmp_path / "data", num_images=6)
    kw = dict(epochs=2, lr=0.05, checkpoint_every=0, ema=True, ema_decay=0.9)
    ref = train(small_config(ann, img, tmp_path / "ref", **kw))
    assert ref["iterations"] == 6

    original, calls = FreeAnchor.loss, {"n": 0}

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # during iteration 4: SIGTERM -> checkpoint and stop
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FreeAnchor, "loss", loss)
    with pytest.raises(SystemExit):
        train(small_config(ann, img, tmp_path / "run", **kw))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["ema"]["updates"] == 4
    calls["n"] = 100
    Trainer(small_config(ann, img, tmp_path / "run", **kw), resume=True).fit()
    for key in ("model", "ema"):
        a, b = _state(tmp_path / "ref", key), _state(tmp_path / "run", key)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (key, k)
    # the EMA differs from the raw weights, and it is what model_final and load_model give
    raw, avg = _state(tmp_path / "ref", "model"), _state(tmp_path / "ref", "ema")
    assert not torch.equal(raw["head.retina_cls.weight"], avg["head.retina_cls.weight"])
    from freeanchor.models.weights import load_model

    for name in ("model_final.safetensors", "last.pt"):
        got = load_model(tmp_path / "ref" / name).state_dict()
        assert all(torch.equal(got[k], avg[k]) for k in avg), name


def test_skipped_steps_leave_the_ema_alone_and_evaluation_uses_it(tmp_path, monkeypatch):
    ann, img = make_coco(tmp_path / "data", num_images=4)
    cfg = small_config(ann, img, tmp_path / "w", epochs=2, lr=0.05, checkpoint_every=0, ema=True,
                       ema_ramp=7)  # fmt: skip
    cfg.data.val_ann, cfg.data.val_images = str(ann), str(img)
    original, calls = FreeAnchor.loss, {"n": 0}

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        out = original(self, *args, **kwargs)
        return {k: v * math.nan for k, v in out.items()} if calls["n"] == 2 else out

    monkeypatch.setattr(FreeAnchor, "loss", loss)
    seen = []
    real_evaluate = trainer_module.evaluate

    def spy(model, *args, **kwargs):
        seen.append(model)
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", spy)
    trainer = Trainer(cfg)
    out = trainer.fit()
    assert out["skipped_steps"] == 1 and trainer.ema.updates == 3  # 4 iterations, 1 skipped
    assert trainer.ema.ramp == 7  # train.ema_ramp reaches the EMA
    assert seen and all(m is trainer.ema.module for m in seen)
