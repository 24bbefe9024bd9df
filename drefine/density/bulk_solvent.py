"""Flat bulk solvent and overall anisotropic scaling.

F_model(h) = k_overall · exp(−¼ sᵀ B_aniso s) · (F_calc(h) + k_sol · exp(−B_sol s²/4) · F_mask(h)),
s the Cartesian reciprocal vector (|s| = 1/d), B_aniso a symmetric Cartesian tensor (Å²)
constrained to the crystal's symmetry (R B Rᵀ = B for every rotation of the point group).

The mask is gemmi's SolventMasker (probe and shrink radii, Jiang & Brünger 1994; cctbx radii by
default, r_probe 1.1 Å, r_shrink 0.9 Å as in phenix), except its last step, the shrink, which is
ours (`shrink_mask`: the same rule, in two threads; gemmi's single-threaded shrink was ~70 % of
the mask's time), transformed by our FFT. The fit is ours:
a grid search over (k_sol, B_sol) with the overall scale solved log-linearly at every point,
then least squares on |F| over the work reflections for all parameters together, then an
isotropic factor per resolution bin for what the smooth scale leaves (`_isotropic_bins`; k_total
includes it). gemmi's own Scaling class is the independent check in the tests.
"""
from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import gemmi
import numpy as np
import scipy.fft
from numba import njit
from scipy.optimize import least_squares

from ..model.arrays import Model
from ..threads import kernel_threads
from .direct import symmetry_operators
from .fft import _miller_to_rfft, grid_shape

K_SOL_GRID = np.arange(0.0, 0.81, 0.05)
B_SOL_GRID = np.arange(10.0, 101.0, 5.0)


def solvent_mask(model: Model, shape, r_probe: float = 1.1, r_shrink: float = 0.9,
                 radii: str = "cctbx", threads: int | None = None) -> np.ndarray:
    """Bulk-solvent mask on the unit-cell grid: 1 in the solvent, 0 in model 0 (all symmetry copies)."""
    st = model.to_structure()
    for k in range(len(st) - 1, 0, -1):
        del st[k]
    choice = {"cctbx": gemmi.AtomicRadiiSet.Cctbx, "refmac": gemmi.AtomicRadiiSet.Refmac,
              "vdw": gemmi.AtomicRadiiSet.VanDerWaals}[radii]
    masker = gemmi.SolventMasker(choice)
    masker.rprobe = r_probe
    masker.rshrink = 0.0  # the shrink is done below
    grid = gemmi.Int8Grid(*shape)
    grid.set_unit_cell(model.cell)
    grid.spacegroup = model.spacegroup or gemmi.SpaceGroup("P 1")
    masker.put_mask_on_int8_grid(grid, st[0])
    mask = np.array(grid, copy=True)
    if r_shrink > 0:
        mask = shrink_mask(mask, model.cell, r_shrink, threads)
    return mask.astype(np.float32)


