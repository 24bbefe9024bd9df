"""Structure factors by direct summation over atoms and symmetry operators: the exact reference.

F(h) = Σ_atoms Σ_ops occ · f_type(s) · exp(−2π² s'ᵀ U s') · exp(2πi (h'·x_frac + h·t)),
h' = Rᵀh and s' = Fᵀh' its Cartesian reciprocal vector (F the fractionalisation matrix), over
the space group's operators (R, t) including centring translations. The same layout,
reflections × atoms, is the one the multi-conformer projections use, so it is also offered as
a blockwise dask array: reflection chunks × atom chunks, reduced over atom chunks.

Gradients of a real target T(F) take D(h) = ∂T/∂Re F + i ∂T/∂Im F and return
∂T/∂p = Σ_h Re(conj(D(h)) ∂F(h)/∂p) for coordinates (Å), B (Å²), occupancy and U (Å²).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import gemmi
import numpy as np
from numba import njit, prange

from ..model.arrays import Model
from .form_factors import ScatteringTypes, scattering_types, u_cart_of_atoms


@dataclass
class Scatterers:
    """What structure-factor kernels need of a model: fractional coordinates, occupancy, U, types."""

    frac: np.ndarray  # (n, 3)
    occ: np.ndarray  # (n,)
    u_cart: np.ndarray  # (n, 6) Å², U11 U22 U33 U12 U13 U23
    is_aniso: np.ndarray  # (n,) bool
    types: ScatteringTypes
    atom_index: np.ndarray  # rows of Model.atoms these scatterers are
    frac_matrix: np.ndarray  # (3, 3) F: fractional = F · Cartesian
    orth_matrix: np.ndarray  # (3, 3) O
    rot: np.ndarray  # (k, 3, 3) fractional rotation of each symmetry operator
    trans: np.ndarray  # (k, 3) fractional translation

    def __len__(self):
        return len(self.occ)


def symmetry_operators(sg: gemmi.SpaceGroup | None) -> tuple[np.ndarray, np.ndarray]:
    """All operators of the space group (centring included) as fractional (R, t)."""
    if sg is None:
        return np.eye(3)[None], np.zeros((1, 3))
    ops = list(sg.operations())
    rot = np.array([np.array(op.rot, dtype=np.float64) / op.DEN for op in ops])
    trans = np.array([np.array(op.tran, dtype=np.float64) / op.DEN for op in ops])
    return rot, trans


def scatterers_of_model(model: Model, atoms: np.ndarray | None = None, source: str = "xray",
                        hydrogens: bool = True, cell: gemmi.UnitCell | None = None,
                        spacegroup: gemmi.SpaceGroup | None = None) -> Scatterers:
    """Scatterers of `atoms` (default: model 0) in the model's cell and space group."""
    a = model.atoms
    idx = model.model_atoms(0) if atoms is None else np.asarray(atoms)
    if not hydrogens:
        idx = idx[~a.is_hydrogen[idx]]
    cell = cell or model.cell
    sg = spacegroup if spacegroup is not None else model.spacegroup
    F = np.array(cell.frac.mat.tolist())
    O = np.array(cell.orth.mat.tolist())
    rot, trans = symmetry_operators(sg)
    return Scatterers(
        frac=a.xyz[idx] @ F.T, occ=a.occupancy[idx].copy(),
        u_cart=u_cart_of_atoms(a.b_iso[idx], a.u_aniso[idx], a.has_aniso[idx]), is_aniso=a.has_aniso[idx].copy(),
        types=scattering_types(a.element[idx], a.charge[idx], source), atom_index=idx,
        frac_matrix=F, orth_matrix=O, rot=rot, trans=trans)


@njit(cache=True, nogil=True, inline="always")
def _s2(fmat, h0, h1, h2):
    """|s|² (Å⁻²) of reflection h: s = Fᵀh."""
    s0 = fmat[0, 0] * h0 + fmat[1, 0] * h1 + fmat[2, 0] * h2
    s1 = fmat[0, 1] * h0 + fmat[1, 1] * h1 + fmat[2, 1] * h2
    s2 = fmat[0, 2] * h0 + fmat[1, 2] * h1 + fmat[2, 2] * h2
    return s0 * s0 + s1 * s1 + s2 * s2


