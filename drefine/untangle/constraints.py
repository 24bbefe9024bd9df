"""Divide-and-concur geometry: constraint sets from the restraint dictionary, replicas, RRR.

Every constraint owns a replica of the positions of its atoms (Gravel & Elser 2008). The sets:
- bonds: |a − b| within ideal ± tol (tol = the dictionary's σ);
- angles: the rigid 3-atom motif built from the two ideal bond lengths and the ideal angle;
- chiral centres: the rigid 4-atom motif (centre and three neighbours) from the ideal bonds and
  angles with the dictionary's handedness (both hands where the dictionary allows either);
- volume exclusion: pairs closer than the repulsion distance minus 0.4 Å pushed apart (atoms of
  different conformers never exclude each other: the neighbour search already skips them).
Ideal values come from `restraints.topology.Restraints` (the CCP4 monomer library the rest of
drefine uses). The concur projection takes every atom to the η-weighted mean of its replicas
(η = 10 for geometry, 1 for exclusion), and RRR iterates
    x ← x + β (P_C(2 P_D(x) − x) − P_D(x)),
the gap |P_C(2P_D(x) − x) − P_D(x)| measuring how far the constraint sets are from agreeing.
Not here yet: planes, torsion motifs, disulfide pairing in the loop, symmetry-related exclusion
pairs, and the density variables with their structure-factor projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model.arrays import Model
from ..restraints.topology import Restraints
from .projections import concur_positions, project_bonds, project_exclusion, project_rigid_motifs

ETA_GEOMETRY = 10.0
ETA_EXCLUSION = 1.0
EXCLUSION_ALLOWANCE = 0.4  # Å below the repulsion distance
MOTIF_TOLERANCE = 0.05  # Å, radius of the tolerance ball around a rigid motif (in its 3k-space)


@dataclass
class _Group:
    kind: str  # "bond", "motif", "exclusion"
    atoms: np.ndarray  # (n, k)
    eta: float
    ideal: np.ndarray | None = None  # bonds: length; exclusion: minimum distance
    tol: np.ndarray | None = None
    motifs: np.ndarray | None = None  # (n, m, k, 3)


def _bond_lookup(r: Restraints):
    pairs = np.sort(r.bond_atoms, axis=1).astype(np.int64)
    keys = pairs[:, 0] * (r.n_atoms + 1) + pairs[:, 1]
    order = np.argsort(keys)
    keys, ideal = keys[order], r.bond_ideal[order]

    def length(i, j):
        k = np.minimum(i, j) * (r.n_atoms + 1) + np.maximum(i, j)
        pos = np.clip(np.searchsorted(keys, k), 0, len(keys) - 1)
        found = keys[pos] == k
        return np.where(found, ideal[pos], np.nan)

    return length


def _angle_lookup(r: Restraints):
    a = r.angle_atoms.astype(np.int64)
    ends = np.sort(a[:, [0, 2]], axis=1)
    n = r.n_atoms + 1
    keys = (a[:, 1] * n + ends[:, 0]) * n + ends[:, 1]
    order = np.argsort(keys)
    keys, ideal = keys[order], r.angle_ideal[order]

    def angle(centre, i, j):
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        k = (centre * n + lo) * n + hi
        pos = np.clip(np.searchsorted(keys, k), 0, len(keys) - 1)
        return np.where(keys[pos] == k, ideal[pos], np.nan)

    return angle


def _angle_motifs(r: Restraints, length) -> tuple[np.ndarray, np.ndarray]:
    """(atoms (n, 3) in restraint order, motifs (n, 1, 3, 3)): end, centre, end."""
    a = r.angle_atoms.astype(np.int64)
    l1, l2 = length(a[:, 0], a[:, 1]), length(a[:, 2], a[:, 1])
    ok = np.isfinite(l1) & np.isfinite(l2)
    a, l1, l2, th = a[ok], l1[ok], l2[ok], r.angle_ideal[ok]
    m = np.zeros((len(a), 1, 3, 3))
    m[:, 0, 0, 0] = l1
    m[:, 0, 2, 0] = l2 * np.cos(th)
    m[:, 0, 2, 1] = l2 * np.sin(th)
    return a, m


def _chiral_motifs(r: Restraints, length, angle) -> tuple[np.ndarray, np.ndarray]:
    """(atoms (n, 4): centre, i, j, m; motifs (n, 2, 4, 3): the dictionary's hand, and the other
    hand too where either is allowed, else the same hand twice)."""
    c = r.chiral_atoms.astype(np.int64)
    o, i, j, k = c.T
    li, lj, lk = length(o, i), length(o, j), length(o, k)
    tij, tik, tjk = angle(o, i, j), angle(o, i, k), angle(o, j, k)
    ok = np.isfinite(li + lj + lk + tij + tik + tjk)
    c, li, lj, lk, tij, tik, tjk = c[ok], li[ok], lj[ok], lk[ok], tij[ok], tik[ok], tjk[ok]
    sign, both = np.sign(r.chiral_ideal[ok]), r.chiral_both[ok]
    # unit vectors: u along x, v in the xy-plane, w from its cosines to u and v, z by the hand
    u = np.zeros((len(c), 3))
    u[:, 0] = 1.0
    v = np.stack([np.cos(tij), np.sin(tij), np.zeros(len(c))], axis=1)
    wx = np.cos(tik)
    wy = (np.cos(tjk) - np.cos(tij) * wx) / np.maximum(np.sin(tij), 1e-9)
    wz = np.sqrt(np.clip(1.0 - wx * wx - wy * wy, 0.0, None))
    out = np.zeros((len(c), 2, 4, 3))
    for hand in (0, 1):
        # volume a·(b×c) of (u, v, w) has the sign of w_z: pick the dictionary's (or the other) hand
        s = np.where(sign == 0, 1.0, sign) * (1.0 if hand == 0 else np.where(both, -1.0, 1.0))
        w = np.stack([wx, wy, s * wz], axis=1)
        out[:, hand, 1] = li[:, None] * u
        out[:, hand, 2] = lj[:, None] * v
        out[:, hand, 3] = lk[:, None] * w
    return c, out


class DivideAndConcur:
    """Constraint groups of one model with replicas, projections and the RRR step."""

    def __init__(self, model: Model, restraints: Restraints, nonbonded=None, bond_tol_scale: float = 1.0):
        self.n_atoms = len(model.atoms)
        length, angle = _bond_lookup(restraints), _angle_lookup(restraints)
        groups = [_Group("bond", restraints.bond_atoms.astype(np.int64), ETA_GEOMETRY,
                         ideal=restraints.bond_ideal.copy(), tol=restraints.bond_sigma * bond_tol_scale)]
        atoms, motifs = _angle_motifs(restraints, length)
        groups.append(_Group("motif", atoms, ETA_GEOMETRY, tol=np.full(len(atoms), MOTIF_TOLERANCE), motifs=motifs))
        atoms, motifs = _chiral_motifs(restraints, length, angle)
        if len(atoms):
            groups.append(_Group("motif", atoms, ETA_GEOMETRY, tol=np.full(len(atoms), MOTIF_TOLERANCE), motifs=motifs))
        if nonbonded is not None:
            same_cell = nonbonded.op == 0
            groups.append(_Group("exclusion", np.stack([nonbonded.i[same_cell], nonbonded.j[same_cell]], 1).astype(np.int64),
                                 ETA_EXCLUSION, ideal=nonbonded.d_min[same_cell] - EXCLUSION_ALLOWANCE))
        self.groups = [g for g in groups if len(g.atoms)]
        self.owner = np.concatenate([g.atoms.ravel() for g in self.groups])
        self.eta = np.concatenate([np.full(g.atoms.size, g.eta) for g in self.groups])
        self.sizes = [g.atoms.size for g in self.groups]

    def replicas(self, xyz: np.ndarray) -> np.ndarray:
        """Every constraint's copy of its atoms' positions, stacked (n_replicas, 3)."""
        return xyz[self.owner].copy()

    def divide(self, x: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        start = 0
        for g, n in zip(self.groups, self.sizes):
            block = x[start:start + n].reshape(len(g.atoms), g.atoms.shape[1], 3)
            if g.kind == "bond":
                a, b = project_bonds(block[:, 0], block[:, 1], g.ideal, g.tol)
                proj = np.stack([a, b], axis=1)
            elif g.kind == "exclusion":
                a, b = project_exclusion(block[:, 0], block[:, 1], g.ideal)
                proj = np.stack([a, b], axis=1)
            else:
                proj, _ = project_rigid_motifs(block, g.motifs, g.tol)
            out[start:start + n] = proj.reshape(-1, 3)
            start += n
        return out

    def positions(self, x: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        """Concurred atom positions (atoms without replicas keep `fallback`)."""
        mean = concur_positions(x, self.owner, self.eta, self.n_atoms)
        return np.where(np.isfinite(mean), mean, fallback)

    def concur(self, x: np.ndarray) -> np.ndarray:
        mean = concur_positions(x, self.owner, self.eta, self.n_atoms)
        return mean[self.owner]

    def rrr_step(self, x: np.ndarray, beta: float = 0.5) -> tuple[np.ndarray, float]:
        """One Reflect-Reflect-Relax step; returns the new iterate and the gap (Å, η-weighted RMS)."""
        pd = self.divide(x)
        pc = self.concur(2.0 * pd - x)
        diff = pc - pd
        gap = float(np.sqrt((self.eta * (diff ** 2).sum(1)).sum() / self.eta.sum()))
        return x + beta * diff, gap
