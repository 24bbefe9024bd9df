"""Map values and gradients at atom positions: tricubic Catmull–Rom (Keys, a = −½) interpolation.

Along each axis the value at grid coordinate x = i + t (i = ⌊x⌋, 0 ≤ t < 1) is
Σ_{k=−1..2} w_k(t) f[i+k] with the Keys cubic-convolution weights for a = −½:

    w₋₁ = (−t³ + 2t² − t)/2,  w₀ = (3t³ − 5t² + 2)/2,  w₁ = (−3t³ + 4t² + t)/2,  w₂ = (t³ − t²)/2

and in 3-D the tensor product over a 4×4×4 neighbourhood. The derivative of the weights gives
the gradient in grid units exactly; the chain rule through index = M·(xyz − origin) − start,
M = diag(sampling)·F (F the fractionalisation matrix), gives ∂ρ/∂xyz = Mᵀ ∂ρ/∂index, in map
units per Å (Cartesian).

Why Keys rather than a cubic B-spline: the B-spline interpolates only after a global prefilter
(a recursive filter along every line of the whole map), so a value depends, weakly, on every
grid point, and chunked evaluation would need the prefilter over the whole map first. Keys
interpolates the samples directly with local 4×4×4 support, so a chunk plus a 2-voxel halo
holds everything its atoms need and chunked evaluation is exact (bitwise, here); it
reproduces the samples at grid points, is third-order accurate for smooth maps, and is C¹, so
the gradient a minimiser sees is continuous across voxel faces. It is the same interpolant as
gemmi's Grid.tricubic_interpolation.

Positions: a map that is a full cell (``DensityMap.is_full_cell``) is periodic and every
position is wrapped into the cell. Otherwise positions must lie within the grid points' hull
([0, n−1] in every index, give or take EDGE_TOL = 1e-6 grid units of round-off); the stencil
is clamped to the edge there (edge values repeated), and positions outside get value and
gradient NaN. `Interpolation.n_outside` counts them; callers report "n atoms outside the map"
(or pass ``on_outside="error"``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ..errors import InputError

#: Stencil modes of the kernels: a block that holds the whole stencil (chunk + halo), periodic
#: wrap of indices, or clamping to the edge with NaN outside [0, n−1].
MODE_BLOCK, MODE_PERIODIC, MODE_CLAMP = 0, 1, 2
#: Round-off allowance (grid units) at the faces of a box: a point computed to lie on a face
#: (index 0 or n−1) may come out as −1e-15; it is inside.
EDGE_TOL = 1e-6


class Interpolation(NamedTuple):
    """Values (N,) and Cartesian gradients (N, 3; map units per Å, None when not asked for)."""

    values: np.ndarray
    gradient: np.ndarray | None

    @property
    def outside(self) -> np.ndarray:
        """(N,) bool: positions outside a non-periodic map (value NaN)."""
        return np.isnan(self.values)

    @property
    def n_outside(self) -> int:
        return int(np.count_nonzero(np.isnan(self.values)))


# ============================================================================================
# numba kernels
# ============================================================================================
@njit(cache=True, nogil=True)
def _keys(t):
    """Keys (a = −½) weights and their derivatives for offsets −1, 0, 1, 2 at fraction t."""
    t2 = t * t
    t3 = t2 * t
    w = (0.5 * (-t3 + 2.0 * t2 - t), 0.5 * (3.0 * t3 - 5.0 * t2 + 2.0),
         0.5 * (-3.0 * t3 + 4.0 * t2 + t), 0.5 * (t3 - t2))
    d = (0.5 * (-3.0 * t2 + 4.0 * t - 1.0), 0.5 * (9.0 * t2 - 10.0 * t),
         0.5 * (-9.0 * t2 + 8.0 * t + 1.0), 0.5 * (3.0 * t2 - 2.0 * t))
    return w, d


@njit(cache=True, nogil=True)
def _wrap(i, n, mode):
    if mode == MODE_PERIODIC:
        return i % n
    if mode == MODE_CLAMP:
        return min(max(i, 0), n - 1)
    return i


@njit(cache=True, nogil=True)
def _outside(arr, x, y, z, mode):
    if not (np.isfinite(x) and np.isfinite(y) and np.isfinite(z)):
        return True
    if mode == MODE_CLAMP:
        nu, nv, nw = arr.shape
        lo = -EDGE_TOL
        return (x < lo or y < lo or z < lo or x > nu - 1 + EDGE_TOL or y > nv - 1 + EDGE_TOL
                or z > nw - 1 + EDGE_TOL)
    return False


@njit(cache=True, nogil=True)
def _tricubic_point(arr, x, y, z, su, sv, sw, mode):
    """Value and ∂/∂(grid index) at global grid coordinate (x, y, z); arr[0,0,0] is index (su, sv, sw)."""
    nu, nv, nw = arr.shape
    fx, fy, fz = math.floor(x), math.floor(y), math.floor(z)
    wu, du = _keys(x - fx)
    wv, dv = _keys(y - fy)
    ww, dw = _keys(z - fz)
    iu, iv, iw = int(fx) - 1 - su, int(fy) - 1 - sv, int(fz) - 1 - sw
    # the four wrapped indices along the rows once, not once per stencil point (an integer
    # modulo per point was a third of the kernel's time)
    k0, k1, k2, k3 = _wrap(iw, nw, mode), _wrap(iw + 1, nw, mode), _wrap(iw + 2, nw, mode), _wrap(iw + 3, nw, mode)
    val = 0.0
    gu = 0.0
    gv = 0.0
    gw = 0.0
    for a in range(4):
        ia = _wrap(iu + a, nu, mode)
        t00 = 0.0
        t10 = 0.0
        t01 = 0.0
        for b in range(4):
            row = arr[ia, _wrap(iv + b, nv, mode)]
            f0, f1, f2, f3 = row[k0], row[k1], row[k2], row[k3]
            s0 = ww[0] * f0 + ww[1] * f1 + ww[2] * f2 + ww[3] * f3
            s1 = dw[0] * f0 + dw[1] * f1 + dw[2] * f2 + dw[3] * f3
            t00 += wv[b] * s0
            t10 += dv[b] * s0
            t01 += wv[b] * s1
        val += wu[a] * t00
        gu += du[a] * t00
        gv += wu[a] * t10
        gw += wu[a] * t01
    return val, gu, gv, gw


@njit(cache=True, nogil=True, inline="always")
def _store_point(arr, g, shift, mode, val, grad, p):
    """Value and gradient at position p (NaN outside the map), written into val/grad."""
    x, y, z = g[p, 0], g[p, 1], g[p, 2]
    if _outside(arr, x, y, z, mode):
        val[p] = np.nan
        grad[p, 0] = np.nan
        grad[p, 1] = np.nan
        grad[p, 2] = np.nan
        return
    v, a, b, c = _tricubic_point(arr, x, y, z, shift[0], shift[1], shift[2], mode)
    val[p] = v
    grad[p, 0] = a
    grad[p, 1] = b
    grad[p, 2] = c


@njit(cache=True, nogil=True, parallel=True)
def _tricubic_parallel(arr, g, shift, mode, val, grad):
    for p in prange(g.shape[0]):
        _store_point(arr, g, shift, mode, val, grad, p)


@njit(cache=True, nogil=True)
def _tricubic_serial(arr, g, shift, mode, val, grad):
    """Same arithmetic as _tricubic_parallel, one thread (for tasks that already run in parallel)."""
    for p in range(g.shape[0]):
        _store_point(arr, g, shift, mode, val, grad, p)


@njit(cache=True, nogil=True, parallel=True)
def _trilinear_kernel(arr, g, mode, val):
    nu, nv, nw = arr.shape
    for p in prange(g.shape[0]):
        x, y, z = g[p, 0], g[p, 1], g[p, 2]
        if _outside(arr, x, y, z, mode):
            val[p] = np.nan
            continue
        fx, fy, fz = math.floor(x), math.floor(y), math.floor(z)
        tx, ty, tz = x - fx, y - fy, z - fz
        i, j, k = int(fx), int(fy), int(fz)
        acc = 0.0
        for a in range(2):
            wa = tx if a else 1.0 - tx
            ia = _wrap(i + a, nu, mode)
            for b in range(2):
                wb = ty if b else 1.0 - ty
                jb = _wrap(j + b, nv, mode)
                for c in range(2):
                    wc = tz if c else 1.0 - tz
                    acc += wa * wb * wc * arr[ia, jb, _wrap(k + c, nw, mode)]
        val[p] = acc


# ============================================================================================
# Python API
# ============================================================================================
def _as_kernel_array(a: np.ndarray) -> np.ndarray:
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return np.ascontiguousarray(a)


def _periodic_mode(dmap, periodic: bool | None) -> bool:
    per = dmap.is_full_cell if periodic is None else bool(periodic)
    if per and not dmap.is_full_cell:
        raise ValueError("periodic interpolation needs a map that covers exactly one full cell")
    return per


def _wrapped_index(xyz, origin, index_matrix, start, n, periodic: bool) -> np.ndarray:
    """Data-index coordinates (N, 3) of Cartesian xyz (Å), wrapped into [0, n) when periodic."""
    g = (np.asarray(xyz, dtype=np.float64).reshape(-1, 3) - origin) @ index_matrix.T - start
    if periodic:
        g = np.mod(g, n)
        g = np.where(g >= n, g - n, g)  # np.mod can round up to n for tiny negative inputs
    return np.ascontiguousarray(g)


def grid_coordinates(dmap, xyz, periodic: bool | None = None) -> tuple[np.ndarray, int]:
    """Grid coordinates (N, 3) of Cartesian xyz (Å) in data index units, and the stencil mode.

    Periodic maps (default: full cells) get coordinates wrapped into [0, n). The in-memory, the
    prepared (`TricubicInterpolator`) and the chunked paths start from these same numbers, which
    is what makes them agree exactly.
    """
    per = _periodic_mode(dmap, periodic)
    g = _wrapped_index(xyz, dmap.origin, dmap.index_matrix, dmap.start, np.asarray(dmap.shape, dtype=np.float64), per)
    return g, (MODE_PERIODIC if per else MODE_CLAMP)


def _finish(dmap, val, grad_g, gradient: bool, on_outside: str) -> Interpolation:
    grad = grad_g @ dmap.index_matrix if gradient else None  # ∂/∂xyz = Mᵀ ∂/∂index, row-wise
    res = Interpolation(val, grad)
    if on_outside not in ("nan", "error"):
        raise ValueError("on_outside must be 'nan' or 'error'")
    if on_outside == "error" and res.n_outside:
        src = f" {dmap.source}" if dmap.source else ""
        raise InputError(f"{res.n_outside} of {len(val)} atoms outside the map{src} "
                         f"(box {'×'.join(str(n) for n in dmap.shape)} at origin {np.round(dmap.origin, 3).tolist()} Å)")
    return res


def interpolate(dmap, xyz, *, periodic: bool | None = None, gradient: bool = True, on_outside: str = "nan",
                parallel: bool = True) -> Interpolation:
    """Tricubic (Keys) map values and Cartesian gradients at positions xyz (N, 3, Å).

    Returns Interpolation(values (N,), gradient (N, 3) in map units per Å or None); unpacks as
    ``values, gradient = interpolate(m, xyz)``. Positions outside a non-periodic map give NaN
    (``.n_outside`` counts them; ``on_outside="error"`` raises InputError instead). periodic:
    default ``dmap.is_full_cell``; pass False for a cryo-EM box stored as a full cell when
    atoms outside the box should not wrap. A chunked (dask) map is handed to
    `interpolate_chunked`. parallel=False uses the single-threaded kernel (inside tasks).
    """
    if getattr(dmap, "is_chunked", False):
        return interpolate_chunked(dmap, xyz, periodic=periodic, gradient=gradient, on_outside=on_outside)
    g, mode = grid_coordinates(dmap, xyz, periodic)
    n = len(g)
    val = np.empty(n)
    grad_g = np.empty((n, 3))
    kernel = _tricubic_parallel if parallel else _tricubic_serial
    kernel(_as_kernel_array(np.asarray(dmap.data)), g, np.zeros(3, np.int64), mode, val, grad_g)
    return _finish(dmap, val, grad_g, gradient, on_outside)


class TricubicInterpolator:
    """`interpolate` prepared for many calls on one in-memory map (a minimiser's evaluations):
    the index matrix (read from the gemmi cell on every call otherwise), the contiguous data and
    the mode are found once, and no gradient check or outside count is made. Same numbers as
    `interpolate(..., on_outside="nan")` (NaN outside a box)."""

    def __init__(self, dmap, periodic: bool | None = None, parallel: bool = True):
        self.periodic = _periodic_mode(dmap, periodic)
        self.mode = MODE_PERIODIC if self.periodic else MODE_CLAMP
        self.data = _as_kernel_array(np.asarray(dmap.data))
        self.index_matrix = dmap.index_matrix
        self.origin, self.start = dmap.origin, dmap.start
        self.n = np.asarray(dmap.shape, dtype=np.float64)
        self.kernel = _tricubic_parallel if parallel else _tricubic_serial
        self._no_shift = np.zeros(3, np.int64)

    def __call__(self, xyz: np.ndarray) -> Interpolation:
        """Values (N,) and Cartesian gradients (N, 3) at xyz (N, 3, Å); NaN outside the box."""
        g = _wrapped_index(xyz, self.origin, self.index_matrix, self.start, self.n, self.periodic)
        val = np.empty(len(g))
        grad_g = np.empty((len(g), 3))
        self.kernel(self.data, g, self._no_shift, self.mode, val, grad_g)
        return Interpolation(val, grad_g @ self.index_matrix)


def trilinear(dmap, xyz, *, periodic: bool | None = None) -> np.ndarray:
    """Trilinear map values (N,) at xyz (N, 3, Å); NaN outside a non-periodic map."""
    m = dmap.load() if getattr(dmap, "is_chunked", False) else dmap
    g, mode = grid_coordinates(m, xyz, periodic)
    val = np.empty(len(g))
    _trilinear_kernel(_as_kernel_array(np.asarray(m.data)), g, mode, val)
    return val


def _block_task(block, g, shift):
    """One chunk's atoms: `block` is the chunk plus halo (numpy), g their global grid coordinates."""
    n = len(g)
    val = np.empty(n)
    grad = np.empty((n, 3))
    _tricubic_serial(_as_kernel_array(np.asarray(block)), g, shift, MODE_BLOCK, val, grad)
    return val, grad


def interpolate_chunked(dmap, xyz, halo: int = 2, *, periodic: bool | None = None, gradient: bool = True,
                        on_outside: str = "nan", compute_kwargs: dict | None = None) -> Interpolation:
    """`interpolate` for a map whose data is a dask array, one task per chunk that holds atoms.

    The dask-image ``map_coordinates`` pattern: atoms are bucketed by the chunk holding their
    grid cell (⌊index⌋), each bucket becomes one task that receives only its chunk plus `halo`
    voxels on every side (sliced from the lazily padded array: periodic wrap for a full cell,
    edge values otherwise, matching the in-memory stencil), and results are put back in the
    atoms' order. With zarr-backed data a task reads only the stored chunks its slice touches;
    chunks far from every atom are never read. The arithmetic is the same as the in-memory
    kernel's, from the same grid coordinates, so the results are identical. halo ≥ 2 (the
    stencil reaches one voxel below and two above ⌊index⌋). Runs on the current dask scheduler
    (a distributed Client when one is active); `compute_kwargs` go to dask.compute.
    """
    import dask
    import dask.array as da

    if halo < 2:
        raise ValueError("halo must be at least 2 voxels for the 4×4×4 Keys stencil")
    data = dmap.data
    if isinstance(data, np.ndarray):
        data = da.from_array(data, chunks=64)
    # overlap needs chunks at least `halo` wide; merge thinner ones (rare) before bucketing
    min_chunks = da.overlap.ensure_minimum_chunksize
    chunks = tuple(min_chunks(halo, c) if min(c) < halo else c for c in data.chunks)
    if chunks != data.chunks:
        data = data.rechunk(chunks)
    g, mode = grid_coordinates(dmap, xyz, periodic)
    n = len(g)
    val = np.full(n, np.nan)
    grad_g = np.full((n, 3), np.nan)
    shape = np.asarray(data.shape)
    ok = np.isfinite(g).all(axis=1)
    if mode == MODE_CLAMP:
        ok &= ((g >= -EDGE_TOL) & (g <= shape - 1 + EDGE_TOL)).all(axis=1)
    inside = np.flatnonzero(ok)
    if len(inside):
        cell = np.clip(np.floor(g[inside]).astype(np.int64), 0, shape - 1)
        bounds = [np.concatenate(([0], np.cumsum(c))) for c in data.chunks]
        block_idx = np.stack([np.searchsorted(bounds[ax], cell[:, ax], side="right") - 1 for ax in range(3)], axis=1)
        key = np.ravel_multi_index(block_idx.T, data.numblocks)
        order = np.argsort(key, kind="stable")
        keys, first = np.unique(key[order], return_index=True)
        groups = np.split(inside[order], first[1:])
        # block b of `haloed` is chunk b of `data` plus `halo` voxels on every side: original
        # indices [lo − halo, hi + halo), wrapped (full cell) or edge-repeated (box)
        haloed = da.overlap.overlap(data, depth=halo, boundary="periodic" if mode == MODE_PERIODIC else "nearest")
        blocks = haloed.to_delayed(optimize_graph=False).ravel()  # culled once, in compute
        tasks = []
        for k, atoms in zip(keys, groups):
            bi = np.unravel_index(k, data.numblocks)
            lo = np.array([bounds[ax][bi[ax]] for ax in range(3)], dtype=np.int64)
            tasks.append(dask.delayed(_block_task, pure=True)(blocks[k], g[atoms], lo - halo))
        results = dask.compute(*tasks, **(compute_kwargs or {}))
        for atoms, (v, gr) in zip(groups, results):
            val[atoms] = v
            grad_g[atoms] = gr
    return _finish(dmap, val, grad_g, gradient, on_outside)
