"""Diagonal curvature of a reciprocal-space target per atomic parameter (Fisher scoring).

For a data target T(|F_model|) with per-reflection curvature c_h = ∂²T/∂|F_calc|² along F's
phase (the target's information per reflection, `LeastSquaresTarget.curvature` and
`MaximumLikelihoodTarget.curvature`), the curvature with respect to one parameter p of atom j,
ignoring the other atoms (their contributions have unrelated phases), is

    H_pp ≈ Σ_h c_h · ½ n_ops · a_j(h)² · q_p(h),   a_j(h) = occ_j f_j(s) e^{−B_j s²/4},

with q = 4π²s²/3 for one coordinate (Å⁻²), s⁴/16 for B (Å⁻⁴) and 1/occ² for the occupancy:
∂F/∂x = Σ_k 2πi (R_kᵀs)_x a_j e^{iφ_k} over the n_ops symmetry images, and random phases
average Re(ū ∂F/∂p)² to ½ Σ_k |2π(R_kᵀs)_x a_j|² ≈ ½ n_ops · 4π² a_j² s²/3. This is the
diagonal of the Fisher (normal) matrix that REFMAC and servalcat use for their second-order
steps (Steiner et al. 2003) and that `refine.uncertainty` uses for diagonal esds. Sums over
reflections are binned in s², so the cost is n_atoms × n_bins × n_Gaussians, not n_atoms × n_refl.
"""
from __future__ import annotations

import numpy as np

from ..density.direct import Scatterers


def _amplitudes(sc: Scatterers, s2: np.ndarray) -> np.ndarray:
    """f_j(s) e^{−B_j s²/4} of every atom (without occupancy) at the given s² (Å⁻²): form
    factors per scattering type, then one exponential per atom and s² (B_eq for anisotropic)."""
    f_type = sc.types.f0(s2)  # (types, len(s2))
    b_eq = 8.0 * np.pi ** 2 * sc.u_cart[:, :3].mean(axis=1)
    return f_type[sc.types.type_of_atom] * np.exp(-b_eq[:, None] * s2[None, :] / 4.0)


