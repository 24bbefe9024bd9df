"""Ramachandran and rotamer statistics of a model, evaluated for every alternate conformer.

φ/ψ use the polymer links decided by the restraint topology (a chain break has no φ or ψ
across it). Each residue is scored in the first conformer and again in every other conformer
its own atoms have; shared atoms take part in all conformers. Without reference tables the
result says "not computed", never a guess.
"""
from __future__ import annotations

import numpy as np

from ..model.arrays import Model
from ..restraints.topology import Restraints
from .ramachandran import KIND_NAMES, RamachandranTables, dihedral_deg, find_rama_data
from .rotamers import CHI_ATOMS, RotamerTables

_NAMES = sorted({"N", "CA", "C"} | {n for chis in CHI_ATOMS.values() for q in chis for n in q})
_NAME_ID = {n: k for k, n in enumerate(_NAMES)}


def conformer_residues(model: Model, r: Restraints):
    """For each conformer: (conformer id, altloc letter, atom table, protein residues scored in it).

    The atom table maps [residue, NAME_ID[name]] to the atom row (−1 if absent), shared atoms
    included. Every protein residue is scored in the first conformer, and again in each other
    conformer its own atoms have. Also returns, once, the linked predecessor and successor of
    every residue (−1 at chain ends and breaks) as the first item.
    """
    a, res = model.atoms, model.residues
    idx = r.atom_indices
    residues = np.unique(a.residue_index[idx])
    protein = residues[np.isin(res.name[residues], list(CHI_ATOMS) + ["ALA", "GLY"])]
    linked_prev = r.linked_prev
    linked_next = np.full(len(res), -1, dtype=np.int64)
    has_prev = np.flatnonzero(linked_prev >= 0)
    linked_next[linked_prev[has_prev]] = has_prev
    confs = sorted(set(np.unique(a.conformer[idx]).tolist()) - {0}) or [0]
    out = []
    for c_i, conf in enumerate(confs):
        table = _atom_table(model, idx, conf)
        if c_i == 0:
            rows = protein
        else:
            own = np.unique(a.residue_index[idx][a.conformer[idx] == conf])
            rows = protein[np.isin(protein, own)]
        alt = "" if conf == 0 else str(a.altloc[idx][a.conformer[idx] == conf][0])
        out.append((conf, alt, table, rows))
    return (linked_prev, linked_next), out


NAME_ID = _NAME_ID


def _atom_table(model: Model, idx: np.ndarray, conformer: int) -> np.ndarray:
    """atom_of[residue, name] = atom row (−1 if absent) for one conformer, shared atoms included."""
    a = model.atoms
    table = np.full((len(model.residues), len(_NAMES)), -1, dtype=np.int64)
    name_id = np.array([_NAME_ID.get(n, -1) for n in a.name[idx]])
    for want in (0, conformer) if conformer else (0,):
        sel = (name_id >= 0) & (a.conformer[idx] == want)
        table[a.residue_index[idx][sel], name_id[sel]] = idx[sel]
    return table


def _torsion(xyz, table, rows, names, prev=None, nxt=None):
    """Dihedral (degrees) for residues `rows`; NaN where an atom is missing."""
    cols = []
    for k, n in enumerate(names):
        res = rows
        if k == 0 and prev is not None:
            res = prev
        if k == 3 and nxt is not None:
            res = nxt
        cols.append(np.where(res >= 0, table[np.maximum(res, 0), _NAME_ID[n]], -1))
    cols = np.array(cols)
    ok = (cols >= 0).all(axis=0)
    out = np.full(len(rows), np.nan)
    if ok.any():
        p = [xyz[c[ok]] for c in cols]
        out[ok] = dihedral_deg(*p)
    return out


