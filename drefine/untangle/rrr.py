"""RRR over positions and density variables together (divide and concur with the data).

The iterate holds every constraint's position replicas and every atom's density variables.
Divide: the geometry projections on the replicas (`constraints.DivideAndConcur.divide`) and, per
reflection, the structure-factor projection of the density variables onto Σ occ ρ = F(h)
(`projections.project_structure_factor`). Concur: each atom's position from its replicas and
density variables together (`density.DensityManifold.concur`, Gauss–Newton in the tangent
space), then replicas and density variables set to that position. The metric weights are η per
replica and g·w_h per density variable (w_h zero below the low-resolution cut). RRR:
x ← x + β (P_C(2 P_D(x) − x) − P_D(x)).

Prototype scale: whole arrays (atoms × operators × reflections) in memory, one conformer set,
phases given. The chunked layout, the two-stage protocol, bulk solvent and the command are to come.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .constraints import DivideAndConcur
from .density import DensityManifold
from .projections import project_structure_factor


@dataclass
class RRRState:
    replicas: np.ndarray  # (n_replicas, 3)
    rho: np.ndarray  # (n_atoms, n_ops, n_refl) complex


class RRRSolver:
    def __init__(self, geometry: DivideAndConcur, manifold: DensityManifold, amp: np.ndarray, occ: np.ndarray,
                 f_target: np.ndarray, w_refl: np.ndarray, atoms: np.ndarray, g: float = 0.1, beta: float = 0.5,
                 concur_steps: int = 3):
        """`atoms`: the model atoms that carry density variables (rows of `amp` and `occ`)."""
        self.geo, self.man = geometry, manifold
        self.amp, self.occ, self.f, self.w = amp, occ, f_target, w_refl
        self.atoms = np.asarray(atoms)
        self.g, self.beta, self.steps = g, beta, concur_steps
        n_ops = manifold.hr.shape[0]
        self.p = np.repeat(occ, n_ops)  # weight of each (atom, operator) variable in Σ occ ρ

    def start(self, xyz: np.ndarray) -> RRRState:
        return RRRState(self.geo.replicas(xyz), self.man.values(xyz[self.atoms], self.amp))

    def divide(self, s: RRRState) -> RRRState:
        n_atoms, n_ops, n_refl = s.rho.shape
        flat = s.rho.transpose(2, 0, 1).reshape(n_refl, n_atoms * n_ops)
        proj = project_structure_factor(flat, np.broadcast_to(self.p, flat.shape), self.f)
        return RRRState(self.geo.divide(s.replicas), proj.reshape(n_refl, n_atoms, n_ops).transpose(1, 2, 0))

    def positions(self, s: RRRState, fallback: np.ndarray) -> np.ndarray:
        """The concurred positions of the iterate `s` (no update)."""
        eta = self.geo.eta
        owner = self.geo.owner
        n = self.geo.n_atoms
        eta_sum = np.bincount(owner, weights=eta, minlength=n)
        rsum = np.stack([np.bincount(owner, weights=eta * s.replicas[:, c], minlength=n) for c in range(3)], 1)
        start = np.where(eta_sum[:, None] > 0, rsum / np.maximum(eta_sum, 1e-300)[:, None], fallback)
        r = start.copy()
        a = self.atoms
        r[a] = self.man.concur(s.rho, self.amp, rsum[a], eta_sum[a], start[a], self.g, self.w, self.steps)
        return r

    def concur(self, s: RRRState, fallback: np.ndarray) -> tuple[RRRState, np.ndarray]:
        r = self.positions(s, fallback)
        return RRRState(r[self.geo.owner], self.man.values(r[self.atoms], self.amp)), r

    def step(self, x: RRRState, fallback: np.ndarray) -> tuple[RRRState, float, np.ndarray]:
        """One RRR step: new iterate, the gap |P_C(2P_D(x) − x) − P_D(x)| in the metric (divided by
        Σ η, so that it reads in Å when the positions dominate), and the concurred positions of P_D(x)."""
        pd = self.divide(x)
        reflected = RRRState(2 * pd.replicas - x.replicas, 2 * pd.rho - x.rho)
        pc, _ = self.concur(reflected, fallback)
        d_rep = pc.replicas - pd.replicas
        d_rho = pc.rho - pd.rho
        w_rho = self.g * self.w[None, None, :]
        gap2 = (self.geo.eta * (d_rep ** 2).sum(1)).sum() + (w_rho * np.abs(d_rho) ** 2).sum()
        new = RRRState(x.replicas + self.beta * d_rep, x.rho + self.beta * d_rho)
        # in Å: the weighted distance per unit of replica weight
        return new, float(np.sqrt(gap2 / self.geo.eta.sum())), self.positions(pd, fallback)
