"""A small region of a model refined alone against the real-space objective: the judge of the
discrete moves (peptide flips, mirror flips) that gradient refinement cannot make.

The region's atoms move; the atoms its restraints and contacts reach are kept fixed; the map
term is the atom-centred target over the region. A move is judged by refining the region from
the model as it is and from the moved model alike, and comparing w · T_map + T_geometry.
"""
from __future__ import annotations

import numpy as np

from ..io.maps import DensityMap
from ..model.arrays import Model
from ..restraints.nonbonded import find_nonbonded_pairs
from ..restraints.target import GeometryTarget
from ..restraints.topology import Restraints
from ..targets.map_targets import AtomCentredMapTarget
from .realspace import minimise


class LocalJudge:
    """The objective of one region refined alone. `work` holds the current coordinates (Å);
    contacts are searched `search_buffer` Å beyond the repulsion cutoff, wide enough for the
    moved states the caller will try."""

    def __init__(self, work: Model, dmap: DensityMap, restraints: Restraints, rama, weight: float,
                 periodic: bool, region: np.ndarray, search_buffer: float, iterations: int, pairs=None):
        """`pairs`: contacts already searched (`search_buffer` Å beyond the cutoff) near this
        region and others, so that many judges on one model need one search."""
        if pairs is None:
            pairs = find_nonbonded_pairs(work, restraints, work.atoms.xyz, buffer=search_buffer, near=region)
        self.geom, self.atoms = GeometryTarget(work, restraints, movable=region, rama=rama,
                                               pairs=pairs).compacted(region)
        self.region = np.searchsorted(self.atoms, region)
        self.data = AtomCentredMapTarget(None, dmap, self.region, periodic=periodic,
                                         weights=AtomCentredMapTarget(work, dmap, region).weights)
        self.weight = weight
        self.iterations = iterations

    def objective(self, xyz: np.ndarray) -> float:
        """The local objective at `xyz` (all atoms), unrefined."""
        local = xyz[self.atoms]
        return float(self.weight * self.data.value_and_gradient(local)[0] + self.geom.value_and_gradient(local)[0])

    def change_of_part(self, before: np.ndarray, after: np.ndarray, part: np.ndarray) -> float:
        """The objective's change from `before` to `after` (all-atom arrays, Å) due to the atoms
        `part` (model indices, within the region): the map values of `part` and the terms that
        involve it, evaluated at both. It is the whole change of swapping in `part` alone when no
        term joins `part` to other atoms that differ (the regions of one colour of mirror flips)."""
        local = np.searchsorted(self.atoms, part)
        geom = self.geom.restricted_to(local)
        data = AtomCentredMapTarget(None, self.data.map, local, periodic=self.data.periodic,
                                    weights=self.data.weights[np.searchsorted(self.region, local)])

        def value(xyz):
            x = xyz[self.atoms]
            return self.weight * data.value_and_gradient(x)[0] + geom.value_and_gradient(x)[0]

        return float(value(after) - value(before))

    def refined(self, xyz: np.ndarray) -> tuple[np.ndarray, float]:
        """The region refined from `xyz` (all atoms): the whole coordinate array with the region
        replaced, and the local objective there."""
        local, _ = minimise(self.data, self.geom, self.weight, xyz[self.atoms], self.region, self.iterations)
        out = xyz.copy()
        out[self.atoms] = local
        return out, self.objective(out)
