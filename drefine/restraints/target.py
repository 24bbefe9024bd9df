"""The geometry restraint target: every term of `Restraints` plus non-bonded repulsion.

It has the interface every drefine target shares (cf. servalcat's refinement targets):
`update(xyz)` to take new model values, `value_and_gradient(xyz)` for the optimiser, and
`statistics(xyz)` for reports. Values are Σ z² over all restraints (dimensionless).
"""
from __future__ import annotations

from copy import copy
from dataclasses import replace

import numpy as np

from ..model.arrays import Model
from . import kernels as K
from .nonbonded import NONBONDED_SIGMA, NonbondedPairs, find_nonbonded_pairs, nonbonded_term
from .ramachandran import rama_term
from .topology import Restraints

TERMS = ("bonds", "angles", "torsions", "chirals", "planes", "nonbonded", "ramachandran")


class GeometryTarget:
    """Σ over restraint terms of ((value − ideal)/σ)², with exact gradient in Å⁻¹ per coordinate."""

    def __init__(self, model: Model, restraints: Restraints, nonbonded: bool = True,
                 search_buffer: float = 1.0, weights: dict[str, float] | None = None,
                 movable: np.ndarray | None = None, rama=None, pairs: NonbondedPairs | None = None):
        """`movable`: only restraints and contacts involving these atoms are evaluated (the rest
        of the model is fixed, so the others would only add a constant). `pairs`: a neighbour
        list already searched over the whole model (kept to the movable atoms' contacts here),
        so that many small targets on one model need one search."""
        self.model = model
        self.full_restraints = restraints
        self.movable = None if movable is None else np.asarray(movable)
        self.restraints = restraints if movable is None else restraints.touching(movable)
        self.rama = rama
        if rama is not None and movable is not None:
            self.rama = rama.subset(_selected(len(model.atoms), movable)[rama.atoms].any(axis=1))
        self.use_nonbonded = nonbonded
        self.search_buffer = search_buffer
        self.weights = {t: 1.0 for t in TERMS} | (weights or {})
        self.pairs: NonbondedPairs | None = None
        if nonbonded:
            self.pairs = self._pairs(model.atoms.xyz) if pairs is None else self._touching_movable(pairs)

    def _pairs(self, xyz):
        return self._touching_movable(find_nonbonded_pairs(self.model, self.full_restraints, xyz,
                                                           buffer=self.search_buffer))

    def _touching_movable(self, pairs: NonbondedPairs) -> NonbondedPairs:
        if self.movable is None:
            return pairs
        return _pairs_touching(pairs, _selected(len(self.model.atoms), self.movable))

    def compacted(self, extra=()) -> tuple[GeometryTarget, np.ndarray]:
        """This target over only the atoms it involves (and `extra`), renumbered 0…n−1, with those
        atoms' indices in the model. A segment refined alone (the weight scan's trials) then
        costs arrays of its own size per evaluation, not the whole model's. The compacted target
        keeps its neighbour list as it is (`update` does nothing)."""
        r = self.restraints
        parts = [r.bond_atoms.ravel(), r.angle_atoms.ravel(), r.torsion_atoms.ravel(), r.chiral_atoms.ravel(),
                 r.plane_atoms.ravel(), np.asarray(extra).ravel()]
        if self.use_nonbonded and self.pairs is not None:
            parts += [self.pairs.i, self.pairs.j]
        if self.rama is not None:
            parts.append(self.rama.atoms.ravel())
        atoms = np.unique(np.concatenate([np.asarray(a, dtype=np.int64) for a in parts]))
        loc = np.full(r.n_atoms, -1, dtype=np.int64)
        loc[atoms] = np.arange(len(atoms))
        per_atom = {name: getattr(r, name)[atoms] for name in ("energy_type", "type_vdw_radius", "type_hb")
                    if len(getattr(r, name)) == r.n_atoms}
        inferred = r.inferred_bonds[(loc[r.inferred_bonds] >= 0).all(axis=1)] if len(r.inferred_bonds) else r.inferred_bonds
        out = copy(self)
        out.model = None
        out.movable = None
        out.restraints = out.full_restraints = replace(
            r, n_atoms=len(atoms), bond_atoms=loc[r.bond_atoms], angle_atoms=loc[r.angle_atoms],
            torsion_atoms=loc[r.torsion_atoms], chiral_atoms=loc[r.chiral_atoms], plane_atoms=loc[r.plane_atoms],
            atom_indices=_kept(loc, r.atom_indices), inferred_bonds=loc[inferred], **per_atom)
        if self.use_nonbonded and self.pairs is not None:
            p = self.pairs
            out.pairs = replace(p, i=loc[p.i], j=loc[p.j], xyz_at_search=p.xyz_at_search[atoms])
        if self.rama is not None:
            out.rama = replace(self.rama, atoms=loc[self.rama.atoms])
        return out, atoms

    def restricted_to(self, atoms: np.ndarray) -> GeometryTarget:
        """This target over only the restraints, contacts and Ramachandran rows that involve
        `atoms` (indices in this target's numbering): with the other atoms fixed, its changes are
        this target's changes (a part of a compacted target judged alone)."""
        sel = _selected(self.restraints.n_atoms, atoms)
        out = copy(self)
        out.restraints = self.restraints.touching(atoms)
        if self.use_nonbonded and self.pairs is not None:
            out.pairs = _pairs_touching(self.pairs, sel)
        if self.rama is not None:
            out.rama = self.rama.subset(sel[self.rama.atoms].any(axis=1))
        return out

    def update(self, xyz: np.ndarray) -> None:
        """Refresh the neighbour list when atoms have moved by more than half the search buffer."""
        if self.model is None:  # a compacted target: its neighbour list stays as it was made
            return
        if self.use_nonbonded and self.pairs is not None and self.pairs.needs_update(xyz, self.search_buffer):
            self.pairs = self._pairs(xyz)

    def terms(self, xyz: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Each term's value and gradient (unweighted)."""
        r = self.restraints
        xyz = np.ascontiguousarray(xyz, dtype=np.float64)
        vals, grads = {}, {}

        def run(name, fn, *args):
            g = np.zeros_like(xyz)
            vals[name] = fn(xyz, *args, g)
            grads[name] = g

        run("bonds", K.bond_term, r.bond_atoms, r.bond_ideal, r.bond_sigma)
        run("angles", K.angle_term, r.angle_atoms, r.angle_ideal, r.angle_sigma)
        run("torsions", K.torsion_term, r.torsion_atoms, r.torsion_ideal, r.torsion_sigma, r.torsion_period)
        run("chirals", K.chiral_term, r.chiral_atoms, r.chiral_ideal, r.chiral_sigma, r.chiral_both)
        run("planes", K.plane_term, r.plane_atoms, r.plane_start, r.plane_sigma)
        if self.use_nonbonded and self.pairs is not None:
            p = self.pairs
            run("nonbonded", nonbonded_term, p.i, p.j, p.op, p.d_min, p.weight, p.op_rot, p.op_trans,
                NONBONDED_SIGMA)
        if self.rama is not None and len(self.rama):
            run("ramachandran", rama_term, self.rama.atoms, self.rama.kind, self.rama.potential, 1.0)
        return vals, grads

    def value_and_gradient(self, xyz: np.ndarray) -> tuple[float, np.ndarray]:
        """Weighted total and its gradient (N×3), accumulated in one array."""
        r = self.restraints
        xyz = np.ascontiguousarray(xyz, dtype=np.float64)
        g = np.zeros_like(xyz)
        w = self.weights
        f = 0.0
        # One gradient array for all terms; per-term weights are applied by scaling afterwards
        # only when they differ from 1 (the usual case is all ones).
        if all(v == 1.0 for v in w.values()):
            f += K.bond_term(xyz, r.bond_atoms, r.bond_ideal, r.bond_sigma, g)
            f += K.angle_term(xyz, r.angle_atoms, r.angle_ideal, r.angle_sigma, g)
            f += K.torsion_term(xyz, r.torsion_atoms, r.torsion_ideal, r.torsion_sigma, r.torsion_period, g)
            f += K.chiral_term(xyz, r.chiral_atoms, r.chiral_ideal, r.chiral_sigma, r.chiral_both, g)
            f += K.plane_term(xyz, r.plane_atoms, r.plane_start, r.plane_sigma, g)
            if self.use_nonbonded and self.pairs is not None:
                p = self.pairs
                f += nonbonded_term(xyz, p.i, p.j, p.op, p.d_min, p.weight, p.op_rot, p.op_trans,
                                    NONBONDED_SIGMA, g)
            if self.rama is not None and len(self.rama):
                f += rama_term(xyz, self.rama.atoms, self.rama.kind, self.rama.potential, 1.0, g)
            return float(f), g
        vals, grads = self.terms(xyz)
        for name, v in vals.items():
            f += w[name] * v
            g += w[name] * grads[name]
        return float(f), g


def _selected(n: int, atoms) -> np.ndarray:
    sel = np.zeros(n, dtype=bool)
    sel[np.asarray(atoms)] = True
    return sel


def _pairs_touching(pairs: NonbondedPairs, sel: np.ndarray) -> NonbondedPairs:
    """A copy of the neighbour list with only the pairs that involve a selected atom."""
    keep = sel[pairs.i] | sel[pairs.j]
    return replace(pairs, **{name: getattr(pairs, name)[keep]
                             for name in ("i", "j", "op", "d_min", "weight", "is_hbond", "is_14")})


def _kept(loc: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The new numbers (`loc`, −1 for atoms left out) of those `indices` that are kept, in
    increasing order: np.intersect1d's answer without sorting the whole model's indices (each
    weight-scan segment compacts against the whole model)."""
    new = loc[indices]
    return np.unique(new[new >= 0])
