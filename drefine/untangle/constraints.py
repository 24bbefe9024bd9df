"""Divide-and-concur geometry: constraint sets from the restraint dictionary, replicas, RRR.

Every constraint owns a replica of the positions of its atoms (Gravel & Elser 2008). The sets:
- bonds: |a − b| within ideal ± tol (tol = the dictionary's σ times a scale the run may change
  between stages: `set_bond_tolerance`);
- angles: the rigid 3-atom motif built from the two ideal bond lengths and the ideal angle;
- chiral centres: the rigid 4-atom motif (centre and three neighbours) from the ideal bonds and
  angles with the dictionary's handedness (both hands where the dictionary allows either);
- peptide units (CA₁ C₁ O₁ N₂ CA₂ [H₂]): rigid motifs, trans or cis (the nearer is taken), built
  from the dictionary's bonds and angles;
- torsions inside a residue (optional, `torsions=True`): rigid 4-atom motifs at each allowed value
  of the dictionary's torsion, the nearest taken (on 1AHO lotswrong they did not help: BENCHMARKS);
- rigid groups: the dictionary's planes inside one residue (aromatic rings, the guanidinium,
  carboxylates, amides) as rigid planar motifs, each residue type's figure fitted once to the
  dictionary's bonds and angles between its atoms (`rigid_groups=True`, the default);
- planes: the other dictionary planes (the peptide links'), each set the configurations within
  σ·√k of coplanar;
- disulfides between two-conformer cysteines: which conformers bridge is left to the projection
  (minimum-cost matching), not to the altloc labels;
- volume exclusion: pairs closer than the repulsion distance minus 0.4 Å pushed apart (the
  dictionary's radii, H-bond pairs shortened; atoms of different conformers never exclude each
  other: the neighbour search already skips them), symmetry images included.
Ideal values come from `restraints.topology.Restraints` (the CCP4 monomer library the rest of
drefine uses). The concur projection takes every atom to the η-weighted mean of its replicas
(η = 10 for geometry, 1 for exclusion), and RRR iterates
    x ← x + β (P_C(2 P_D(x) − x) − P_D(x)),
the gap |P_C(2P_D(x) − x) − P_D(x)| measuring how far the constraint sets are from agreeing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model.arrays import Model
from ..restraints.build_builtin_monlib import nerf
from ..restraints.topology import Restraints
from .projections import (
    concur_positions,
    project_bonds,
    project_coplanar,
    project_disulfides,
    project_exclusion,
    project_rigid_motifs,
)

ETA_GEOMETRY = 10.0
ETA_EXCLUSION = 1.0
EXCLUSION_ALLOWANCE = 0.4  # Å below the repulsion distance
MOTIF_TOLERANCE = 0.05  # Å, radius of the tolerance ball around a rigid motif (in its 3k-space)
PEPTIDE_TOLERANCE = 0.15  # Å: real peptide units sit ~0.1 Å (6 atoms) from the ideal planar motif
EXCLUSION_REACH = 0.5  # Å: exclusion pairs listed while closer than their minimum distance plus this


@dataclass
class _Group:
    kind: str  # "bond", "motif", "plane", "disulfide", "exclusion"
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


def _torsion_motifs(model: Model, r: Restraints, length, angle) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Torsions inside a residue (side-chain χ and the like) as rigid 4-atom motifs, one per allowed
    value of the dictionary's torsion (ideal + 360°·m/period), the nearest taken by the projection:
    [(atoms (n, 4) i j k l, motifs (n, period, 4, 3), tolerance (n,) Å)], a group per period. The
    tolerance is the displacement of l that the torsion's σ allows (|kl| sin ∠jkl · σ), at least
    MOTIF_TOLERANCE. Link torsions (ω, φ, ψ) are left out: a cis peptide would need its own motif."""
    t = r.torsion_atoms.astype(np.int64)
    if not len(t):
        return []
    i, j, k, l = t.T
    res = model.atoms.residue_index
    same = (res[i] == res[j]) & (res[j] == res[k]) & (res[k] == res[l])
    lij, ljk, lkl = length(i, j), length(j, k), length(k, l)
    a1, a2 = angle(j, i, k), angle(k, j, l)
    ok = same & np.isfinite(lij + ljk + lkl + a1 + a2)
    out = []
    for period in np.unique(r.torsion_period[ok]):
        sel = ok & (r.torsion_period == period)
        n, per = int(sel.sum()), int(period)
        phi = r.torsion_ideal[sel][:, None] + 2.0 * np.pi * np.arange(per)[None, :] / per
        m = np.zeros((n, per, 4, 3))
        # j at the origin, k along x, i in the xy-plane; l placed from them at each allowed φ
        m[:, :, 0, 0] = (lij[sel] * np.cos(a1[sel]))[:, None]
        m[:, :, 0, 1] = (lij[sel] * np.sin(a1[sel]))[:, None]
        m[:, :, 2, 0] = ljk[sel][:, None]
        m[:, :, 3] = nerf(m[:, :, 0], m[:, :, 1], m[:, :, 2], np.broadcast_to(lkl[sel][:, None, None], (n, per, 1)),
                          np.degrees(a2[sel])[:, None, None], np.degrees(phi)[:, :, None])
        tol = np.maximum(MOTIF_TOLERANCE, lkl[sel] * np.sin(a2[sel]) * r.torsion_sigma[sel])
        out.append((t[sel], m, tol))
    return out


