"""Occupancy groups of alternate conformers, constrained to sum to one (or at most one).

Every residue with alternate locations is one group; each conformer (altloc) of it is one
refinable occupancy shared by all its atoms. When the conformers' occupancies in the input add
up to 1 (±0.02), they are refined with Σ q = 1 (the last one is 1 − Σ of the others); otherwise
(a partly occupied ligand, say) with Σ q ≤ 1. Atoms without an altloc keep their occupancy.

Parameters of the refinement are the free q's; `expand` turns them into per-atom occupancies
and `chain_rule` turns ∂T/∂occupancy per atom into ∂T/∂q.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arrays import Model

Q_MIN = 0.01


@dataclass
class OccupancyGroups:
    """Conformer occupancy groups of one model."""

    atom: np.ndarray  # atoms with a refinable occupancy (indices into Model.atoms)
    conformer_of_atom: np.ndarray  # for each of `atom`: global conformer number
    group_of_conformer: np.ndarray  # (n_conformers,) group of each conformer
    sum_to_one: np.ndarray  # (n_groups,) bool
    labels: list[str]

    @property
    def n_conformers(self) -> int:
        return len(self.group_of_conformer)

    @property
    def n_groups(self) -> int:
        return len(self.sum_to_one)

    def is_dependent(self) -> np.ndarray:
        """Per conformer: True for the last conformer of a sum-to-one group (not a free parameter)."""
        dep = np.zeros(self.n_conformers, dtype=bool)
        if self.n_conformers:
            last = np.zeros(self.n_groups, dtype=np.int64)
            np.maximum.at(last, self.group_of_conformer, np.arange(self.n_conformers))
            dep[last[self.sum_to_one]] = True
        return dep

    def conformer_values(self, occupancy: np.ndarray) -> np.ndarray:
        """Mean input occupancy of each conformer."""
        s = np.bincount(self.conformer_of_atom, weights=occupancy[self.atom], minlength=self.n_conformers)
        n = np.bincount(self.conformer_of_atom, minlength=self.n_conformers)
        return s / np.maximum(n, 1)

    def free_parameters(self, occupancy: np.ndarray) -> np.ndarray:
        q = self.conformer_values(occupancy)
        return np.clip(q[~self.is_dependent()], Q_MIN, 1.0)

    def _group_sums(self, per_conformer: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.bincount(self.group_of_conformer, weights=np.where(mask, per_conformer, 0.0),
                           minlength=self.n_groups)

    def conformers_from_free(self, free: np.ndarray) -> np.ndarray:
        """Every conformer's value; a dependent one is 1 − the sum of the others in its group."""
        dep = self.is_dependent()
        q = np.zeros(self.n_conformers)
        q[~dep] = free
        others = self._group_sums(q, ~dep)
        return np.where(dep, 1.0 - others[self.group_of_conformer], q)

    def expand(self, free: np.ndarray, occupancy: np.ndarray) -> np.ndarray:
        """Per-atom occupancies with the group values put in."""
        occ = occupancy.copy()
        occ[self.atom] = self.conformers_from_free(free)[self.conformer_of_atom]
        return occ

    def _to_free(self, per_atom: np.ndarray, dependent_sign: float) -> np.ndarray:
        """Per free conformer: the sum over its atoms plus `dependent_sign` times its group's
        dependent conformer's sum."""
        per_conf = np.bincount(self.conformer_of_atom, weights=per_atom[self.atom], minlength=self.n_conformers)
        dep = self.is_dependent()
        dep_of_group = self._group_sums(per_conf, dep)
        return (per_conf + dependent_sign * dep_of_group[self.group_of_conformer])[~dep]

    def chain_rule(self, d_occ: np.ndarray) -> np.ndarray:
        """∂T/∂(free q) from ∂T/∂occupancy per atom (of Model.atoms): a free conformer's own
        derivative minus its group's dependent one (which moves by −1 when it moves by +1)."""
        return self._to_free(d_occ, -1.0)

    def curvature_chain_rule(self, h_occ: np.ndarray) -> np.ndarray:
        """Diagonal ∂²T/∂(free q)² from a diagonal curvature per atom occupancy (of Model.atoms):
        a free conformer's own plus its group's dependent one ((−1)² = 1; off-diagonal terms left out)."""
        return self._to_free(h_occ, 1.0)

    def project(self, free: np.ndarray) -> np.ndarray:
        """Nearest admissible values: every q ≥ Q_MIN and each group's sum ≤ 1 (sum-to-one groups:
        the dependent conformer ≥ Q_MIN as well); groups over the limit are scaled down."""
        free = np.clip(free, Q_MIN, 1.0)
        dep = self.is_dependent()
        q = np.zeros(self.n_conformers)
        q[~dep] = free
        total = self._group_sums(q, ~dep)
        limit = np.where(self.sum_to_one, 1.0 - Q_MIN, 1.0)
        scale = np.where(total > limit, limit / np.maximum(total, 1e-300), 1.0)
        return (q * scale[self.group_of_conformer])[~dep]


def occupancy_groups(model: Model, atoms: np.ndarray | None = None) -> OccupancyGroups:
    """Groups of the residues of `atoms` (default model 0) that have alternate conformers."""
    a = model.atoms
    idx = model.model_atoms(0) if atoms is None else np.asarray(atoms)
    has_alt = idx[a.altloc[idx] != ""]
    if not len(has_alt):
        return OccupancyGroups(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                               np.zeros(0, bool), [])
    res = a.residue_index[has_alt]
    keys = np.char.add(res.astype(str), np.char.add(":", a.altloc[has_alt].astype(str)))
    conf_keys, conf_of_atom = np.unique(keys, return_inverse=True)
    conf_res = np.array([int(k.split(":")[0]) for k in conf_keys])
    group_res, group_of_conf = np.unique(conf_res, return_inverse=True)
    tmp = OccupancyGroups(has_alt, conf_of_atom, group_of_conf, np.zeros(len(group_res), bool), [])
    q = tmp.conformer_values(a.occupancy)
    sums = np.bincount(group_of_conf, weights=q, minlength=len(group_res))
    tmp.sum_to_one = np.abs(sums - 1.0) <= 0.02
    tmp.labels = [model.residues.label(int(r)) for r in group_res]
    return tmp
