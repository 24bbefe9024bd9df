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

--all-kinds judges instead every swap of those kinds in every two-conformer residue (each terminal
heavy atom alone, the N alone, the carbonyl C+O, the side chain from CB on; at least one atom 0.1 Å
from its partner) and counts, by the truth, how many the judge would take rightly (the residue's
label mismatches fall) and wrongly (they rise), at several gain thresholds.

Usage: python benchmarks/diagnose_untangle_swaps.py MODEL [--all-kinds [--limit N]] [--truth ground_truth.pdb]
       [--data refme.mtz]
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
    out = []
    for r in np.flatnonzero(_tangled_mask(model, res, label, conf)):  # the tangled residues: a few
        sel = (res == r) & (conf == 0)
        keep = np.bincount(label[sel], minlength=3)[1:].argmax() + 1
        side = idx[sel][label[sel] != keep]
        side = _with_hydrogens(model, restraints, side, partner, conf_a)
        names = [str(at.name[i]) for i in side if not at.is_hydrogen[i]]
        out.append((model.residues.label(int(r)), names, side, partner[side]))
    return out


def _with_hydrogens(model, restraints, side, partner, conf_a):
    """`side` and the hydrogens of conformer `conf_a` bonded to it, those with a partner."""
    bonds = restraints.bond_atoms.astype(np.int64)
    at = model.atoms
    hs = np.unique(bonds[np.isin(bonds, side).any(axis=1)].ravel())
    hs = hs[at.is_hydrogen[hs] & (at.conformer[hs] == conf_a)]
    side = np.concatenate([side, hs]).astype(np.int64)
    return side[partner[side] >= 0]


def label_mismatches(model, truth):
    """Per residue: scored atoms whose truth label differs from their conformer's majority label."""
    idx, label, conf, _ = _truth_labels(model, truth)
    res = model.atoms.residue_index[idx]
    n = np.zeros(len(model.residues), dtype=np.int64)
    for c in (0, 1):
        counts = np.zeros((len(model.residues), 3), dtype=np.int64)
        np.add.at(counts, (res[conf == c], label[conf == c]), 1)
        n += counts[:, 1:].sum(axis=1) - counts[:, 1:].max(axis=1)
    return n


def swaps_of_every_kind(model, restraints):
    """[(residue index, side)] for every two-conformer residue: each terminal heavy atom alone, the N
    alone, the carbonyl C+O, the side chain from CB on (a set whose atoms all sit within 0.1 Å of
    their partners is left out)."""
    at = model.atoms
    conf_a, conf_b = sorted({int(c) for c in at.conformer if c > 0})[:2]
    partner = crossings.conformer_partners(model)[(conf_a, conf_b)]
    heavy = ~at.is_hydrogen
    hb = restraints.bond_atoms.astype(np.int64)
    hb = hb[heavy[hb].all(axis=1)]
    degree = np.bincount(hb.ravel(), minlength=len(at))
    own = (at.conformer == conf_a) & heavy & (partner >= 0)
    out = []
    for r in np.unique(at.residue_index[own]):  # setup of a diagnostic: a loop over residues
        atoms = np.flatnonzero(own & (at.residue_index == r))
        names = {str(at.name[i]): i for i in atoms}
        sets = [[i] for i in atoms if degree[i] == 1 and at.name[i] != "C"]
        sets += [[names["N"]]] if "N" in names else []
        sets += [[names["C"], names["O"]]] if "C" in names and "O" in names else []
        chain = [i for n, i in names.items() if n not in ("N", "CA", "C", "O", "OXT")]
        sets += [chain] if chain else []
        for s in sorted({tuple(sorted(x)) for x in sets}):
            s = np.array(s)
            if np.linalg.norm(at.xyz[s] - at.xyz[partner[s]], axis=1).max() >= 0.1:
                out.append((int(r), _with_hydrogens(model, restraints, s, partner, conf_a)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--truth", default=str(CASE / "ground_truth.pdb"))
    ap.add_argument("--data", default=str(CASE / "refme.mtz"))
    ap.add_argument("--labin", default="F=F,SIGF=SIGF,FREE=FreeR_flag")
    ap.add_argument("--all-kinds", action="store_true",
                    help="judge every swap of the same kinds and count right and wrong acceptances (~40 min on 1AHO)")
    ap.add_argument("--limit", type=int, default=None, metavar="N",
                    help="with --all-kinds: judge only the first N candidates (a quick look)")
    args = ap.parse_args()
    model, truth = read_model(args.model), read_model(args.truth)
    table = read_reflections(args.data, labin=args.labin)
    restraints = build_restraints(model)
    # the crossing search's judge: its weight and its local refinement settings
    weight = refine_xray(model, table, restraints, XrayOptions(target="ls", cycles=2, adp="fixed", occupancies=False,
                                                               minimiser="lbfgs"), log=crossings._quiet).weight
    opt = XrayOptions(target="ls", cycles=1, weight=weight, adp="fixed", occupancies=False, geometry_rescue=False,
                      iterations=crossings.LOCAL_ITERATIONS, minimiser="lbfgs")
    if args.all_kinds:
        return judge_every_kind(model, truth, table, restraints, opt, args.limit)
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


def judge_every_kind(model, truth, table, restraints, opt, limit=None):
    """Judge every candidate of `swaps_of_every_kind` (the first `limit`) as the crossing search
    would, and count by the truth the swaps taken rightly and wrongly at several gain thresholds."""
    at = model.atoms
    conf_a, conf_b = sorted({int(c) for c in at.conformer if c > 0})[:2]
    partner = crossings.conformer_partners(model)[(conf_a, conf_b)]
    before = label_mismatches(model, truth)
    rows = []
    cands = swaps_of_every_kind(model, restraints)
    print(f"{len(cands)} candidate swaps" + (f", the first {limit} judged" if limit else ""), flush=True)
    cands = cands[:limit]
    for r, side in cands:
        swapped = crossings.swap_conformers(model, side, partner[side])
        mask = crossings._within_bonds(np.concatenate([side, partner[side]]), restraints.bond_atoms, len(at), 2)
        res = crossings._refine_all([(swapped, mask), (model, mask)], table, restraints, opt, None)
        j1, j0 = res[0].cycles[-1].objective, res[1].cycles[-1].objective
        z1, z0 = (crossings._worst_z(x.xyz, restraints, mask) for x in res)
        change = int(label_mismatches(swapped, truth)[r] - before[r])
        rows.append(((j0 - j1) / abs(j0), z1 <= max(crossings.GEOMETRY_Z_MAX, z0), change))
        names = ",".join(str(at.name[i]) for i in side if not at.is_hydrogen[i])
        print(f"{model.residues.label(r):12s} {names:28s} gain {rows[-1][0]:+.2e} |z| {z1:.1f}/{z0:.1f} "
              f"mismatches {change:+d}", flush=True)
    for threshold in (crossings.MIN_GAIN, 1e-4, 3e-4, 1e-3, 3e-3):
        taken = [c for g, ok, c in rows if g > threshold and ok]
        print(f"gain > {threshold:.0e}: {len(taken)} taken, {sum(c < 0 for c in taken)} right, "
              f"{sum(c > 0 for c in taken)} wrong, {sum(c == 0 for c in taken)} neither; right ones judged: "
              f"{sum(c < 0 for _, _, c in rows)}")


if __name__ == "__main__":
    main()
