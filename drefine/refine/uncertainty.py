"""Standard uncertainties of coordinates and B from the least-squares normal matrix.

Full matrix (small problems, ≤ FULL_MATRIX_PARAMETERS parameters): with the Jacobian
J[h, p] = ∂|F_model(h)|/∂p over the work reflections (p = x, y, z of every atom of model 0 and B
of the isotropic ones; direct summation over atoms and symmetry operators, exact), weights
W = 1/σ² and residuals r = |Fo| − |F_model|:
    N = Jᵀ W J,   GoF² = Σ W r² / (n_obs − n_par),   cov = GoF² · N⁻¹,   esd = √diag(cov).
This is the unrestrained covariance (as SHELXL reports without restraints): it says how well the
data alone determine each parameter. In polar space groups (P1, P2₁, C2, P4₁, ...) the origin
floats along the polar axes: a shift of every atom changes only the fixed bulk-solvent part, so N
is nearly singular there and the esds would be spurious; those shifts are projected out (the
centroid is held along the polar axes, as SHELXL does), and any other null space is dropped
(pseudo-inverse) and said so.

Diagonal approximation (larger problems): N_pp ≈ Σ_h W_h k_h² · ½ n_ops · a_j(h)² · c_p(h), with
a_j(h) = occ_j f_j(s) e^{−B_j s²/4} the atom's amplitude, c = 4π²s²/3 for a coordinate
(random phases average Re(ū ∂F/∂x)² to ½ |∂F/∂x|², and q_x² to s²/3) and s⁴/16 for B. It
ignores correlations between parameters, so it underestimates the full-matrix esds (by a
factor of about 1–2 on 6mw0, see the tests). Sums over reflections are binned in s².
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..density.direct import _operator_terms, _s2, _type_form_factors, scatterers_of_model
from ..errors import DrefineError
from ..io.reflections import ReflectionTable
from ..model.arrays import Model
from ..targets.curvature import diagonal_curvature

FULL_MATRIX_PARAMETERS = 1500
REFLECTION_BLOCK = 2048


@dataclass
class Uncertainties:
    method: str
    xyz: np.ndarray  # (N, 3) Å, NaN for atoms outside model 0
    b: np.ndarray  # (N,) Å², NaN where not a parameter
    goodness_of_fit: float
    n_observations: int
    n_parameters: int
    labels: list[str]
    notes: list[str]

    def as_dict(self) -> dict:
        ok = np.isfinite(self.xyz[:, 0])
        mean_xyz = float(np.sqrt((self.xyz[ok] ** 2).sum(1)).mean()) if ok.any() else float("nan")
        out = {"method": self.method, "goodness_of_fit": self.goodness_of_fit, "n_observations": self.n_observations,
               "n_parameters": self.n_parameters, "mean_position_esd": mean_xyz, "notes": self.notes}
        if ok.sum() <= 5000:
            out["atoms"] = [{"atom": self.labels[i], "x": float(self.xyz[i, 0]), "y": float(self.xyz[i, 1]),
                             "z": float(self.xyz[i, 2]), "b": None if not np.isfinite(self.b[i]) else float(self.b[i])}
                            for i in np.flatnonzero(ok)]
        return out


@njit(cache=True, nogil=True, parallel=True)
def _amplitude_jacobian(hkl, unit, k_total, frac, occ, u, iso, type_idx, ga, gb, rot, trans, fmat, frac_t):
    """∂|F_model|/∂(x, y, z, B) per reflection and atom: (n_refl, n_atoms, 4); B column 0 for
    anisotropic atoms. `unit` = F_model/|F_model|; fractional gradients turned Cartesian by Fᵀ."""
    n, m = hkl.shape[0], frac.shape[0]
    out = np.zeros((n, m, 4))
    two_pi = 2.0 * math.pi
    n_types = ga.shape[0]
    for r in prange(n):
        h0, h1, h2 = hkl[r, 0], hkl[r, 1], hkl[r, 2]
        ss = _s2(fmat, h0, h1, h2)
        f_type = np.zeros(n_types)
        _type_form_factors(ga, gb, ss, f_type)
        ur, ui = unit[r].real, unit[r].imag
        for a in range(m):
            d0r = d0i = d1r = d1i = d2r = d2i = dbr = dbi = 0.0
            for k in range(rot.shape[0]):
                p0, p1, p2, q0, q1, q2, shift = _operator_terms(rot, trans, fmat, k, h0, h1, h2)
                quad = (u[a, 0] * q0 * q0 + u[a, 1] * q1 * q1 + u[a, 2] * q2 * q2
                        + 2.0 * (u[a, 3] * q0 * q1 + u[a, 4] * q0 * q2 + u[a, 5] * q1 * q2))
                amp = occ[a] * f_type[type_idx[a]] * math.exp(-2.0 * math.pi * math.pi * quad)
                ph = two_pi * (p0 * frac[a, 0] + p1 * frac[a, 1] + p2 * frac[a, 2] + shift)
                c, s = math.cos(ph), math.sin(ph)
                # ∂F/∂frac_i = 2πi p_i amp e^{iφ}
                d0r -= two_pi * p0 * amp * s
                d0i += two_pi * p0 * amp * c
                d1r -= two_pi * p1 * amp * s
                d1i += two_pi * p1 * amp * c
                d2r -= two_pi * p2 * amp * s
                d2i += two_pi * p2 * amp * c
                dbr += -0.25 * ss * amp * c
                dbi += -0.25 * ss * amp * s
            g0 = k_total[r] * (ur * d0r + ui * d0i)
            g1 = k_total[r] * (ur * d1r + ui * d1i)
            g2 = k_total[r] * (ur * d2r + ui * d2i)
            # Cartesian: ∂/∂x = Fᵀ ∂/∂frac
            out[r, a, 0] = frac_t[0, 0] * g0 + frac_t[0, 1] * g1 + frac_t[0, 2] * g2
            out[r, a, 1] = frac_t[1, 0] * g0 + frac_t[1, 1] * g1 + frac_t[1, 2] * g2
            out[r, a, 2] = frac_t[2, 0] * g0 + frac_t[2, 1] * g1 + frac_t[2, 2] * g2
            if iso[a]:
                out[r, a, 3] = k_total[r] * (ur * dbr + ui * dbi)
    return out


def amplitude_jacobian(model: Model, table: ReflectionTable, f_model: np.ndarray, k_total: np.ndarray,
                       rows: np.ndarray, source: str = "xray", sc=None) -> np.ndarray:
    """J[h, atom, (x, y, z, B)] = ∂|F_model(h)|/∂p for the reflections `rows` (exact, direct sum);
    `sc`: the model's scatterers when the caller already has them (blocks of one matrix)."""
    if sc is None:
        sc = scatterers_of_model(model, source=source, cell=table.cell, spacegroup=table.spacegroup)
    unit = np.where(np.abs(f_model) > 0, f_model / np.maximum(np.abs(f_model), 1e-300), 1.0)
    return _amplitude_jacobian(np.ascontiguousarray(table.hkl[rows], dtype=np.float64), unit[rows], k_total[rows],
                               sc.frac, sc.occ, sc.u_cart, ~sc.is_aniso, sc.types.type_of_atom, sc.types.a,
                               sc.types.b, sc.rot, sc.trans, sc.frac_matrix,
                               np.ascontiguousarray(sc.frac_matrix.T))


