"""Mirror-image flips that the map can judge but gradient refinement cannot make: either-handed
chiral centres and proline ring puckers.

The library marks some centres as either-handed ("both": Val CB, Leu CG, whose two methyls are
alike), so the chiral restraint only keeps the centre out of its substituents' plane. A start
that put the centre atom across that plane (a shaken model, a poor fit) refines into the mirror
image: the restraint's barrier at the plane holds the atom there, though the map wants it on
the other side (4hg7 at 3 Å shaken by 0.5 Å: Leu 35, Val 75, Leu 81, Val 108, 0.4–0.7 Å off and
half the model's squared error; servalcat leaves three of them too). A proline ring is the same
kind of trap: its CG sits on one side of the CA-CB-CD plane (the endo or exo envelope), and the
ring's angle and torsion restraints hold it there (4hg7: Pro 20 and Pro 30, CG 0.6 Å off). Density
at the moving atom does not tell the two states apart (the refined atom sits in density either
way), so every candidate is judged.

A flip mirrors one atom (and its hydrogens, which stay on its far side) through the plane of
three others: the chiral centre through its substituents, proline CG through CA, CB, CD. The
judge is the peptide flips' (local_search.LocalJudge): the residue is refined alone from the model
as it is and from the flipped model, and the flip is kept when its refined objective
(w · atom-centred map target + restraints) is lower. To judge hundreds in one go, the candidates
are coloured so that no restraint or contact joins two regions of one colour; the objective is
then a sum of independent per-region parts, one refinement of a colour's union serves all its
regions, and each region's change is read off exactly from its own map values and the terms
that involve it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ..io.maps import DensityMap
from ..model.arrays import Model
from ..restraints.nonbonded import NonbondedPairs, find_nonbonded_pairs
from ..restraints.topology import Restraints
from .local_search import LocalJudge

FLIP_ITERATIONS = 40  # L-BFGS iterations for a colour's union of regions
FLIP_SEARCH_BUFFER = 2.0  # Å beyond the repulsion cutoff: a flip moves its atom ~1 Å


@dataclass
class MirrorFlipReport:
    judged: int = 0
    flipped: list[str] = field(default_factory=list)  # labels of the mirrored atoms

    def as_dict(self) -> dict:
        return {"judged": self.judged, "flipped": self.flipped}


def mirror_through_plane(points: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """`points` (n, 3) reflected through the plane of a, b, c (Å)."""
    n = np.cross(b - a, c - a)
    n /= np.linalg.norm(n)
    return points - 2.0 * ((points - a) @ n)[:, None] * n


def hydrogens_of(model: Model, restraints: Restraints, centres: np.ndarray) -> dict[int, list[int]]:
    """Atom of `centres` → the hydrogens bonded to it (by the bond restraints)."""
    b = restraints.bond_atoms
    is_h = model.atoms.is_hydrogen
    both_ways = np.concatenate([b, b[:, ::-1]])
    hit = both_ways[np.isin(both_ways[:, 0], centres) & is_h[both_ways[:, 1]]]
    out: dict[int, list[int]] = {}
    for centre, h in hit.tolist():  # a few per centre
        out.setdefault(centre, []).append(h)
    return out


def mirror_flip(xyz: np.ndarray, row: np.ndarray, hydrogens: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Atom row[0] and its hydrogens, and their positions mirrored through the plane of row[1:4]
    (a mirrored hydrogen stays on the far side of the plane)."""
    moving = np.array([int(row[0]), *hydrogens.get(int(row[0]), [])], dtype=np.int64)
    return moving, mirror_through_plane(xyz[moving], *xyz[row[1:4]])


def mirrored(xyz: np.ndarray, row: np.ndarray, hydrogens: dict[int, list[int]]) -> np.ndarray:
    """Coordinates with the mirror flip of `row` made (see mirror_flip)."""
    moving, moved = mirror_flip(xyz, row, hydrogens)
    out = xyz.copy()
    out[moving] = moved
    return out


def _incidence(rows: np.ndarray, n_atoms: int) -> sp.csr_matrix:
    """Terms × atoms incidence of fixed-arity restraint rows."""
    rows = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)
    t = np.repeat(np.arange(len(rows)), rows.shape[1])
    return sp.csr_matrix((np.ones(rows.size, dtype=np.int8), (t, rows.ravel())), shape=(len(rows), n_atoms))


def independent_colours(regions: list[np.ndarray], restraints: Restraints, pairs: NonbondedPairs, rama,
                        n_atoms: int) -> list[list[int]]:
    """Regions grouped so that within a group no two share an atom, a restraint or a contact
    (greedy colouring, largest conflict count first): the local objective of a group's union is
    then the sum of its regions' objectives."""
    r = restraints
    terms = [_incidence(x, n_atoms) for x in (r.bond_atoms, r.angle_atoms, r.torsion_atoms, r.chiral_atoms)
             if len(x)]
    if len(r.plane_atoms):
        plane_of = np.repeat(np.arange(len(r.plane_start) - 1), np.diff(r.plane_start))
        terms.append(sp.csr_matrix((np.ones(len(plane_of), dtype=np.int8), (plane_of, r.plane_atoms)),
                                   shape=(len(r.plane_start) - 1, n_atoms)))
    if pairs is not None and len(pairs.i):
        terms.append(_incidence(np.c_[pairs.i, pairs.j], n_atoms))
    if rama is not None and len(rama):
        terms.append(_incidence(rama.atoms, n_atoms))
    member = sp.csr_matrix((np.ones(sum(len(g) for g in regions), dtype=np.int8),
                            (np.repeat(np.arange(len(regions)), [len(g) for g in regions]),
                             np.concatenate(regions))), shape=(len(regions), n_atoms))
    touch = sp.hstack([member @ t.T for t in terms] + [member]).tocsr()  # regions × (terms, atoms)
    touch.data[:] = 1
    conflict = (touch.astype(np.int32) @ touch.T.astype(np.int32)).tolil()
    neighbours = [set(row) - {k} for k, row in enumerate(conflict.rows)]
    colour = np.full(len(regions), -1)
    for k in sorted(range(len(regions)), key=lambda k: -len(neighbours[k])):
        used = {colour[j] for j in neighbours[k]}
        colour[k] = next(c for c in range(len(regions)) if c not in used)
    return [np.flatnonzero(colour == c).tolist() for c in range(colour.max() + 1)]


