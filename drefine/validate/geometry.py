"""Geometry statistics: deviations from ideal, RMSD and RMSZ, worst outliers, clashes.

Deviations are computed with numpy from the same restraint arrays the refinement target
uses (bond lengths in Å, angles in degrees, chiral volumes in Å³, plane distances in Å), so
what is validated is exactly what is restrained. Clashes follow MolProbity's definition: a
pair of atoms not within three bonds whose van der Waals spheres overlap by ≥ 0.4 Å, with
hydrogen-bonding pairs allowed their shorter contact; the clashscore is clashes per 1000 atoms.
"""
from __future__ import annotations

import numpy as np

from ..model.arrays import Model
from ..restraints.nonbonded import NonbondedPairs
from ..restraints.topology import Restraints

CLASH_OVERLAP = 0.4  # Å
OUTLIER_Z = 4.0


def bond_lengths(xyz: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    return np.linalg.norm(xyz[atoms[:, 0]] - xyz[atoms[:, 1]], axis=1)


def angles_deg(xyz: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    u = xyz[atoms[:, 0]] - xyz[atoms[:, 1]]
    v = xyz[atoms[:, 2]] - xyz[atoms[:, 1]]
    cos = (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def chiral_volumes(xyz: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    c = xyz[atoms[:, 0]]
    a, b, d = xyz[atoms[:, 1]] - c, xyz[atoms[:, 2]] - c, xyz[atoms[:, 3]] - c
    return np.einsum("ij,ij->i", a, np.cross(b, d))


def plane_deviations(xyz: np.ndarray, atoms: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Signed distance (Å) of every plane atom from its plane's least-squares plane."""
    out = np.zeros(len(atoms))
    counts = np.diff(start)
    for n in np.unique(counts):
        # Planes with the same number of atoms are fitted together as one batch.
        sel = np.flatnonzero(counts == n)
        idx = start[sel][:, None] + np.arange(n)[None, :]
        p = xyz[atoms[idx]]
        centred = p - p.mean(axis=1, keepdims=True)
        _, vecs = np.linalg.eigh(np.einsum("pki,pkj->pij", centred, centred))
        normal = vecs[:, :, 0]
        out[idx] = np.einsum("pki,pi->pk", centred, normal)
    return out


def _rms(x: np.ndarray) -> float | None:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else None


def _worst(model: Model, atoms: np.ndarray, value, ideal, z, n: int, unit: str, digits: int = 3):
    order = np.argsort(-np.abs(z))[:n]
    return [{"atoms": [model.atom_label(int(i)) for i in atoms[k]], "value": round(float(value[k]), digits),
             "ideal": round(float(ideal[k]), digits), "z": round(float(z[k]), 2), "unit": unit}
            for k in order]


def geometry_statistics(model: Model, r: Restraints, xyz: np.ndarray | None = None,
                        pairs: NonbondedPairs | None = None, n_worst: int = 10) -> dict:
    """Bond/angle RMSD and RMSZ (restraints without hydrogens; all-atom values under
    `with_hydrogens`), worst outliers, chirality and planarity violations, clashes."""
    xyz = model.atoms.xyz if xyz is None else xyz
    out: dict = {}
    is_h = model.atoms.is_hydrogen
    b = bond_lengths(xyz, r.bond_atoms)
    bz = (b - r.bond_ideal) / r.bond_sigma
    a = angles_deg(xyz, r.angle_atoms)
    a_ideal = np.degrees(r.angle_ideal)
    az = (a - a_ideal) / np.degrees(r.angle_sigma)
    # Headline numbers over restraints without hydrogens (hydrogens ride on their parents, and
    # validators such as MolProbity report heavy-atom geometry); all-atom values alongside.
    bh = ~is_h[r.bond_atoms].any(axis=1)
    ah = ~is_h[r.angle_atoms].any(axis=1)
    out.update(n_bonds=int(bh.sum()), bonds_rmsd=_rms((b - r.bond_ideal)[bh]), bonds_rmsz=_rms(bz[bh]),
               bonds_max_deviation=float(np.abs(b - r.bond_ideal)[bh].max(initial=0.0)),
               n_bond_outliers=int((np.abs(bz[bh]) > OUTLIER_Z).sum()),
               n_angles=int(ah.sum()), angles_rmsd=_rms((a - a_ideal)[ah]), angles_rmsz=_rms(az[ah]),
               n_angle_outliers=int((np.abs(az[ah]) > OUTLIER_Z).sum()),
               with_hydrogens={"n_bonds": len(b), "bonds_rmsd": _rms(b - r.bond_ideal), "bonds_rmsz": _rms(bz),
                               "n_bond_outliers": int((np.abs(bz) > OUTLIER_Z).sum()),
                               "n_angles": len(a), "angles_rmsd": _rms(a - a_ideal), "angles_rmsz": _rms(az),
                               "n_angle_outliers": int((np.abs(az) > OUTLIER_Z).sum())})
    out["worst_bonds"] = _worst(model, r.bond_atoms[bh], b[bh], r.bond_ideal[bh], bz[bh], n_worst, "Å")
    out["worst_angles"] = _worst(model, r.angle_atoms[ah], a[ah], a_ideal[ah], az[ah], n_worst, "°", 1)

    vol = chiral_volumes(xyz, r.chiral_atoms)
    wrong_hand = (~r.chiral_both) & (vol * r.chiral_ideal < 0)
    out["n_chirals"] = len(vol)
    out["chirality_violations"] = [
        {"atoms": [model.atom_label(int(i)) for i in r.chiral_atoms[k]], "volume": round(float(vol[k]), 3),
         "ideal": round(float(r.chiral_ideal[k]), 3)} for k in np.flatnonzero(wrong_hand)]

    dev = plane_deviations(xyz, r.plane_atoms, r.plane_start)
    plane_of = np.repeat(np.arange(len(r.plane_sigma)), np.diff(r.plane_start))
    pz = dev / r.plane_sigma[plane_of] if len(dev) else dev
    bad_planes = np.unique(plane_of[np.abs(pz) > OUTLIER_Z])
    out.update(n_planes=len(r.plane_sigma), planes_rmsd=_rms(dev),
               planarity_violations=[
                   {"atoms": [model.atom_label(int(i)) for i in r.plane_atoms[r.plane_start[p]:r.plane_start[p + 1]]],
                    "max_deviation": round(float(np.abs(dev[plane_of == p]).max()), 3)} for p in bad_planes])
    out.update(clash_statistics(model, r, xyz, pairs, n_worst))
    return out


def clash_statistics(model: Model, r: Restraints, xyz: np.ndarray, pairs: NonbondedPairs | None,
                     n_worst: int = 10) -> dict:
    """Clashes (overlap ≥ 0.4 Å, not within three bonds) and the clashscore per 1000 atoms."""
    if pairs is None:
        from ..restraints.nonbonded import find_nonbonded_pairs

        pairs = find_nonbonded_pairs(model, r, xyz)
    d = pairs.distances(xyz)
    overlap = pairs.d_min - d
    clash = (overlap >= CLASH_OVERLAP) & ~pairs.is_14
    n_atoms = len(r.atom_indices)
    # Symmetry contacts are listed from both sides (weight ½ each): count each once.
    n_clash = float(pairs.weight[clash].sum())
    listed = clash & ((pairs.op == 0) | (pairs.i <= pairs.j))
    order = np.flatnonzero(listed)[np.argsort(-overlap[listed])][:n_worst]
    has_h = bool(model.atoms.is_hydrogen[r.atom_indices].any())
    return {"n_clashes": round(n_clash), "clashscore": 1000.0 * n_clash / max(n_atoms, 1),
            "clashscore_with_hydrogens": has_h,
            "worst_clashes": [{"atoms": [model.atom_label(int(pairs.i[k])), model.atom_label(int(pairs.j[k]))],
                               "distance": round(float(d[k]), 3), "overlap": round(float(overlap[k]), 3),
                               "symmetry": bool(pairs.op[k] != 0)} for k in order]}
