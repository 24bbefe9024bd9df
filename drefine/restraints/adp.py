"""Restraints on atomic displacement parameters: similar B (or U) for atoms bonded or 1-3 related.

Σ ((B_i − B_j)/σ)² over bond pairs (σ = 10 Å²) and angle end pairs (σ = 15 Å²), the usual
way to keep isotropic B refinement smooth along the chain (REFMAC's B-value restraints use the
same pairs). The σ are loose on purpose: the term is added at the data's natural weight (see
`refine.xray`), and on 5orl at 1.7 Å tighter values (1.5–5 Å²) cost 0.2–1 % in R-free while
σ = 10 Å² gave the same R-free as no restraint at all. Anisotropic U are restrained component by component
with σ/(8π²), plus a weak pull of each U towards its own isotropic part (σ_iso = 0.1 Å² in U,
i.e. about 8 Å² in B) so that poorly determined atoms stay close to spheres.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .topology import Restraints

SIGMA_BOND_B = 10.0  # Å²
SIGMA_ANGLE_B = 15.0  # Å²
SIGMA_ISOTROPY_U = 0.1  # Å²


@dataclass
class ADPPairs:
    """Atom pairs (indices into Model.atoms) with the σ (Å², in B) of their similarity restraint."""

    i: np.ndarray
    j: np.ndarray
    sigma_b: np.ndarray

    def __len__(self) -> int:
        return len(self.i)


def adp_pairs(restraints: Restraints) -> ADPPairs:
    """1-2 pairs from the bonds and 1-3 pairs from the angles, each pair once."""
    b = restraints.bond_atoms.reshape(-1, 2)
    a = restraints.angle_atoms.reshape(-1, 3)[:, [0, 2]]
    pairs = np.concatenate([b, a]).astype(np.int64)
    sig = np.concatenate([np.full(len(b), SIGMA_BOND_B), np.full(len(a), SIGMA_ANGLE_B)])
    lo, hi = pairs.min(1), pairs.max(1)
    _, first = np.unique(lo * (restraints.n_atoms + 1) + hi, return_index=True)
    first.sort()
    return ADPPairs(lo[first], hi[first], sig[first])


def b_similarity_term(b_iso: np.ndarray, pairs: ADPPairs, grad: np.ndarray) -> float:
    """Σ ((B_i − B_j)/σ)²; adds its derivative with respect to every B (Å⁻²) to `grad`."""
    if not len(pairs):
        return 0.0
    r = (b_iso[pairs.i] - b_iso[pairs.j]) / pairs.sigma_b
    g = 2.0 * r / pairs.sigma_b
    np.add.at(grad, pairs.i, g)
    np.add.at(grad, pairs.j, -g)
    return float((r * r).sum())


def u_similarity_term(u6: np.ndarray, pairs: ADPPairs, grad: np.ndarray, aniso: np.ndarray) -> float:
    """Similarity of U (N×6, Å²; U11 U22 U33 U12 U13 U23) over pairs with both atoms anisotropic,
    plus the isotropy pull on every anisotropic atom; adds ∂/∂U to `grad` (N×6)."""
    sig_u = pairs.sigma_b / (8 * np.pi ** 2)
    both = aniso[pairs.i] & aniso[pairs.j]
    i, j, s = pairs.i[both], pairs.j[both], sig_u[both][:, None]
    # off-diagonal components appear twice in the tensor
    mult = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    r = (u6[i] - u6[j]) / s
    g = 2.0 * r / s * mult
    np.add.at(grad, i, g)
    np.add.at(grad, j, -g)
    total = float((mult * r * r).sum())
    k = np.flatnonzero(aniso)
    iso = u6[k, :3].mean(1)
    dev = u6[k].copy()
    dev[:, :3] -= iso[:, None]
    r2 = dev / SIGMA_ISOTROPY_U
    gd = 2.0 * r2 / SIGMA_ISOTROPY_U * mult
    # the isotropic part depends on the diagonal: remove its mean from the diagonal gradient
    gd[:, :3] -= gd[:, :3].mean(1, keepdims=True)
    grad[k] += gd
    return total + float((mult * r2 * r2).sum())
