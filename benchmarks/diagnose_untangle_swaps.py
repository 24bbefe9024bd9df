"""Would the data and restraints accept the right relabelling of each residue still tangled?

A developer's diagnostic for `drefine untangle` on the 1AHO challenge: it reads the ground truth, so it
tells where the method falls short, not what the method may do. For every residue of MODEL still tangled
by the challenge's rule, conformer A keeps the truth label most of its scored atoms carry; the others
(with their hydrogens) exchange positions and ADPs with their conformer-B partners. That variant and the
model itself are refined alike and locally, exactly as the crossing search judges its candidates
(`drefine/untangle/crossings.py`: atoms within two bonds move, least squares at one fixed weight), and
the relative gain of the objective and the worst bond/angle |z| near the swap are printed. A positive
gain above the search's MIN_GAIN with acceptable geometry means the judge would take the right swap:
the search only failed to propose it.

Usage: python benchmarks/diagnose_untangle_swaps.py MODEL [--truth ground_truth.pdb] [--data refme.mtz]
"""
import argparse

import numpy as np
from common import DATA

from drefine.io.models import read_model
from drefine.io.reflections import read_reflections
from drefine.refine.xray import XrayOptions, refine_xray
from drefine.restraints.topology import build_restraints
from drefine.untangle import crossings
from drefine.untangle.tangling import _tangled_mask, _truth_labels

CASE = DATA / "untangle"


def truth_consistent_swaps(model, truth, restraints):
    """[(residue label, heavy atom names swapped, side, partners)] for every tangled residue."""
    idx, label, conf, _ = _truth_labels(model, truth)
    res = model.atoms.residue_index[idx]
    at = model.atoms
    conf_a, conf_b = sorted({int(c) for c in at.conformer if c > 0})[:2]
    partner = crossings.conformer_partners(model)[(conf_a, conf_b)]
    bonds = restraints.bond_atoms.astype(np.int64)
    out = []
    for r in np.flatnonzero(_tangled_mask(model, res, label, conf)):  # the tangled residues: a few
        sel = (res == r) & (conf == 0)
        keep = np.bincount(label[sel], minlength=3)[1:].argmax() + 1
        side = idx[sel][label[sel] != keep]
        riding = np.isin(bonds, side).any(axis=1)
        hs = np.unique(bonds[riding].ravel())
        hs = hs[at.is_hydrogen[hs] & (at.conformer[hs] == conf_a)]
        side = np.concatenate([side, hs]).astype(np.int64)
        side = side[partner[side] >= 0]
        names = [str(at.name[i]) for i in side if not at.is_hydrogen[i]]
        out.append((model.residues.label(int(r)), names, side, partner[side]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--truth", default=str(CASE / "ground_truth.pdb"))
    ap.add_argument("--data", default=str(CASE / "refme.mtz"))
    ap.add_argument("--labin", default="F=F,SIGF=SIGF,FREE=FreeR_flag")
    args = ap.parse_args()
    model, truth = read_model(args.model), read_model(args.truth)
    table = read_reflections(args.data, labin=args.labin)
    restraints = build_restraints(model)
    # the crossing search's judge: its weight and its local refinement settings
    weight = refine_xray(model, table, restraints, XrayOptions(target="ls", cycles=2, adp="fixed", occupancies=False,
                                                               minimiser="lbfgs"), log=crossings._quiet).weight
    opt = XrayOptions(target="ls", cycles=1, weight=weight, adp="fixed", occupancies=False, geometry_rescue=False,
                      iterations=crossings.LOCAL_ITERATIONS, minimiser="lbfgs")
    swaps = truth_consistent_swaps(model, truth, restraints)
    jobs = []
    for _, _, side, partners in swaps:
        mask = crossings._within_bonds(np.concatenate([side, partners]), restraints.bond_atoms, len(model.atoms), 2)
        jobs += [(crossings.swap_conformers(model, side, partners), mask), (model, mask)]
    results = crossings._refine_all(jobs, table, restraints, opt, None)
    print(f"{len(swaps)} tangled residues; the search accepts a gain above {crossings.MIN_GAIN:.0e} with |z| <= "
          f"{crossings.GEOMETRY_Z_MAX:g} (or the unswapped model's worst)")
    for k, (label, names, _, _) in enumerate(swaps):
        swapped, unswapped = results[2 * k], results[2 * k + 1]
        j1, j0 = swapped.cycles[-1].objective, unswapped.cycles[-1].objective
        mask = jobs[2 * k][1]
        print(f"{label:12s} swap {','.join(names):28s} gain {(j0 - j1) / abs(j0):+.2e}  worst |z| swapped "
              f"{crossings._worst_z(swapped.xyz, restraints, mask):.1f}, unswapped "
              f"{crossings._worst_z(unswapped.xyz, restraints, mask):.1f}", flush=True)


if __name__ == "__main__":
    main()
