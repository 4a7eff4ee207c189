"""Metrics log: JSONL records, plain console lines off a TTY, TensorBoard events, curve PNG."""

from __future__ import annotations

import json

from freeanchor.engine.logging import TrainLogger, plot_curves, read_jsonl


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
    train = [r for r in records if r["type"] == "train"]
    # iteration 2 (log_every) and 3 (end of epoch), each the mean of its window
    assert [(r["iter"], r["loss"]) for r in train] == [(2, 2.5), (3, 1.0)]
    assert [r["AP"] for r in records if r["type"] == "val"] == [0.25]
    assert "per_class" not in records[2]  # only scalars go to the log
    skip = [r for r in records if r["type"] == "skip"]
    assert skip[0]["iter"] == 4 and skip[0]["loss"] != skip[0]["loss"]  # NaN kept
    assert any(line.startswith("epoch 1/2 [2/3] iter 2/6") for line in out)
    assert any("iteration 4: non-finite loss; step skipped" in line for line in out)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


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
    log.close()
    assert not (tmp_path / "x").exists() and capsys.readouterr().out == ""


def test_tty_progress_bar(tmp_path, capsys):
    _run(tmp_path, tty=True)
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "3/3" in err  # tqdm draws on stderr


def test_plot_curves(tmp_path):
    log = _run(tmp_path)
    png = plot_curves(log.jsonl, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(tmp_path / "missing.jsonl", tmp_path / "none.png") is None
