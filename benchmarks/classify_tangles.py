"""What kind of tangle is each residue a `drefine untangle` run leaves? (developer's diagnostic)

It reads the ground truth, so it tells where the method falls short, not what it may do. Each residue
tangled by the challenge's rule (`drefine.untangle.tangling`) is put in the first class that fits:

- names only: renaming equivalent atoms (a ring's CD1/CD2, CE1/CE2; OD1/OD2 …) untangles it; the
  density and the restraints cannot see it.
- no bonded crossing: no bond of the residue joins two atoms of different truth labels; the labels
  change only across atoms whose truth conformers lie within 0.15 Å (unscored), so neither the
  geometry nor, at equal occupancies, the data sees which way the residue is labelled.
- squeezed crossing: a bond joins atoms of different labels, and an atom of it has its two model
  conformers within 0.1 Å of each other (the search's MIN_OFFSET), so its label is decided by less
  than the model's error.
- crossing: a bond joins atoms of different labels, both atoms' conformers 0.1 Å apart or more: the
  kind of tangle the searches exist for.

For each crossing bond it prints the model's conformer offsets |x_A − x_B| (Å) of the two atoms, the
truth's, and the cosine of the model's two offsets.

Usage: python benchmarks/classify_tangles.py MODEL [--truth ground_truth.pdb] [--monlib DIR]
"""
import argparse
from pathlib import Path

import numpy as np
from common import DATA

from drefine.io.models import read_model
from drefine.restraints.topology import build_restraints
from drefine.untangle.crossings import MIN_OFFSET, conformer_partners
from drefine.untangle.tangling import _keys, _tangled_mask, _truth_labels, naming_only


def classify(model, truth, restraints) -> dict[str, dict]:
    m_idx, label, conf, _ = _truth_labels(model, truth)
    at = model.atoms
    res = at.residue_index[m_idx]
    tangled = np.flatnonzero(_tangled_mask(model, res, label, conf))
    lab = np.zeros(len(at), dtype=np.int64)  # 0: not scored, 1/2: nearer truth conformer A/B
    lab[m_idx] = label
    part = conformer_partners(model)
    offset = np.zeros(len(at))
    for p in part.values():
        has = p >= 0
        offset[has] = np.linalg.norm(at.xyz[has] - at.xyz[p[has]], axis=1)
    t_off = _truth_offsets(model, truth)
    bonds = restraints.bond_atoms.astype(np.int64)
    names = set(naming_only(model, truth))
    out = {}
    for r in tangled:  # a few residues
        key = model.residues.label(int(r))
        touch = (at.residue_index[bonds] == r).any(axis=1)
        cross = bonds[touch & (lab[bonds] > 0).all(axis=1) & (lab[bonds[:, 0]] != lab[bonds[:, 1]])]
        rows = []
        for p, q in cross:
            o_p, o_q = at.xyz[p] - at.xyz[_partner(part, p)], at.xyz[q] - at.xyz[_partner(part, q)]
            cos = o_p @ o_q / max(np.linalg.norm(o_p) * np.linalg.norm(o_q), 1e-12)
            rows.append(f"{model.atom_label(int(p))}–{model.atom_label(int(q))}: model {offset[p]:.2f}/"
                        f"{offset[q]:.2f} Å, truth {t_off[p]:.2f}/{t_off[q]:.2f} Å, cos {cos:+.2f}")
        if key in names:
            kind = "names only"
        elif len(cross) == 0:
            kind = "no bonded crossing"
        elif (offset[cross] < MIN_OFFSET).any(axis=1).all():
            kind = "squeezed crossing"
        else:
            kind = "crossing"
        out[key] = {"kind": kind, "crossing_bonds": rows}
    return out


def _partner(part, i):
    for p in part.values():
        if p[i] >= 0:
            return p[i]
    return i


def _truth_offsets(model, truth) -> np.ndarray:
    """Per model atom: its truth conformers' separation (Å), 0 where the truth has not both A and B."""
    ta = truth.atoms
    t = truth.model_atoms(0)
    t_a, t_b = t[ta.altloc[t] == "A"], t[ta.altloc[t] == "B"]
    common, ia, ib = np.intersect1d(_keys(truth, t_a), _keys(truth, t_b), return_indices=True)
    sep = np.linalg.norm(ta.xyz[t_a[ia]] - ta.xyz[t_b[ib]], axis=1)
    m = model.model_atoms(0)
    keys = _keys(model, m)
    where = np.clip(np.searchsorted(common, keys), 0, len(common) - 1)
    found = common[where] == keys
    out = np.zeros(len(model.atoms))
    out[m[found]] = sep[where[found]]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--truth", type=Path, default=DATA / "untangle" / "ground_truth.pdb")
    ap.add_argument("--monlib", type=Path, default=None, help="monomer library (default: drefine's)")
    args = ap.parse_args()
    model, truth = read_model(args.model), read_model(args.truth)
    restraints = build_restraints(model, monlib_dir=args.monlib)
    found = classify(model, truth, restraints)
    kinds = {}
    for key, row in found.items():
        kinds.setdefault(row["kind"], []).append(key)
        print(f"{key}: {row['kind']}")
        for line in row["crossing_bonds"]:
            print(f"    {line}")
    print(f"{len(found)} tangled: " + "; ".join(f"{k} {len(v)}" for k, v in kinds.items()))


if __name__ == "__main__":
    main()
