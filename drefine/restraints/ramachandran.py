"""Ramachandran restraints: a smooth potential in (φ, ψ) from the Top500 reference distributions.

U(φ, ψ) = −ln(P₄(φ, ψ) + 0.01·P₃₀(φ, ψ) + P_floor), with P_σ the table's density smoothed by a
periodic Gaussian of σ degrees: the narrow part follows the favoured regions closely, the broad
part gives outlier regions a slope towards the allowed ones (a floor alone would leave them flat,
with no force at all on a residue deep in an outlier region). Sampled on the tables' 2° grid and
interpolated with periodic bicubic (Keys) weights, analytic in (φ, ψ); the gradient reaches
the atoms through the exact dihedral gradients. Per residue kind (general, Gly, Pro, pre-Pro)
its own table. The term is E = Σ U over residues with both φ and ψ, in nats, weighted like
the other restraint terms. Used only when the tables are available (it is a prior from
high-resolution structures, as in phenix.real_space_refine's default Ramachandran restraints);
otherwise the refinement report says it was not used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from numba import njit
from scipy.ndimage import gaussian_filter

from ..model.arrays import Model
from ..validate.backbone import NAME_ID, conformer_residues
from ..validate.ramachandran import RamachandranTables, dihedral_deg, find_rama_data
from .kernels import _dihedral_and_gradient
from .topology import Restraints

P_FLOOR = 1e-6
SMOOTH_DEG = 4.0
BROAD_DEG = 30.0
BROAD_FRACTION = 0.01
#: weight of the term (nats per residue) against the other restraints (Σ z²)
RAMA_WEIGHT = 10.0


@dataclass
class RamachandranRestraints:
    atoms: np.ndarray  # (n, 5): C(i−1), N, CA, C, N(i+1)
    kind: np.ndarray  # (n,) 0 general, 1 gly, 2 pro, 3 prepro
    potential: np.ndarray  # (4, 180, 180) U on the grid of bin centres (−179, −177, … °)
    source: str

    def __len__(self):
        return int(self.atoms.shape[0])

    def subset(self, keep: np.ndarray) -> RamachandranRestraints:
        """The rows `keep` (boolean or indices)."""
        return replace(self, atoms=self.atoms[keep], kind=self.kind[keep])


def phi_psi_deg(xyz: np.ndarray, rama: RamachandranRestraints) -> tuple[np.ndarray, np.ndarray]:
    """φ and ψ (degrees) of every row."""
    a = rama.atoms
    return (dihedral_deg(xyz[a[:, 0]], xyz[a[:, 1]], xyz[a[:, 2]], xyz[a[:, 3]]),
            dihedral_deg(xyz[a[:, 1]], xyz[a[:, 2]], xyz[a[:, 3]], xyz[a[:, 4]]))


def outlier_rows(xyz: np.ndarray, rama: RamachandranRestraints) -> np.ndarray:
    """Rows whose (φ, ψ) the validation's Top500 tables call outliers (boolean)."""
    if not len(rama):
        return np.zeros(0, dtype=bool)
    phi, psi = phi_psi_deg(xyz, rama)
    return np.asarray(RamachandranTables.load(rama.source).classify(phi, psi, rama.kind) == "outlier", dtype=bool)


def load_potentials(directory, weight: float = RAMA_WEIGHT) -> np.ndarray:
    """weight · U on the 2° grid for the four residue kinds (see the module docstring); made
    once per directory and weight in a process (every member of an ensemble asks for it)."""
    return _potentials(str(Path(directory).resolve()), float(weight)).copy()


@lru_cache(maxsize=4)
def _potentials(directory: str, weight: float) -> np.ndarray:
    tables = RamachandranTables.load(directory).tables
    pot = np.zeros((4, 180, 180))
    for k in range(4):
        t = tables[k]
        if tuple(t.nbins) != (180, 180):
            raise ValueError("Ramachandran tables are expected on a 2° grid")
        v = np.asarray(t.values, dtype=np.float64)
        narrow = gaussian_filter(v, SMOOTH_DEG / 2.0, mode="wrap")
        broad = gaussian_filter(v, BROAD_DEG / 2.0, mode="wrap")
        pot[k] = -weight * np.log(narrow + BROAD_FRACTION * broad / broad.max() * narrow.max() + P_FLOOR)
    return pot


