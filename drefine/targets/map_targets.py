"""Real-space data targets: the atom-centred map target and the map-model least-squares target.

Both share the interface of every drefine target: `update(xyz)` (take new model values),
`value_and_gradient(xyz)` (for the minimiser; gradient N×3 over all atoms of the model) and
`statistics(xyz)` (for reports).

Atom-centred (routine cycles): T = −Σ_i w_i ρ̃(x_i), ρ̃ the map scaled to zero mean and unit σ over
the box, w_i = Z_i/6 (carbon 1: heavier atoms carry more density; hydrogens get 0 and ride on
their parents through the restraints). A sum over atoms like the restraint target is a sum over
restraints, so one data/restraint weight suits models of any size. Cheap (interpolation only) with a wide
convergence radius; biased where neighbouring atoms' densities merge at low resolution.

Map-model least squares (final cycles): T = Σ_mask (k ρ_calc − ρ_obs)² / Σ_mask ρ_obs², ρ_calc the
model map at the map's resolution, k the best scale, over grid points within a mask around the
start model. Its optimum is where the model explains the map (for a map made from a model,
exactly that model), at the cost of a model map and its gradient per evaluation.
"""
from __future__ import annotations

import gemmi
import numpy as np
import scipy.fft

from ..density.interpolate import TricubicInterpolator, interpolate
from ..density.map_fit import _pearson
from ..density.model_map import REFINEMENT_ACCURACY, ModelMapCalculator
from ..errors import DrefineError
from ..io.maps import DensityMap, mask_around_atoms
from ..model.arrays import Model

PARALLEL_MIN_ATOMS = 20000


def normalised_map(dmap: DensityMap) -> DensityMap:
    """The map scaled to zero mean and unit standard deviation over its box."""
    data = np.asarray(dmap.load().data, dtype=np.float64)
    sd = data.std()
    if not np.isfinite(sd) or sd == 0:
        raise DrefineError("the map is flat (zero standard deviation): nothing to refine against")
    return dmap.with_data((data - data.mean()) / sd)


class AtomCentredMapTarget:
    """−Σ w ρ̃(x) over the refined atoms (dimensionless; per carbon about −1 to −4 for a good fit)."""

    def __init__(self, model: Model, dmap: DensityMap, atoms: np.ndarray, periodic: bool = False,
                 weights: np.ndarray | None = None):
        self.model = model
        self.map = dmap
        self.periodic = periodic
        self.atoms = np.asarray(atoms)
        if weights is None:
            z = model.atoms.atomic_number[self.atoms].astype(np.float64)
            weights = np.where(model.atoms.is_hydrogen[self.atoms], 0.0, z / 6.0)
        self.weights = np.asarray(weights, dtype=np.float64)
        self._interpolator = None  # made at the first evaluation

    def update(self, xyz: np.ndarray) -> None:
        pass

    def value_and_gradient(self, xyz: np.ndarray) -> tuple[float, np.ndarray]:
        if self._interpolator is None:
            # numba's thread pool costs milliseconds per call: worth it only for many atoms
            parallel = len(self.atoms) > PARALLEL_MIN_ATOMS
            self._interpolator = (TricubicInterpolator(self.map, self.periodic, parallel) if
                                  not getattr(self.map, "is_chunked", False) else
                                  lambda p: interpolate(self.map, p, periodic=self.periodic, on_outside="nan",
                                                        parallel=parallel))
        vals, grad = self._interpolator(xyz[self.atoms])
        out = ~np.isfinite(vals)
        if out.any():
            # an atom that wandered off the box: no density pull (restraints hold it)
            vals = np.where(out, 0.0, vals)
            grad = np.where(out[:, None], 0.0, grad)
        g = np.zeros_like(xyz)
        g[self.atoms] = -self.weights[:, None] * grad
        return float(-(self.weights * vals).sum()), g

    def statistics(self, xyz: np.ndarray) -> dict:
        res = interpolate(self.map, xyz[self.atoms], periodic=self.periodic, gradient=False)
        v = res.values[self.weights > 0]
        return {"mean_density_at_atoms": float(np.nanmean(v)), "atoms_outside_map": int(res.n_outside)}