def standard_uncertainties(model: Model, table: ReflectionTable, result, mode: str = "auto", source: str = "xray",
                           log: Callable[[str], None] = print) -> Uncertainties | None:
    """esds of the refined model (`result`: the XrayResult whose F_model and scale to use;
    `source`: the form factors it was refined with)."""
    if mode == "none":
        return None
    atoms = model.model_atoms(0)
    n_par = 3 * len(atoms) + int((~model.atoms.has_aniso[atoms]).sum())
    if mode == "auto":
        mode = "full" if n_par <= FULL_MATRIX_PARAMETERS else "diagonal"
    # twin refinement: the residuals are taken against the detwinned F_obs (untwinned model amplitudes)
    f_obs = table.f_obs if getattr(result, "f_obs_maps", None) is None else result.f_obs_maps
    work = np.flatnonzero(table.work & np.isfinite(f_obs))
    sig = np.nan_to_num(table.sigma_f[work])
    w = np.where(sig > 0, 1.0 / np.maximum(sig, 1e-300) ** 2, 0.0)
    if not np.any(w > 0):
        w = np.ones(len(work))
    fo = f_obs[work]
    fm = np.abs(result.f_model[work])
    resid = fo - fm
    gof2 = float((w * resid ** 2).sum() / max(len(work) - n_par, 1))
    k_total = result.scale.k_total(np.asarray(table.hkl, dtype=np.float64) @ np.array(table.cell.frac.mat.tolist()))
    labels = [model.atom_label(int(i)) for i in atoms]
    notes: list[str] = []
    xyz = np.full((len(model.atoms), 3), np.nan)
    b = np.full(len(model.atoms), np.nan)
    iso = ~model.atoms.has_aniso[atoms]
    if mode == "full":
        if n_par > 4 * FULL_MATRIX_PARAMETERS:
            raise DrefineError(f"{n_par} parameters are too many for the full normal matrix (at most "
                               f"{4 * FULL_MATRIX_PARAMETERS}): use --esd diagonal")
        cols = np.concatenate([np.arange(len(atoms))[:, None] * 4 + np.arange(3)[None, :],
                               (np.arange(len(atoms)) * 4 + 3)[iso][:, None]], axis=None)
        cols = np.sort(cols)
        normal = np.zeros((len(cols), len(cols)))
        sc = scatterers_of_model(model, source=source, cell=table.cell, spacegroup=table.spacegroup)
        for start in range(0, len(work), REFLECTION_BLOCK):
            rows = work[start:start + REFLECTION_BLOCK]
            jac = amplitude_jacobian(model, table, result.f_model, k_total, rows, sc=sc).reshape(len(rows), -1)[:, cols]
            ww = w[start:start + REFLECTION_BLOCK]
            normal += jac.T @ (jac * ww[:, None])
        shifts = _origin_shifts(table, atoms, cols)
        if len(shifts):
            proj = np.eye(len(cols)) - shifts.T @ np.linalg.solve(shifts @ shifts.T, shifts)
            normal = proj @ normal @ proj
            notes.append(f"floating origin along {len(shifts)} polar axis(es): the centroid is held there")
        vals, vecs = np.linalg.eigh(normal)
        keep = vals > vals.max() * 1e-10
        if (~keep).sum() > len(shifts):
            notes.append(f"{int((~keep).sum()) - len(shifts)} undetermined combinations left out of the inverse")
        cov = (vecs[:, keep] / vals[keep]) @ vecs[:, keep].T * gof2
        esd = np.sqrt(np.clip(np.diag(cov), 0, None))
        atom_of, kind = cols // 4, cols % 4
        for j, (at, kd) in enumerate(zip(atom_of, kind)):
            if kd < 3:
                xyz[atoms[at], kd] = esd[j]
            else:
                b[atoms[at]] = esd[j]
        method = "full normal matrix (unrestrained least squares)"
    else:
        sx, sb = _diagonal_esd(model, table, atoms, work, w, k_total[work], source)
        xyz[atoms] = np.sqrt(gof2 / sx)[:, None]
        b[atoms[iso]] = np.sqrt(gof2 / sb[iso])
        method = "diagonal approximation of the normal matrix"
    log(f"standard uncertainties ({method}): mean position esd "
        f"{float(np.sqrt((xyz[atoms] ** 2).sum(1)).mean()):.4f} Å, goodness of fit {math.sqrt(gof2):.2f}")
    return Uncertainties(method, xyz, b, math.sqrt(gof2), len(work), n_par, labels, notes)


