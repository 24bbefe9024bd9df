"""Model maps at a given resolution: the density a model would give in a map of resolution d_min.

The atoms are spread with a blur (as for structure factors), transformed, the blur removed and
every coefficient beyond 1/d_min set to zero (a sharp resolution cut, as gemmi and servalcat
do for their model maps), and transformed back. Electron form factors for cryo-EM maps,
X-ray ones for crystallographic maps. Works on a unit cell with its space group, or on a
cryo-EM box treated as a P 1 cell whose corner is at `origin` (Å).
"""
from __future__ import annotations

import gemmi
import numpy as np
import scipy.fft

from ..model.arrays import Model
from ..threads import kernel_threads
from .direct import scatterers_of_model
from .fft import atom_density_grid, choose_blur

#: Accuracy of model maps used as refinement targets: aliasing of the sharpest atom ~1e-3 and a
#: density cutoff of 1e-4 (vs 1e-5 and 1e-6 for reported numbers). Target and gradient share the
#: approximation, so the minimiser sees a consistent function; it is ~3× cheaper.
REFINEMENT_ACCURACY = {"alias": 1e-3, "cutoff": 1e-4}
REPORT_ACCURACY = {"alias": None, "cutoff": 1e-6}


def model_map(model: Model, cell: gemmi.UnitCell, shape, d_min: float, source: str = "electron",
              spacegroup: gemmi.SpaceGroup | None = None, origin=(0.0, 0.0, 0.0), atoms: np.ndarray | None = None,
              hydrogens: bool = True, threads: int | None = None, accuracy: dict | None = None) -> np.ndarray:
    """Model density on the full grid `shape` of `cell` (e/Å³ for X-ray; potential units for electrons)."""
    threads = kernel_threads(threads)
    sg = spacegroup if spacegroup is not None else gemmi.SpaceGroup("P 1")
    sc = scatterers_of_model(model, atoms, source=source, hydrogens=hydrogens, cell=cell, spacegroup=sg)
    if np.any(np.asarray(origin) != 0):
        xyz = model.atoms.xyz[sc.atom_index] - np.asarray(origin, dtype=np.float64)
        sc.frac = xyz @ sc.frac_matrix.T
    shape = tuple(int(n) for n in shape)
    acc = accuracy or REPORT_ACCURACY
    b_add = choose_blur(sc, shape, d_min, acc["alias"])
    rho = atom_density_grid(sc, shape, b_add, cutoff=acc["cutoff"], threads=threads)
    spec = scipy.fft.rfftn(rho, workers=threads)
    s2 = reciprocal_s2(cell, shape)
    keep = s2 <= 1.0 / d_min ** 2
    spec *= np.where(keep, np.exp(b_add * s2 / 4.0), 0.0)
    return scipy.fft.irfftn(spec, s=shape, workers=threads)


def reciprocal_s2(cell: gemmi.UnitCell, shape) -> np.ndarray:
    """|s|² (Å⁻²) of every coefficient of an rfftn array over the grid `shape` of `cell` (read-only:
    the last few are kept, since a real-space refinement asks for the same grid several times and
    a 150³ grid takes ~0.1 s)."""
    key = (tuple(round(x, 9) for x in cell.parameters), tuple(int(n) for n in shape))
    hit = _S2_CACHE.get(key)
    if hit is None:
        hit = _reciprocal_s2(cell, shape)
        hit.flags.writeable = False
        if hit.nbytes <= S2_CACHE_MAX_BYTES:  # a large map's grid is not worth holding on to
            if len(_S2_CACHE) >= 4:
                _S2_CACHE.pop(next(iter(_S2_CACHE)))
            _S2_CACHE[key] = hit
    return hit


_S2_CACHE: dict[tuple, np.ndarray] = {}
S2_CACHE_MAX_BYTES = 64 * 2 ** 20


