"""Would the data and restraints accept the right relabelling of each residue still tangled?

A developer's diagnostic for `drefine untangle` on the 1AHO challenge: it reads the ground truth, so it
tells where the method falls short, not what the method may do. For every residue of MODEL still tangled
by the challenge's rule, conformer A keeps the truth label most of its scored atoms carry; the others
(with their hydrogens) exchange positions and ADPs with their conformer-B partners. That variant and the
model itself are refined alike and locally, as one of drefine's judges does
(`drefine/untangle/crossings.py`; --judge positions: the crossing search's, atoms within two bonds
move, least squares at one fixed weight; --judge residue: the residue swap search's, which also
refines their B factors, three bonds out), and the relative gain of the objective and the worst
bond/angle |z| near the swap are printed. A positive gain above the search's threshold with
acceptable geometry means the judge would take the right swap.

--all-kinds judges instead every candidate of the residue swap search (`residue_swap_candidates`:
each terminal heavy atom alone, the N alone, the carbonyl C+O, the side chain from CB on; at least
one atom 0.1 Å from its partner) and counts, by the truth, how many the judge would take rightly (the
residue's label mismatches fall) and wrongly (they rise), at several gain thresholds, all candidates
and the best of each residue.

--from-report JSON counts the same way, without refining anything, the verdicts a `drefine untangle`
run's residue swap search gave in its first round (the run's PREFIX.json); MODEL is then that run's RRR
output (a `--no-residue-swaps` run resumed from the same checkpoint has the same coordinates).

Usage: python benchmarks/diagnose_untangle_swaps.py MODEL [--judge positions|residue] [--all-kinds [--limit N]]
       [--from-report JSON] [--truth ground_truth.pdb] [--data refme.mtz]
"""
import argparse
import json
from pathlib import Path

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
        side = crossings.with_hydrogens(model, restraints, side, partner)
        names = [str(at.name[i]) for i in side if not at.is_hydrogen[i]]
        out.append((model.residues.label(int(r)), names, side, partner[side]))
    return out


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--truth", default=str(CASE / "ground_truth.pdb"))
    ap.add_argument("--data", default=str(CASE / "refme.mtz"))
    ap.add_argument("--labin", default="F=F,SIGF=SIGF,FREE=FreeR_flag")
    ap.add_argument("--all-kinds", action="store_true",
                    help="judge every swap of the same kinds and count right and wrong acceptances (~40 min on 1AHO)")
    ap.add_argument("--judge", choices=("positions", "residue"), default="residue",
                    help="positions: the crossing search's judge; residue: the residue swap search's (default)")
    ap.add_argument("--limit", type=int, default=None, metavar="N",
                    help="with --all-kinds: judge only the first N candidates (a quick look)")
    ap.add_argument("--from-report", metavar="JSON",
                    help="count the first-round residue swap verdicts of a run's report instead of judging")
    args = ap.parse_args()
    model, truth = read_model(args.model), read_model(args.truth)
    if args.from_report:
        return count_reported(model, truth, build_restraints(model), args.from_report)
    table = read_reflections(args.data, labin=args.labin)
    restraints = build_restraints(model)
    # the judge's weight and its local refinement settings (crossings.resolve_crossings)
    weight = refine_xray(model, table, restraints, XrayOptions(target="ls", cycles=2, adp="fixed", occupancies=False,
                                                               minimiser="lbfgs"), log=crossings._quiet).weight
    residue = args.judge == "residue"
    opt = XrayOptions(target="ls", cycles=1, weight=weight, adp="iso" if residue else "fixed", occupancies=False,
                      geometry_rescue=False, iterations=crossings.LOCAL_ITERATIONS, minimiser="lbfgs")
    hops = crossings.RESIDUE_HOPS if residue else 2
    min_gain = crossings.RESIDUE_MIN_GAIN if residue else crossings.MIN_GAIN
    if args.all_kinds:
        return judge_every_kind(model, truth, table, restraints, opt, hops, args.limit)
    swaps = truth_consistent_swaps(model, truth, restraints)
    jobs = []
    for _, _, side, partners in swaps:
        mask = crossings._within_bonds(np.concatenate([side, partners]), restraints.bond_atoms, len(model.atoms), hops)
        jobs += [(crossings.swap_conformers(model, side, partners), mask), (model, mask)]
    results = crossings._refine_all(jobs, table, restraints, opt, None)
    print(f"{len(swaps)} tangled residues; the search accepts a gain above {min_gain:.0e} with |z| <= "
          f"{crossings.GEOMETRY_Z_MAX:g} (or the unswapped model's worst)")
    for k, (label, names, _, _) in enumerate(swaps):
        swapped, unswapped = results[2 * k], results[2 * k + 1]
        j1, j0 = swapped.objective, unswapped.objective
        mask = jobs[2 * k][1]
        print(f"{label:12s} swap {','.join(names):28s} gain {(j0 - j1) / abs(j0):+.2e}  worst |z| swapped "
              f"{crossings._worst_z(swapped.xyz, restraints, mask):.1f}, unswapped "
              f"{crossings._worst_z(unswapped.xyz, restraints, mask):.1f}", flush=True)