def _shrink_stencils(cell: gemmi.UnitCell, shape, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid offsets (du, dv, dw) within `r` Å of a point (the point itself excluded), split into
    those closer than the largest grid step ("near") and the rest, as gemmi's set_margin_around
    builds them (offsets up to floor(r / plane spacing) along each axis)."""
    n = np.asarray(shape, dtype=np.int64)
    recip = np.array([cell.reciprocal().a, cell.reciprocal().b, cell.reciprocal().c])
    reach = np.floor(r * recip * n).astype(np.int64)  # plane spacing along axis i is 1/(n_i |a_i*|)
    if np.any(2 * reach >= n):
        raise ValueError(f"shrink radius {r} Å is more than half the cell along an axis")
    axes = [np.arange(-k, k + 1) for k in reach]
    off = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    orth = np.array(cell.orth.mat.tolist())
    d2 = (((off / n) @ orth.T) ** 2).sum(1)
    keep = (d2 <= r * r) & (d2 != 0.0)
    step2 = max(cell.a / n[0], cell.b / n[1], cell.c / n[2]) ** 2 + 1e-6
    near = keep & (d2 < step2)
    return off[near], off[keep & ~near]


def shrink_mask(mask: np.ndarray, cell: gemmi.UnitCell, r_shrink: float, threads: int | None = None) -> np.ndarray:
    """Give back to the solvent (1) the model (0) points within `r_shrink` Å of a solvent point
    on the solvent region's edge: gemmi's rule (SolventMasker's shrink, set_margin_around) exactly,
    where a solvent point is on the edge when a model point lies among its nearest neighbours.
    Both passes run over slabs of the grid in threads: the first finds the edge points, the
    second marks the model points near them."""
    near, far = _shrink_stencils(cell, mask.shape, r_shrink)
    every = np.concatenate([near, far]) if len(far) else near
    if mask.flags.f_contiguous and not mask.flags.c_contiguous:
        # gemmi's grids are Fortran-ordered: work on the transpose (C-ordered, axes w, v, u) with
        # the offsets' components reversed, rather than copy 4 million points into C order
        return _shrink_c_order(mask.T, near[:, ::-1], every[:, ::-1], threads).T
    return _shrink_c_order(mask, near, every, threads)


def _shrink_c_order(mask: np.ndarray, near: np.ndarray, every: np.ndarray, threads: int | None) -> np.ndarray:
    """`shrink_mask` on a C-ordered grid, the offsets given in its axes' order."""
    near, every = np.ascontiguousarray(near), np.ascontiguousarray(every)
    shape = np.array(mask.shape, dtype=np.int64)
    src = np.ascontiguousarray(mask, dtype=np.int8).reshape(-1)
    edge = np.zeros(src.shape, dtype=np.int8)
    out = src.copy()
    n_threads = max(1, min(kernel_threads(threads), int(shape[0])))
    bounds = np.linspace(0, shape[0], n_threads + 1).astype(np.int64)
    slabs = list(itertools.pairwise(int(b) for b in bounds))
    plane = int(shape[1] * shape[2])
    with ThreadPoolExecutor(n_threads) as ex:
        list(ex.map(lambda b: _mask_edge(src, shape, near, edge, b[0], b[1]), slabs))
        list(ex.map(lambda b: _mask_margin(src, shape, edge, every, out, b[0] * plane, b[1] * plane), slabs))
    return out.reshape(mask.shape)


@njit(cache=True, nogil=True)
def _flat_steps(offsets, nv, nw):
    """Flat-index step of each offset inside the grid, and the largest |offset| component."""
    steps = np.empty(offsets.shape[0], np.int64)
    reach = 0
    for k in range(offsets.shape[0]):
        steps[k] = (offsets[k, 0] * nv + offsets[k, 1]) * nw + offsets[k, 2]
        for a in range(3):
            reach = max(reach, abs(offsets[k, a]))
    return steps, reach


@njit(cache=True, nogil=True)
def _mask_edge(mask, shape, near, edge, u0, u1):
    """edge = 1 at solvent points (u0 ≤ u < u1) with a model point at a `near` offset (flat arrays
    of a C-ordered grid of `shape`). Away from the cell's faces a neighbour is a fixed flat step
    (4× faster than wrapping every index)."""
    nu, nv, nw = shape[0], shape[1], shape[2]
    steps, reach = _flat_steps(near, nv, nw)
    for u in range(u0, u1):
        for v in range(nv):
            inner = reach <= u < nu - reach and reach <= v < nv - reach
            base = (u * nv + v) * nw
            for w in range(nw):
                i = base + w
                if mask[i] < 1:
                    continue
                if inner and reach <= w < nw - reach:
                    for k in range(steps.shape[0]):
                        if mask[i + steps[k]] < 1:
                            edge[i] = 1
                            break
                else:
                    for k in range(steps.shape[0]):
                        if mask[(((u + near[k, 0]) % nu) * nv + (v + near[k, 1]) % nv) * nw + (w + near[k, 2]) % nw] < 1:
                            edge[i] = 1
                            break


@njit(cache=True, nogil=True)
def _mask_margin(mask, shape, edge, offsets, out, i0, i1):
    """out = 1 at the model points `offsets` away from an edge point i (i0 ≤ i < i1). The edge
    points are a thin shell, so scattering from them is cheaper than searching around every
    model point. Threads on neighbouring ranges may set the same point: both write 1."""
    nu, nv, nw = shape[0], shape[1], shape[2]
    steps, reach = _flat_steps(offsets, nv, nw)
    for i in range(i0, i1):
        if not edge[i]:
            continue
        w = i % nw
        v = (i // nw) % nv
        u = i // (nw * nv)
        inner = reach <= u < nu - reach and reach <= v < nv - reach and reach <= w < nw - reach
        for k in range(steps.shape[0]):
            if inner:
                j = i + steps[k]
            else:
                j = (((u + offsets[k, 0]) % nu) * nv + (v + offsets[k, 1]) % nv) * nw + (w + offsets[k, 2]) % nw
            if mask[j] < 1:
                out[j] = 1


def mask_structure_factors(mask: np.ndarray, cell: gemmi.UnitCell, hkl: np.ndarray, threads: int | None = None) -> np.ndarray:
    """F_mask(h) = ∫ mask · e^{2πi h·x} dV at the given Miller indices."""
    threads = kernel_threads(threads)
    spec = scipy.fft.rfftn(mask, workers=threads)
    idx, neg = _miller_to_rfft(hkl, mask.shape)
    v = spec[idx]
    return np.where(neg, v, np.conj(v)) * (cell.volume / mask.size)


def aniso_basis(cell: gemmi.UnitCell, sg: gemmi.SpaceGroup | None) -> np.ndarray:
    """Basis (k, 3, 3) of symmetric Cartesian tensors invariant under the point group (kept per
    cell and space group: every scale fit asks for it)."""
    key = (cell.parameters, sg.xhm() if sg is not None else None)
    if key not in _BASIS_CACHE:
        basis = _aniso_basis(cell, sg)
        basis.flags.writeable = False
        _BASIS_CACHE[key] = basis
    return _BASIS_CACHE[key]


_BASIS_CACHE: dict[tuple, np.ndarray] = {}


def _aniso_basis(cell: gemmi.UnitCell, sg: gemmi.SpaceGroup | None) -> np.ndarray:
    units = []
    for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)):
        e = np.zeros((3, 3))
        e[i, j] = e[j, i] = 1.0
        units.append(e)
    units = np.array(units)
    F = np.array(cell.frac.mat.tolist())
    O = np.array(cell.orth.mat.tolist())
    rot, _ = symmetry_operators(sg)
    rows = []
    for R in rot:
        Rc = O @ R @ F
        moved = np.einsum("ij,kjl,ml->kim", Rc, units, Rc)
        # coordinates of R E_k Rᵀ in the basis (symmetric: read the 6 unique elements)
        a = np.stack([moved[:, 0, 0], moved[:, 1, 1], moved[:, 2, 2], moved[:, 0, 1], moved[:, 0, 2],
                      moved[:, 1, 2]], axis=0)
        rows.append(a - np.eye(6))
    _, sv, vt = np.linalg.svd(np.concatenate(rows))
    null = vt[np.sum(sv > 1e-8):]
    return np.einsum("kn,nij->kij", null, units)


@dataclass
class BulkSolventScale:
    """Fitted scale and solvent parameters (k dimensionless, B in Å²)."""

    k_overall: float
    b_aniso: np.ndarray  # (3, 3) Cartesian, Å²
    k_sol: float
    b_sol: float
    r_work: float = float("nan")
    r_free: float = float("nan")
    per_bin: list[dict] = field(default_factory=list)
    # k_isotropic(s): a factor per resolution bin (at the bins' mean s², Å⁻²; linear in s² between
    # them, constant beyond), what the smooth e^{−sᵀBs/4} leaves (empty: 1)
    k_iso_s2: np.ndarray = field(default_factory=lambda: np.zeros(0))
    k_iso: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def b_iso(self) -> float:
        return float(np.trace(self.b_aniso) / 3.0)

    def k_isotropic(self, s2: np.ndarray) -> np.ndarray:
        if not len(self.k_iso):
            return np.ones(len(s2))
        return np.interp(s2, self.k_iso_s2, self.k_iso)

    def k_total(self, s_vec: np.ndarray) -> np.ndarray:
        quad = ((s_vec @ self.b_aniso) * s_vec).sum(1)
        return self.k_overall * np.exp(-0.25 * quad) * self.k_isotropic((s_vec ** 2).sum(1))

    def f_model(self, f_calc: np.ndarray, f_mask: np.ndarray, s_vec: np.ndarray) -> np.ndarray:
        s2 = (s_vec ** 2).sum(1)
        return self.k_total(s_vec) * (f_calc + self.k_sol * np.exp(-self.b_sol * s2 / 4.0) * f_mask)

    def as_dict(self) -> dict:
        return {"k_overall": self.k_overall, "b_aniso": self.b_aniso.tolist(), "b_iso": self.b_iso,
                "k_sol": self.k_sol, "b_sol": self.b_sol, "r_work": self.r_work, "r_free": self.r_free,
                "k_isotropic": [{"s2": float(a), "k": float(b)} for a, b in zip(self.k_iso_s2, self.k_iso)],
                "per_bin": self.per_bin}


def _isotropic_bins(fo, fm_abs, s2, work, bins: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k_isotropic per resolution bin (Afonine et al. 2013, Acta Cryst. D69, 625, as phenix
    scales): after the smooth overall scale, the least-squares factor Σ Fo|Fm| / Σ |Fm|² over each
    bin's work reflections, placed at their mean s². `bins`: the table's resolution bins (else
    made the same way, `io.reflections.resolution_bins`). On 5orl, 4hg7 and 1l2h the smooth
    scale alone left R ~0.4 % above cctbx's for the same model (the data fall off faster than
    e^{−Bs²/4} near the resolution limit); with the tables' 20 bins it is within ~0.1–0.2 %."""
    from ..io.reflections import default_n_bins, resolution_bins

    ok = work & (fm_abs > 0) & np.isfinite(fo)
    if bins is None:
        bins = resolution_bins(1.0 / np.sqrt(np.maximum(s2, 1e-300)), default_n_bins(int(ok.sum())))
    b = np.asarray(bins)[ok]
    n = int(b.max()) + 1 if len(b) else 0
    counts = np.bincount(b, minlength=n)
    use = counts > 0
    if use.sum() < 2:
        return np.zeros(0), np.zeros(0)
    f, a = fo[ok], fm_abs[ok]
    centres = np.bincount(b, s2[ok], minlength=n)[use] / counts[use]
    k = np.bincount(b, f * a, minlength=n)[use] / np.bincount(b, a * a, minlength=n)[use]
    order = np.argsort(centres)
    return centres[order], k[order]


def _loglinear_scale(fo, fm, s2, w):
    """k, B minimising Σ w (ln Fo − ln k + B s²/4 − ln|Fm|)²: a straight-line fit, solved in
    closed form about the means (`_solvent_grid_r` is the same fit at every grid point)."""
    ok = (fo > 0) & (fm > 0) & w
    y = np.log(fo[ok]) - np.log(fm[ok])
    x = s2[ok] / 4.0
    xm, ym = x.mean(), y.mean()
    dx = x - xm
    sxx = float(dx @ dx)
    b = -float(dx @ (y - ym)) / sxx if sxx > 0 else 0.0
    return float(np.exp(ym + b * xm)), b


@njit(cache=True, nogil=True, fastmath=True)
def _solvent_grid_r(fo, f_calc, f_mask, s2, k_sol_grid, b_sol_grid, f_calc_mate, f_mask_mate, alpha):
    """R(k_sol, B_sol) on the grid, each point with its own overall k, B from `_loglinear_scale`'s
    line fit, over the reflections given (work set, F_o finite). One pass per grid point for the
    fit's sums and one for R: the per-point numpy version cost ~0.45 ms × 323 points. Twinned
    data: the amplitude is √((1 − α)|F(h)|² + α|F(Th)|²) with the twin mates' F_calc, F_mask
    (α = 0 and any mates: untwinned)."""
    n = fo.shape[0]
    log_fo = np.log(np.maximum(fo, 1e-300))
    r = np.empty((k_sol_grid.shape[0], b_sol_grid.shape[0]))
    k_all = np.empty_like(r)
    b_all = np.empty_like(r)
    amp = np.empty(n)
    y = np.empty(n)
    sum_fo = 0.0
    for i in range(n):
        sum_fo += fo[i]
    for jb in range(b_sol_grid.shape[0]):
        damp = np.exp(-b_sol_grid[jb] * s2 / 4.0)
        for jk in range(k_sol_grid.shape[0]):
            ks = k_sol_grid[jk]
            cnt = 0
            sx = 0.0
            sy = 0.0
            for i in range(n):
                f = f_calc[i] + ks * damp[i] * f_mask[i]
                fm = f_calc_mate[i] + ks * damp[i] * f_mask_mate[i]  # twin mates share |s|
                a = np.sqrt((1.0 - alpha) * (f.real * f.real + f.imag * f.imag)
                            + alpha * (fm.real * fm.real + fm.imag * fm.imag))
                amp[i] = a
                if fo[i] > 0 and a > 0:
                    y[i] = log_fo[i] - np.log(a)
                    cnt += 1
                    sx += s2[i] / 4.0
                    sy += y[i]
            xm = sx / max(cnt, 1)
            ym = sy / max(cnt, 1)
            sxx = 0.0
            sxy = 0.0
            for i in range(n):
                if fo[i] > 0 and amp[i] > 0:
                    dx = s2[i] / 4.0 - xm
                    sxx += dx * dx
                    sxy += dx * (y[i] - ym)
            b = -sxy / sxx if sxx > 0 else 0.0
            k = np.exp(ym + b * xm)
            num = 0.0
            for i in range(n):
                num += abs(fo[i] - k * np.exp(-b * s2[i] / 4.0) * amp[i])
            r[jk, jb] = num / sum_fo
            k_all[jk, jb] = k
            b_all[jk, jb] = b
    return r, k_all, b_all


def _solvent_grid_search(fo, f_calc, f_mask, s2, threads: int | None = None, twin=None):
    """`_solvent_grid_r` over (K_SOL_GRID, B_SOL_GRID), the B_sol columns split between threads.
    `twin`: (F_calc, F_mask of the twin mates, α), else untwinned."""
    fc_m, fm_m, alpha = twin if twin is not None else (f_calc, f_mask, 0.0)
    parts = [p for p in np.array_split(B_SOL_GRID, max(1, kernel_threads(threads))) if len(p)]
    with ThreadPoolExecutor(len(parts)) as ex:
        out = list(ex.map(lambda b: _solvent_grid_r(fo, f_calc, f_mask, s2, K_SOL_GRID, b, fc_m, fm_m, float(alpha)),
                          parts))
    return tuple(np.concatenate([o[i] for o in out], axis=1) for i in range(3))


class _ScaleModel:
    """Residuals |Fo| − |F_model| of the work set as a function of x = (ln k_overall, B_aniso's
    coefficients in the symmetry basis, [k_sol, B_sol]), with their analytic Jacobian (a
    numerical one cost 4–6 residual evaluations a step)."""

    def __init__(self, s_vec, s2, f_calc, f_mask, f_obs, basis, with_solvent: bool, twin=None):
        self.s2, self.f_calc, self.f_mask, self.f_obs = s2, f_calc, f_mask, f_obs
        self.basis, self.with_solvent = basis, with_solvent
        # twinned data: (F_calc, F_mask of each reflection's twin mate, α); k_total is taken as
        # the same for h and Th (true for merohedral twins, whose mates share |s| and the
        # symmetry-constrained anisotropy)
        self.twin = twin
        # sᵀ E_j s for every basis tensor: k_total's exponent is linear in the coefficients
        self.quad = np.stack([((s_vec @ e) * s_vec).sum(1) for e in basis], axis=1)  # sᵀE_k s (einsum: 5× slower)

    def unpack(self, x):
        nb = len(self.basis)
        b_aniso = np.einsum("k,kij->ij", x[1:1 + nb], self.basis)
        ks, bs = (x[1 + nb], x[2 + nb]) if self.with_solvent else (0.0, 0.0)
        return np.exp(x[0]), b_aniso, ks, bs

    def _parts(self, x):
        _, _, ks, bs = self.unpack(x)
        kt = np.exp(x[0] - 0.25 * self.quad @ x[1:1 + len(self.basis)])
        e = np.exp(-bs * self.s2 / 4.0)
        return kt, e, ks, self.f_calc + ks * e * self.f_mask

    def _amplitude(self, f, e, ks):
        """|F| (untwinned) or the twinned amplitude, and F of the mates (None untwinned)."""
        if self.twin is None:
            return np.abs(f), None
        fc_m, fm_m, alpha = self.twin
        g = fc_m + ks * e * fm_m
        return np.sqrt((1.0 - alpha) * np.abs(f) ** 2 + alpha * np.abs(g) ** 2), g

    def residuals(self, x):
        kt, e, ks, f = self._parts(x)
        return self.f_obs - kt * self._amplitude(f, e, ks)[0]

    def jacobian(self, x):
        kt, e, ks, f = self._parts(x)
        amp, g = self._amplitude(f, e, ks)
        af = np.maximum(amp, 1e-300)
        a = kt * af
        cols = [a[:, None], a[:, None] * (-0.25 * self.quad)]
        if self.with_solvent:
            if g is None:
                along = (np.conj(f) * e * self.f_mask).real / af  # ∂|F|/∂k_sol
            else:
                alpha = self.twin[2]
                along = ((1.0 - alpha) * (np.conj(f) * e * self.f_mask).real
                         + alpha * (np.conj(g) * e * self.twin[1]).real) / af
            cols += [(kt * along)[:, None], (kt * along * ks * (-self.s2 / 4.0))[:, None]]
        return -np.concatenate(cols, axis=1)


def twinned_amplitudes(f: np.ndarray, twin: tuple[np.ndarray, float] | None) -> np.ndarray:
    """|F| untwinned; with `twin` = (mate rows, α): √((1 − α)|F(h)|² + α|F(Th)|²), 0 where the
    mate (row −1) is missing."""
    if twin is None:
        return np.abs(f)
    mate, alpha = twin
    ok = mate >= 0
    a2 = np.abs(f) ** 2
    return np.where(ok, np.sqrt((1.0 - alpha) * a2 + alpha * a2[np.where(ok, mate, 0)]), 0.0)


def fit_bulk_solvent(hkl: np.ndarray, f_obs: np.ndarray, f_calc: np.ndarray, f_mask: np.ndarray,
                     cell: gemmi.UnitCell, sg: gemmi.SpaceGroup | None, work: np.ndarray,
                     free: np.ndarray | None = None, bins: np.ndarray | None = None,
                     with_solvent: bool = True, start: BulkSolventScale | None = None,
                     twin: tuple[np.ndarray, float] | None = None) -> BulkSolventScale:
    """Fit k_overall, B_aniso (symmetry-constrained), k_sol, B_sol to |F_obs| on the work set.

    `start`: a previous fit (refinement's earlier cycle) to start the least squares from,
    skipping the grid search over (k_sol, B_sol). `twin` = (row of each reflection's twin mate,
    −1 if not measured; twin fraction α): the model amplitudes compared with F_obs are the
    twinned ones (`twinned_amplitudes`), reflections without a mate left out, and so are the R
    values."""
    F = np.array(cell.frac.mat.tolist())
    s_vec = np.asarray(hkl, dtype=np.float64) @ F
    s2 = (s_vec ** 2).sum(1)
    fo = np.asarray(f_obs, dtype=np.float64)
    usable = np.isfinite(fo) & (twin[0] >= 0 if twin is not None else True)
    work = np.asarray(work, dtype=bool) & usable
    basis = aniso_basis(cell, sg)
    f_calc, f_mask = np.asarray(f_calc, np.complex128), np.asarray(f_mask, np.complex128)
    mates = None
    if twin is not None:
        m = np.where(twin[0] >= 0, twin[0], np.arange(len(fo)))
        mates = (f_calc[m], f_mask[m], float(twin[1]))

    def r_of(fmod, sel):
        return float(np.abs(fo[sel] - twinned_amplitudes(fmod, twin)[sel]).sum() / fo[sel].sum())

    if start is None and with_solvent:
        r, k_all, b_all = _solvent_grid_search(fo[work], f_calc[work], f_mask[work], s2[work],
                                               twin=None if mates is None else (mates[0][work], mates[1][work],
                                                                                mates[2]))
        jk, jb = np.unravel_index(np.argmin(r), r.shape)  # the first minimum, as the loop it replaced
        ks0, bs0, k0, b0 = float(K_SOL_GRID[jk]), float(B_SOL_GRID[jb]), float(k_all[jk, jb]), float(b_all[jk, jb])
    else:
        ks0 = (start.k_sol if start is not None else 0.0) if with_solvent else 0.0
        bs0 = (start.b_sol if start is not None else 0.0) if with_solvent else 0.0
        k0, b0 = _loglinear_scale(fo, twinned_amplitudes(f_calc + ks0 * np.exp(-bs0 * s2 / 4.0) * f_mask, twin),
                                  s2, work)
    # B_iso as the starting anisotropic tensor, in the symmetry basis
    b_start = start.b_aniso if start is not None else b0 * np.eye(3)
    coef0, *_ = np.linalg.lstsq(basis.reshape(len(basis), 9).T, b_start.ravel(), rcond=None)
    k_start = start.k_overall if start is not None else k0
    x0 = np.concatenate([[np.log(k_start)], coef0, [ks0, bs0] if with_solvent else []])

    model = _ScaleModel(s_vec[work], s2[work], f_calc[work], f_mask[work], fo[work], basis, with_solvent,
                        twin=None if mates is None else (mates[0][work], mates[1][work], mates[2]))
    lo = np.full(len(x0), -np.inf)
    hi = np.full(len(x0), np.inf)
    if with_solvent:
        lo[-2:], hi[-2:] = (0.0, 0.0), (1.5, 300.0)
        x0[-2:] = np.clip(x0[-2:], lo[-2:] + 1e-6, hi[-2:] - 1e-6)
    sol = least_squares(model.residuals, x0, jac=model.jacobian, bounds=(lo, hi), x_scale="jac", method="trf")
    k, b_an, ks, bs = model.unpack(sol.x)
    out = BulkSolventScale(k_overall=float(k), b_aniso=b_an, k_sol=float(ks), b_sol=float(bs))
    out.k_iso_s2, out.k_iso = _isotropic_bins(fo, twinned_amplitudes(out.f_model(f_calc, f_mask, s_vec), twin), s2,
                                              work, bins)
    fmod = out.f_model(f_calc, f_mask, s_vec)
    out.r_work = r_of(fmod, work)
    if free is not None and np.any(free & usable):
        out.r_free = r_of(fmod, np.asarray(free, dtype=bool) & usable)
    if bins is not None:
        out.per_bin = _r_per_bin(fo, twinned_amplitudes(fmod, twin), s2, np.asarray(bins), work,
                                 None if free is None else np.asarray(free, dtype=bool) & usable)
    return out


def _r_per_bin(fo, fm_abs, s2, bins, work, free) -> list[dict]:
    """R-work (and R-free) per resolution bin with its d range, by bincount (one pass, not one
    mask per bin: ~25 ms a cycle on 5orl)."""
    n = int(bins.max()) + 1 if len(bins) else 0
    d = 1.0 / np.sqrt(np.maximum(s2, 1e-300))
    present = np.bincount(bins, minlength=n) > 0
    d_max = np.full(n, -np.inf)
    d_min = np.full(n, np.inf)
    np.maximum.at(d_max, bins, d)
    np.minimum.at(d_min, bins, d)
    diff = np.abs(np.where(np.isfinite(fo), fo, 0.0) - fm_abs)
    fo0 = np.where(np.isfinite(fo), fo, 0.0)

    def per_bin(sel):
        num = np.bincount(bins[sel], diff[sel], minlength=n)
        den = np.bincount(bins[sel], fo0[sel], minlength=n)
        return num, den, np.bincount(bins[sel], minlength=n)

    w_num, w_den, n_work = per_bin(work)
    f_num, f_den, n_free = per_bin(free) if free is not None else (None, None, np.zeros(n, np.int64))
    rows = []
    for b in np.flatnonzero(present):
        row = {"bin": int(b), "d_max": float(d_max[b]), "d_min": float(d_min[b]), "n_work": int(n_work[b])}
        row["r_work"] = float(w_num[b] / w_den[b]) if n_work[b] else None
        if n_free[b]:
            row["r_free"] = float(f_num[b] / f_den[b])
        rows.append(row)
    return rows


def mask_grid_shape(model: Model, d_min: float, rate: float = 1.5):
    """The grid used for the solvent mask (same rule as the FFT structure factors)."""
    return grid_shape(model.cell, model.spacegroup, d_min, rate)