@njit(cache=True, nogil=True, inline="always")
def _operator_terms(rot, trans, fmat, k, h0, h1, h2):
    """h' = Rᵀh, its Cartesian vector s' = Fᵀh', and the phase shift h·t of operator k."""
    p0 = rot[k, 0, 0] * h0 + rot[k, 1, 0] * h1 + rot[k, 2, 0] * h2
    p1 = rot[k, 0, 1] * h0 + rot[k, 1, 1] * h1 + rot[k, 2, 1] * h2
    p2 = rot[k, 0, 2] * h0 + rot[k, 1, 2] * h1 + rot[k, 2, 2] * h2
    q0 = fmat[0, 0] * p0 + fmat[1, 0] * p1 + fmat[2, 0] * p2
    q1 = fmat[0, 1] * p0 + fmat[1, 1] * p1 + fmat[2, 1] * p2
    q2 = fmat[0, 2] * p0 + fmat[1, 2] * p1 + fmat[2, 2] * p2
    return p0, p1, p2, q0, q1, q2, h0 * trans[k, 0] + h1 * trans[k, 1] + h2 * trans[k, 2]


@njit(cache=True, nogil=True, inline="always")
def _type_form_factors(ga, gb, ss, f_type):
    """f(s) of every scattering type at |s|² = ss (sum of Gaussians), into `f_type`."""
    for t in range(ga.shape[0]):
        acc = 0.0
        for g in range(ga.shape[1]):
            acc += ga[t, g] * math.exp(-gb[t, g] * ss * 0.25)
        f_type[t] = acc


@njit(cache=True, nogil=True, parallel=True)
def _sf_kernel(hkl, frac, occ, u, type_idx, ga, gb, rot, trans, fmat):
    n = hkl.shape[0]
    out = np.zeros(n, dtype=np.complex128)
    n_types = ga.shape[0]
    two_pi = 2.0 * math.pi
    for r in prange(n):
        h0, h1, h2 = hkl[r, 0], hkl[r, 1], hkl[r, 2]
        ss = _s2(fmat, h0, h1, h2)
        f_type = np.zeros(n_types)
        _type_form_factors(ga, gb, ss, f_type)
        re = 0.0
        im = 0.0
        for k in range(rot.shape[0]):
            p0, p1, p2, q0, q1, q2, shift = _operator_terms(rot, trans, fmat, k, h0, h1, h2)
            for a in range(frac.shape[0]):
                quad = (u[a, 0] * q0 * q0 + u[a, 1] * q1 * q1 + u[a, 2] * q2 * q2
                        + 2.0 * (u[a, 3] * q0 * q1 + u[a, 4] * q0 * q2 + u[a, 5] * q1 * q2))
                amp = occ[a] * f_type[type_idx[a]] * math.exp(-2.0 * math.pi * math.pi * quad)
                phase = two_pi * (p0 * frac[a, 0] + p1 * frac[a, 1] + p2 * frac[a, 2] + shift)
                re += amp * math.cos(phase)
                im += amp * math.sin(phase)
        out[r] = complex(re, im)
    return out


@njit(cache=True, nogil=True)
def _sf_gradient_kernel(hkl, dt, frac, occ, u, type_idx, ga, gb, rot, trans, fmat):
    """Σ_h Re(conj(D) ∂F/∂p) for fractional coordinates, occupancy and U (per atom)."""
    m = frac.shape[0]
    g_frac = np.zeros((m, 3))
    g_occ = np.zeros(m)
    g_u = np.zeros((m, 6))
    n_types = ga.shape[0]
    two_pi = 2.0 * math.pi
    tpp = 2.0 * math.pi * math.pi
    f_type = np.zeros(n_types)
    for r in range(hkl.shape[0]):
        dre, dim = dt[r].real, dt[r].imag
        if dre == 0.0 and dim == 0.0:
            continue
        h0, h1, h2 = hkl[r, 0], hkl[r, 1], hkl[r, 2]
        ss = _s2(fmat, h0, h1, h2)
        _type_form_factors(ga, gb, ss, f_type)
        for k in range(rot.shape[0]):
            p0, p1, p2, q0, q1, q2, shift = _operator_terms(rot, trans, fmat, k, h0, h1, h2)
            for a in range(m):
                quad = (u[a, 0] * q0 * q0 + u[a, 1] * q1 * q1 + u[a, 2] * q2 * q2
                        + 2.0 * (u[a, 3] * q0 * q1 + u[a, 4] * q0 * q2 + u[a, 5] * q1 * q2))
                base = f_type[type_idx[a]] * math.exp(-tpp * quad)
                phase = two_pi * (p0 * frac[a, 0] + p1 * frac[a, 1] + p2 * frac[a, 2] + shift)
                c = math.cos(phase)
                s = math.sin(phase)
                # term = occ·base·e^{iφ}; Re(conj(D)·term) and Re(conj(D)·i·term)
                re_t = base * (dre * c + dim * s)
                re_it = base * (dim * c - dre * s)
                g_occ[a] += re_t
                w = occ[a] * re_it * two_pi
                g_frac[a, 0] += w * p0
                g_frac[a, 1] += w * p1
                g_frac[a, 2] += w * p2
                wu = -tpp * occ[a] * re_t
                g_u[a, 0] += wu * q0 * q0
                g_u[a, 1] += wu * q1 * q1
                g_u[a, 2] += wu * q2 * q2
                g_u[a, 3] += wu * 2.0 * q0 * q1
                g_u[a, 4] += wu * 2.0 * q0 * q2
                g_u[a, 5] += wu * 2.0 * q1 * q2
    return g_frac, g_occ, g_u


