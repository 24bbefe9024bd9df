"""Outputs of a batch: the ensemble as one multi-model file, plots (PNG, matplotlib) and an HTML page."""
from __future__ import annotations

import html
import re
from pathlib import Path

import gemmi
import numpy as np

from ..io.atomic import atomic_path, atomic_write


def write_multimodel(paths: list[Path], out: Path) -> Path:
    """Every member's model 0 as one model of a multi-model mmCIF, written member by member
    (atomically): only one member's structure is in memory at a time, so 100 large members do not
    need 100 structures' worth of memory. The header and the other categories are the first
    member's; each member's atom_site rows follow with their model number and running ids."""
    head = tail = None
    next_id = 1
    with atomic_path(out) as tmp, open(tmp, "w") as fh:
        for k, p in enumerate(paths, start=1):
            st = gemmi.read_structure(str(p))
            st.setup_entities()
            text = st.make_mmcif_document().as_string()
            start = text.index(_LAST_ATOM_SITE_TAG) + len(_LAST_ATOM_SITE_TAG)
            end = _end_of_loop(text, start)
            if head is None:
                head, tail = text[:start], text[end:]
                fh.write(head)
            rows, next_id = _renumber(text[start:end], k, next_id)
            fh.write(rows)
        fh.write(tail or "")
    return out


# gemmi writes the atom_site loop with the model number as its last column
_LAST_ATOM_SITE_TAG = "_atom_site.pdbx_PDB_model_num\n"


def _end_of_loop(text: str, start: int) -> int:
    """Index where the loop's rows end (a '#', 'loop_', '_tag' or 'data_' line, or the end)."""
    m = re.compile(r"^(#|loop_|_|data_)", re.MULTILINE).search(text, start)
    return m.start() if m else len(text)


def _renumber(rows: str, model: int, first_id: int) -> tuple[str, int]:
    """Rows with the model number (last column) set and atom ids (second column) running on."""
    counter = [first_id]

    def fix(m: re.Match) -> str:
        i = counter[0]
        counter[0] += 1
        return f"{m.group(1)} {i} {m.group(3)} {model}"

    out = re.sub(r"^(\S+) (\S+) (.*) (\S+)$", fix, rows, flags=re.MULTILINE)
    return out, counter[0]


def new_figure(figsize: tuple[float, float]):
    """A matplotlib Figure on the Agg canvas, without pyplot: pyplot's import and its global
    figure registry cost ~0.1 s more, and nothing here is shown on screen."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_png(fig, out: Path, dpi: int = 110) -> Path:
    """The figure as a PNG, written atomically."""
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return out


def plot_along_chain(rows: list[dict], keys: list[tuple[str, str]], out: Path, title: str) -> Path:
    """One panel per (key, label) of per-residue rows, against the residue's position in the chain."""
    height = 2.6 * len(keys)
    fig = new_figure((10, height))
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)
    x = np.arange(len(rows))
    for ax, (key, label) in zip(axes[:, 0], keys):
        ax.plot(x, [r.get(key, np.nan) for r in rows], lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    step = max(1, len(rows) // 15)
    axes[-1, 0].set_xticks(x[::step], [r["residue"] for r in rows][::step], rotation=60, fontsize=7)
    axes[0, 0].set_title(title)
    # fixed margins in inches (room for the rotated residue labels and the title): tight_layout
    # measured every text and doubled the plot's time
    fig.subplots_adjust(left=0.9 / 10, right=1 - 0.2 / 10, bottom=1.0 / height, top=1 - 0.4 / height, hspace=0.08)
    return save_png(fig, out)


def plot_weight_scan(done: list[dict], fit_key: str, out: Path, recommended: str | None) -> Path:
    """Map fit (or R-free) against bond RMSD, one point per run, labelled by its name."""
    fig = new_figure((6, 4.5))
    ax = fig.subplots()
    for s in done:
        ax.scatter(s["bonds_rmsd"], s[fit_key], color="C3" if s["name"] == recommended else "C0")
        ax.annotate(s["name"], (s["bonds_rmsd"], s[fit_key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("bond RMSD (Å)")
    ax.set_ylabel(fit_key)
    ax.grid(alpha=0.3)
    ax.set_title("weight scan" + (f": recommended {recommended}" if recommended else ""))
    fig.tight_layout()
    return save_png(fig, out)


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