def _binned(s2: np.ndarray, c: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Reflections' curvatures summed in n_bins equal bins of s² (Å⁻²): (mean s² per bin, sum).
    Observed curvatures (ML) can be negative one by one; their sums per bin estimate the
    expected information, which is not (a negative sum is set to 0)."""
    s2 = np.asarray(s2, dtype=np.float64)
    edges = np.linspace(0.0, s2.max() * (1 + 1e-9) if len(s2) else 1.0, n_bins + 1)
    which = np.clip(np.digitize(s2, edges) - 1, 0, n_bins - 1)
    centre = np.bincount(which, weights=s2, minlength=n_bins) / np.maximum(np.bincount(which, minlength=n_bins), 1)
    return centre, np.maximum(np.bincount(which, weights=np.asarray(c, dtype=np.float64), minlength=n_bins), 0.0)


def diagonal_curvature(sc: Scatterers, s2: np.ndarray, c: np.ndarray, n_bins: int = 100
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H_x, H_B, H_occ) per scatterer: the curvature for one coordinate (the same for x, y, z;
    Å⁻² per unit of T), for B (Å⁻⁴) and for the occupancy, given each reflection's s² (Å⁻²)
    and curvature c (zero for reflections outside the target). Anisotropic atoms use B_eq."""
    centre, c_bin = _binned(s2, c, n_bins)
    f2 = _amplitudes(sc, centre) ** 2 * (0.5 * len(sc.rot))
    h_occ = f2 @ c_bin
    h_x = (sc.occ ** 2) * (f2 @ (c_bin * 4.0 * np.pi ** 2 * centre / 3.0))
    h_b = (sc.occ ** 2) * (f2 @ (c_bin * centre ** 2 / 16.0))
    return h_x, h_b, h_occ


def pair_coupling(sc: Scatterers, xyz: np.ndarray, s2: np.ndarray, c: np.ndarray, cutoff: float,
                  n_bins: int = 100):
    """Curvature between the parameters of atom pairs closer than `cutoff` (Å), in the same
    random-phase, direction-averaged approximation as `diagonal_curvature`. With r = x_j − x_i,
    q = 2π|s||r| and w = c_h ½ n_ops a_i a_j (⟨ŝ_a ŝ_b e^{2πi s·r}⟩ = (j₁(q)/q) δ_ab − j₂(q) r̂_a r̂_b
    over directions, ⟨ŝ sin(2π s·r)⟩ = j₁(q) r̂, ⟨cos(2π s·r)⟩ = j₀(q)):
        coordinates  H_xixj = Σ_h w 4π²s² [(j₁(q)/q) I − j₂(q) r̂r̂ᵀ]   (I/3 at r = 0: the diagonal)
        B            H_BiBj = Σ_h w s⁴/16 j₀(q)
        mixed        H_xiBj = −Σ_h w 2πs · s²/4 · j₁(q) r̂   (and H_BixJ = +the same)
    Returns (i, j, xx (pairs, 3, 3), bb (pairs,), xb (pairs, 3)) for i < j, rows of `sc`;
    `xyz` their Cartesian positions (Å). Checked against the exact Gauss-Newton blocks in the tests."""
    from scipy.spatial import cKDTree

    pairs = cKDTree(xyz).query_pairs(cutoff, output_type="ndarray")
    if not len(pairs):
        return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3, 3)), np.zeros(0), np.zeros((0, 3)))
    i, j = pairs[:, 0], pairs[:, 1]
    centre, c_bin = _binned(s2, c, n_bins)
    amp = sc.occ[:, None] * _amplitudes(sc, centre)  # (atoms, bins)
    r = xyz[j] - xyz[i]
    dist = np.linalg.norm(r, axis=1)
    s = np.sqrt(centre)
    q = np.maximum(2.0 * np.pi * s[None, :] * dist[:, None], 1e-12)  # (pairs, bins)
    w = amp[i] * amp[j] * (c_bin * 0.5 * len(sc.rot))[None, :]
    # spherical Bessel functions in closed form (one sine and one cosine per element)
    # (their series below q = 0.05, where the closed forms cancel)
    sin_q, cos_q = np.sin(q), np.cos(q)
    small = q < 0.05
    q2 = q * q
    j0 = np.where(small, 1.0 - q2 / 6.0, sin_q / q)
    j1 = np.where(small, q / 3.0 - q * q2 / 30.0, (sin_q / q - cos_q) / q)
    j2 = np.where(small, q2 / 15.0 - q2 * q2 / 210.0, (3.0 / q2 - 1.0) * sin_q / q - 3.0 * cos_q / q2)
    alpha = (w * (4.0 * np.pi ** 2 * centre)[None, :] * j1 / q).sum(1)
    beta = (w * (4.0 * np.pi ** 2 * centre)[None, :] * j2).sum(1)
    gamma = (w * (2.0 * np.pi * s * centre / 4.0)[None, :] * j1).sum(1)
    bb = (w * (centre ** 2 / 16.0)[None, :] * j0).sum(1)
    # cut off smoothly: the curvature matrix of all pairs is positive semi-definite (a Gram
    # matrix), the same matrix cut at `cutoff` need not be, and the minimiser then runs off
    # along a negative direction. The Schur product with a positive-definite, compactly
    # supported kernel (Wendland's ψ₃,₁, valid in 3-D) keeps it semi-definite.
    x = dist / cutoff
    taper = (1.0 - x) ** 4 * (4.0 * x + 1.0)
    alpha, beta, gamma, bb = alpha * taper, beta * taper, gamma * taper, bb * taper
    unit = r / np.maximum(dist, 1e-12)[:, None]
    xx = alpha[:, None, None] * np.eye(3)[None] - beta[:, None, None] * unit[:, :, None] * unit[:, None, :]
    return i, j, xx, bb, -gamma[:, None] * unit