def proline_puckers(model: Model, restraints: Restraints) -> np.ndarray:
    """(CG, CA, CB, CD) of every restrained proline ring: CG mirrored through the CA-CB-CD plane is
    the other envelope pucker (endo/exo)."""
    a = model.atoms
    ang = restraints.angle_atoms
    resname = model.residues.name[a.residue_index]
    # CB-CG-CD angles of prolines give (CG, CB, CD); the CA-CB-CG angle at that CB gives CA
    vertex_cg = ang[(a.name[ang[:, 1]] == "CG") & (resname[ang[:, 1]] == "PRO")]
    if not len(vertex_cg):
        return np.zeros((0, 4), dtype=np.int64)
    ends = np.sort(vertex_cg[:, [0, 2]], axis=1)
    first_is_cb = a.name[ends[:, 0]] == "CB"
    cb = np.where(first_is_cb, ends[:, 0], ends[:, 1])
    cd = np.where(first_is_cb, ends[:, 1], ends[:, 0])
    cg = vertex_cg[:, 1]
    at_cb = ang[np.isin(ang[:, 1], cb)]
    ca_of = {}
    for i, j, k in at_cb.tolist():  # a few angles per proline
        for end in (i, k):
            if a.name[end] == "CA":
                ca_of[j] = end
    ca = np.array([ca_of.get(int(b), -1) for b in cb], dtype=np.int64)
    rows = np.c_[cg, ca, cb, cd]
    return rows[ca >= 0]


def flip_candidates(model: Model, restraints: Restraints) -> np.ndarray:
    """(moving atom, three plane atoms) of every either-handed chiral centre and proline ring
    outside alternate conformers: there the mirrored atom of one conformer can land in the other's
    density and fit it better than its own (1AHO's Pro 41 A, against its own map: CG 0.3 → 0.8 Å
    off when flipped), so those are left alone."""
    rows = np.concatenate([restraints.chiral_atoms[restraints.chiral_both].astype(np.int64),
                           proline_puckers(model, restraints)])
    return rows[(model.atoms.altloc[rows] == "").all(axis=1)]


def judge_mirror_flips(model: Model, xyz: np.ndarray, dmap: DensityMap, restraints: Restraints, rama,
                       weight: float, periodic: bool) -> tuple[np.ndarray, MirrorFlipReport]:
    """Judge the mirror flip of every candidate; keep those the local objective prefers (module
    docstring). Returns the new coordinates (all atoms, Å) and a report."""
    report = MirrorFlipReport()
    idx = restraints.atom_indices
    rows = flip_candidates(model, restraints)
    if not len(rows):
        return xyz, report
    # a flip's region is its residue (all its restrained atoms): group the atoms by residue once
    res = model.atoms.residue_index
    by_res = idx[np.argsort(res[idx], kind="stable")]
    starts = np.searchsorted(res[by_res], res[rows[:, 0]], side="left")
    ends = np.searchsorted(res[by_res], res[rows[:, 0]], side="right")
    regions = [by_res[a:b] for a, b in zip(starts, ends)]
    work = model.copy()
    work.atoms.xyz = xyz
    # one contact search for every judge, wide enough for the flipped states
    pairs = find_nonbonded_pairs(work, restraints, xyz, buffer=FLIP_SEARCH_BUFFER,
                                 near=np.unique(np.concatenate(regions)))
    xyz = xyz.copy()
    hydrogens = hydrogens_of(model, restraints, rows[:, 0])
    for members in independent_colours(regions, restraints, pairs, rama, len(model.atoms)):
        union = np.unique(np.concatenate([regions[k] for k in members]))
        work.atoms.xyz = xyz
        judge = LocalJudge(work, dmap, restraints, rama, weight, periodic, union, FLIP_SEARCH_BUFFER,
                           FLIP_ITERATIONS, pairs=pairs)
        start_b = xyz.copy()
        for k in members:
            moving, moved = mirror_flip(xyz, rows[k], hydrogens)
            start_b[moving] = moved
        as_is, _ = judge.refined(xyz)
        flipped, _ = judge.refined(start_b)
        # regions of one colour share no term: each one's change is its own terms' change
        keep = [k for k in members if judge.change_of_part(as_is, flipped, regions[k]) < 0.0]
        xyz = as_is
        for k in keep:
            xyz[regions[k]] = flipped[regions[k]]
            report.flipped.append(model.atom_label(int(rows[k, 0])))
        report.judged += len(members)
    return xyz, report
