"""The curves of a run: loss terms against iteration, AP against epoch, from its metrics log."""

from __future__ import annotations

from pathlib import Path

from freeanchor.engine.logging import read_jsonl
from freeanchor.eval.report import SCALE_NOTE
from freeanchor.files import atomic_path


def plot_curves(jsonl: str | Path, out_png: str | Path) -> Path | None:
    """Loss terms vs iteration (left) and AP vs epoch (right) from a metrics log."""
    records = read_jsonl(jsonl)
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    keys = [
        k for k in ("loss", "positive_bag_loss", "negative_bag_loss") if train and k in train[0]
    ]
    for key in keys:
        ax_loss.plot([r["iter"] for r in train], [r[key] for r in train], label=key)
    ax_loss.set(xlabel="iteration", ylabel="loss", title="training loss")
    if keys:
        ax_loss.legend()
    for key in ("AP", "AP50", "AP75"):
        pts = [(r["epoch"], r[key]) for r in val if key in r]
        if pts:
            ax_ap.plot(*zip(*pts, strict=True), marker="o", label=key)
    ax_ap.set(xlabel="epoch", ylabel=f"AP {SCALE_NOTE}", title="validation", ylim=(0, 1))
    ax_ap.grid(alpha=0.3)
    if val:
        ax_ap.legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(out_png)