def _peptide_motifs(model: Model, r: Restraints, length, angle) -> list[tuple[np.ndarray, np.ndarray]]:
    """Peptide units as rigid motifs, trans and cis: [(atoms (n, k), motifs (n, 2, k, 3))] for k = 6
    (CA₁ C₁ O₁ N₂ CA₂ H₂) and k = 5 (no H₂: proline, or no hydrogens in the model). The planar
    motif is built from the dictionary's ideal bonds and angles (C₁ at the origin, N₂ along x)."""
    at = model.atoms
    b = r.bond_atoms.astype(np.int64)
    is_pep = (at.name[b[:, 0]] == "C") & (at.name[b[:, 1]] == "N") & (at.residue_index[b[:, 0]] != at.residue_index[b[:, 1]])
    rev = (at.name[b[:, 1]] == "C") & (at.name[b[:, 0]] == "N") & (at.residue_index[b[:, 0]] != at.residue_index[b[:, 1]])
    pairs = np.concatenate([b[is_pep], b[rev][:, ::-1]])
    key = {(int(at.residue_index[i]), str(at.name[i]), int(at.conformer[i])): i for i in r.atom_indices}

    def find(res, name, conf):
        return key.get((res, name, conf), key.get((res, name, 0), -1))

    rows: dict[int, list] = {5: [], 6: []}
    for c, n in pairs:  # one per peptide link: setup, not a loop over atoms at every step
        conf = max(int(at.conformer[c]), int(at.conformer[n]))
        ca1, o1 = find(int(at.residue_index[c]), "CA", conf), find(int(at.residue_index[c]), "O", conf)
        ca2, h2 = find(int(at.residue_index[n]), "CA", conf), find(int(at.residue_index[n]), "H", conf)
        if min(ca1, o1, ca2) < 0:
            continue
        if h2 >= 0:
            rows[6].append((ca1, c, o1, n, ca2, h2))
        else:
            rows[5].append((ca1, c, o1, n, ca2))
    out = []
    for k, lst in rows.items():
        if not lst:
            continue
        a = np.array(lst, dtype=np.int64)
        ca1, c, o1, n, ca2 = a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4]
        d_cn, d_cca, d_co, d_nca = length(c, n), length(c, ca1), length(c, o1), length(n, ca2)
        t_ca, t_o, t_n = angle(c, ca1, n), angle(c, o1, n), angle(n, c, ca2)
        vals = [d_cn, d_cca, d_co, d_nca, t_ca, t_o, t_n]
        if k == 6:
            d_nh, t_h = length(n, a[:, 5]), angle(n, c, a[:, 5])
            vals += [d_nh, t_h]
        ok = np.all(np.isfinite(np.stack(vals)), axis=0)
        a = a[ok]
        vals = [v[ok] for v in vals]
        d_cn, d_cca, d_co, d_nca, t_ca, t_o, t_n = vals[:7]
        m = np.zeros((len(a), 2, k, 3))
        for form, side in ((0, -1.0), (1, 1.0)):  # trans: CA₂ opposite CA₁ across C–N; cis: same side
            m[:, form, 0, :2] = np.stack([d_cca * np.cos(t_ca), d_cca * np.sin(t_ca)], 1)
            m[:, form, 2, :2] = np.stack([d_co * np.cos(t_o), -d_co * np.sin(t_o)], 1)
            m[:, form, 3, 0] = d_cn
            m[:, form, 4, :2] = np.stack([d_cn - d_nca * np.cos(t_n), side * d_nca * np.sin(t_n)], 1)
            if k == 6:
                d_nh, t_h = vals[7], vals[8]
                m[:, form, 5, :2] = np.stack([d_cn - d_nh * np.cos(t_h), -side * d_nh * np.sin(t_h)], 1)
        out.append((a, m))
    return out


