"""`freeanchor compare`: FreeAnchor against RetinaNet on your data, everything else held equal.

    freeanchor compare --demo --out cmp --iters 300 --seeds 0,1,2
    freeanchor compare --losses freeanchor,retinanet --model freeanchor_mobilenetv2_fpn_1x \
        --pretrained weights.pth --train-ann A.json --train-images DIR \
        --val-ann V.json --val-images VDIR --epochs 12 --seeds 0,1,2 --out cmp

Each loss is trained with the standard trainer once per seed, on the same data, backbone,
schedule and budget, into OUT/<loss>/seed_<k>; only the loss differs (and, for RetinaNet, its
own box coder: target stds 1.0, as MMDetection's and torchvision's RetinaNet). The config is
`freeanchor train`'s (same flags and --set), or with --demo the demo's (synthetic data made
once in OUT/data, `freeanchor.demo`). Prints AP, AP50, AP75, AP_s/m/l per loss as
median [min-max] over the seeds, and the paired per-seed difference; writes OUT/compare.json
and OUT/compare.png (loss per iteration and AP per epoch of every run).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

from freeanchor.config import Config, apply_override
from freeanchor.errors import OptionError

LOSSES = ("freeanchor", "retinanet")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
COLOURS = {"freeanchor": "tab:blue", "retinanet": "tab:orange"}


def parse_list(text: str, name: str, cast=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise OptionError(f"--{name}: give a comma-separated list, got {text!r}")
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise OptionError(f"--{name}: cannot read {text!r} as a list of {cast.__name__}") from None


def run_config(base: Config, loss: str, seed: int, work_dir: Path) -> Config:
    """`base` with only the loss (and its coder), the seed and the work dir changed."""
    from freeanchor.models.retinanet_loss import retinanet_config

    cfg = copy.deepcopy(base)
    if loss == "retinanet":
        cfg.model = retinanet_config(cfg.model)
    else:
        cfg.model.loss = loss
    cfg.train.seed = seed
    cfg.work_dir = str(work_dir)
    return cfg


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]], losses: list[str]) -> dict[str, Any]:
    """Per loss and metric: median, min, max over the seeds; the paired differences of the
    other losses from the first one (same seed)."""
    out: dict[str, Any] = {}
    for loss in losses:
        mine = [r for r in runs if r["loss"] == loss]
        out[loss] = {m: spread([r["metrics"][m] for r in mine]) for m in METRICS}
    first = {r["seed"]: r for r in runs if r["loss"] == losses[0]}
    for loss in losses[1:]:
        pairs = [(first[r["seed"]], r) for r in runs if r["loss"] == loss and r["seed"] in first]
        out[f"{losses[0]} - {loss}"] = {m: _differences(pairs, m) for m in METRICS}
    return out


def _differences(pairs: list[tuple[dict, dict]], metric: str) -> dict[str, float]:
    """Spread of the paired differences; n/a (-1) when no pair has the metric (COCO's -1)."""
    diffs = [a["metrics"][metric] - b["metrics"][metric] for a, b in pairs
             if min(a["metrics"][metric], b["metrics"][metric]) >= 0]  # fmt: skip
    return spread(diffs) if diffs else {"median": -1.0, "min": -1.0, "max": -1.0}


def format_table(summary: dict[str, Any], seeds: list[int]) -> str:
    """The summary as text: COCO's 0-1 fractions, median [min-max] over the seeds."""
    head = f"{'':<24}" + "".join(f"{m:>24}" for m in METRICS)
    lines = [f"COCO box AP (COCO, 0-1), median [min-max] over seeds {seeds}", head]
    for name, row in summary.items():

        def cell(s: dict[str, float]) -> str:
            if s["median"] == -1 and s["min"] == -1:  # COCO's -1: no gt of that size
                return f"{'n/a':>24}"
            return f"{s['median']:>8.3f} [{s['min']:.3f}, {s['max']:.3f}]"

        lines.append(f"{name:<24}" + "".join(f"{cell(row[m]):>24}" for m in METRICS))
    return "\n".join(lines)


def plot_runs(runs: list[dict[str, Any]], out_png: Path) -> Path:
    """Loss per iteration (left) and validation AP per epoch (right) of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from freeanchor.engine.logging import read_jsonl
    from freeanchor.eval.report import SCALE_NOTE
    from freeanchor.files import atomic_path

    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    labelled: set[tuple[str, str]] = set()
    for run in runs:
        records = read_jsonl(Path(run["work_dir"]) / "metrics.jsonl")
        colour, loss = COLOURS.get(run["loss"], None), run["loss"]
        train = [(r["iter"], r["loss"]) for r in records if r.get("type") == "train"]
        val = [(r["epoch"], r["AP"]) for r in records if r.get("type") == "val" and "AP" in r]
        for ax, pts, kind in ((ax_loss, train, "loss"), (ax_ap, val, "AP")):
            if pts:
                label = loss if (loss, kind) not in labelled else None
                labelled.add((loss, kind))
                ax.plot(*zip(*pts, strict=True), color=colour, alpha=0.7, label=label,
                        marker="o" if kind == "AP" else None)  # fmt: skip
    ax_loss.set(xlabel="iteration", ylabel="training loss (each its own: scales differ)",
                title="training loss, every seed")  # fmt: skip
    ax_ap.set(xlabel="epoch", ylabel=f"AP {SCALE_NOTE}", title="validation AP, every seed")
    for ax in (ax_loss, ax_ap):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out_png


def demo_base(out: Path, args) -> Config:
    """The demo's config on its synthetic data (made once, in OUT/data)."""
    from freeanchor import demo
    from freeanchor.data.synthetic import make_dataset

    num_train = args.num_train or demo.NUM_TRAIN
    num_val = args.num_val or demo.NUM_VAL
    data = make_dataset(out / "data", num_train, num_val, demo.IMAGE_SIZE, 0, demo.DIFFICULTY)
    return demo.demo_config(data, out / "runs", args.iters, seed=0)


def base_config(args) -> Config:
    """The shared config: the demo's (--demo) or `freeanchor train`'s, then --set."""
    out = Path(args.out)
    if args.demo:
        cfg = demo_base(out, args)
        for assignment in args.set or []:
            apply_override(cfg, assignment)
        return cfg
    from freeanchor.engine.train import build_config

    if not args.train_ann:
        raise OptionError("give --train-ann/--train-images/--val-ann/--val-images, or --demo")
    if args.iters:
        args.set = [*(args.set or []), f"train.max_iters={args.iters}"]
    return build_config(args)


def run_compare(args) -> int:
    """Train every loss for every seed, then print and write the comparison."""
    from freeanchor.engine.trainer import train
    from freeanchor.files import write_json, write_text

    losses = parse_list(args.losses, "losses")
    for loss in losses:
        if loss not in LOSSES:
            raise OptionError(f"--losses: unknown loss {loss!r} (known: {', '.join(LOSSES)})")
    seeds = parse_list(args.seeds, "seeds", int)
    if args.iters is not None and args.iters < 1:
        raise OptionError(f"--iters must be >= 1, got {args.iters}")
    out = Path(args.out)
    base = base_config(args)
    if not (base.data.val_ann and base.data.val_images):
        raise OptionError("the comparison needs validation data (--val-ann, --val-images)")
    if args.eval_every is not None:
        base.train.eval_every = args.eval_every
    runs = []
    for seed in seeds:  # seed-major: a stopped comparison still has pairs
        for loss in losses:
            cfg = run_config(base, loss, seed, out / loss / f"seed_{seed}")
            print(f"[compare] {loss}, seed {seed} -> {cfg.work_dir}", flush=True)
            t = time.time()
            result = train(cfg)
            metrics = result["last_metrics"] or {}
            runs.append({"loss": loss, "seed": seed, "work_dir": cfg.work_dir,
                         "iterations": result["iterations"], "seconds": round(time.time() - t, 1),
                         "metrics": {m: float(metrics.get(m, -1)) for m in METRICS}})  # fmt: skip
    summary = summarise(runs, losses)
    table = format_table(summary, seeds)
    iters = runs[0]["iterations"]
    tc = base.train
    budget = (f"{iters} iterations x {tc.batch_size} images, {base.model.backbone}, "
              f"lr {tc.lr:g} ({tc.optimizer}), data {base.data.train_ann}")  # fmt: skip
    text = f"{table}\nbudget: {budget}\n"
    write_text(out / "compare.txt", text)
    plot = plot_runs(runs, out / "compare.png")
    write_json(out / "compare.json", {"losses": losses, "seeds": seeds, "budget": budget,
                                      "ap_scale": "fraction", "summary": summary,
                                      "runs": runs})  # fmt: skip
    print(text + f"plot: {plot}\nJSON: {out / 'compare.json'}")
    print(json.dumps({k: v["AP"]["median"] for k, v in summary.items()}), flush=True)
    return 0
