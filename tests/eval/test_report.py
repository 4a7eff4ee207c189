"""One AP convention (COCO's 0-1 fractions, 3 decimals, labelled) in every report."""

from __future__ import annotations

import json

import numpy as np

from freeanchor.eval.coco import METRIC_NAMES
from freeanchor.eval.report import (
    SCALE_NOTE,
    ap_fields,
    fmt_ap,
    metrics_line,
    per_class_table,
    plot_pr_curve,
    summary_dict,
    write_summary,
)

METRICS = {k: 0.0 for k in METRIC_NAMES} | {"AP": 0.38649, "AP50": 0.5416, "APl": -1.0}


def test_values_are_fractions_with_three_decimals():
    assert fmt_ap(0.38649) == "0.386" and fmt_ap(1.0) == "1.000" and fmt_ap(0.0) == "0.000"
    assert fmt_ap(-1.0) == "n/a" and fmt_ap(None) == "n/a" and fmt_ap(float("nan")) == "n/a"
    assert ap_fields(METRICS) == "AP=0.386 AP50=0.542 AP75=0.000"


def test_console_line_is_labelled_once():
    line = metrics_line(METRICS)
    assert line.startswith("AP=0.386 AP50=0.542 ") and line.endswith(SCALE_NOTE)
    assert "APl=n/a" in line and line.count("(COCO, 0-1)") == 1
    assert "38.6" not in line  # no percent anywhere


def test_per_class_table_caption_and_values():
    lines = per_class_table({"dog": 0.25, "cat": -1.0}, {"dog": 0.5, "cat": -1.0}).splitlines()
    assert lines[0].startswith("per-class AP (COCO, 0-1)")
    assert lines[3].split() == ["0", "dog", "0.250", "0.500"]
    assert lines[4].split() == ["1", "cat", "-", "-"]


def test_json_full_precision_with_scale(tmp_path):
    data = json.loads(write_summary(tmp_path / "m.json", METRICS, weights="w").read_text())
    assert data["ap_scale"] == "fraction" and data["AP"] == 0.38649  # not rounded
    assert summary_dict(METRICS)["AP50"] == 0.5416 and summary_dict({})["ap_scale"] == "fraction"


def test_pr_legend_uses_the_same_scale(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    class FakeEval:  # one class, precision 0.5 at every recall for both IoU rows
        class params:
            recThrs = np.linspace(0, 1, 101)

        eval = {"precision": np.full((10, 101, 1, 4, 3), 0.5)}

    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", figs.append)
    plot_pr_curve(FakeEval(), tmp_path / "pr.png")
    texts = [t.get_text() for t in figs[0].axes[0].get_legend().get_texts()]
    assert texts == ["IoU=0.50 (AP=0.500)", "IoU=0.50:0.95 (AP=0.500)"]
    assert "0-1" in figs[0].axes[0].get_title()
    close(figs[0])