def _disulfide_groups(model: Model, r: Restraints) -> tuple[np.ndarray, np.ndarray]:
    """Disulfides between cysteines with two conformers: (groups (n, 4) SG atoms [i_A, i_B, j_A, j_B],
    bond rows they replace). Which conformer of one cysteine bridges to which of the other is
    decided by the projection (minimum-cost matching), not by the altloc labels."""
    a = r.bond_atoms.astype(np.int64)
    at = model.atoms
    is_ss = (at.name[a[:, 0]] == "SG") & (at.name[a[:, 1]] == "SG") & (at.residue_index[a[:, 0]] != at.residue_index[a[:, 1]])
    is_ss &= (at.conformer[a[:, 0]] != 0) & (at.conformer[a[:, 1]] != 0)
    rows = np.flatnonzero(is_ss)
    groups, used = [], []
    by_pair: dict[tuple[int, int], list[int]] = {}
    for k in rows:  # a handful of disulfides: not a loop over atoms
        i, j = a[k]
        ri, rj = sorted((int(at.residue_index[i]), int(at.residue_index[j])))
        by_pair.setdefault((ri, rj), []).append(int(k))
    for (ri, rj), ks in by_pair.items():
        sg_i = sorted({int(x) for k in ks for x in a[k] if at.residue_index[x] == ri}, key=lambda x: at.altloc[x])
        sg_j = sorted({int(x) for k in ks for x in a[k] if at.residue_index[x] == rj}, key=lambda x: at.altloc[x])
        if len(sg_i) == 2 and len(sg_j) == 2:
            groups.append(sg_i + sg_j)
            used.extend(ks)
    return np.array(groups, dtype=np.int64).reshape(-1, 4), np.array(used, dtype=np.int64)


