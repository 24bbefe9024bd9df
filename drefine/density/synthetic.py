"""Synthetic data from a model: structure factors with flat bulk solvent, noise and a free set.

Used by `drefine fmodel` for examples and benchmarks. F = |F_calc + k_sol e^{−B_sol s²/4} F_mask|
over the unique reflections to d_min; with `noise` > 0, F_obs = F + σ·N(0,1) where σ = noise·F
(relative noise per reflection, floored at `noise`·mean F/10 so that weak reflections keep a
sensible σ); without noise, σ = 1 % of the mean F.
"""
from __future__ import annotations

import gemmi
import numpy as np

from ..errors import DrefineError
from ..io.reflections import ReflectionTable, default_n_bins, make_free_set, resolution_bins
from ..model.arrays import Model
from .bulk_solvent import mask_grid_shape, mask_structure_factors, solvent_mask
from .crystal_fft import CrystalStructureFactors
from .direct import scatterers_of_model


def synthetic_reflections(model: Model, d_min: float, source: str = "xray", k_sol: float = 0.35,
                          b_sol: float = 46.0, noise: float = 0.0, free_fraction: float = 0.05,
                          seed: int = 0) -> ReflectionTable:
    """A ReflectionTable of model structure factors (phases kept in `phases_deg`)."""
    if not model.has_crystal_cell:
        raise DrefineError("the model has no crystal cell: reflections need one (write a map with --map instead)")
    cell, sg = model.cell, model.spacegroup or gemmi.SpaceGroup("P 1")
    hkl = np.array(gemmi.make_miller_array(cell, sg, d_min, 0, True), dtype=np.int32)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    sc = scatterers_of_model(model, source=source)
    f = CrystalStructureFactors(sc, hkl, d_min).structure_factors(sc)
    s2 = ((hkl @ sc.frac_matrix) ** 2).sum(1)
    if k_sol > 0:
        f_mask = mask_structure_factors(solvent_mask(model, mask_grid_shape(model, d_min)), cell, hkl)
        f = f + k_sol * np.exp(-b_sol * s2 / 4.0) * f_mask
    amp = np.abs(f)
    rng = np.random.default_rng(seed)
    if noise > 0:
        sigma = np.maximum(noise * amp, noise * amp.mean() / 10.0)
        f_obs = np.abs(amp + sigma * rng.standard_normal(len(amp)))
    else:
        sigma = np.full(len(amp), 0.01 * amp.mean())
        f_obs = amp
    d = 1.0 / np.sqrt(s2)
    free = make_free_set(hkl, d, free_fraction, seed)
    ops = sg.operations()
    centric = np.array([ops.is_reflection_centric([int(x) for x in h]) for h in hkl], dtype=bool)
    epsilon = np.array([ops.epsilon_factor([int(x) for x in h]) for h in hkl], dtype=np.int32)
    notes = [(f"synthetic: {source} form factors, d_min {d_min} Å, k_sol {k_sol}, B_sol {b_sol} Å², "
              f"noise {noise}, free fraction {free_fraction}, seed {seed}")]
    return ReflectionTable(cell=cell, spacegroup=sg, hkl=hkl, d=d, centric=centric, epsilon=epsilon, free=free,
                           f_obs=f_obs, sigma_f=sigma, bin=resolution_bins(d, default_n_bins(int((~free).sum()))),
                           phases_deg=np.degrees(np.angle(f)), source=model.source, notes=notes)
