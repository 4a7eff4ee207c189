"""Metrics log: JSONL records, console lines and bar within 80 columns, training-only rate and
ETA, schedule warnings, TensorBoard events, curve PNG."""

from __future__ import annotations

import json
import re

from freeanchor.engine import logging as train_logging
from freeanchor.engine.curves import plot_curves
from freeanchor.engine.logging import TrainLogger, read_jsonl
from freeanchor.engine.trainer import train

from .conftest import small_config


def _run(tmp_path, tty=False):
    log = TrainLogger(tmp_path, total_iters=6, log_every=2, tty=tty)
    log.start_epoch(0, 2, 3)
    for i in range(3):
        log.log_iter(i + 1, i + 1, {"loss": 3.0 - i, "lr": 0.01})
    log.end_epoch()
    log.log_eval(1, 3, {"AP": 0.25, "AP50": 0.5, "per_class": {"a": 0.1}})
    log.log_skip(4, "non-finite loss", {"loss": float("nan")})
    log.close()
    return log


def test_jsonl_records_and_plain_lines(tmp_path, capsys):
    log = _run(tmp_path)
    out = capsys.readouterr().out.splitlines()
    records = read_jsonl(log.jsonl)
    train_records = [r for r in records if r["type"] == "train"]
    # iteration 1 (always), 2 (log_every), 3 (end of epoch), each the mean of its window
    assert [(r["iter"], r["loss"]) for r in train_records] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert [r["AP"] for r in records if r["type"] == "val"] == [0.25]
    assert all("per_class" not in r for r in records)  # only scalars go to the log
    skip = [r for r in records if r["type"] == "skip"]
    assert skip[0]["iter"] == 4 and skip[0]["loss"] != skip[0]["loss"]  # NaN kept
    assert any(line.startswith("ep 1/2 it 2/6 loss 2.000 lr 1.0e-02") for line in out)
    assert "epoch 1 evaluation: AP=0.250 AP50=0.500 (COCO, 0-1)" in out
    assert any("iteration 4: non-finite loss; step skipped" in line for line in out)
    assert all(len(line) <= 80 for line in out if line.startswith("ep "))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_first_and_last_iterations_of_a_short_run_are_logged(tmp_path):
    log = TrainLogger(tmp_path, total_iters=2, log_every=20, tensorboard=False, tty=False)
    log.start_epoch(0, 1, 5)  # the run stops (max_iters) before the epoch ends
    log.log_iter(1, 1, {"loss": 2.0})
    log.log_iter(2, 2, {"loss": 1.0})
    log.close()
    assert [r["iter"] for r in read_jsonl(log.jsonl) if r["type"] == "train"] == [1, 2]


def test_a_two_iteration_training_run_logs_iteration_1(tmp_path, tiny_coco):
    """The real trainer: a record at iteration 1, and the warning about no validation set."""
    ann, img = tiny_coco
    cfg = small_config(ann, img, tmp_path / "w", max_iters=2, log_every=20, epochs=1)
    train(cfg)
    records = read_jsonl(tmp_path / "w" / "metrics.jsonl")
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2]
    messages = [r["message"] for r in records if r["type"] == "info"]
    assert any(m.startswith("warning: no validation set") for m in messages)


def test_rate_and_eta_count_training_time_only(tmp_path, monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 2.0, 12.0, 13.0, 14.0, 14.0])  # 10 s of evaluation at 2..12
    monkeypatch.setattr(train_logging.time, "perf_counter", lambda: next(clock))
    log = TrainLogger(tmp_path, total_iters=6, log_every=1, tensorboard=False, tty=False)
    log.start_epoch(0, 3, 2)
    log.log_iter(1, 1, {"loss": 1.0})
    log.log_iter(2, 2, {"loss": 1.0})
    log.end_epoch()
    log.start_epoch(1, 3, 2)  # after the evaluation
    log.log_iter(3, 1, {"loss": 1.0})
    log.log_iter(4, 2, {"loss": 1.0})
    log.end_epoch()
    train_records = [r for r in read_jsonl(log.jsonl) if r["type"] == "train"]
    assert [r["sec_per_iter"] for r in train_records] == [1.0, 1.0, 1.0, 1.0]
    assert [r["eta_s"] for r in train_records] == [5.0, 4.0, 3.0, 2.0]
    # overall: + 10 s per end of epoch still to come (this one and the next)
    assert train_records[2]["eta_all_s"] == 3.0 + 10.0 * 2
    assert train_records[0]["eta_all_s"] == 5.0  # no evaluation measured yet


def test_tty_bar_moves_every_step_within_80_columns(tmp_path, capsys):
    _run(tmp_path, tty=True)
    err = capsys.readouterr().err
    assert "ep 1/2" in err and "3/3" in err  # tqdm draws on stderr
    frames = [f for f in re.split(r"[\r\n]", err) if f.strip()]
    assert frames and all(len(f) <= 80 for f in frames), max(frames, key=len)
    for step, loss in ((1, "3.000"), (2, "2.000"), (3, "1.000")):  # a frame per step
        assert any(f"{step}/3, loss {loss} lr 1.0e-02" in f for f in frames), (step, frames)


def test_truncate_after_and_torn_line(tmp_path):
    log = _run(tmp_path)
    with log.jsonl.open("a") as f:
        f.write('{"type": "train", "iter": 9')  # torn by a kill -9
    assert read_jsonl(log.jsonl)[-1]["iter"] == 4
    log.truncate_after(3)
    assert max(r["iter"] for r in read_jsonl(log.jsonl)) == 3
    assert all(json.loads(line) for line in log.jsonl.read_text().splitlines())


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    log = TrainLogger(tmp_path / "x", enabled=False)
    log.start_epoch(0, 1, 1)
    log.log_iter(1, 1, {"loss": 1.0})
    log.log_eval(1, 1, {"AP": 0.1})
    log.warn("nothing")
    log.close()
    assert not (tmp_path / "x").exists() and capsys.readouterr().out == ""


def test_plot_curves(tmp_path):
    log = _run(tmp_path)
    png = plot_curves(log.jsonl, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(tmp_path / "missing.jsonl", tmp_path / "none.png") is None