def _plane_groups(r: Restraints, skip: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Planes by size: [(atoms (n, k), σ (n,))], leaving out the planes flagged in `skip`."""
    starts = np.asarray(r.plane_start)
    sizes = np.diff(starts)
    out = []
    for k in np.unique(sizes):
        if k < 4:
            continue
        sel = np.flatnonzero((sizes == k) & (True if skip is None else ~skip))
        if not len(sel):
            continue
        idx = starts[sel][:, None] + np.arange(k)[None, :]
        out.append((r.plane_atoms[idx].astype(np.int64), np.asarray(r.plane_sigma)[sel]))
    return out


def _planar_figure(xyz: np.ndarray, pairs: np.ndarray, dist: np.ndarray, sigma: np.ndarray) -> np.ndarray | None:
    """The planar figure (k, 3), z = 0, centred, whose inter-atomic distances best fit `dist` (Å, σ
    `sigma`) for the atom pairs `pairs`, found by least squares in 2D from `xyz` flattened onto its
    own least-squares plane; None when the distances do not fix the figure (the 2D rigidity matrix
    has rank below 2k − 3) or cannot all be met (a residual beyond 3σ)."""
    from scipy.optimize import least_squares

    k = len(xyz)
    c = xyz - xyz.mean(axis=0)
    _, _, vt = np.linalg.svd(c)
    start = c @ vt[:2].T
    i, j = pairs.T

    def resid(p):
        q = p.reshape(k, 2)
        return (np.linalg.norm(q[i] - q[j], axis=1) - dist) / sigma

    def jac(p):
        q = p.reshape(k, 2)
        d = q[i] - q[j]
        u = d / np.maximum(np.linalg.norm(d, axis=1), 1e-12)[:, None] / sigma[:, None]
        out = np.zeros((len(pairs), 2 * k))
        rows = np.arange(len(pairs))
        for c2 in range(2):
            np.add.at(out, (rows, 2 * i + c2), u[:, c2])
            np.add.at(out, (rows, 2 * j + c2), -u[:, c2])
        return out

    fit = least_squares(resid, start.ravel(), jac=jac, xtol=1e-12, ftol=1e-12, gtol=1e-12)
    sv = np.linalg.svd(jac(fit.x), compute_uv=False)
    if len(sv) < 2 * k - 3 or sv[2 * k - 4] < 1e-6 * sv[0] or np.abs(fit.fun).max() > 3.0:
        return None
    q = fit.x.reshape(k, 2)
    q -= q.mean(axis=0)
    return np.concatenate([q, np.zeros((k, 1))], axis=1)


def _fit_plane(model: Model, r: Restraints, length, atoms: np.ndarray, b: np.ndarray, ang: np.ndarray):
    """The planar figure of one plane instance (`_planar_figure`) from the dictionary's bonds between
    its atoms and the 1–3 distances of its angles; None when they do not fix it."""
    k = len(atoms)
    local = np.full(model.atoms.xyz.shape[0], -1, dtype=np.int64)
    local[atoms] = np.arange(k)
    in_b = (local[b] >= 0).all(axis=1)
    in_a = (local[ang] >= 0).all(axis=1)
    a = ang[in_a]
    l1, l2, th = length(a[:, 0], a[:, 1]), length(a[:, 2], a[:, 1]), r.angle_ideal[in_a]
    d13 = np.sqrt(l1 * l1 + l2 * l2 - 2 * l1 * l2 * np.cos(th))  # 1–3 distance of an ideal angle
    pairs = np.concatenate([local[b[in_b]], local[a[:, [0, 2]]]])
    dist = np.concatenate([r.bond_ideal[in_b], d13])
    sigma = np.concatenate([r.bond_sigma[in_b], np.maximum(l1 * l2 * np.sin(th) * r.angle_sigma[in_a] / d13, 1e-3)])
    if len(pairs) < 2 * k - 3 or not np.all(np.isfinite(dist)):
        return None
    return _planar_figure(model.atoms.xyz[atoms], pairs, dist, sigma)


def _rigid_groups(model: Model, r: Restraints, length) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                                                                 np.ndarray]:
    """The dictionary's planes inside one residue as rigid planar motifs (aromatic rings, the
    guanidinium, carboxylates, amides): [(atoms (n, k), motifs (n, 1, k, 3), tolerance (n,) Å)] a
    group per size, and a mask of the planes so replaced. Each residue type's figure is fitted once
    (`_planar_figure`) to the dictionary's bonds between the plane's atoms and the 1–3 distances its
    angles imply; a plane whose distances do not fix its figure stays a coplanarity set, and so do
    planes across residues (the peptide links'). Tolerance σ·√k, as the coplanarity set's."""
    starts = np.asarray(r.plane_start)
    sizes = np.diff(starts)
    res, names, resname = model.atoms.residue_index, model.atoms.name, model.residues.name
    replaced = np.zeros(len(sizes), dtype=bool)
    b = r.bond_atoms.astype(np.int64)
    ang = r.angle_atoms.astype(np.int64)
    out = []
    for k in np.unique(sizes):
        if k < 4:
            continue
        sel = np.flatnonzero(sizes == k)
        idx = r.plane_atoms[starts[sel][:, None] + np.arange(k)[None, :]].astype(np.int64)
        one = np.all(res[idx] == res[idx[:, :1]], axis=1)
        sel, idx = sel[one], idx[one]
        if not len(sel):
            continue
        key = resname[res[idx[:, 0]]].astype(str)
        for q in range(k):
            key = np.char.add(np.char.add(key, "|"), names[idx[:, q]].astype(str))
        types, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        figures = np.full((len(types), k, 3), np.nan)
        # one fit per residue type and plane, from its first instance: setup only (the fit converges to
        # the same figure even from a plane collapsed to a point)
        for t, f in enumerate(first):
            fig = _fit_plane(model, r, length, idx[f], b, ang)
            if fig is not None:
                figures[t] = fig
        ok = np.isfinite(figures[inverse]).all(axis=(1, 2))
        if not ok.any():
            continue
        replaced[sel[ok]] = True
        tol = np.asarray(r.plane_sigma)[sel[ok]] * np.sqrt(k)
        out.append((idx[ok], figures[inverse[ok]][:, None], tol))
    return out, replaced


@dataclass
class _Exclusion:
    atoms: np.ndarray  # (n, 2)
    r_min: np.ndarray  # (n,) Å
    rot: np.ndarray  # (n, 3, 3) Cartesian rotation taking j's replica to its image
    trans: np.ndarray  # (n, 3) Å


class DivideAndConcur:
    """Constraint groups of one model with replicas, projections and the RRR step.

    The replica iterate is one array (n_replicas, 3), group after group. Exclusion pairs are
    re-listed (`refresh_exclusions`) as atoms move: pairs within EXCLUSION_REACH of violation are
    kept, so satisfied far-away pairs add no replicas (each replica also pulls its atom's
    concur); new pairs start with replicas at the current positions.
    """

    def __init__(self, model: Model, restraints: Restraints, nonbonded=None, bond_tol_scale: float = 1.0,
                 motif_tolerance: float = MOTIF_TOLERANCE, planes: bool = True, disulfides: bool = True,
                 peptides: bool = True, torsions: bool = False, rigid_groups: bool = True):
        self.model, self.restraints = model, restraints
        self.n_atoms = len(model.atoms)
        length, angle = _bond_lookup(restraints), _angle_lookup(restraints)
        keep_bond = np.ones(len(restraints.bond_atoms), dtype=bool)
        ss_groups = np.zeros((0, 4), dtype=np.int64)
        if disulfides:
            ss_groups, ss_rows = _disulfide_groups(model, restraints)
            keep_bond[ss_rows] = False
        self.ss_ideal = (float(np.median(restraints.bond_ideal[~keep_bond])) if (~keep_bond).any() else 2.03)
        self.ss_tol = (float(np.median(restraints.bond_sigma[~keep_bond])) if (~keep_bond).any() else 0.02)
        self._bond_sigma = restraints.bond_sigma[keep_bond].copy()
        groups = [_Group("bond", restraints.bond_atoms[keep_bond].astype(np.int64), ETA_GEOMETRY,
                         ideal=restraints.bond_ideal[keep_bond].copy(), tol=self._bond_sigma * bond_tol_scale)]
        atoms, motifs = _angle_motifs(restraints, length)
        groups.append(_Group("motif", atoms, ETA_GEOMETRY, tol=np.full(len(atoms), motif_tolerance), motifs=motifs))
        atoms, motifs = _chiral_motifs(restraints, length, angle)
        if len(atoms):
            groups.append(_Group("motif", atoms, ETA_GEOMETRY, tol=np.full(len(atoms), motif_tolerance), motifs=motifs))
        if peptides:
            for atoms, motifs in _peptide_motifs(model, restraints, length, angle):
                groups.append(_Group("motif", atoms, ETA_GEOMETRY, tol=np.full(len(atoms), PEPTIDE_TOLERANCE),
                                     motifs=motifs))
        if torsions:
            for atoms, motifs, tol in _torsion_motifs(model, restraints, length, angle):
                groups.append(_Group("motif", atoms, ETA_GEOMETRY, tol=tol, motifs=motifs))
        replaced = None
        if rigid_groups:
            groups_rigid, replaced = _rigid_groups(model, restraints, length)
            for atoms, motifs, tol in groups_rigid:
                groups.append(_Group("motif", atoms, ETA_GEOMETRY, tol=tol, motifs=motifs))
        if planes:
            for atoms, sigma in _plane_groups(restraints, replaced):
                groups.append(_Group("plane", atoms, ETA_GEOMETRY, tol=sigma * np.sqrt(atoms.shape[1])))
        if len(ss_groups):
            groups.append(_Group("disulfide", ss_groups, ETA_GEOMETRY))
        self.fixed_groups = [g for g in groups if len(g.atoms)]
        self.exclusion: _Exclusion | None = None
        self.nonbonded = nonbonded
        if nonbonded is not None:
            self.exclusion = self._exclusion_pairs(nonbonded, model.atoms.xyz)
        self._layout()

    def set_bond_tolerance(self, scale: float) -> None:
        """Bond windows ideal ± scale × the dictionary's σ from now on (a stage may tighten them)."""
        for g in self.fixed_groups:
            if g.kind == "bond":
                g.tol = self._bond_sigma * scale

    # -- layout of the replica iterate ---------------------------------------------------------
    def _groups(self):
        out = list(self.fixed_groups)
        if self.exclusion is not None and len(self.exclusion.atoms):
            out.append(_Group("exclusion", self.exclusion.atoms, ETA_EXCLUSION, ideal=self.exclusion.r_min))
        return out

    def _layout(self):
        self.groups = self._groups()
        self.owner = np.concatenate([g.atoms.ravel() for g in self.groups])
        self.eta = np.concatenate([np.full(g.atoms.size, g.eta) for g in self.groups])
        self.sizes = [g.atoms.size for g in self.groups]
        self.eta_sum = np.bincount(self.owner, weights=self.eta, minlength=self.n_atoms)

    @staticmethod
    def _exclusion_pairs(nb, xyz: np.ndarray, reach: float | None = None) -> _Exclusion:
        reach = EXCLUSION_REACH if reach is None else reach
        r_min = nb.d_min - EXCLUSION_ALLOWANCE
        # a symmetry contact is listed from both sides: keep one (i ≤ j)
        keep = (nb.op == 0) | (nb.i <= nb.j)
        keep &= nb.distances(xyz) < r_min + reach
        op = nb.op[keep]
        return _Exclusion(np.stack([nb.i[keep], nb.j[keep]], 1).astype(np.int64), r_min[keep],
                          nb.op_rot[op], nb.op_trans[op])

    def refresh_exclusions(self, replicas: np.ndarray, xyz: np.ndarray) -> np.ndarray:
        """Re-list exclusion pairs near violation at positions xyz; returns the new replica iterate
        (geometry replicas kept, exclusion replicas of pairs still listed kept, new ones at xyz)."""
        if self.nonbonded is None:
            return replicas
        from ..restraints.nonbonded import find_nonbonded_pairs

        if self.nonbonded.needs_update(xyz, 1.0):
            self.nonbonded = find_nonbonded_pairs(self.model, self.restraints, xyz, buffer=1.0)
        old = self.exclusion
        n_fixed = sum(g.atoms.size for g in self.fixed_groups)
        new = self._exclusion_pairs(self.nonbonded, xyz)
        rep_new = xyz[new.atoms.ravel()].reshape(-1, 2, 3).copy()
        if old is not None and len(old.atoms) and len(new.atoms):
            n = self.n_atoms + 1
            k_old = old.atoms[:, 0] * n + old.atoms[:, 1]
            k_new = new.atoms[:, 0] * n + new.atoms[:, 1]
            # pairs are unique per (i, j) except symmetry contacts of one atom pair through two operators
            k_old = k_old * 10007 + np.round(old.r_min * 1000).astype(np.int64) % 10007
            k_new = k_new * 10007 + np.round(new.r_min * 1000).astype(np.int64) % 10007
            _, i_new, i_old = np.intersect1d(k_new, k_old, return_indices=True)
            old_rep = replicas[n_fixed:].reshape(-1, 2, 3)
            rep_new[i_new] = old_rep[i_old]
        self.exclusion = new
        self._layout()
        return np.concatenate([replicas[:n_fixed], rep_new.reshape(-1, 3)])

    # -- the iterate -----------------------------------------------------------------------------
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
                ex = self.exclusion
                img = np.einsum("nab,nb->na", ex.rot, block[:, 1]) + ex.trans
                a, b = project_exclusion(block[:, 0], img, g.ideal)
                b = np.einsum("nba,nb->na", ex.rot, b - ex.trans)  # back to j's own frame
                proj = np.stack([a, b], axis=1)
            elif g.kind == "plane":
                proj = project_coplanar(block, g.tol)
            elif g.kind == "disulfide":
                proj = project_disulfides(block, self.ss_ideal, self.ss_tol)
            else:
                proj, _ = project_rigid_motifs(block, g.motifs, g.tol)
            out[start:start + n] = proj.reshape(-1, 3)
            start += n
        return out

    def positions(self, x: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        """Concurred atom positions (atoms without replicas keep `fallback`)."""
        mean = concur_positions(x, self.owner, self.eta, self.n_atoms)
        return np.where(np.isfinite(mean), mean, fallback)

    def replica_sums(self, x: np.ndarray) -> np.ndarray:
        """Σ η r_c per atom (n_atoms, 3)."""
        return np.stack([np.bincount(self.owner, weights=self.eta * x[:, c], minlength=self.n_atoms)
                         for c in range(3)], axis=1)

    def concur(self, x: np.ndarray) -> np.ndarray:
        mean = concur_positions(x, self.owner, self.eta, self.n_atoms)
        return mean[self.owner]

    def rrr_step(self, x: np.ndarray, beta: float = 0.5) -> tuple[np.ndarray, float]:
        """One geometry-only Reflect-Reflect-Relax step; returns the new iterate and the gap (Å,
        η-weighted RMS)."""
        pd = self.divide(x)
        pc = self.concur(2.0 * pd - x)
        diff = pc - pd
        gap = float(np.sqrt((self.eta * (diff ** 2).sum(1)).sum() / self.eta.sum()))
        return x + beta * diff, gap
