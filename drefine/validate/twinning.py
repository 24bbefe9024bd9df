"""Twinning tests on merged intensities: the L-test, the H-test per twin law and the second
moment of the normalised intensities.

Refining an untwinned model against merohedrally twinned data leaves R high whatever the model
(the observed intensities mix (1 − α)I(h) + αI(Th)); a user should be told before reading the R
values. These are the standard tests (as phenix.xtriage reports them), written here on the
reflection table's arrays because no well-kept Python library exposes them without the whole
cctbx stack:

- L-test (Padilla & Yeates 2003): L = (I₁ − I₂)/(I₁ + I₂) over acentric pairs h₂ = h₁ + Δ with
  Δ = 2 along one axis (near in reciprocal space, so the local mean cancels; the even offset
  keeps lattice-centring absences and most translational pseudo-symmetry out). ⟨|L|⟩ = ½ and
  ⟨L²⟩ = ⅓ for untwinned data, ⅜ and ⅕ for a perfect twin; independent of twin laws.
- H-test (Yeates 1997): H = |I(h) − I(Th)|/(I(h) + I(Th)) over acentric twin pairs of one twin
  law T; ⟨H⟩ = ½ − α, so α = ½ − ⟨H⟩. The strongest half of the pairs is used (weak pairs are
  dominated by measurement error, which pulls α towards 0), as xtriage does.
- ⟨I²⟩/⟨I⟩² of acentric intensities normalised per resolution bin: 2 untwinned, 1.5 perfect twin.

Twin laws are the lattice's extra symmetry (gemmi `find_twin_laws`, obliquity ≤ 3°).
"""
from __future__ import annotations

import gemmi
import numpy as np

from ..io.reflections import hkl_keys

L_TWINNED = 0.44  # ⟨|L|⟩ below this suggests twinning (xtriage's threshold; untwinned 0.5)
H_TWIN_FRACTION = 0.1  # an H-test twin fraction above this, with the L-test, names the twin law
MIN_PAIRS = 100  # fewer pairs than this: no verdict from that test


def hkl_rotation(op: gemmi.Op) -> np.ndarray:
    """The integer 3×3 matrix R with h' = h R (row vectors) for `op` applied to Miller indices
    (gemmi's `Op.apply_to_hkl`)."""
    return np.array(op.rot, dtype=np.int64) // gemmi.Op.DEN


