"""Seeded perturbation of coordinates (starting models for refinement tests and ensembles)."""
from __future__ import annotations

import gemmi
import numpy as np

from ..errors import DrefineError
from .arrays import Model


def selection_mask(model: Model, cid: str) -> np.ndarray:
    """Boolean mask of the atoms a gemmi selection (CID syntax) picks; an empty pick is an error."""
    try:
        sel = gemmi.Selection(cid)
    except (RuntimeError, ValueError) as e:
        raise DrefineError(f"bad selection {cid!r}: {e}") from None
    # gemmi selects on a copy whose b_iso carries each atom's row index (exact in float32).
    st = model.structure.clone()
    for i, cra in enumerate(cra for gm in st for cra in gm.all()):
        cra.atom.b_iso = float(i)
    picked = [int(cra.atom.b_iso) for gm in sel.copy_structure_selection(st) for cra in gm.all()]
    mask = np.zeros(len(model.atoms), dtype=bool)
    mask[picked] = True
    if not mask.any():
        raise DrefineError(f"the selection {cid!r} matches no atoms")
    return mask


def shake_coordinates(model: Model, rms: float, seed: int, mask: np.ndarray | None = None) -> tuple[Model, float]:
    """A copy of `model` with Gaussian shifts rescaled to exactly `rms` Å over the moved atoms.

    Returns the new model and the RMS shift achieved (Å).
    """
    out = model.copy()
    n = len(model.atoms)
    moved = np.ones(n, dtype=bool) if mask is None else mask
    rng = np.random.default_rng(seed)
    shift = rng.normal(size=(int(moved.sum()), 3))
    if rms > 0 and len(shift):
        shift *= rms / np.sqrt((shift ** 2).sum(axis=1).mean())
    else:
        shift[:] = 0.0
    out.atoms.xyz[moved] += shift
    achieved = float(np.sqrt((shift ** 2).sum(axis=1).mean())) if len(shift) else 0.0
    return out, achieved
