"""Counting tangled residues of a two-conformer model against a two-conformer truth.

The rule (Untangle challenge, issue 6): wherever the truth's conformers A and B of an atom lie
more than 0.15 Å apart, each model atom of conformer A or B is labelled by the nearer truth
conformer; a residue is tangled when one of its model conformers mixes labels, or both carry the
same single label. Hydrogens and waters are not scored. Used by the tests and by reports; refinement never sees
the truth.

Some tangles are of names only: the two halves of a symmetric group (a Tyr or Phe ring's CD1/CD2
and CE1/CE2, Asp OD1/OD2, Glu OE1/OE2, Arg NH1/NH2) occupy the same places whichever is called
which, so neither the density nor the restraints can tell a model named against the truth's
convention. `naming_only` lists the tangled residues that such a renaming would untangle.
"""
from __future__ import annotations

import numpy as np

from ..model.arrays import Model

MIN_SEPARATION = 0.15  # Å
# chemically equivalent atom pairs: renaming one for the other moves no atom
EQUIVALENT_NAMES = {"TYR": (("CD1", "CD2"), ("CE1", "CE2")), "PHE": (("CD1", "CD2"), ("CE1", "CE2")),
                    "ASP": (("OD1", "OD2"),), "GLU": (("OE1", "OE2"),), "ARG": (("NH1", "NH2"),)}


def _keys(model: Model, idx: np.ndarray, altloc: str | None = None) -> np.ndarray:
    a, r = model.atoms, model.residues
    res = a.residue_index[idx]
    parts = [r.chain[res].astype(str), r.seqnum[res].astype(str), r.icode[res].astype(str), a.name[idx].astype(str)]
    key = parts[0]
    for p in parts[1:]:
        key = np.char.add(np.char.add(key, "|"), p)
    return key


def _truth_labels(model: Model, truth: Model, xyz: np.ndarray | None = None):
    """The scored atoms of model 0: (atom indices, label 1/2 = nearer truth conformer A/B,
    model conformer 0/1 for altloc A/B, distance to the nearer truth conformer Å); `xyz` in place of
    the model's coordinates (Å), to score a renamed model."""
    ta, ma = truth.atoms, model.atoms
    t_idx = truth.model_atoms(0)
    t_idx = t_idx[~ta.is_hydrogen[t_idx]]
    t_a = t_idx[ta.altloc[t_idx] == "A"]
    t_b = t_idx[ta.altloc[t_idx] == "B"]
    ka, kb = _keys(truth, t_a), _keys(truth, t_b)
    common, ia, ib = np.intersect1d(ka, kb, return_indices=True)
    pos_a, pos_b = ta.xyz[t_a[ia]], ta.xyz[t_b[ib]]
    far = np.linalg.norm(pos_a - pos_b, axis=1) > MIN_SEPARATION
    common, pos_a, pos_b = common[far], pos_a[far], pos_b[far]
    m_idx = model.model_atoms(0)
    m_idx = m_idx[~ma.is_hydrogen[m_idx]]
    m_idx = m_idx[np.isin(ma.altloc[m_idx], ("A", "B")) & (model.residues.entity_type[ma.residue_index[m_idx]] != "water")]
    keys = _keys(model, m_idx)
    where = np.searchsorted(common, keys)
    where = np.clip(where, 0, max(len(common) - 1, 0))
    scored = (len(common) > 0) & (common[where] == keys) if len(common) else np.zeros(len(keys), bool)
    m_idx, where = m_idx[scored], where[scored]
    xyz = ma.xyz if xyz is None else xyz
    d_a = np.linalg.norm(xyz[m_idx] - pos_a[where], axis=1)
    d_b = np.linalg.norm(xyz[m_idx] - pos_b[where], axis=1)
    label = np.where(d_a < d_b, 1, 2)  # 1: truth A, 2: truth B
    conf = np.where(ma.altloc[m_idx] == "A", 0, 1)
    return m_idx, label, conf, np.minimum(d_a, d_b)


def _tangled_mask(model: Model, res: np.ndarray, label: np.ndarray, conf: np.ndarray) -> np.ndarray:
    # per residue and model conformer: which labels occur (bit 1: A, bit 2: B)
    bits = np.zeros((len(model.residues), 2), dtype=np.int64)
    np.bitwise_or.at(bits, (res, conf), label)
    mixed = (bits == 3).any(axis=1)
    same = (bits[:, 0] == bits[:, 1]) & (bits[:, 0] > 0)
    return mixed | same


def tangled_residues(model: Model, truth: Model) -> list[str]:
    """Labels ("A/ALA 39") of the tangled residues of model 0 (conformers A and B)."""
    m_idx, label, conf, _ = _truth_labels(model, truth)
    res = model.atoms.residue_index[m_idx]
    return [model.residues.label(int(r)) for r in np.flatnonzero(_tangled_mask(model, res, label, conf))]


def tangled_atoms(model: Model, truth: Model) -> dict[str, dict[str, str]]:
    """For each tangled residue, per model conformer, its scored atoms with the truth conformer
    each is nearer and how near (Å): {"A/ASP 3": {"A": "N→B 0.04, …, OD1→A 0.07", "B": …}}. Shows
    what kind of tangle it is: a lone atom, a side chain against its backbone, a whole residue."""
    m_idx, label, conf, dist = _truth_labels(model, truth)
    res = model.atoms.residue_index[m_idx]
    out: dict[str, dict[str, str]] = {}
    for r in np.flatnonzero(_tangled_mask(model, res, label, conf)):  # the tangled residues: a few
        rows = {}
        for c, alt in ((0, "A"), (1, "B")):
            sel = (res == r) & (conf == c)
            rows[alt] = ", ".join(f"{model.atoms.name[i]}→{'AB'[lab - 1]} {d:.2f}"
                                  for i, lab, d in zip(m_idx[sel], label[sel], dist[sel]))
        out[model.residues.label(int(r))] = rows
    return out


def naming_only(model: Model, truth: Model) -> list[str]:
    """The tangled residues (labels) that renaming equivalent atoms (`EQUIVALENT_NAMES`) within one
    or both model conformers would untangle: tangles no data or restraint can see."""
    m_idx, label, conf, _ = _truth_labels(model, truth)
    res = model.atoms.residue_index[m_idx]
    tangled = _tangled_mask(model, res, label, conf)
    a = model.atoms
    rename = {}  # (residue, altloc) -> the index pairs to exchange; a few residues
    for r in np.flatnonzero(tangled & np.isin(model.residues.name, list(EQUIVALENT_NAMES))):
        for alt in ("A", "B"):
            here = np.flatnonzero((a.residue_index == r) & (a.altloc == alt))
            names = {str(a.name[i]): int(i) for i in here}
            rename[(r, alt)] = [(names[p], names[q]) for p, q in EQUIVALENT_NAMES[str(model.residues.name[r])]
                                if p in names and q in names]
    fixed = np.zeros(len(model.residues), dtype=bool)
    for alts in (("A",), ("B",), ("A", "B")):
        pairs = np.array([pq for (r, alt), v in rename.items() if alt in alts for pq in v], dtype=np.int64)
        if len(pairs) == 0:
            continue
        xyz = a.xyz.copy()
        xyz[pairs[:, 0]], xyz[pairs[:, 1]] = a.xyz[pairs[:, 1]], a.xyz[pairs[:, 0]]
        m2, lab2, conf2, _ = _truth_labels(model, truth, xyz)
        fixed |= ~_tangled_mask(model, a.residue_index[m2], lab2, conf2)
    return [model.residues.label(int(r)) for r in np.flatnonzero(tangled & fixed)]