def equivalent_rows(hkl: np.ndarray, targets: np.ndarray, spacegroup: gemmi.SpaceGroup) -> np.ndarray:
    """For each row of `targets` (Miller indices), the row of `hkl` holding a symmetry or Friedel
    equivalent of it, or −1 (not measured)."""
    keys = hkl_keys(hkl)
    order = np.argsort(keys)
    sorted_keys = keys[order]
    out = np.full(len(targets), -1, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    todo = np.arange(len(targets))  # rows not found yet: each further operator tries only these
    for op in spacegroup.operations().sym_ops:
        r = hkl_rotation(op)
        for sign in (1, -1):
            if not len(todo):
                return out
            k = hkl_keys(sign * (targets[todo] @ r))
            pos = np.clip(np.searchsorted(sorted_keys, k), 0, len(sorted_keys) - 1)
            hit = sorted_keys[pos] == k
            out[todo[hit]] = order[pos[hit]]
            todo = todo[~hit]
    return out


def twin_laws(cell: gemmi.UnitCell, spacegroup: gemmi.SpaceGroup) -> list[gemmi.Op]:
    """Merohedral and pseudo-merohedral twin laws of this lattice (obliquity ≤ 3°)."""
    return list(gemmi.find_twin_laws(cell, spacegroup, 3.0, False))


def law_matrix(law: str | gemmi.Op) -> np.ndarray:
    """The integer matrix H with h' = h H (row vectors) of a twin law given as a gemmi Op, in
    reciprocal notation ("h,-k,-l", as phenix writes twin laws: h' = (h, −k, −l)) or as a
    real-space operator ("-x,y,-z", as gemmi's find_twin_laws gives them)."""
    if isinstance(law, gemmi.Op):
        return hkl_rotation(law)
    text = law.replace(" ", "").lower()
    if any(c in text for c in "hkl"):
        op = gemmi.Op(text.replace("h", "x").replace("k", "y").replace("l", "z"))
        if any(op.tran):
            raise ValueError(f"twin law {law!r} has a translation")
        return (np.array(op.rot, dtype=np.int64) // gemmi.Op.DEN).T
    op = gemmi.Op(text)
    if any(op.tran):
        raise ValueError(f"twin law {law!r} has a translation")
    return hkl_rotation(op)


def law_text(matrix: np.ndarray) -> str:
    """Reciprocal notation ("h,-k,-l") of h' = h H."""
    names = "hkl"
    parts = []
    for j in range(3):
        terms = []
        for i in range(3):
            c = int(matrix[i, j])
            if c:
                terms.append(("-" if c < 0 else "+") + ("" if abs(c) == 1 else str(abs(c))) + names[i])
        parts.append("".join(terms).lstrip("+") or "0")
    return ",".join(parts)


def twin_mates(table, law) -> np.ndarray:
    """Row of each reflection's twin mate Th in `table` (−1 when not measured). ValueError when
    the law does not fit these data: a symmetry operator of the space group already (every
    reflection its own mate), or one that maps most reflections off the measured ones."""
    matrix = law_matrix(law)
    hkl = np.asarray(table.hkl, dtype=np.int64)
    mate = equivalent_rows(hkl, hkl @ matrix, table.spacegroup)
    name = law_text(matrix)
    if not len(hkl):
        raise ValueError("no reflections")
    if np.all((mate == np.arange(len(hkl))) | (mate < 0)):
        raise ValueError(f"twin law {name} is a symmetry operator of {table.spacegroup.hm}: it twins nothing")
    found = float((mate >= 0).mean())
    if found < 0.5:
        raise ValueError(f"twin law {name} maps {100 * (1 - found):.0f} % of the reflections of {table.spacegroup.hm} "
                         "onto ones not measured: not a twin law of this lattice?")
    return mate


def free_set_in_twin_pairs(free: np.ndarray, mate: np.ndarray) -> np.ndarray:
    """The test-set flags with each twin pair sharing one: that of the pair's lower row. A test
    reflection whose twin mate is refined against is not independent of the model (its
    twinned intensity holds the mate's), so under twinning a free set is chosen in pairs."""
    rows = np.arange(len(free))
    lower = np.where(mate >= 0, np.minimum(rows, mate), rows)
    return np.asarray(free, dtype=bool)[lower]


def l_test(hkl, intensity, centric, spacegroup) -> dict:
    """⟨|L|⟩ and ⟨L²⟩ over acentric pairs h, h + 2 e_axis (both measured, I > 0)."""
    ok = np.isfinite(intensity) & ~centric
    values = []
    for axis in range(3):
        step = np.zeros(3, dtype=np.int64)
        step[axis] = 2
        partner = equivalent_rows(hkl, hkl + step, spacegroup)
        use = ok & (partner >= 0)
        use[use] &= ok[partner[use]]
        i1, i2 = intensity[use], intensity[partner[use]]
        s = i1 + i2
        keep = s > 0
        values.append((i1[keep] - i2[keep]) / s[keep])
    lv = np.clip(np.concatenate(values), -1.0, 1.0) if values else np.zeros(0)
    return {"pairs": len(lv), "mean_abs_l": float(np.abs(lv).mean()) if len(lv) else float("nan"),
            "mean_l2": float((lv * lv).mean()) if len(lv) else float("nan")}


def h_test(hkl, intensity, centric, spacegroup, law) -> dict:
    """Twin fraction α = ½ − ⟨H⟩ for one twin law (`law_matrix` forms), over the strongest half
    of the acentric pairs."""
    matrix = law_matrix(law)
    mate = equivalent_rows(hkl, np.asarray(hkl, dtype=np.int64) @ matrix, spacegroup)
    row = np.arange(len(hkl))
    ok = np.isfinite(intensity) & ~centric & (intensity > 0)
    use = ok & (mate > row)  # each pair once, and not a reflection paired with itself
    use[use] &= ok[mate[use]]
    i1, i2 = intensity[use], intensity[mate[use]]
    if not len(i1):
        return {"law": law_text(matrix), "pairs": 0, "twin_fraction": float("nan")}
    strength = i1 + i2
    strong = strength >= np.median(strength)
    h = np.abs(i1 - i2)[strong] / strength[strong]
    return {"law": law_text(matrix), "pairs": int(strong.sum()), "mean_h": float(h.mean()),
            "twin_fraction": float(max(0.0, 0.5 - h.mean()))}


def second_moment(intensity, centric, bins) -> float:
    """⟨I²⟩/⟨I⟩² of acentric intensities, each normalised by its resolution bin's mean."""
    ok = np.isfinite(intensity) & ~centric
    b = bins[ok]
    i = intensity[ok]
    mean = np.bincount(b, i, minlength=int(bins.max()) + 1) / np.maximum(np.bincount(b, minlength=int(bins.max()) + 1), 1)
    z = i / np.where(mean[b] > 0, mean[b], np.nan)
    z = z[np.isfinite(z)]
    return float((z * z).mean() / z.mean() ** 2) if len(z) else float("nan")


def twinning_report(table) -> dict:
    """The three tests on a reflection table (intensities, else amplitudes squared) and a verdict:
    `suspected` when ⟨|L|⟩ < L_TWINNED, with the twin law of the largest H-test fraction when
    that fraction exceeds H_TWIN_FRACTION."""
    intensity = table.i_obs if table.i_obs is not None else table.f_obs ** 2
    intensity = np.asarray(intensity, dtype=np.float64)
    hkl = np.asarray(table.hkl, dtype=np.int64)
    lt = l_test(hkl, intensity, table.centric, table.spacegroup)
    laws = [h_test(hkl, intensity, table.centric, table.spacegroup, op) for op in twin_laws(table.cell, table.spacegroup)]
    laws = [h for h in laws if h["pairs"] >= MIN_PAIRS]
    best = max(laws, key=lambda h: h["twin_fraction"], default=None)
    suspected = lt["pairs"] >= MIN_PAIRS and lt["mean_abs_l"] < L_TWINNED
    return {"l_test": lt, "h_test": laws, "second_moment": second_moment(intensity, table.centric, table.bin),
            "suspected": bool(suspected),
            "twin_law": best["law"] if suspected and best and best["twin_fraction"] > H_TWIN_FRACTION else None,
            "twin_fraction": best["twin_fraction"] if suspected and best else None}


def twinning_note(report: dict) -> str | None:
    """One line for the log when twinning is suspected, else None."""
    if not report["suspected"]:
        return None
    lt = report["l_test"]
    law = (f"; twin law {report['twin_law']}, fraction ≈ {report['twin_fraction']:.2f} by the H-test"
           if report["twin_law"] else "; no twin law of this lattice explains it (check the space group)")
    return (f"the intensities look twinned: L-test <|L|> = {lt['mean_abs_l']:.3f} (untwinned 0.500, perfect "
            f"twin 0.375), <I²>/<I>² = {report['second_moment']:.2f} (2.0, 1.5){law}")
