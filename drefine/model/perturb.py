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
    mask = np.zeros(len(model.atoms), dtype=bool)
    i = 0
    # Matching is per atom through gemmi (setup, once); the arrays share gemmi's order.
    for gm in model.structure:
        m_ok = sel.matches(gm)
        for ch in gm:
            c_ok = m_ok and sel.matches(ch)
            for res in ch:
                r_ok = c_ok and sel.matches(res)
                for atom in res:
                    mask[i] = r_ok and sel.matches(atom)
                    i += 1
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
