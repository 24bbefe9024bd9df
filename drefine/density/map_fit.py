"""How well a model fits a map: CC_box, CC_mask and per-residue correlation.

The model map is computed at the map's resolution on the map's own grid (start and origin
honoured), as `model_map` does: electron form factors for cryo-EM maps, X-ray ones for
crystallographic maps. CC_box: over the whole box. CC_mask: over grid points within
`mask_radius` of any model atom (2.5 Å by default, the radius of the shared yardstick
`tools/metrics.py`). Per-residue CC: each masked grid point belongs to the residue of its
nearest atom; sums per residue by bincount (one pass, no loop over residues or points); the mask and the
nearest atoms come from one pass over each atom's sphere (periodic images of a full cell included).
"""
from __future__ import annotations

import numpy as np

from ..io.maps import DensityMap, nearest_atom_labels
from ..model.arrays import Model
from .model_map import model_map

DEFAULT_MASK_RADIUS = 2.5  # Å


def model_map_on_grid(model: Model, dmap: DensityMap, d_min: float, source: str = "electron",
                      atoms: np.ndarray | None = None, accuracy: dict | None = None) -> np.ndarray:
    """Model density on exactly the grid points of `dmap` (same shape as dmap.data)."""
    full = model_map(model, dmap.cell, tuple(int(n) for n in dmap.sampling), d_min, source=source,
                     spacegroup=dmap.spacegroup if dmap.is_full_cell else None, origin=dmap.origin, atoms=atoms,
                     accuracy=accuracy)
    idx = [(dmap.start[k] + np.arange(dmap.shape[k])) % dmap.sampling[k] for k in range(3)]
    return full[np.ix_(*idx)]


def _pearson(x, y):
    x = x - x.mean()
    y = y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def map_model_fit(model: Model, dmap: DensityMap, d_min: float, source: str = "electron",
                  mask_radius: float = DEFAULT_MASK_RADIUS, atoms: np.ndarray | None = None,
                  n_worst: int = 10) -> dict:
    """CC_box, CC_mask and per-residue CC of model 0 against a map; fraction of atoms outside it."""
    idx = model.model_atoms(0) if atoms is None else np.asarray(atoms)
    data = np.asarray(dmap.load().data, dtype=np.float64)
    calc = model_map_on_grid(model, dmap, d_min, source, idx)
    xyz = model.atoms.xyz[idx]
    nearest = nearest_atom_labels(dmap, xyz, mask_radius)  # one pass gives the mask and its labels
    mask = nearest >= 0
    out = {"cc_box": _pearson(data.ravel(), calc.ravel()),
           "cc_mask": _pearson(data[mask], calc[mask]) if mask.any() else float("nan"),
           "mask_radius": mask_radius, "mask_points": int(mask.sum()),
           "atoms_inside_map": float(dmap.covers(xyz))}
    # per residue: masked points labelled by the residue of their nearest atom
    if mask.any():
        res = model.atoms.residue_index[idx][nearest[mask]]
        x = data[mask]
        y = calc[mask]
        n_res = len(model.residues)
        n = np.bincount(res, minlength=n_res).astype(np.float64)
        sx, sy = np.bincount(res, x, n_res), np.bincount(res, y, n_res)
        sxx, syy, sxy = np.bincount(res, x * x, n_res), np.bincount(res, y * y, n_res), np.bincount(res, x * y, n_res)
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = sxy - sx * sy / n
            cc = cov / np.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))
        have = np.flatnonzero(n >= 4)
        cc_res = cc[have]
        order = have[np.argsort(cc_res)][:n_worst]
        out["per_residue"] = {"n_residues": len(have), "mean": float(np.nanmean(cc_res)),
                              "median": float(np.nanmedian(cc_res)),
                              "worst": [{"residue": model.residues.label(int(r)), "cc": round(float(cc[r]), 3)}
                                        for r in order],
                              "values": {model.residues.label(int(r)): round(float(cc[r]), 4) for r in have}}
    return out
