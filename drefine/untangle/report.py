"""The untangling run's plot: gap and R on the used reflections against the iteration."""
from __future__ import annotations

import os
from pathlib import Path


def plot_trajectory(history: list[dict], path: str | os.PathLike) -> Path:
    """PNG of the gap (log scale, Å) and R_used per iteration, stages marked; written atomically."""
    from ..parallel.batch_report import new_figure, save_png

    x = list(range(1, len(history) + 1))
    fig = new_figure((7, 5.5))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.semilogy(x, [max(h["gap"], 1e-12) for h in history], lw=1.2, label="gap")
    ax1.semilogy(x, [max(h["gap_geometry"], 1e-12) for h in history], lw=0.8, alpha=0.7, label="geometry part")
    ax1.semilogy(x, [max(h["gap_density"], 1e-12) for h in history], lw=0.8, alpha=0.7, label="density part")
    ax1.set_ylabel("gap (Å)")
    ax1.legend(fontsize=8)
    ax2.plot(x, [100 * h["r_used"] for h in history], lw=1.2, color="C3")
    ax2.set_ylabel("R, used reflections (%)")
    ax2.set_xlabel("RRR iteration")
    for k in range(1, len(history)):
        if history[k]["stage"] != history[k - 1]["stage"]:
            for ax in (ax1, ax2):
                ax.axvline(k + 0.5, color="grey", ls="--", lw=0.8)
    fig.tight_layout()
    return save_png(fig, Path(path))
