"""Non-bonded repulsion: neighbour pairs that honour crystal symmetry and alternate conformers.

Pairs are found once per geometry (refinement re-searches when atoms have moved more than
half the search buffer) by a numba cell list over the model's atoms and those symmetry images
(rotation + lattice translation) that come within reach of it. Each pair is (i, j, op): atom
i against image op of atom j. Pairs with op 0 (identity) are listed once; a symmetry contact
appears from both sides, each with weight ½, so energy and gradient are counted exactly once.

Minimum distances are sums of van der Waals radii of the atoms' energy types (CCP4 energy
library `vdw_radius`; by element when a type is unknown), shortened for hydrogen-bonding
pairs (donor/acceptor heavy atoms 2.6 Å, polar H to acceptor 1.8 Å) and for atoms three bonds
apart (1-4 pairs, and 1-5 pairs that involve a hydrogen as MolProbity's Probe -4H does: −0.5 Å).
Polar hydrogens (bonded to N or O) take Probe's 1.0 Å radius. Atoms one or two bonds apart do
not repel; atoms of different altlocs never meet; an atom shared by all conformers meets every
conformer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from numba import njit

from ..model.arrays import Model
from .topology import Restraints

NONBONDED_SIGMA = 0.2  # Å
HBOND_HEAVY_MIN = 2.6  # Å, donor–acceptor heavy atoms
HBOND_H_MIN = 1.8  # Å, polar hydrogen to acceptor
POLAR_H_RADIUS = 1.0  # Å, Probe (Word et al. 1999, J. Mol. Biol. 285, 1711)
ONE_FOUR_REDUCTION = 0.5  # Å
#: Fallback radii (Å, Bondi 1964) for atoms whose energy type the library does not give.
ELEMENT_RADIUS = {"H": 1.20, "C": 1.70, "N": 1.55, "O": 1.52, "S": 1.80, "P": 1.80, "SE": 1.90,
                  "F": 1.47, "CL": 1.75, "BR": 1.85, "I": 1.98, "MG": 1.73, "NA": 2.27, "K": 2.75,
                  "ZN": 1.39, "CA": 2.31, "FE": 1.40, "MN": 1.40, "CU": 1.40}


@dataclass
class NonbondedPairs:
    """Neighbour pairs (i, image `op` of j) within `cutoff` Å, with their minimum distances."""

    i: np.ndarray
    j: np.ndarray
    op: np.ndarray
    d_min: np.ndarray  # Å
    weight: np.ndarray  # 1 for pairs within the model, ½ for symmetry contacts
    is_hbond: np.ndarray
    is_14: np.ndarray  # 1-4 pairs, and 1-5 pairs involving a hydrogen
    op_rot: np.ndarray  # (n_ops, 3, 3) Cartesian rotation of each image
    op_trans: np.ndarray  # (n_ops, 3) Cartesian translation, Å
    cutoff: float
    xyz_at_search: np.ndarray

    def __len__(self):
        return int(self.i.shape[0])

    def needs_update(self, xyz: np.ndarray, buffer: float) -> bool:
        """True when some atom moved more than half the search buffer since the search."""
        moved = np.sqrt(((xyz - self.xyz_at_search) ** 2).sum(axis=1)).max(initial=0.0)
        return bool(moved > 0.5 * buffer)

    def distances(self, xyz: np.ndarray) -> np.ndarray:
        xj = np.einsum("pab,pb->pa", self.op_rot[self.op], xyz[self.j]) + self.op_trans[self.op]
        return np.linalg.norm(xyz[self.i] - xj, axis=1)


def atom_radii(model: Model, restraints: Restraints) -> tuple[np.ndarray, np.ndarray]:
    """Van der Waals radius (Å) and hydrogen-bond type ('D', 'A', 'B', 'H' or 'N') per atom."""
    n = len(model.atoms)
    elements, which = np.unique(model.atoms.element, return_inverse=True)  # a few kinds: no per-atom Python
    radius = np.array([ELEMENT_RADIUS.get(str(e).upper(), 1.7) for e in elements], dtype=np.float64)[which]
    hb = np.full(n, "N", dtype="<U1")
    known = ~np.isnan(restraints.type_vdw_radius)
    radius[known] = restraints.type_vdw_radius[known]
    hb[known] = restraints.type_hb[known]
    # Polar hydrogens: acedrg-era libraries type every H as plain "H", so a hydrogen is polar
    # (an H-bond donor hydrogen) when it is bonded to N or O.
    el = model.atoms.element
    bonds = np.concatenate([restraints.bond_atoms, restraints.inferred_bonds])
    for h_col, x_col in ((0, 1), (1, 0)):
        h, x = bonds[:, h_col], bonds[:, x_col]
        polar = np.isin(el[h], ("H", "D")) & np.isin(el[x], ("N", "O"))
        hb[h[polar]] = "H"
        radius[h[polar]] = POLAR_H_RADIUS
    return radius, hb


def symmetry_images(model: Model, frac_lo, frac_hi, cutoff):
    """Rotations/translations (Cartesian) of symmetry images that can come within `cutoff`
    of the fractional box [frac_lo, frac_hi], with the first one the identity."""
    rots, trans = [np.eye(3)], [np.zeros(3)]
    if not model.has_crystal_cell or model.spacegroup is None:
        return np.array(rots), np.array(trans), [(0, (0, 0, 0))]
    cell = model.cell
    O = np.array(cell.orth.mat.tolist())
    F = np.array(cell.frac.mat.tolist())
    delta = cutoff * np.linalg.norm(F, axis=1)
    keys = [(0, (0, 0, 0))]
    corners = np.array([[frac_lo[0] if b0 else frac_hi[0], frac_lo[1] if b1 else frac_hi[1],
                         frac_lo[2] if b2 else frac_hi[2]] for b0 in (0, 1) for b1 in (0, 1) for b2 in (0, 1)])
    for s, op in enumerate(model.spacegroup.operations()):
        R = np.array(op.rot, dtype=np.float64) / op.DEN
        t = np.array(op.tran, dtype=np.float64) / op.DEN
        img = corners @ R.T + t
        lo_s, hi_s = img.min(0), img.max(0)
        n_lo = np.ceil(frac_lo - delta - hi_s).astype(int)
        n_hi = np.floor(frac_hi + delta - lo_s).astype(int)
        for n0 in range(n_lo[0], n_hi[0] + 1):
            for n1 in range(n_lo[1], n_hi[1] + 1):
                for n2 in range(n_lo[2], n_hi[2] + 1):
                    shift = (n0, n1, n2)
                    if np.allclose(R, np.eye(3)) and np.allclose(t + shift, 0):
                        continue
                    rots.append(O @ R @ F)
                    trans.append(O @ (t + np.array(shift, dtype=np.float64)))
                    keys.append((s, shift))
    return np.array(rots), np.array(trans), keys


@njit(cache=True, nogil=True)
def _cell_list_pairs(targets, cand_xyz, cand_atom, cand_op, cutoff):
    """Pairs (target row, candidate row) closer than cutoff, by a uniform cell list."""
    lo = np.empty(3)
    for c in range(3):
        lo[c] = min(targets[:, c].min(), cand_xyz[:, c].min()) - 1e-6
    ncell = np.empty(3, dtype=np.int64)
    for c in range(3):
        hi = max(targets[:, c].max(), cand_xyz[:, c].max())
        ncell[c] = max(1, int((hi - lo[c]) / cutoff) + 1)
    nc = cand_xyz.shape[0]
    cell_of = np.empty(nc, dtype=np.int64)
    for k in range(nc):
        cx = int((cand_xyz[k, 0] - lo[0]) / cutoff)
        cy = int((cand_xyz[k, 1] - lo[1]) / cutoff)
        cz = int((cand_xyz[k, 2] - lo[2]) / cutoff)
        cell_of[k] = (cx * ncell[1] + cy) * ncell[2] + cz
    order = np.argsort(cell_of)
    total = ncell[0] * ncell[1] * ncell[2]
    start = np.searchsorted(cell_of[order], np.arange(total + 1))
    cut2 = cutoff * cutoff
    out_t = []
    out_c = []
    for t in range(targets.shape[0]):
        cx = int((targets[t, 0] - lo[0]) / cutoff)
        cy = int((targets[t, 1] - lo[1]) / cutoff)
        cz = int((targets[t, 2] - lo[2]) / cutoff)
        for ix in range(max(cx - 1, 0), min(cx + 2, ncell[0])):
            for iy in range(max(cy - 1, 0), min(cy + 2, ncell[1])):
                for iz in range(max(cz - 1, 0), min(cz + 2, ncell[2])):
                    cell = (ix * ncell[1] + iy) * ncell[2] + iz
                    for q in range(start[cell], start[cell + 1]):
                        k = order[q]
                        if cand_op[k] == 0 and cand_atom[k] <= t:
                            continue
                        d2 = 0.0
                        for c in range(3):
                            d2 += (targets[t, c] - cand_xyz[k, c]) ** 2
                        if d2 < cut2:
                            out_t.append(t)
                            out_c.append(k)
    return np.array(out_t, dtype=np.int64), np.array(out_c, dtype=np.int64)


def _bond_graph_pairs(n: int, bond_atoms: np.ndarray):
    """Keys i*n+j (i<j) of atom pairs 1–2 or 1–3 apart, exactly 1–4 apart, and exactly 1–5 apart."""
    if len(bond_atoms) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    a = sp.coo_matrix((np.ones(len(bond_atoms)), (bond_atoms[:, 0], bond_atoms[:, 1])), shape=(n, n)).tocsr()
    a = ((a + a.T) > 0).astype(np.int8)
    a2 = ((a @ a) > 0).astype(np.int8)
    near = ((a + a2) > 0).astype(np.int8)
    a3 = ((a2 @ a) > 0).astype(np.int8)
    one_four = (a3 - a3.multiply(near)) > 0
    up_to_four = ((near + a3) > 0).astype(np.int8)
    a4 = ((a3 @ a) > 0).astype(np.int8)
    one_five = (a4 - a4.multiply(up_to_four)) > 0

    def keys(m):
        m = sp.triu(m, 1).tocoo()
        return np.unique(m.row.astype(np.int64) * n + m.col.astype(np.int64))

    return keys(near), keys(one_four), keys(one_five)


def _bond_graph_of(restraints: Restraints, n: int):
    """`_bond_graph_pairs` of the restraints' bonds, kept on the Restraints object: it depends on
    the bonds alone, and a refinement searches neighbours again and again (half the search's
    time on 5fuu). Restraints are not changed in place (subsets are new objects), so the cache
    cannot go stale; it is not pickled."""
    cached = restraints.__dict__.get("_bond_graph")
    if cached is None or cached[0] != n:
        cached = (n, _bond_graph_pairs(n, np.concatenate([restraints.bond_atoms, restraints.inferred_bonds])))
        restraints.__dict__["_bond_graph"] = cached
    return cached[1]


def _in_sorted(values: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """np.isin(values, sorted_keys) for sorted unique keys (the bond graph's), by binary search:
    np.isin sorts the keys again on every call (the weight scan searches once per scan)."""
    if len(sorted_keys) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, values), len(sorted_keys) - 1)
    return sorted_keys[at] == values


def find_nonbonded_pairs(model: Model, restraints: Restraints, xyz: np.ndarray | None = None,
                         buffer: float = 0.0, near: np.ndarray | None = None) -> NonbondedPairs:
    """All repulsion candidates among the restrained model's atoms and their symmetry images.
    With `near` (atom indices) and no symmetry images in reach, only the atoms within the cutoff
    of those atoms are searched: the pairs that touch them are all found, faster (the weight scan
    needs only its segments' contacts). With images, every atom is searched (a far atom may
    meet a near one's image)."""
    xyz = model.atoms.xyz if xyz is None else xyz
    idx = restraints.atom_indices
    radius, hb = atom_radii(model, restraints)
    cutoff = 2.0 * float(radius[idx].max()) + buffer
    local = xyz[idx]
    if model.has_crystal_cell and model.spacegroup is not None:
        F = np.array(model.cell.frac.mat.tolist())
        frac = local @ F.T
        lo, hi = frac.min(0), frac.max(0)
    else:
        lo = hi = np.zeros(3)
    rots, trans, _ = symmetry_images(model, lo, hi, cutoff)
    if near is not None and len(rots) == 1 and len(near):
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(xyz[np.asarray(near)]).query(local, distance_upper_bound=cutoff * (1 + 1e-9))
        idx = idx[np.isfinite(dist)]
        local = xyz[idx]
    cand_xyz = [local]
    cand_atom = [np.arange(len(idx))]
    cand_op = [np.zeros(len(idx), dtype=np.int64)]
    if len(rots) > 1:
        frac_box_lo, frac_box_hi = lo, hi
        delta = cutoff * np.linalg.norm(np.array(model.cell.frac.mat.tolist()), axis=1)
        F = np.array(model.cell.frac.mat.tolist())
        for o in range(1, len(rots)):
            img = local @ rots[o].T + trans[o]
            f = img @ F.T
            keep = np.all((f >= frac_box_lo - delta) & (f <= frac_box_hi + delta), axis=1)
            if keep.any():
                cand_xyz.append(img[keep])
                cand_atom.append(np.flatnonzero(keep))
                cand_op.append(np.full(int(keep.sum()), o, dtype=np.int64))
    cx = np.ascontiguousarray(np.concatenate(cand_xyz))
    ca = np.concatenate(cand_atom)
    co = np.concatenate(cand_op)
    t_row, c_row = _cell_list_pairs(np.ascontiguousarray(local), cx, ca, co, cutoff)
    i = idx[t_row]
    j = idx[ca[c_row]]
    op = co[c_row]
    # Altlocs: different conformers never meet; shared atoms (conformer 0) meet all.
    conf = model.atoms.conformer
    keep = ~((conf[i] != 0) & (conf[j] != 0) & (conf[i] != conf[j]))
    n = len(model.atoms)
    near, one_four, one_five = _bond_graph_of(restraints, n)
    key = np.minimum(i, j) * n + np.maximum(i, j)
    same_image = op == 0
    keep &= ~(same_image & _in_sorted(key, near))
    # An atom never repels its own image through a special position it sits on.
    keep &= ~((i == j) & (np.linalg.norm(xyz[i] - (np.einsum("pab,pb->pa", rots[op], xyz[j]) + trans[op]),
                                         axis=1) < 0.5))
    i, j, op, key, same_image = i[keep], j[keep], op[keep], key[keep], same_image[keep]
    is_h = model.atoms.is_hydrogen
    is_14 = same_image & (_in_sorted(key, one_four) | (_in_sorted(key, one_five) & (is_h[i] | is_h[j])))
    d_min = radius[i] + radius[j]
    hi_, hj = hb[i], hb[j]
    heavy_hb = (np.isin(hi_, ("D", "B")) & np.isin(hj, ("A", "B"))) | (np.isin(hi_, ("A", "B")) & np.isin(hj, ("D", "B")))
    h_hb = ((hi_ == "H") & np.isin(hj, ("A", "B"))) | ((hj == "H") & np.isin(hi_, ("A", "B")))
    d_min = np.where(heavy_hb, np.minimum(d_min, HBOND_HEAVY_MIN), d_min)
    d_min = np.where(h_hb, np.minimum(d_min, HBOND_H_MIN), d_min)
    d_min = np.where(is_14, d_min - ONE_FOUR_REDUCTION, d_min)
    weight = np.where(same_image, 1.0, 0.5)
    return NonbondedPairs(i=i.astype(np.int64), j=j.astype(np.int64), op=op.astype(np.int64), d_min=d_min,
                          weight=weight, is_hbond=heavy_hb | h_hb, is_14=is_14,
                          op_rot=np.ascontiguousarray(rots), op_trans=np.ascontiguousarray(trans),
                          cutoff=cutoff, xyz_at_search=xyz.copy())


@njit(cache=True, nogil=True)
def nonbonded_term(xyz, pi, pj, pop, d_min, weight, rot, trans, sigma, grad):
    """Σ w ((d_min − d)/σ)² over pairs closer than d_min; atom j taken through image `op`."""
    f = 0.0
    w0 = 1.0 / (sigma * sigma)
    xj = np.empty(3)
    for k in range(pi.shape[0]):
        i, j, o = pi[k], pj[k], pop[k]
        for c in range(3):
            xj[c] = rot[o, c, 0] * xyz[j, 0] + rot[o, c, 1] * xyz[j, 1] + rot[o, c, 2] * xyz[j, 2] + trans[o, c]
        dx = xyz[i, 0] - xj[0]
        dy = xyz[i, 1] - xj[1]
        dz = xyz[i, 2] - xj[2]
        d = math.sqrt(dx * dx + dy * dy + dz * dz)
        if d >= d_min[k] or d == 0.0:
            continue
        diff = d_min[k] - d
        w = weight[k] * w0
        f += w * diff * diff
        g = -2.0 * w * diff / d  # ∂/∂(x_i − x_j')
        gx, gy, gz = g * dx, g * dy, g * dz
        grad[i, 0] += gx
        grad[i, 1] += gy
        grad[i, 2] += gz
        # x_j' = R x_j + t, so ∂/∂x_j = −Rᵀ (∂/∂(x_i − x_j'))
        for c in range(3):
            grad[j, c] -= rot[o, 0, c] * gx + rot[o, 1, c] * gy + rot[o, 2, c] * gz
    return f