def ramachandran_restraints(model: Model, restraints: Restraints, rama_dir=None,
                            weight: float = RAMA_WEIGHT) -> RamachandranRestraints | None:
    """φ/ψ atom quintuples of every protein residue (each conformer), or None without tables."""
    where = find_rama_data(rama_dir)
    if where is None:
        return None
    res = model.residues
    (prev, nxt), per_conformer = conformer_residues(model, restraints)
    name_id = NAME_ID
    rows, kinds = [], []
    for _, _, table, sel in per_conformer:
        sel = sel[(prev[sel] >= 0) & (nxt[sel] >= 0)]
        q = np.stack([table[prev[sel], name_id["C"]], table[sel, name_id["N"]], table[sel, name_id["CA"]],
                      table[sel, name_id["C"]], table[nxt[sel], name_id["N"]]], axis=1)
        ok = (q >= 0).all(axis=1)
        next_names = res.name[nxt[sel]]
        k = np.where(res.name[sel] == "GLY", 1, np.where(res.name[sel] == "PRO", 2, np.where(next_names == "PRO", 3, 0)))
        rows.append(q[ok])
        kinds.append(k[ok])
    atoms = np.unique(np.concatenate(rows), axis=0, return_index=True)[1]
    all_rows, all_kinds = np.concatenate(rows), np.concatenate(kinds)
    return RamachandranRestraints(all_rows[np.sort(atoms)].astype(np.int64), all_kinds[np.sort(atoms)].astype(np.int64),
                                  load_potentials(where, weight), str(where))


@njit(cache=True, nogil=True, inline="always")
def _keys(t):
    return ((-t * t * t + 2 * t * t - t) * 0.5, (3 * t * t * t - 5 * t * t + 2) * 0.5,
            (-3 * t * t * t + 4 * t * t + t) * 0.5, (t * t * t - t * t) * 0.5)


@njit(cache=True, nogil=True, inline="always")
def _dkeys(t):
    return ((-3 * t * t + 4 * t - 1) * 0.5, (9 * t * t - 10 * t) * 0.5, (-9 * t * t + 8 * t + 1) * 0.5,
            (3 * t * t - 2 * t) * 0.5)


@njit(cache=True, nogil=True)
def potential_at(pot, phi_deg, psi_deg):
    """U and ∂U/∂φ, ∂U/∂ψ (per degree) by periodic bicubic interpolation on the 2° grid."""
    x = (phi_deg + 179.0) / 2.0
    y = (psi_deg + 179.0) / 2.0
    i0 = math.floor(x)
    j0 = math.floor(y)
    tx = x - i0
    ty = y - j0
    wx = _keys(tx)
    wy = _keys(ty)
    dx = _dkeys(tx)
    dy = _dkeys(ty)
    u = 0.0
    gx = 0.0
    gy = 0.0
    for a in range(4):
        ii = (i0 - 1 + a) % 180
        for b in range(4):
            v = pot[ii, (j0 - 1 + b) % 180]
            u += wx[a] * wy[b] * v
            gx += dx[a] * wy[b] * v
            gy += wx[a] * dy[b] * v
    return u, gx / 2.0, gy / 2.0


@njit(cache=True, nogil=True)
def rama_term(xyz, atoms, kind, pot, weight, grad):
    f = 0.0
    g0 = np.empty(3)
    g1 = np.empty(3)
    g2 = np.empty(3)
    g3 = np.empty(3)
    h0 = np.empty(3)
    h1 = np.empty(3)
    h2 = np.empty(3)
    h3 = np.empty(3)
    to_deg = 180.0 / math.pi
    for r in range(atoms.shape[0]):
        c0, n1, a1, c1, n2 = atoms[r, 0], atoms[r, 1], atoms[r, 2], atoms[r, 3], atoms[r, 4]
        phi = _dihedral_and_gradient(xyz[c0], xyz[n1], xyz[a1], xyz[c1], g0, g1, g2, g3)
        psi = _dihedral_and_gradient(xyz[n1], xyz[a1], xyz[c1], xyz[n2], h0, h1, h2, h3)
        u, du_phi, du_psi = potential_at(pot[kind[r]], phi * to_deg, psi * to_deg)
        f += weight * u
        sp = weight * du_phi * to_deg
        ss = weight * du_psi * to_deg
        for q in range(3):
            grad[c0, q] += sp * g0[q]
            grad[n1, q] += sp * g1[q] + ss * h0[q]
            grad[a1, q] += sp * g2[q] + ss * h1[q]
            grad[c1, q] += sp * g3[q] + ss * h2[q]
            grad[n2, q] += ss * h3[q]
    return f
