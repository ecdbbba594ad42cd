"""Plots for training logs and evaluations (matplotlib, imported lazily; PNG output)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_training_log(log: str | Path, out: str | Path, title: str, keys: tuple[str, ...] = ("loss",),
                      smooth: int = 20) -> Path:
    """Plot one or more fields of a JSONL training log against step (raw and moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        steps = np.array([r["step"] for r in rows if key in r])
        vals = np.array([r[key] for r in rows if key in r], dtype=float)
        ax.plot(steps, vals, alpha=0.3, lw=0.8, label=key)
        if len(vals) > smooth:
            kernel = np.ones(smooth) / smooth
            ax.plot(steps[smooth - 1 :], np.convolve(vals, kernel, mode="valid"), lw=1.6, label=f"{key} (avg {smooth})")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