def judge_every_kind(model, truth, table, restraints, opt, hops, limit=None):
    """Judge every candidate of `residue_swap_candidates` (the first `limit`) with `opt` and `hops`,
    and count by the truth the swaps taken rightly and wrongly at several gain thresholds: all of
    them, and the best of each residue (as the search takes them)."""
    at = model.atoms
    before = label_mismatches(model, truth)
    rows = []
    cands = crossings.residue_swap_candidates(model, restraints)
    print(f"{len(cands)} candidate swaps" + (f", the first {limit} judged" if limit else ""), flush=True)
    cands = cands[:limit]
    for c in cands:
        side, r = c.side, int(at.residue_index[c.p])
        swapped = crossings.swap_conformers(model, side, c.partners)
        mask = crossings._within_bonds(np.concatenate([side, c.partners]), restraints.bond_atoms, len(at), hops)
        res = crossings._refine_all([(swapped, mask), (model, mask)], table, restraints, opt, None)
        j1, j0 = res[0].objective, res[1].objective
        z1, z0 = (crossings._worst_z(x.xyz, restraints, mask) for x in res)
        change = int(label_mismatches(swapped, truth)[r] - before[r])
        rows.append(((j0 - j1) / abs(j0), z1 <= max(crossings.GEOMETRY_Z_MAX, z0), change, r))
        names = ",".join(str(at.name[i]) for i in side if not at.is_hydrogen[i])
        print(f"{model.residues.label(r):12s} {names:28s} gain {rows[-1][0]:+.2e} |z| {z1:.1f}/{z0:.1f} "
              f"mismatches {change:+d}", flush=True)
    count_verdicts(rows)


def count_reported(model, truth, restraints, report_path):
    """The first-round residue swap verdicts of a run (gain, worst |z| swapped and unswapped per
    candidate, in its report) counted by the truth as `judge_every_kind` counts its own."""
    rounds = json.loads(Path(report_path).read_text())["crossings"]["residue_swaps"]["rounds"]
    verdicts = {c["bond"]: c for c in rounds[0]["candidates"]}
    before = label_mismatches(model, truth)
    rows, labels = [], []
    for c in crossings.residue_swap_candidates(model, restraints):
        if c.label not in verdicts:
            raise SystemExit(f"{c.label} is not in {report_path}: MODEL is not the RRR output that run searched")
        v, r = verdicts[c.label], int(model.atoms.residue_index[c.p])
        change = int(label_mismatches(crossings.swap_conformers(model, c.side, c.partners), truth)[r] - before[r])
        rows.append((v["gain"], v["worst_z"] <= max(crossings.GEOMETRY_Z_MAX, v["worst_z_model"]), change, r))
        labels.append(c.label)
    print(f"{len(rows)} candidate swaps, verdicts from {report_path}")
    count_verdicts(rows)
    accepted = set(rounds[0]["accepted"])
    print("round 1 accepted: " + ", ".join(f"{lab} ({'right' if row[2] < 0 else 'wrong' if row[2] > 0 else 'neither'})"
                                           for lab, row in zip(labels, rows) if lab in accepted))


def count_verdicts(rows):
    """rows: (relative gain, geometry acceptable, change of the residue's label mismatches, residue)."""
    for threshold in (crossings.MIN_GAIN, 1e-4, 3e-4, 1e-3, 3e-3):
        taken = [row for row in rows if row[0] > threshold and row[1]]
        best = {}
        for row in taken:
            if row[3] not in best or row[0] > best[row[3]][0]:
                best[row[3]] = row
        for what, sel in (("taken", taken), ("best of each residue", list(best.values()))):
            print(f"gain > {threshold:.0e}, {what}: {len(sel)}, {sum(x[2] < 0 for x in sel)} right, "
                  f"{sum(x[2] > 0 for x in sel)} wrong, {sum(x[2] == 0 for x in sel)} neither")
    print(f"right ones judged: {sum(x[2] < 0 for x in rows)}")


if __name__ == "__main__":
    main()
