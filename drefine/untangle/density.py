"""Density variables of divide and concur and their part of the concur projection.

Each atom j (of one conformer) owns a density variable per symmetry operator s and reflection h:
its structure-factor contribution ρ_{j,s}(h). On the "concur manifold" these are
    m_{j,s}(h; r) = a_j(h) · exp(2πi (h R_s · x(r) + h · t_s)),   a_j(h) = f_j(|h|) e^{−B_j s²/4},
x(r) the fractional coordinates of the atom's position r. The divide side (the structure-factor
constraint Σ_{j,s} occ_j ρ_{j,s}(h) = F(h), `projections.project_structure_factor`) moves them off
it; the concur projection brings every atom back, minimising over its position r
    E(r) = Σ_c η_c |r_c − r|² + g Σ_{s,h} w_h |ρ_{j,s}(h) − m_{j,s}(h; r)|²
(position replicas r_c with weights η_c, relative density weight g, reflection weights w_h, zero
below the low-resolution cut). E is minimised by Gauss–Newton steps in the tangent space of the
manifold (∂m/∂r = 2πi q_s(h) m, q_s(h) the Cartesian vector of h R_s), 2–3 steps from the
current position, and the density variables are then set to m(r).

This module holds the arrays whole (atoms × operators × reflections) and evaluates them with numpy:
the independent reference the tests check the production kernels against (`density_kernels`,
`density_engine`), which never build more than one atom's row at a time.
"""
from __future__ import annotations

import numpy as np


def atom_amplitudes(ga: np.ndarray, gb: np.ndarray, type_of_atom: np.ndarray, b_iso: np.ndarray,
                    s2: np.ndarray) -> np.ndarray:
    """a_j(h) = f_type(j)(s) e^{−B_j s²/4}: (n_atoms, n_refl), from Gaussian coefficients (a, b)."""
    f_type = (ga[:, :, None] * np.exp(-gb[:, :, None] * s2[None, None, :] / 4.0)).sum(axis=1)
    return f_type[type_of_atom] * np.exp(-np.outer(b_iso, s2) / 4.0)


class DensityManifold:
    """Geometry of the manifold for fixed reflections and space-group operators."""

    def __init__(self, hkl: np.ndarray, rot: np.ndarray, trans: np.ndarray, frac_matrix: np.ndarray):
        hkl = np.asarray(hkl, dtype=np.float64)
        self.hr = np.einsum("ni,sij->snj", hkl, rot)  # h R_s: (n_ops, n_refl, 3), fractional
        self.shift = np.einsum("ni,si->sn", hkl, trans)  # h·t_s: (n_ops, n_refl)
        self.frac_matrix = frac_matrix
        self.q = 2 * np.pi * self.hr @ frac_matrix  # 2π q_s(h), Cartesian: (n_ops, n_refl, 3)

    def values(self, xyz: np.ndarray, amp: np.ndarray) -> np.ndarray:
        """m (n_atoms, n_ops, n_refl) at Cartesian positions xyz (n_atoms, 3)."""
        frac = xyz @ self.frac_matrix.T
        phase = 2 * np.pi * (np.einsum("snk,ak->asn", self.hr, frac) + self.shift[None])
        return amp[:, None, :] * np.exp(1j * phase)

    def concur(self, rho: np.ndarray, amp: np.ndarray, replica_sum: np.ndarray, eta_sum: np.ndarray,
               start: np.ndarray, g: float, w_refl: np.ndarray, steps: int = 3) -> np.ndarray:
        """Positions minimising E(r) per atom by `steps` Gauss–Newton steps from `start`.

        rho (n_atoms, n_ops, n_refl) density variables; replica_sum = Σ_c η_c r_c and eta_sum =
        Σ_c η_c per atom; w_refl (n_refl,) reflection weights."""
        r = start.copy()
        for _ in range(steps):
            m = self.values(r, amp)
            resid = rho - m
            # tangent: J = i q m; normal matrix g Σ w |m|² q qᵀ, right side g Σ w Re(conj(J) resid)
            wm2 = w_refl[None, None, :] * np.abs(m) ** 2
            a = g * np.einsum("asn,sni,snj->aij", wm2, self.q, self.q)
            jr = np.real(np.conj(1j * m) * resid) * w_refl[None, None, :]
            b = g * np.einsum("asn,sni->ai", jr, self.q)
            a += eta_sum[:, None, None] * np.eye(3)
            b += replica_sum - eta_sum[:, None] * r
            r = r + np.linalg.solve(a, b[..., None])[..., 0]
        return r
