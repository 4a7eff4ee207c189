"""Human-readable evaluation output: per-class AP table, precision-recall plot, summary JSON."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from freeanchor.files import atomic_path, write_json


def metrics_line(metrics: Mapping[str, Any]) -> str:
    """The 12 COCO numbers on one line, in percent ("n/a": COCO's -1, no ground truth)."""
    from freeanchor.eval.coco import METRIC_NAMES

    def pct(value: float) -> str:
        return f"{100 * value:.2f}" if value >= 0 else "n/a"

    return " ".join(f"{k} {pct(metrics[k])}" for k in METRIC_NAMES if k in metrics)


def per_class_table(
    per_class: Mapping[str, float],
    per_class_ap50: Mapping[str, float] | None = None,
    sort: str = "id",
) -> str:
    """Fixed-width text table of per-class AP (values in %, '-' where a class has no GT).

    Args:
        per_class: {class_name: AP} in label order (as `COCOEvaluator.evaluate` returns it).
        per_class_ap50: optional second column {class_name: AP50}.
        sort: "id" (label order), "name" (alphabetical) or "ap" (best first).
    """
    if sort not in ("id", "name", "ap"):
        raise ValueError(f"unknown sort {sort!r}; choose id, name or ap")
    rows = list(enumerate(per_class.items()))
    if sort == "name":
        rows.sort(key=lambda r: r[1][0])
    elif sort == "ap":
        rows.sort(key=lambda r: -r[1][1])
    width = max([len("class")] + [len(name) for name in per_class])

    def fmt(v: float | None) -> str:
        return f"{100 * v:7.2f}" if v is not None and v >= 0 else f"{'-':>7}"

    header = f"{'id':>3}  {'class':<{width}}  {'AP':>7}"
    header += f"  {'AP50':>7}" if per_class_ap50 else ""
    lines = [header, "-" * len(header)]
    for label, (name, ap) in rows:
        line = f"{label:>3}  {name:<{width}}  {fmt(ap)}"
        if per_class_ap50:
            line += f"  {fmt(per_class_ap50.get(name))}"
        lines.append(line)
    return "\n".join(lines)


def pr_curves(precision: np.ndarray) -> dict[str, np.ndarray]:
    """Class-mean precision at the 101 recall points, area all, last maxDets.

    Args:
        precision: COCOeval `eval["precision"]` [T, R, K, A, M] (-1 = undefined).

    Returns:
        {"IoU=0.50": [R], "IoU=0.50:0.95": [R]}; NaN where no class is defined.
    """
    p = np.asarray(precision, dtype=np.float64)[:, :, :, 0, -1]  # [T, R, K]

    def mean_over_classes(x: np.ndarray) -> np.ndarray:  # [..., R, K] -> [R]
        x = np.where(x > -1, x, np.nan)
        valid = ~np.isnan(x)
        total = np.nansum(x, axis=-1)
        count = valid.sum(axis=-1)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no class defined
            out = total / count
            return out if out.ndim == 1 else np.nanmean(out, axis=0)

    return {"IoU=0.50": mean_over_classes(p[0]), "IoU=0.50:0.95": mean_over_classes(p)}


def plot_pr_curve(coco_eval: Any, path: str | Path) -> Path:
    """PNG of the precision-recall curves at IoU 0.5 and averaged over IoU 0.5:0.95.

    Args:
        coco_eval: an evaluated COCOeval (either backend; `COCOEvaluator.coco_eval`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recall = np.asarray(coco_eval.params.recThrs, dtype=np.float64)
    curves = pr_curves(coco_eval.eval["precision"])
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    for label, prec in curves.items():
        ap = float(np.mean(prec)) if np.isfinite(prec).all() else float("nan")
        ax.plot(recall, prec, label=f"{label} (AP {100 * ap:.1f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title("COCO box precision-recall (class mean)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def _json_safe(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_summary(path: str | Path, metrics: Mapping[str, Any], **extra: Any) -> Path:
    """Write metrics (+ extra fields, e.g. weights, ann_file) as indented JSON, atomically."""
    return write_json(path, _json_safe({**metrics, **extra}))
    return path