def _args(sc: Scatterers):
    return (np.ascontiguousarray(sc.frac), sc.occ, np.ascontiguousarray(sc.u_cart), sc.types.type_of_atom,
            sc.types.a, sc.types.b, sc.rot, sc.trans, sc.frac_matrix)


def direct_structure_factors(sc: Scatterers, hkl: np.ndarray) -> np.ndarray:
    """F(h) (complex, electrons or Å for electron scattering) at Miller indices hkl (n, 3), in-process."""
    return _sf_kernel(np.ascontiguousarray(hkl, dtype=np.float64), *_args(sc))


@dataclass
class StructureFactorGradient:
    """∂T/∂p per scatterer: xyz (n,3) in Å⁻¹·T, b_iso (n,) per Å² (isotropic atoms), occ (n,), u (n,6)."""

    xyz: np.ndarray
    b_iso: np.ndarray
    occ: np.ndarray
    u: np.ndarray


def direct_gradient(sc: Scatterers, hkl: np.ndarray, dtarget_df: np.ndarray) -> StructureFactorGradient:
    """Gradient of a target with respect to coordinates, B, occupancy and U by direct summation."""
    g_frac, g_occ, g_u = _sf_gradient_kernel(np.ascontiguousarray(hkl, dtype=np.float64),
                                             np.ascontiguousarray(dtarget_df, dtype=np.complex128), *_args(sc))
    return _finish_gradient(sc, g_frac, g_occ, g_u)


def _finish_gradient(sc, g_frac, g_occ, g_u):
    # fractional = F·x, so ∂T/∂x = Fᵀ ∂T/∂frac; an isotropic B enters as U = B/(8π²)·I.
    g_xyz = g_frac @ sc.frac_matrix
    g_b = (g_u[:, 0] + g_u[:, 1] + g_u[:, 2]) / (8.0 * np.pi ** 2)
    return StructureFactorGradient(xyz=g_xyz, b_iso=g_b, occ=g_occ, u=g_u)


def direct_structure_factors_dask(sc: Scatterers, hkl: np.ndarray, reflection_chunk: int = 4096,
                                  atom_chunk: int = 1024):
    """F(h) as a lazy dask array: blocks of reflection chunks × atom chunks, summed over atom chunks.

    Chunk sizes are parameters; the result equals the in-process one up to summation order.
    """
    import dask.array as da

    hkl_d = da.from_array(np.ascontiguousarray(hkl, dtype=np.float64), chunks=(reflection_chunk, 3))
    n = len(sc)
    fr = da.from_array(np.ascontiguousarray(sc.frac), chunks=(atom_chunk, 3))
    occ = da.from_array(sc.occ, chunks=(atom_chunk,))
    u = da.from_array(np.ascontiguousarray(sc.u_cart), chunks=(atom_chunk, 6))
    ti = da.from_array(sc.types.type_of_atom, chunks=(atom_chunk,))
    const = (sc.types.a, sc.types.b, sc.rot, sc.trans, sc.frac_matrix)

    def block(h, f, o, uu, t):
        return _sf_kernel(h, f, o, uu, t, *const)[:, None]

    n_atom_chunks = len(fr.chunks[0]) if n else 0
    partial = da.blockwise(block, "ra", hkl_d, "rx", fr, "ax", occ, "a", u, "ay", ti, "a",
                           dtype=np.complex128, concatenate=True, adjust_chunks={"a": 1})
    assert partial.shape[1] == n_atom_chunks
    return partial.sum(axis=1)