def _reciprocal_s2(cell: gemmi.UnitCell, shape) -> np.ndarray:
    F = np.array(cell.frac.mat.tolist())
    h = np.fft.fftfreq(shape[0], 1.0 / shape[0])
    k = np.fft.fftfreq(shape[1], 1.0 / shape[1])
    l_ = np.arange(shape[2] // 2 + 1, dtype=np.float64)
    s2 = np.zeros((len(h), len(k), len(l_)))
    for i in range(3):
        comp = (h[:, None, None] * F[0, i] + k[None, :, None] * F[1, i] + l_[None, None, :] * F[2, i])
        s2 += comp ** 2
    return s2


def model_map_gradient(model: Model, cell: gemmi.UnitCell, shape, d_min: float, grad_map: np.ndarray,
                       source: str = "electron", spacegroup: gemmi.SpaceGroup | None = None,
                       origin=(0.0, 0.0, 0.0), atoms: np.ndarray | None = None, hydrogens: bool = True,
                       threads: int | None = None, accuracy: dict | None = None):
    """Gradient of a target T of the model map, given ∂T/∂ρ_calc on the same grid (`grad_map`).

    ρ_calc = IFFT(W · FFT(ρ_blur)) with W = cut · exp(B_add s²/4) real and symmetric, so
    ∂T/∂ρ_blur = IFFT(W · FFT(∂T/∂ρ_calc)); that map is then gathered against the derivative
    of every atom's blurred shape. Returns a StructureFactorGradient (xyz, b_iso, occ, u).
    """
    threads = kernel_threads(threads)
    from .fft import gather_gradient

    sg = spacegroup if spacegroup is not None else gemmi.SpaceGroup("P 1")
    sc = scatterers_of_model(model, atoms, source=source, hydrogens=hydrogens, cell=cell, spacegroup=sg)
    if np.any(np.asarray(origin) != 0):
        sc.frac = (model.atoms.xyz[sc.atom_index] - np.asarray(origin, dtype=np.float64)) @ sc.frac_matrix.T
    shape = tuple(int(n) for n in shape)
    acc = accuracy or REPORT_ACCURACY
    b_add = choose_blur(sc, shape, d_min, acc["alias"])
    s2 = reciprocal_s2(cell, shape)
    w = np.where(s2 <= 1.0 / d_min ** 2, np.exp(b_add * s2 / 4.0), 0.0)
    g_blur = scipy.fft.irfftn(w * scipy.fft.rfftn(grad_map, workers=threads), s=shape, workers=threads)
    return gather_gradient(sc, g_blur, b_add, 1.0, cutoff=acc["cutoff"], threads=threads)


class ModelMapCalculator:
    """Model maps and their gradients on one grid for fixed B, U and occupancies, positions varying.

    Everything that depends only on the atoms' shapes (the per-image Gaussian parameters, the
    blur, the resolution filter) is prepared once; each evaluation only moves the images, spreads,
    transforms and (for gradients) gathers. Used by refinement targets, which call it ~100 times.
    """

    def __init__(self, model: Model, cell: gemmi.UnitCell, shape, d_min: float, source: str = "electron",
                 spacegroup: gemmi.SpaceGroup | None = None, origin=(0.0, 0.0, 0.0),
                 atoms: np.ndarray | None = None, hydrogens: bool = True, threads: int | None = None,
                 accuracy: dict | None = None):
        threads = kernel_threads(threads)
        from .fft import _prepare

        acc = accuracy or REPORT_ACCURACY
        self.sg = spacegroup if spacegroup is not None else gemmi.SpaceGroup("P 1")
        self.sc = scatterers_of_model(model, atoms, source=source, hydrogens=hydrogens, cell=cell, spacegroup=self.sg)
        self.origin = np.asarray(origin, dtype=np.float64)
        self.shape = tuple(int(n) for n in shape)
        self.threads = threads
        self.cutoff = acc["cutoff"]
        self.b_add = choose_blur(self.sc, self.shape, d_min, acc["alias"])
        self.prepared = _prepare(self.sc, self.shape, self.b_add, self.cutoff)
        s2 = reciprocal_s2(cell, self.shape)
        # refinement targets need ~1e-3 relative accuracy: single precision grids and FFTs suffice
        self.dtype = np.float32 if accuracy is REFINEMENT_ACCURACY else np.float64
        self.filter = np.where(s2 <= 1.0 / d_min ** 2, np.exp(self.b_add * s2 / 4.0), 0.0).astype(self.dtype)

    def set_positions(self, xyz_all: np.ndarray) -> None:
        """Take the positions (Å) of the scatterers from the model-wide coordinate array."""
        sc = self.sc
        sc.frac = (xyz_all[sc.atom_index] - self.origin) @ sc.frac_matrix.T
        self.prepared.frac = np.ascontiguousarray(np.concatenate([sc.frac @ R.T + t for R, t in zip(sc.rot, sc.trans)]))

    def map(self) -> np.ndarray:
        from .fft import atom_density_grid

        rho = atom_density_grid(self.sc, self.shape, self.b_add, self.cutoff, self.threads, prepared=self.prepared,
                                dtype=self.dtype)
        spec = scipy.fft.rfftn(rho, workers=self.threads)
        spec *= self.filter
        return scipy.fft.irfftn(spec, s=self.shape, workers=self.threads)

    def gradient(self, grad_map: np.ndarray, positions_only: bool = False):
        """StructureFactorGradient of a target given ∂T/∂ρ_calc on the grid (see model_map_gradient);
        `positions_only` skips the B/U/occupancy parts."""
        from .fft import gather_gradient

        g = np.asarray(grad_map, dtype=self.dtype)
        g_blur = scipy.fft.irfftn(self.filter * scipy.fft.rfftn(g, workers=self.threads), s=self.shape,
                                  workers=self.threads)
        return gather_gradient(self.sc, g_blur, self.b_add, 1.0, cutoff=self.cutoff, threads=self.threads,
                               prepared=self.prepared, positions_only=positions_only)
