"""A model's map as a DensityMap: on its crystal cell, or on a padded P 1 box around it.

For a model without a crystal cell (cryo-EM, NMR) the box's corner is written as the map's
ORIGIN, so the map lies where the model's coordinates are and no atom needs moving.
"""
from __future__ import annotations

import gemmi
import numpy as np

from ..io.maps import DensityMap, write_map
from ..model.arrays import Model
from .fft import grid_shape
from .model_map import model_map


def model_density_map(model: Model, d_min: float, source: str = "electron", padding: float = 10.0,
                      rate: float = 1.5) -> DensityMap:
    """The model map at d_min on a grid of spacing d_min/(2·rate)."""
    if model.has_crystal_cell:
        cell, sg, origin = model.cell, model.spacegroup or gemmi.SpaceGroup("P 1"), np.zeros(3)
    else:
        xyz = model.atoms.xyz[model.model_atoms(0)]
        lo = xyz.min(0) - padding
        size = xyz.max(0) + padding - lo
        cell, sg, origin = gemmi.UnitCell(*size, 90, 90, 90), gemmi.SpaceGroup("P 1"), lo
    shape = grid_shape(cell, sg, d_min, rate)
    data = model_map(model, cell, shape, d_min, source=source, spacegroup=sg, origin=origin)
    return DensityMap(data=data.astype(np.float32), cell=cell, sampling=np.array(shape), start=np.zeros(3, dtype=int),
                      origin=np.asarray(origin, dtype=np.float64), spacegroup=sg)


def write_model_map(model: Model, path, d_min: float, source: str = "electron", padding: float = 10.0) -> dict:
    """Write the model map; returns grid, voxel size and a description of the box."""
    dmap = model_density_map(model, d_min, source, padding)
    write_map(dmap, path)
    cell = dmap.cell
    box = ("unit cell " if model.has_crystal_cell else "P 1 box ") + f"{cell.a:.1f} × {cell.b:.1f} × {cell.c:.1f} Å"
    return {"grid": [int(n) for n in dmap.data.shape], "voxel": [float(v) for v in dmap.voxel_size], "box": box}
