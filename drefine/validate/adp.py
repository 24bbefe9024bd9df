"""B-factor statistics and occupancies of alternate conformers."""
from __future__ import annotations

import numpy as np

from ..model.arrays import Model
from ..restraints.topology import Restraints

B_JUMP_FACTOR = 4.0  # residue-to-residue jump flagged at this many robust SDs of all jumps
OCC_TOLERANCE = 0.02


def _summary(b: np.ndarray) -> dict:
    return {"n_atoms": len(b), "mean": float(b.mean()), "min": float(b.min()), "max": float(b.max()),
            "sd": float(b.std())}


def b_factor_statistics(model: Model, r: Restraints, n_list: int = 10) -> dict:
    """Per chain summary, outlying atoms, bonded-atom ΔB and jumps of residue mean B along chains."""
    a, res = model.atoms, model.residues
    idx = r.atom_indices
    b = a.b_iso[idx]
    out = {"overall": _summary(b), "per_chain": {}}
    chains = res.chain[a.residue_index[idx]]
    for ch in np.unique(chains):
        out["per_chain"][str(ch)] = _summary(b[chains == ch])
    bad = idx[(a.b_iso[idx] <= 0) | ~np.isfinite(a.b_iso[idx])]
    med = np.median(b)
    mad = 1.4826 * np.median(np.abs(b - med)) or 1.0
    high = idx[(a.b_iso[idx] - med) / mad > 6]
    out["non_positive"] = [model.atom_label(int(i)) for i in bad[:n_list]]
    out["n_non_positive"] = len(bad)
    out["n_high_outliers"] = len(high)
    out["high_outliers"] = [{"atom": model.atom_label(int(i)), "b": float(a.b_iso[i])}
                            for i in high[np.argsort(-a.b_iso[high])][:n_list]]
    if len(r.bond_atoms):
        db = np.abs(a.b_iso[r.bond_atoms[:, 0]] - a.b_iso[r.bond_atoms[:, 1]])
        out["bonded_delta_b_rms"] = float(np.sqrt(np.mean(db ** 2)))
    # Jumps of residue-mean B between linked consecutive residues.
    r_idx = a.residue_index[idx]
    sums = np.bincount(r_idx, weights=a.b_iso[idx], minlength=len(res))
    cnt = np.bincount(r_idx, minlength=len(res))
    mean_b = np.divide(sums, cnt, out=np.zeros_like(sums), where=cnt > 0)
    cur = np.flatnonzero(r.linked_prev >= 0)
    jumps = mean_b[cur] - mean_b[r.linked_prev[cur]]
    jumps_out = []
    if len(jumps) > 2:
        scale = 1.4826 * np.median(np.abs(jumps - np.median(jumps))) or 1.0
        flag = np.flatnonzero(np.abs(jumps) > B_JUMP_FACTOR * scale)
        flag = flag[np.argsort(-np.abs(jumps[flag]))][:n_list]
        jumps_out = [{"from": res.label(int(r.linked_prev[cur[k]])), "to": res.label(int(cur[k])),
                      "delta_b": round(float(jumps[k]), 2)} for k in flag]
    out["jumps_along_chain"] = jumps_out
    return out


def occupancy_statistics(model: Model, r: Restraints, n_list: int = 20) -> dict:
    """Occupancy sums of alternate conformers per residue (expected to be ≤ 1, usually = 1)."""
    a, res = model.atoms, model.residues
    idx = r.atom_indices
    has_alt = idx[a.conformer[idx] > 0]
    if not len(has_alt):
        return {"n_residues_with_altlocs": 0, "n_sums_above_one": 0, "sums_above_one": [], "n_partial": 0,
                "partial": []}
    keys = a.residue_index[has_alt].astype(np.int64) * 1000 + a.conformer[has_alt]
    uk, inv = np.unique(keys, return_inverse=True)
    occ_mean = np.bincount(inv, weights=a.occupancy[has_alt]) / np.bincount(inv)
    res_of = uk // 1000
    ur, rinv = np.unique(res_of, return_inverse=True)
    total = np.bincount(rinv, weights=occ_mean)
    over = np.flatnonzero(total > 1.0 + OCC_TOLERANCE)
    partial = np.flatnonzero(total < 1.0 - OCC_TOLERANCE)

    def listing(rows):
        return [{"residue": res.label(int(ur[k])), "sum": round(float(total[k]), 3)} for k in rows[:n_list]]

    # A sum above one is an error; below one is legitimate (a partly occupied site) but worth seeing.
    return {"n_residues_with_altlocs": len(ur), "n_sums_above_one": len(over),
            "sums_above_one": listing(over), "n_partial": len(partial), "partial": listing(partial)}