def backbone_statistics(model: Model, r: Restraints, xyz: np.ndarray | None = None,
                        rama_dir=None, n_list: int = 20) -> tuple[dict, dict]:
    """(ramachandran, rotamers) summaries, or {'computed': False, 'reason': ...} without tables."""
    where = find_rama_data(rama_dir)
    if where is None:
        why = {"computed": False, "reason": "no Top500 tables found (give --rama-data DIR)"}
        return dict(why), dict(why)
    rama = RamachandranTables.load(where)
    rota = RotamerTables.load(where)
    xyz = model.atoms.xyz if xyz is None else xyz
    res = model.residues
    (linked_prev, linked_next), per_conformer = conformer_residues(model, r)

    rama_rows, rota_rows = [], []
    for _, alt, table, rows in per_conformer:
        if not len(rows):
            continue
        phi = _torsion(xyz, table, rows, ("C", "N", "CA", "C"), prev=linked_prev[rows])
        psi = _torsion(xyz, table, rows, ("N", "CA", "C", "N"), nxt=linked_next[rows])
        nxt = linked_next[rows]
        next_names = np.where(nxt >= 0, res.name[np.maximum(nxt, 0)], "")
        kinds = RamachandranTables.kinds(res.name[rows].tolist(), next_names.tolist())
        ok = ~np.isnan(phi) & ~np.isnan(psi)
        score = np.full(len(rows), np.nan)
        score[ok] = rama.score(phi[ok], psi[ok], kinds[ok])
        cls = np.asarray(rama.classify_scores(score, kinds), dtype=object)
        for k in np.flatnonzero(ok):
            rama_rows.append((int(rows[k]), alt, float(phi[k]), float(psi[k]), KIND_NAMES[int(kinds[k])],
                              float(score[k]), str(cls[k])))
        for name in np.unique(res.name[rows]):
            if name not in CHI_ATOMS:
                continue
            sel = rows[res.name[rows] == name]
            chis = np.stack([_torsion(xyz, table, sel, q) for q in CHI_ATOMS[name]], axis=1)
            if not rota.has_table(name):
                rota_rows.extend((int(s), alt, name, None, "not computed") for s in sel)
                continue
            n_chi = rota.n_chi(name)
            good = ~np.isnan(chis[:, :n_chi]).any(axis=1)
            scores = np.full(len(sel), np.nan)
            if good.any():
                scores[good] = np.atleast_1d(rota.score(name, chis[good, :n_chi]))
            for s, sc in zip(sel, scores):
                status = "not computed" if np.isnan(sc) else ("outlier" if rota.is_outlier(sc) else "ok")
                rota_rows.append((int(s), alt, name, None if np.isnan(sc) else float(sc), status))

    def label(ri, alt):
        return res.label(ri) + (f" ({alt})" if alt else "")

    n = len(rama_rows)
    counts = {c: sum(1 for row in rama_rows if row[6] == c) for c in ("favored", "allowed", "outlier")}
    rama_out = {"computed": True, "tables": str(where), "n_residues": n, **{f"n_{k}": v for k, v in counts.items()},
                "favored_percent": 100.0 * counts["favored"] / n if n else None,
                "outliers_percent": 100.0 * counts["outlier"] / n if n else None,
                "outliers": [{"residue": label(ri, alt), "phi": round(ph, 1), "psi": round(ps, 1), "kind": kd,
                              "score": round(sc, 5)} for ri, alt, ph, ps, kd, sc, c in rama_rows
                             if c == "outlier"][:n_list]}
    scored = [row for row in rota_rows if row[4] in ("ok", "outlier")]
    n_out = sum(1 for row in scored if row[4] == "outlier")
    rota_out = {"computed": True, "tables": str(where), "n_scored": len(scored), "n_outliers": n_out,
                "outliers_percent": 100.0 * n_out / len(scored) if scored else None,
                "n_not_computed": sum(1 for row in rota_rows if row[4] == "not computed"),
                "not_computed_residue_types": sorted({row[2] for row in rota_rows if row[4] == "not computed"}),
                "outliers": [{"residue": label(ri, alt), "score": round(sc, 4)}
                             for ri, alt, _, sc, st in rota_rows if st == "outlier"][:n_list]}
    return rama_out, rota_out
