"""Atomic scattering factors as sums of Gaussians, from gemmi's tables.

X-ray: International Tables vol. C (1992) 4-Gaussian + constant fits (gemmi `Element.it92`,
charged ions through `gemmi.IT92_get_exact`, the neutral atom for ions the table lacks). Electron: the 5-Gaussian fits of Peng et al.
(1996) as gemmi carries them (`Element.c4322`, used by gemmi.DensityCalculatorE).
f(s) = Σ_g a_g exp(−b_g s²/4) + c, with s = 1/d in Å⁻¹ (so s²/4 = (sinθ/λ)²).

Atoms are grouped into scattering types (element, charge); every type carries the same number
of Gaussians (5; the constant c becomes a Gaussian with b = 0) so kernels use one array layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import gemmi
import numpy as np

N_GAUSS = 5


@dataclass
class ScatteringTypes:
    """Per-type Gaussian coefficients and the type index of every atom."""

    a: np.ndarray  # (n_types, N_GAUSS), electrons (X-ray) or Å (electron scattering)
    b: np.ndarray  # (n_types, N_GAUSS), Å²
    type_of_atom: np.ndarray  # (n_atoms,) int64
    labels: list[str]
    source: str  # "xray" or "electron"

    def f0(self, s2: np.ndarray) -> np.ndarray:
        """Form factor of each type at s² = 1/d² (Å⁻²): array (n_types, len(s2))."""
        return (self.a[:, :, None] * np.exp(-self.b[:, :, None] * np.asarray(s2)[None, None, :] / 4.0)).sum(1)


def scattering_types(elements: np.ndarray, charges: np.ndarray | None = None,
                     source: str = "xray") -> ScatteringTypes:
    """Scattering types for atoms given their element symbols (and formal charges, X-ray only).

    xray: IT92 Gaussians (e); electron: C4322 (Peng) Gaussians; neutron: the coherent scattering
    length (fm, Sears 1992 via gemmi), constant in s, as one Gaussian of width 0."""
    if source not in ("xray", "electron", "neutron"):
        raise ValueError(f"unknown scattering source {source!r} (xray, electron or neutron)")
    charges = np.zeros(len(elements), dtype=np.int64) if charges is None else np.asarray(charges, dtype=np.int64)
    keys = np.char.add(np.char.add(np.asarray(elements, dtype="<U2"), ":"), charges.astype("<U3"))
    uniq, inv = np.unique(keys, return_inverse=True)
    a = np.zeros((len(uniq), N_GAUSS))
    b = np.zeros((len(uniq), N_GAUSS))
    for k, key in enumerate(uniq):
        el_name, q = key.split(":")
        el = gemmi.Element(el_name)
        if source == "xray":
            # ions the table lacks (IT92 covers common ones only) scatter as the neutral atom
            coef = (gemmi.IT92_get_exact(el, int(q)) if int(q) else None) or el.it92
            a[k, :4], b[k, :4] = coef.a, coef.b
            a[k, 4], b[k, 4] = coef.c, 0.0
        elif source == "neutron":
            a[k, 0] = el.neutron92.get_coefs()[0]
        else:
            a[k], b[k] = el.c4322.a, el.c4322.b
    return ScatteringTypes(a=a, b=b, type_of_atom=inv.astype(np.int64), labels=uniq.tolist(), source=source)


def u_cart_of_atoms(b_iso: np.ndarray, u_aniso: np.ndarray, has_aniso: np.ndarray) -> np.ndarray:
    """Per-atom Cartesian U (N, 6: U11 U22 U33 U12 U13 U23, Å²); isotropic atoms get B/(8π²)·I."""
    u = np.zeros((len(b_iso), 6))
    iso = b_iso / (8.0 * np.pi ** 2)
    u[:, 0] = u[:, 1] = u[:, 2] = iso
    u[has_aniso] = u_aniso[has_aniso]
    return u
