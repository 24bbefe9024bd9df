"""F_model for observed data: Fcalc (one P 1 FFT, symmetry in reciprocal space), bulk-solvent mask,
fitted scale, R-work and R-free."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..io.reflections import ReflectionTable, check_cell_compatible
from ..model.arrays import Model
from .bulk_solvent import (
    BulkSolventScale,
    fit_bulk_solvent,
    mask_grid_shape,
    mask_structure_factors,
    solvent_mask,
)
from .crystal_fft import CrystalStructureFactors
from .direct import scatterers_of_model


@dataclass
class FModel:
    """Model structure factors at the table's reflections and the fit that scales them to F_obs."""

    f_calc: np.ndarray  # complex, atoms only
    f_mask: np.ndarray  # complex, bulk-solvent mask
    scale: BulkSolventScale
    f_model: np.ndarray  # complex, k_total (F_calc + k_sol e^{−B_sol s²/4} F_mask)

    @property
    def r_work(self) -> float:
        return self.scale.r_work

    @property
    def r_free(self) -> float:
        return self.scale.r_free


def compute_fmodel(model: Model, table: ReflectionTable, source: str = "xray", bulk_solvent: bool = True,
                   threads: int | None = None) -> FModel:
    """Fcalc, mask and fitted scale/solvent of model 0 against `table` (cells must agree)."""
    check_cell_compatible(table, model.cell)
    sc = scatterers_of_model(model, source=source, cell=table.cell, spacegroup=table.spacegroup)
    f_calc = CrystalStructureFactors(sc, table.hkl, table.d_min, threads=threads).structure_factors(sc)
    if bulk_solvent:
        mask = solvent_mask(model, mask_grid_shape(model, table.d_min))
        f_mask = mask_structure_factors(mask, table.cell, table.hkl, threads=threads)
    else:
        f_mask = np.zeros_like(f_calc)
    scale = fit_bulk_solvent(table.hkl, table.f_obs, f_calc, f_mask, table.cell, table.spacegroup, table.work,
                             table.test, table.bin, with_solvent=bulk_solvent)
    s_vec = np.asarray(table.hkl, dtype=np.float64) @ np.array(table.cell.frac.mat.tolist())
    return FModel(f_calc=f_calc, f_mask=f_mask, scale=scale, f_model=scale.f_model(f_calc, f_mask, s_vec))
