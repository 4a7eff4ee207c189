"""`freeanchor compare`: the table's arithmetic, the option checks, and a tiny run end to end."""

from __future__ import annotations

import json

import pytest
import torch

from freeanchor.cli import main
from freeanchor.config import Config
from freeanchor.tools.compare import METRICS, format_table, run_config, summarise


def _run(loss, seed, ap):
    return {"loss": loss, "seed": seed, "metrics": {m: ap for m in METRICS} | {"APl": -1.0}}


def test_summary_is_median_min_max_and_paired_differences():
    runs = [_run("freeanchor", 0, 0.30), _run("retinanet", 0, 0.20),
            _run("freeanchor", 1, 0.10), _run("retinanet", 1, 0.25),
            _run("freeanchor", 2, 0.20), _run("retinanet", 2, 0.15)]  # fmt: skip
    s = summarise(runs, ["freeanchor", "retinanet"])
    assert s["freeanchor"]["AP"] == {"median": 0.20, "min": 0.10, "max": 0.30}
    assert s["retinanet"]["AP"] == {"median": 0.20, "min": 0.15, "max": 0.25}
    diff = s["freeanchor - retinanet"]["AP"]  # per seed: +0.10, -0.15, +0.05
    assert diff["median"] == pytest.approx(0.05) and diff["min"] == pytest.approx(-0.15)
    assert s["freeanchor - retinanet"]["APl"]["median"] == -1  # no large objects: n/a
    table = format_table(s, [0, 1, 2])
    assert "0.200 [0.100, 0.300]" in table and "0.050 [-0.150, 0.100]" in table and "n/a" in table
    assert "(COCO, 0-1)" in table


def test_only_the_loss_coder_seed_and_work_dir_differ(tmp_path):
    base = Config()
    fa = run_config(base, "freeanchor", 3, tmp_path / "a")
    rn = run_config(base, "retinanet", 3, tmp_path / "b")
    assert (fa.model.loss, rn.model.loss) == ("freeanchor", "retinanet")
    assert rn.model.target_stds == (1.0, 1.0, 1.0, 1.0)
    assert fa.model.target_stds == base.model.target_stds and fa.train.seed == 3
    rn.model.loss, rn.model.target_stds = fa.model.loss, fa.model.target_stds
    assert rn.model == fa.model and rn.train == fa.train and rn.data == fa.data
    assert base.train.seed == 0  # the base is not changed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--losses", "freeanchor,yolo", "--demo"], "unknown loss 'yolo'"),
        (["--seeds", "a,b", "--demo"], "--seeds"),
        (["--iters", "3"], "--demo"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["compare", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_compare_runs_end_to_end_on_a_tiny_synthetic_set(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: threads only add contention on a shared CPU
    try:
        argv = ["compare", "--demo", "--out", str(tmp_path), "--num-train", "8",
                "--num-val", "4", "--iters", "2", "--seeds", "1"]  # fmt: skip
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "freeanchor - retinanet" in out and "median [min-max]" in out
    result = json.loads((tmp_path / "compare.json").read_text())
    runs = {(r["loss"], r["seed"]) for r in result["runs"]}
    assert runs == {("freeanchor", 1), ("retinanet", 1)}
    assert all(r["iterations"] == 2 for r in result["runs"])
    assert set(result["summary"]["retinanet"]) == set(METRICS)
    assert (tmp_path / "compare.png").stat().st_size > 0
    for loss in ("freeanchor", "retinanet"):  # separate work dirs, each a full run
        assert (tmp_path / loss / "seed_1" / "model_final.safetensors").is_file()
    from freeanchor.models.weights import load_model

    trained = load_model(tmp_path / "retinanet" / "seed_1" / "model_final.safetensors")
    assert trained.cfg.loss == "retinanet" and trained.box_coder.stds == (1.0,) * 4
