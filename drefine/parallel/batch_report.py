"""Outputs of a batch: the ensemble as one multi-model file, plots (PNG, matplotlib) and an HTML page."""
from __future__ import annotations

import html
from pathlib import Path

import gemmi
import numpy as np

from ..io.atomic import atomic_path, atomic_write


def write_multimodel(paths: list[Path], out: Path) -> Path:
    """Every member's model 0 as one model of a multi-model mmCIF, atomically."""
    combined = None
    for k, p in enumerate(paths, start=1):
        st = gemmi.read_structure(str(p))
        if combined is None:
            combined = st
            combined[0].num = 1
            while len(combined) > 1:
                del combined[1]
            continue
        m = st[0].clone() if hasattr(st[0], "clone") else gemmi.Model(st[0])
        m.num = k
        combined.add_model(m)
    combined.setup_entities()
    atomic_write(out, combined.make_mmcif_document().as_string())
    return out


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_along_chain(rows: list[dict], keys: list[tuple[str, str]], out: Path, title: str) -> Path:
    """One panel per (key, label) of per-residue rows, against the residue's position in the chain."""
    plt = _figure()
    fig, axes = plt.subplots(len(keys), 1, figsize=(10, 2.6 * len(keys)), sharex=True, squeeze=False)
    x = np.arange(len(rows))
    for ax, (key, label) in zip(axes[:, 0], keys):
        ax.plot(x, [r.get(key, np.nan) for r in rows], lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    step = max(1, len(rows) // 15)
    axes[-1, 0].set_xticks(x[::step], [r["residue"] for r in rows][::step], rotation=60, fontsize=7)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def plot_weight_scan(done: list[dict], fit_key: str, out: Path, recommended: str | None) -> Path:
    """Map fit (or R-free) against bond RMSD, one point per run, labelled by its name."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for s in done:
        ax.scatter(s["bonds_rmsd"], s[fit_key], color="C3" if s["name"] == recommended else "C0")
        ax.annotate(s["name"], (s["bonds_rmsd"], s[fit_key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("bond RMSD (Å)")
    ax.set_ylabel(fit_key)
    ax.grid(alpha=0.3)
    ax.set_title("weight scan" + (f": recommended {recommended}" if recommended else ""))
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def write_html(out: Path, title: str, summary: dict, table: list[dict], images: list[str]) -> Path:
    """A self-contained page: the summary numbers, the members' table and the plots (same folder)."""
    cols = list(table[0].keys()) if table else []
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))
    rows = "\n".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in table)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    facts = "".join(f"<li><b>{html.escape(k)}</b>: {fmt(v)}</li>" for k, v in summary.items()
                    if not isinstance(v, (list, dict)))
    imgs = "".join(f'<p><img src="{html.escape(i)}" alt="{html.escape(i)}"></p>' for i in images)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><ul>{facts}</ul>{imgs}<table><tr>{head}</tr>{rows}</table></body></html>")
    atomic_write(out, page)
    return out
