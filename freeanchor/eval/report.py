"""Human-readable evaluation output: per-class AP table, precision-recall plot, summary JSON.

One AP convention everywhere (console, tables, JSON, plots, training logs, the demo): COCO's
own, fractions in [0, 1], printed with 3 decimals and labelled (`AP=0.386`, or a header that
says "COCO, 0-1"), written to JSON at full precision beside `"ap_scale": "fraction"`. COCO's
-1 (no ground truth to score) prints as "n/a" or "-".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from freeanchor.files import atomic_path, write_json

AP_SCALE = "fraction"  # the JSON tag of the convention: AP values are 0-1, not percent
SCALE_NOTE = "(COCO, 0-1)"


def fmt_ap(value: float | None) -> str:
    """One AP/AR value as printed everywhere: "0.386"; "n/a" for COCO's -1 or a missing one."""
    if value is None or not math.isfinite(value) or value < 0:
        return "n/a"
    return f"{value:.3f}"


def ap_fields(metrics: Mapping[str, Any], keys: Sequence[str] = ("AP", "AP50", "AP75")) -> str:
    """ "AP=0.386 AP50=0.541 ..." for the keys present in `metrics`."""
    return " ".join(f"{k}={fmt_ap(metrics[k])}" for k in keys if k in metrics)


def metrics_line(metrics: Mapping[str, Any]) -> str:
    """The 12 COCO numbers on one line, labelled with their scale."""
    from freeanchor.eval.coco import METRIC_NAMES

    return f"{ap_fields(metrics, METRIC_NAMES)} {SCALE_NOTE}"


def per_class_table(
    per_class: Mapping[str, float],
    per_class_ap50: Mapping[str, float] | None = None,
    sort: str = "id",
) -> str:
    """Fixed-width text table of per-class AP: a caption naming the scale (COCO's 0-1), a
    header, a rule, one row per class ('-' where a class has no ground truth).

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
        text = fmt_ap(v)
        return f"{'-' if text == 'n/a' else text:>7}"

    header = f"{'id':>3}  {'class':<{width}}  {'AP':>7}"
    header += f"  {'AP50':>7}" if per_class_ap50 else ""
    caption = f"per-class AP {SCALE_NOTE}, '-': no ground truth"
    lines = [caption, header, "-" * len(header)]
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
        ax.plot(recall, prec, label=f"{label} (AP={fmt_ap(ap)})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(f"COCO box precision-recall (class mean), AP {SCALE_NOTE}")
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


def summary_dict(metrics: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """Metrics (full precision, 0-1) + `"ap_scale": "fraction"` + extra fields, JSON-safe."""
    return _json_safe({**metrics, "ap_scale": AP_SCALE, **extra})


def write_summary(path: str | Path, metrics: Mapping[str, Any], **extra: Any) -> Path:
    """Write `summary_dict(metrics, **extra)` (e.g. weights, ann_file) as indented JSON."""
    return write_json(path, summary_dict(metrics, **extra))
