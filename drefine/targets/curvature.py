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


def diagonal_curvature(sc: Scatterers, s2: np.ndarray, c: np.ndarray, n_bins: int = 100
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H_x, H_B, H_occ) per scatterer: the curvature for one coordinate (the same for x, y, z;
    Å⁻² per unit of T), for B (Å⁻⁴) and for the occupancy, given each reflection's s² (Å⁻²)
    and curvature c (zero for reflections outside the target). Anisotropic atoms use B_eq."""
    s2 = np.asarray(s2, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    edges = np.linspace(0.0, s2.max() * (1 + 1e-9) if len(s2) else 1.0, n_bins + 1)
    which = np.clip(np.digitize(s2, edges) - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    centre = np.bincount(which, weights=s2, minlength=n_bins) / np.maximum(counts, 1)
    # observed curvatures (ML) can be negative one by one; their sums per bin estimate the
    # expected information, which is not
    c_bin = np.maximum(np.bincount(which, weights=c, minlength=n_bins), 0.0)
    t = sc.types.type_of_atom
    f = (sc.types.a[t][:, :, None] * np.exp(-sc.types.b[t][:, :, None] * centre[None, None, :] / 4.0)).sum(1)
    b_eq = 8.0 * np.pi ** 2 * sc.u_cart[:, :3].mean(axis=1)
    f2 = f ** 2 * np.exp(-b_eq[:, None] * centre[None, :] / 2.0) * (0.5 * len(sc.rot))
    h_occ = f2 @ c_bin
    h_x = (sc.occ ** 2) * (f2 @ (c_bin * 4.0 * np.pi ** 2 * centre / 3.0))
    h_b = (sc.occ ** 2) * (f2 @ (c_bin * centre ** 2 / 16.0))
    return h_x, h_b, h_occ