class MapModelLSTarget:
    """Σ_mask (k ρ_calc − ρ_obs)² / Σ_mask ρ_obs², with k the least-squares scale (k held fixed
    in the gradient: it is optimal, so its own derivative term vanishes).

    For a box cut from a larger map (`periodic=False`) the model map is made on a grid grown to
    sizes the FFT handles fast (2·3·5-smooth), the box its corner: a box of 144×160×143 points
    has a prime-ish axis that made every transform 3× slower, and the margin around the model
    keeps the extra periodic images far from it. Values live on the masked points only (float32,
    as the model map), so an evaluation touches the box's full grid only in the transforms.
    """

    def __init__(self, model: Model, dmap: DensityMap, d_min: float, atoms: np.ndarray, source: str = "electron",
                 mask_radius: float = 3.0, periodic: bool = True):
        self.model = model
        self.map = dmap.load()
        self.d_min = d_min
        self.atoms = np.asarray(atoms)
        self.source = source
        mask = mask_around_atoms(self.map, model.atoms.xyz[self.atoms], mask_radius)
        self.obs = np.asarray(self.map.data, dtype=np.float64)[mask]
        self.norm = float((self.obs ** 2).sum())
        if periodic:
            grid = tuple(int(n) for n in self.map.sampling)
            cell = self.map.cell
            # the map's points within the full sampling grid the model map is made on
            index = [(self.map.start[a] + np.arange(self.map.shape[a])) % grid[a] for a in range(3)]
            points = np.nonzero(mask)
            points = tuple(index[a][points[a]] for a in range(3))
        else:
            grid = tuple(scipy.fft.next_fast_len(int(n), real=True) for n in self.map.shape)
            c = self.map.cell
            stretch = np.array(grid) / np.array(self.map.shape)
            cell = gemmi.UnitCell(c.a * stretch[0], c.b * stretch[1], c.c * stretch[2], c.alpha, c.beta, c.gamma)
            points = np.nonzero(mask)
        self.grid = grid
        self.cell = cell
        self.points = np.ravel_multi_index(points, grid)  # masked map points, flat in the model-map grid
        sg = self.map.spacegroup if (periodic and self.map.is_full_cell) else None
        self.calculator = ModelMapCalculator(model, cell, grid, d_min, source, sg, self.map.origin, self.atoms,
                                             accuracy=REFINEMENT_ACCURACY)
        self.k: float | None = None  # the LS scale of the last evaluation
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # (positions, model map on the mask)
        self._unit_curvature: np.ndarray | None = None  # `curvature` at k = 1, made on first use
        self._last_gradient: tuple | None = None  # (positions, T, gradient, k) of the last gradient

    def update(self, xyz: np.ndarray) -> None:
        pass

    def _calc(self, xyz) -> np.ndarray:
        """The model map on the masked points (the last one is kept: a scoring step asks for the
        value at a point and then for the gradient there)."""
        if self._last is not None and np.array_equal(self._last[0], xyz[self.atoms]):
            return self._last[1]
        self.calculator.set_positions(xyz)
        c = self.calculator.map().reshape(-1)[self.points].astype(np.float64)
        self._last = (xyz[self.atoms].copy(), c)
        return c

    def _scale_and_value(self, c: np.ndarray) -> tuple[float, np.ndarray, float]:
        # numpy sums, not BLAS dot products: those depend on BLAS's thread count, and a member
        # must give the same numbers on a dask worker and in-process
        k = float((c * self.obs).sum() / (c * c).sum())
        diff = k * c - self.obs
        self.k = k
        return k, diff, float((diff * diff).sum()) / self.norm

    def value(self, xyz: np.ndarray) -> float:
        """T alone (one model map, no gradient)."""
        return self._scale_and_value(self._calc(xyz))[2]

    def curvature(self, xyz: np.ndarray, n_bins: int = 100) -> np.ndarray:
        """Gauss-Newton curvature of T for one coordinate of each atom (Å⁻², over Model.atoms;
        zero for atoms not in the target), at the scale k of the last evaluation:
            H_i = (2k²/Σρ_obs²) Σ_points (∂ρ_i/∂x)² = (2k²/Σρ_obs²) (N/V²) Σ_h |F_i(h)|² 4π²s²/3
        by Parseval over the model map's grid (N points, cell volume V; h within 1/d_min, where
        the map is cut), with the random-phase average of `targets.curvature`."""
        from ..density.model_map import reciprocal_s2
        from .curvature import diagonal_curvature

        if self._unit_curvature is None:
            s2 = reciprocal_s2(self.cell, self.grid)
            # an rfft entry with 0 < l < N/2 stands for h and −h
            mult = np.full(s2.shape[2], 2.0)
            mult[0] = 1.0
            if self.grid[2] % 2 == 0:
                mult[-1] = 1.0
            inside = s2 <= 1.0 / self.d_min ** 2
            edges = np.linspace(0.0, 1.0 / self.d_min ** 2 * (1 + 1e-9), n_bins + 1)
            which = np.digitize(s2[inside], edges) - 1
            weight = np.broadcast_to(mult, s2.shape)[inside]
            count = np.bincount(which, weights=weight, minlength=n_bins)
            centre = np.bincount(which, weights=weight * s2[inside], minlength=n_bins) / np.maximum(count, 1e-300)
            centre, count = centre[count > 0], count[count > 0]
            # per atom at k = 1: positions do not enter (random phases), and B, U and occupancies
            # are fixed for the calculator's life, so only k² changes between calls
            n = float(np.prod(self.grid))
            # diagonal_curvature sums c ½ n_ops a² 4π²s²/3: c carries the factor 2 back, and 1/n_ops
            # since the mask around the model holds one image of each atom (a crystal map's other
            # images lie outside it, but for atoms at contacts; measured: second differences
            # 0.27–0.53 of the all-images value in P2₁2₁2₁)
            c = 2.0 * (2.0 / self.norm) * (n / self.cell.volume ** 2) * count / len(self.calculator.sc.rot)
            self._unit_curvature = np.zeros(len(self.model.atoms))
            self._unit_curvature[self.calculator.sc.atom_index] = diagonal_curvature(
                self.calculator.sc, centre, c, n_bins=len(centre))[0]
        if self.k is None:
            self.value(xyz)
        return self.k ** 2 * self._unit_curvature

    def value_and_gradient(self, xyz: np.ndarray) -> tuple[float, np.ndarray]:
        # the last gradient is kept too: the final cycle asks for it at its start twice (the
        # weight's gradient-matching scale, then the minimiser)
        if self._last_gradient is not None and np.array_equal(self._last_gradient[0], xyz[self.atoms]) \
                and self._last_gradient[2].shape == xyz.shape:
            self.k = self._last_gradient[3]  # (the scale `curvature` uses is that of this point)
            return self._last_gradient[1], self._last_gradient[2].copy()
        c = self._calc(xyz)
        k, diff, f = self._scale_and_value(c)
        # ∂T/∂ρ_calc, placed on the grid the model map is made on
        g_grid = np.zeros(self.grid, dtype=self.calculator.dtype)
        g_grid.reshape(-1)[self.points] = (2.0 * k / self.norm) * diff
        gr = self.calculator.gradient(g_grid, positions_only=True)
        g = np.zeros_like(xyz)
        g[self.atoms] = gr.xyz
        self._last_gradient = (xyz[self.atoms].copy(), f, g.copy(), k)
        return f, g

    def statistics(self, xyz: np.ndarray) -> dict:
        return {"cc_mask": _pearson(self._calc(xyz), self.obs)}