def _origin_shifts(table: ReflectionTable, atoms: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Parameter-space vectors of a rigid shift of all atoms along each polar axis (directions d
    with R d = d for every rotation of the space group); (n_axes, n_cols)."""
    from ..density.direct import symmetry_operators

    rot, _ = symmetry_operators(table.spacegroup)
    _, sv, vt = np.linalg.svd(np.concatenate([r - np.eye(3) for r in rot]))
    axes = vt[np.sum(sv > 1e-8):]
    orth = np.array(table.cell.orth.mat.tolist())
    out = []
    for d in axes:
        e = orth @ d
        e /= np.linalg.norm(e)
        v = np.zeros(4 * len(atoms))
        for c in range(3):
            v[np.arange(len(atoms)) * 4 + c] = e[c]
        out.append(v[cols])
    return np.array(out).reshape(len(out), len(cols))


def _diagonal_esd(model: Model, table: ReflectionTable, atoms, work, w, k_total_work, source: str = "xray",
                  n_bins: int = 100):
    """Diagonal normal-matrix elements per atom for a coordinate and for B (module docstring)."""
    sc = scatterers_of_model(model, atoms=atoms, source=source, cell=table.cell, spacegroup=table.spacegroup)
    h_x, h_b, _ = diagonal_curvature(sc, 1.0 / table.d[work] ** 2, w * k_total_work ** 2, n_bins)
    return h_x, h_b
