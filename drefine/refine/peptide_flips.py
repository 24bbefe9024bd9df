"""Peptide flips for residues that became Ramachandran outliers during real-space refinement.

A map can pull a residue across a ridge of the Ramachandran potential into a forbidden region
(3j6b: LYS 63 to φ 138°, ψ −39°). Gradient refinement cannot come back: the way back rotates a
whole peptide plane through an eclipsed conformation. The classic cure is a peptide flip: turn
the peptide unit on either side of the residue (C, O of the residue before, N, H of the
residue; or C, O of the residue, N, H of the next) by 180° about its CA–CA axis, which leaves
every CA and side chain in place and moves φ (or ψ) by about 180°.

Each candidate flip is judged like a weight-scan trial: the residue and its neighbours (two on
each side) are refined alone, from the model as it is and from the flipped model, against the
same objective (w · atom-centred map target + restraints, Ramachandran restraints included);
the flip is kept when its refined objective is lower and the residue is then no outlier.

Where no flip helps, two more candidates ("escapes"): the same region refined first with the
Ramachandran term five times as strong, from the model as it is and from the input's
coordinates of the region, then judged like the flips (refined with the normal objective; kept
when that is lower and the outlier is cured). The strong term carries the backbone over the
ridge that held it; the normal objective then decides. 3j6b's LYS 63 (input φ 80°, ψ −46°,
refined to 124°, −50°, an outlier) returns from its input coordinates to 87°, −63° (allowed)
with a local objective 27 lower.
Only residues that are outliers now and were not in the input are tried, so a deposited
model's own outliers are left to the user. Written here because no library offers it for
this package's arrays (phenix's flip search lives inside cctbx).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..io.maps import DensityMap
from ..model.arrays import Model
from ..restraints.nonbonded import find_nonbonded_pairs
from ..restraints.ramachandran import RamachandranRestraints, outlier_rows
from ..restraints.topology import Restraints
from .local_search import LocalJudge

FLIP_NEIGHBOURS = 2  # residues on each side refined with a flip
FLIP_ITERATIONS = 100
FLIP_SEARCH_BUFFER = 4.0  # Å added to the repulsion cutoff when listing contacts


RAMA_ESCAPE_FACTOR = 5.0  # the Ramachandran term's strength in an escape's first refinement


@dataclass
class FlipReport:
    tried: list[str] = field(default_factory=list)
    flipped: list[str] = field(default_factory=list)
    escaped: list[str] = field(default_factory=list)  # cured by an escape (module docstring), not a flip

    def as_dict(self) -> dict:
        return {"tried": self.tried, "flipped": self.flipped, "escaped": self.escaped}


def _atom_in(model: Model, residue: int, name: str, like: int) -> int:
    """Index of atom `name` of `residue` in the conformer of atom `like` (shared atoms count), or −1."""
    a = model.atoms
    cand = np.flatnonzero((a.residue_index == residue) & (a.name == name))
    conf = a.conformer[like]
    cand = cand[(a.conformer[cand] == 0) | (a.conformer[cand] == conf) | (conf == 0)]
    return int(cand[0]) if len(cand) else -1


def peptide_units(model: Model, row: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
    """The two peptide units around a Ramachandran row (C(i−1), N, CA, C, N(i+1)): for each, the
    atoms that turn (C, O, N, H) and the two CA atoms of its axis."""
    c_prev, n, _, c, n_next = (int(x) for x in row)
    res = model.atoms.residue_index
    units = []
    for c_at, n_at in ((c_prev, n), (c, n_next)):
        ca_a = _atom_in(model, int(res[c_at]), "CA", c_at)
        ca_b = _atom_in(model, int(res[n_at]), "CA", n_at)
        o = _atom_in(model, int(res[c_at]), "O", c_at)
        h = _atom_in(model, int(res[n_at]), "H", n_at)
        if ca_a < 0 or ca_b < 0:
            continue
        moving = np.array([x for x in (c_at, o, n_at, h) if x >= 0], dtype=np.int64)
        units.append((moving, ca_a, ca_b))
    return units


def flipped(xyz: np.ndarray, moving: np.ndarray, ca_a: int, ca_b: int) -> np.ndarray:
    """Coordinates with `moving` turned by 180° about the ca_a–ca_b axis."""
    axis = xyz[ca_b] - xyz[ca_a]
    axis /= np.linalg.norm(axis)
    d = xyz[moving] - xyz[ca_a]
    along = (d @ axis)[:, None] * axis
    out = xyz.copy()
    out[moving] = xyz[ca_a] + 2 * along - d  # R(180°) d = 2(d·u)u − d
    return out


def flip_new_outliers(model: Model, xyz: np.ndarray, dmap: DensityMap, restraints: Restraints,
                      rama: RamachandranRestraints, weight: float, periodic: bool,
                      start_xyz: np.ndarray) -> tuple[np.ndarray, FlipReport]:
    """Try both peptide flips of every residue that is a Ramachandran outlier at `xyz` but was
    not at `start_xyz`; keep a flip that the local objective prefers and that cures the outlier."""
    report = FlipReport()
    new = np.flatnonzero(outlier_rows(xyz, rama) & ~outlier_rows(start_xyz, rama))
    if not len(new):
        return xyz, report
    xyz = xyz.copy()
    work = model.copy()
    res = model.atoms.residue_index
    idx = restraints.atom_indices
    chain = model.residues.chain_index
    centres = [int(res[rama.atoms[r][2]]) for r in new]
    segments = [idx[(np.abs(res[idx] - c) <= FLIP_NEIGHBOURS) & (chain[res[idx]] == chain[c])] for c in centres]
    pairs = None
    for k, (r, centre, segment) in enumerate(zip(new, centres, segments)):
        row = rama.atoms[r]
        label = model.residues.label(centre)
        report.tried.append(label)
        work.atoms.xyz = xyz
        if pairs is None:
            # one contact search for the judges to come, wide enough for the flipped states (a flip
            # moves O by ~3 Å); searched again after a flip is kept
            pairs = find_nonbonded_pairs(work, restraints, xyz, buffer=FLIP_SEARCH_BUFFER,
                                         near=np.concatenate(segments[k:]))
        judge = LocalJudge(work, dmap, restraints, rama, weight, periodic, segment, FLIP_SEARCH_BUFFER,
                           FLIP_ITERATIONS, pairs=pairs)
        # the model as it is, refined alike: a flip must beat that, not the unrefined start
        _, f_best = judge.refined(xyz)
        best = None
        this_row = rama.subset(np.arange(len(rama)) == r)
        for moving, ca_a, ca_b in peptide_units(model, row):
            full, f_cand = judge.refined(flipped(xyz, moving, ca_a, ca_b))
            if f_cand < f_best and not outlier_rows(full, this_row)[0]:
                best, f_best = full, f_cand
        kind = "flipped"
        if best is None:
            strong = LocalJudge(work, dmap, restraints, replace(rama, potential=rama.potential * RAMA_ESCAPE_FACTOR),
                                weight, periodic, segment, FLIP_SEARCH_BUFFER, FLIP_ITERATIONS, pairs=pairs)
            from_input = xyz.copy()
            from_input[segment] = start_xyz[segment]
            for origin in (xyz, from_input):
                full, f_cand = judge.refined(strong.refined(origin)[0])
                if f_cand < f_best and not outlier_rows(full, this_row)[0]:
                    best, f_best, kind = full, f_cand, "escaped"
        if best is not None:
            xyz = best
            getattr(report, kind).append(label)
            pairs = None
    return xyz, report
