"""Structure factors by FFT: atom density on a grid (all symmetry images), FFT, unblur.

Each atom image is a sum of Gaussians ρ(r) = Σ_g c_g exp(−4π² rᵀ M_g⁻¹ r) with
M_g = (b_g + B_add)·I + 8π²U and c_g = occ·a_g (4π)^{3/2}/√det M_g, spread only within the
radius where its density falls below `cutoff` (e/Å³). The global blur B_add widens the
narrowest Gaussian until the part of its transform beyond the grid's Nyquist frequency is
below ~1e-5 (Gaussian tail: B_add ≥ 4 ln(10⁵)/(1/h − 1/d_min)², h the grid spacing), and is
removed afterwards by exp(+B_add s²/4). Grid sizes come from gemmi (FFT-friendly and
compatible with the space group's symmetry).

F(h) = ∫ρ e^{2πi h·x} dV ≈ (V/N) conj(FFT(ρ))[h] (numpy's FFT has the opposite sign).

Gradient of a target T with D(h) = ∂T/∂Re F + i ∂T/∂Im F: with the gradient map
g(x) = Re Σ_h conj(D(h) e^{B_add s²/4}) e^{2πi h·x} over the given reflections,
∂T/∂p = ∫ g ∂ρ/∂p dV, evaluated by the same per-atom boxes (the "gradient map convolved with
the atom shapes").

Atoms are spread in chunks on separate grids by threads (the kernels release the GIL), and
the grids summed: the same layout distributes over dask workers.
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import gemmi
import numpy as np
import scipy.fft
from numba import njit

from ..threads import kernel_threads
from .direct import Scatterers, StructureFactorGradient

ALIAS_LOG = math.log(1e5)  # aliased fraction of the sharpest Gaussian: ~1e-5
#: isotropic atoms on cells with c ⟂ a, b go through the factorised kernels (tests switch this
#: off to compare both paths)
FACTORISED_KERNELS = True


@dataclass
class FFTGrid:
    """A real-space grid over the unit cell, with the blur it was computed with."""

    shape: tuple[int, int, int]
    cell: gemmi.UnitCell
    b_add: float  # Å²


def grid_shape(cell: gemmi.UnitCell, sg: gemmi.SpaceGroup | None, d_min: float, rate: float = 1.5):
    """Grid points along a, b, c for spacing d_min/(2·rate), FFT-friendly and symmetry-compatible."""
    return _grid_shape(cell.parameters, sg.xhm() if sg is not None else "P 1", float(d_min), float(rate))


@functools.lru_cache(maxsize=64)
def _grid_shape(cell_parameters: tuple, hm: str, d_min: float, rate: float):
    g = gemmi.FloatGrid()
    g.set_unit_cell(gemmi.UnitCell(*cell_parameters))
    g.spacegroup = gemmi.SpaceGroup(hm)
    g.set_size_from_spacing(d_min / (2.0 * rate), gemmi.GridSizeRounding.Up)
    return (g.nu, g.nv, g.nw)


def choose_blur(sc: Scatterers, shape, d_min: float, alias: float | None = None) -> float:
    """Smallest B_add (Å²) that keeps aliasing of the sharpest atom below ~1e-5."""
    lengths = np.array([sc.orth_matrix[:, i] for i in range(3)])
    spacing = max(np.linalg.norm(lengths[i]) / shape[i] for i in range(3))
    gap = 1.0 / spacing - 1.0 / d_min
    b_needed = 4.0 * (ALIAS_LOG if alias is None else math.log(1.0 / alias)) / gap ** 2
    u = np.zeros((len(sc), 3, 3))
    iu = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    for k, (i, j) in enumerate(iu):
        u[:, i, j] = u[:, j, i] = sc.u_cart[:, k]
    b_min = 8 * np.pi ** 2 * np.linalg.eigvalsh(u)[:, 0].min() if len(sc) else 0.0
    return float(max(0.0, b_needed - b_min))


def _images(sc: Scatterers):
    """Fractional positions, Cartesian U (3×3) and Cartesian rotation of every symmetry image."""
    F, O = sc.frac_matrix, sc.orth_matrix
    u = np.zeros((len(sc), 3, 3))
    for k, (i, j) in enumerate([(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]):
        u[:, i, j] = u[:, j, i] = sc.u_cart[:, k]
    fr, uu, rc, atom = [], [], [], []
    for R, t in zip(sc.rot, sc.trans):
        Rc = O @ R @ F
        fr.append(sc.frac @ R.T + t)
        uu.append(np.einsum("ij,ajk,lk->ail", Rc, u, Rc))
        rc.append(np.broadcast_to(Rc, (len(sc), 3, 3)))
        atom.append(np.arange(len(sc)))
    return np.concatenate(fr), np.concatenate(uu), np.concatenate(rc), np.concatenate(atom)


def _gaussians(sc: Scatterers, u_img: np.ndarray, atom: np.ndarray, b_add: float, shape, cutoff: float):
    """Per image and Gaussian: coefficient, inverse of M, plus the box half-widths (grid points)."""
    t = sc.types.type_of_atom[atom]
    b = sc.types.b[t] + b_add  # (m, G)
    M = b[:, :, None, None] * np.eye(3) + 8 * np.pi ** 2 * u_img[:, None]
    # isotropic images (M = β I) in closed form: refinement of B makes these anew at every
    # evaluation, and LAPACK's det, inv and eigvalsh on every 3×3 cost ~8 ms for 2,400 atoms
    diag = u_img[:, 0, 0]
    iso = np.all(np.abs(u_img - diag[:, None, None] * np.eye(3)) <= 1e-12 * np.maximum(np.abs(diag), 1e-30)[:, None, None],
                 axis=(1, 2))
    det = np.empty(b.shape)
    minv = np.empty(M.shape)
    lam = np.empty(b.shape)
    beta = M[iso][:, :, 0, 0]
    det[iso] = beta ** 3
    minv[iso] = (1.0 / beta)[:, :, None, None] * np.eye(3)
    lam[iso] = beta
    if (~iso).any():
        det[~iso] = np.linalg.det(M[~iso])
        minv[~iso] = np.linalg.inv(M[~iso])
        lam[~iso] = np.linalg.eigvalsh(M[~iso])[..., -1]
    if np.any(det <= 0):
        raise ValueError("non-positive-definite atomic displacement (check B and U values)")
    coef = sc.occ[atom][:, None] * sc.types.a[t] * (4 * np.pi) ** 1.5 / np.sqrt(det)
    ratio = np.abs(coef) / cutoff
    r2 = np.where(ratio > 1, lam * np.log(np.maximum(ratio, 1.0)) / (4 * np.pi ** 2), 0.0)
    radius = np.sqrt(r2.max(axis=1))
    fnorm = np.linalg.norm(sc.frac_matrix, axis=1)
    half = np.ceil(radius[:, None] * fnorm[None, :] * np.array(shape)[None, :]).astype(np.int64)
    return coef, minv, radius, half


@njit(cache=True, nogil=True, inline="always")
def _row_range(rb, step, r2max, klo, khi):
    """k range of a grid row r(k) = rb + k·step inside the sphere |r|² ≤ r2max (clipped to box)."""
    a = step[0] * step[0] + step[1] * step[1] + step[2] * step[2]
    b = rb[0] * step[0] + rb[1] * step[1] + rb[2] * step[2]
    c = rb[0] * rb[0] + rb[1] * rb[1] + rb[2] * rb[2] - r2max
    disc = b * b - a * c
    if disc < 0.0:
        return 1, 0
    root = math.sqrt(disc)
    k0 = max(klo, int(math.ceil((-b - root) / a)))
    k1 = min(khi, int(math.floor((-b + root) / a)))
    return k0, k1


@njit(cache=True, nogil=True, inline="always")
def _row_recurrence(coef, minv, rb, step, k0, val, ratio, mult):
    """Start values of each Gaussian on a grid row r(k) = rb + k·s at k0, and the factors of its
    recurrence: q(k+1) − q(k) = 2 sᵀM⁻¹r(k) + sᵀM⁻¹s, so e^{−4π²q} moves by `ratio`, which itself
    moves by `mult` (two multiplications per point instead of an exp)."""
    fpp = 4.0 * math.pi * math.pi
    x = rb[0] + k0 * step[0]
    y = rb[1] + k0 * step[1]
    z = rb[2] + k0 * step[2]
    for g in range(coef.shape[0]):
        m = minv[g]
        q = (m[0, 0] * x * x + m[1, 1] * y * y + m[2, 2] * z * z
             + 2.0 * (m[0, 1] * x * y + m[0, 2] * x * z + m[1, 2] * y * z))
        ms0 = m[0, 0] * step[0] + m[0, 1] * step[1] + m[0, 2] * step[2]
        ms1 = m[1, 0] * step[0] + m[1, 1] * step[1] + m[1, 2] * step[2]
        ms2 = m[2, 0] * step[0] + m[2, 1] * step[1] + m[2, 2] * step[2]
        sms = step[0] * ms0 + step[1] * ms1 + step[2] * ms2
        smr = x * ms0 + y * ms1 + z * ms2
        val[g] = coef[g] * math.exp(-fpp * q)
        ratio[g] = math.exp(-fpp * (2.0 * smr + sms))
        mult[g] = math.exp(-2.0 * fpp * sms)


@njit(cache=True, nogil=True)
def _spread(grid, frac, coef, minv, radius, half, orth):
    """Add every image's density to the grid, row by row.

    Along a row r(k) = rb + k·s the exponent of each Gaussian is quadratic in k, so the values
    follow a recurrence (two multiplications per point and Gaussian instead of an exp).
    """
    n0, n1, n2 = grid.shape
    ng = coef.shape[1]
    step = np.empty(3)
    rb = np.empty(3)
    val = np.empty(ng)
    ratio = np.empty(ng)
    mult = np.empty(ng)
    row = np.zeros(2 * n2 + 4)
    for p in range(3):
        step[p] = orth[p, 2] / n2
    for a in range(frac.shape[0]):
        r2max = radius[a] * radius[a]
        if r2max == 0.0:
            continue
        c0 = int(math.floor(frac[a, 0] * n0))
        c1 = int(math.floor(frac[a, 1] * n1))
        c2 = int(math.floor(frac[a, 2] * n2))
        klo = c2 - half[a, 2]
        khi = c2 + half[a, 2] + 1
        for i in range(c0 - half[a, 0], c0 + half[a, 0] + 2):
            d0 = i / n0 - frac[a, 0]
            for j in range(c1 - half[a, 1], c1 + half[a, 1] + 2):
                d1 = j / n1 - frac[a, 1]
                for p in range(3):
                    rb[p] = orth[p, 0] * d0 + orth[p, 1] * d1 - orth[p, 2] * frac[a, 2]
                k0, k1 = _row_range(rb, step, r2max, klo, khi)
                if k1 < k0:
                    continue
                _row_recurrence(coef[a], minv[a], rb, step, k0, val, ratio, mult)
                for k in range(k0, k1 + 1):
                    tot = 0.0
                    for g in range(ng):
                        tot += val[g]
                        val[g] *= ratio[g]
                        ratio[g] *= mult[g]
                    row[k - k0] = tot
                ii = i % n0
                jj = j % n1
                for k in range(k0, k1 + 1):
                    grid[ii, jj, k % n2] += row[k - k0]
    return grid


@njit(cache=True, nogil=True)
def _gather(gmap, frac, coef, minv, radius, half, orth, occ_of_image, dvol, with_shape, iso, with_occ):
    """∫ g ∂ρ/∂p dV per image: position (Cartesian), with `with_occ` occupancy, and with
    `with_shape` ∂T/∂M summed over Gaussians (coordinate refinement needs positions only: about
    25 % cheaper; occupancies cost little more, the shape part most).

    Same row recurrence as `_spread` for the Gaussian values; r(k) is linear in k. For an
    isotropic image (M⁻¹ = m_g·I), ∂ρ/∂x = 8π² r Σ_g m_g ρ_g and ∂ρ/∂M needs only Σ ρ_g, Σ m_g ρ_g
    and Σ m_g² ρ_g: scalar sums per point instead of matrix products per Gaussian.
    """
    n0, n1, n2 = gmap.shape
    m_img = frac.shape[0]
    ng = coef.shape[1]
    g_x = np.zeros((m_img, 3))
    g_occ = np.zeros(m_img)
    g_m = np.zeros((m_img, 3, 3))
    fpp = 4.0 * math.pi * math.pi
    step = np.empty(3)
    rb = np.empty(3)
    r = np.empty(3)
    mr = np.empty(3)
    val = np.empty(ng)
    ratio = np.empty(ng)
    mult = np.empty(ng)
    for p in range(3):
        step[p] = orth[p, 2] / n2
    for a in range(m_img):
        r2max = radius[a] * radius[a]
        if r2max == 0.0:
            continue
        c0 = int(math.floor(frac[a, 0] * n0))
        c1 = int(math.floor(frac[a, 1] * n1))
        c2 = int(math.floor(frac[a, 2] * n2))
        klo = c2 - half[a, 2]
        khi = c2 + half[a, 2] + 1
        inv_occ = 1.0 / occ_of_image[a] if occ_of_image[a] != 0.0 else 0.0
        for i in range(c0 - half[a, 0], c0 + half[a, 0] + 2):
            d0 = i / n0 - frac[a, 0]
            for j in range(c1 - half[a, 1], c1 + half[a, 1] + 2):
                d1 = j / n1 - frac[a, 1]
                for p in range(3):
                    rb[p] = orth[p, 0] * d0 + orth[p, 1] * d1 - orth[p, 2] * frac[a, 2]
                k0, k1 = _row_range(rb, step, r2max, klo, khi)
                if k1 < k0:
                    continue
                _row_recurrence(coef[a], minv[a], rb, step, k0, val, ratio, mult)
                ii = i % n0
                jj = j % n1
                if iso[a] and with_shape:
                    # M⁻¹ = m_g I: per point only Σ ρ_g, Σ ρ_g m_g and Σ ρ_g m_g² are needed
                    for k in range(k0, k1 + 1):
                        s0 = 0.0
                        s1 = 0.0
                        s2 = 0.0
                        for g in range(ng):
                            mg = minv[a, g, 0, 0]
                            s0 += val[g]
                            s1 += val[g] * mg
                            s2 += val[g] * mg * mg
                            val[g] *= ratio[g]
                            ratio[g] *= mult[g]
                        gval = gmap[ii, jj, k % n2] * dvol
                        for p in range(3):
                            r[p] = rb[p] + k * step[p]
                            g_x[a, p] += gval * 2.0 * fpp * s1 * r[p]
                        g_occ[a] += gval * s0 * inv_occ
                        for p in range(3):
                            g_m[a, p, p] -= 0.5 * gval * s1
                            for q_ in range(3):
                                g_m[a, p, q_] += gval * fpp * s2 * r[p] * r[q_]
                    continue
                if iso[a] and not with_shape:
                    for k in range(k0, k1 + 1):
                        acc = 0.0
                        acc0 = 0.0
                        for g in range(ng):
                            acc += val[g] * minv[a, g, 0, 0]
                            acc0 += val[g]
                            val[g] *= ratio[g]
                            ratio[g] *= mult[g]
                        gval = gmap[ii, jj, k % n2] * dvol
                        if with_occ:
                            g_occ[a] += gval * acc0 * inv_occ
                        w = gval * acc * 2.0 * fpp
                        for p in range(3):
                            g_x[a, p] += w * (rb[p] + k * step[p])
                    continue
                for k in range(k0, k1 + 1):
                    gval = gmap[ii, jj, k % n2] * dvol
                    for p in range(3):
                        r[p] = rb[p] + k * step[p]
                    for g in range(ng):
                        w = gval * val[g]
                        val[g] *= ratio[g]
                        ratio[g] *= mult[g]
                        if w == 0.0:
                            continue
                        m = minv[a, g]
                        for p in range(3):
                            mr[p] = m[p, 0] * r[0] + m[p, 1] * r[1] + m[p, 2] * r[2]
                        # ∂ρ/∂x_atom = ρ · 8π² M⁻¹ r (r = x − x_atom)
                        for p in range(3):
                            g_x[a, p] += w * 2.0 * fpp * mr[p]
                        if with_occ:
                            g_occ[a] += w * inv_occ
                        if with_shape:
                            # ∂ρ/∂M = ρ (−½ M⁻¹ + 4π² M⁻¹ r rᵀ M⁻¹)
                            for p in range(3):
                                for q_ in range(3):
                                    g_m[a, p, q_] += w * (-0.5 * m[p, q_] + fpp * mr[p] * mr[q_])
    return g_x, g_occ, g_m


@njit(cache=True, nogil=True)
def _axis_factors(frac, n, length, half_a, m_img, lo_out, fac_out, d_out):
    """Per Gaussian g and grid index i in lo..lo+len: exp(−4π² m_g d_i²), d_i the distance (Å)
    along one axis of an orthogonal cell; returns lo. Filled into fac_out[g, :], d_out[:]."""
    fpp = 4.0 * math.pi * math.pi
    c = int(math.floor(frac * n))
    lo = c - half_a
    for t in range(2 * half_a + 2):
        d = ((lo + t) / n - frac) * length
        d_out[t] = d
        for g in range(m_img.shape[0]):
            fac_out[g, t] = math.exp(-fpp * m_img[g] * d * d)
    lo_out[0] = lo
    return lo


@njit(cache=True, nogil=True)
def _factor_scratch(images, half, ng):
    """Scratch arrays of the factorised kernels, sized for the largest atom box of `images`."""
    hmax = 1
    for t in range(images.shape[0]):
        a = images[t]
        for q in range(3):
            hmax = max(hmax, half[a, q])
    return (np.empty((ng, 2 * hmax + 2)), np.empty((ng, 2 * hmax + 2)), np.empty((ng, 2 * hmax + 2)),
            np.empty(2 * hmax + 2), np.empty(2 * hmax + 2), np.empty(2 * hmax + 2), np.empty(1, dtype=np.int64),
            np.empty(ng))


@njit(cache=True, nogil=True, inline="always")
def _atom_factors(a, frac, minv, half, orth, shape, xy_ortho, m_img, lo, fx, fy, fz, dx, dy, dz):
    """Per image: m_g, the axis factors (z always, x and y on an orthogonal cell), and the first
    grid indices of its box (i0, j0, k0) with the k limits of its rows (klo, khi)."""
    n0, n1, n2 = shape
    for g in range(m_img.shape[0]):
        m_img[g] = minv[a, g, 0, 0]
    if xy_ortho:
        i0 = _axis_factors(frac[a, 0], n0, orth[0, 0], half[a, 0], m_img, lo, fx, dx)
        j0 = _axis_factors(frac[a, 1], n1, orth[1, 1], half[a, 1], m_img, lo, fy, dy)
    else:
        i0 = int(math.floor(frac[a, 0] * n0)) - half[a, 0]
        j0 = int(math.floor(frac[a, 1] * n1)) - half[a, 1]
    k0 = _axis_factors(frac[a, 2], n2, orth[2, 2], half[a, 2], m_img, lo, fz, dz)
    c2 = int(math.floor(frac[a, 2] * n2))
    return i0, j0, k0, c2 - half[a, 2], c2 + half[a, 2] + 1


@njit(cache=True, nogil=True, inline="always")
def _row_weights(coef, m_img, fx, fy, ti, tj, rb, xy_ortho, w):
    """coef_g · exp(−4π² m_g (x² + y²)) of one grid row (x, y = rb[0], rb[1], Å): from the axis
    factors on an orthogonal cell, else one exp per Gaussian."""
    if xy_ortho:
        for g in range(coef.shape[0]):
            w[g] = coef[g] * fx[g, ti] * fy[g, tj]
    else:
        q = -4.0 * math.pi * math.pi * (rb[0] * rb[0] + rb[1] * rb[1])
        for g in range(coef.shape[0]):
            w[g] = coef[g] * math.exp(q * m_img[g])


@njit(cache=True, nogil=True)
def _spread_ortho(grid, images, frac, coef, minv, radius, half, orth, xy_ortho):
    """`_spread` for isotropic images on a cell whose c axis is perpendicular to a and b (the
    grid rows run along c): each Gaussian factorises into exp(−4π²m r_ab²)·exp(−4π²m z²), and on
    an orthogonal cell (`xy_ortho`) further into exp(−4π²m x²)·exp(−4π²m y²). An atom then costs
    one exp per Gaussian per row (hexagonal) or per axis point (orthogonal) instead of three per
    Gaussian per row (rows are short: most of the work was in the exps). The same sphere of
    points as `_spread` (the same row ranges)."""
    n0, n1, n2 = grid.shape
    ng = coef.shape[1]
    fx, fy, fz, dx, dy, dz, lo, m_img = _factor_scratch(images, half, ng)
    w = np.empty(ng)
    step = np.zeros(3)
    step[2] = orth[2, 2] / n2
    rb = np.empty(3)
    for t in range(images.shape[0]):
        a = images[t]
        r2max = radius[a] * radius[a]
        if r2max == 0.0:
            continue
        i0, j0, k0_all, klo, khi = _atom_factors(a, frac, minv, half, orth, (n0, n1, n2), xy_ortho, m_img, lo,
                                                  fx, fy, fz, dx, dy, dz)
        for ti in range(2 * half[a, 0] + 2):
            for tj in range(2 * half[a, 1] + 2):
                if xy_ortho:
                    rb[0] = dx[ti]
                    rb[1] = dy[tj]
                else:
                    d0 = (i0 + ti) / n0 - frac[a, 0]
                    d1 = (j0 + tj) / n1 - frac[a, 1]
                    rb[0] = orth[0, 0] * d0 + orth[0, 1] * d1
                    rb[1] = orth[1, 1] * d1
                rb[2] = -orth[2, 2] * frac[a, 2]
                k0, k1 = _row_range(rb, step, r2max, klo, khi)
                if k1 < k0:
                    continue
                _row_weights(coef[a], m_img, fx, fy, ti, tj, rb, xy_ortho, w)
                ii = (i0 + ti) % n0
                jj = (j0 + tj) % n1
                for k in range(k0, k1 + 1):
                    tk = k - k0_all
                    tot = 0.0
                    for g in range(ng):
                        tot += w[g] * fz[g, tk]
                    grid[ii, jj, k % n2] += tot
    return grid


@njit(cache=True, nogil=True)
def _gather_ortho(gmap, images, frac, coef, minv, radius, half, orth, xy_ortho, occ_of_image, dvol, with_shape,
                  with_occ, g_x, g_occ, g_m, offset):
    """`_gather` for isotropic images on a cell with c perpendicular to a and b (factorised
    Gaussians, as in `_spread_ortho`); adds into g_x, g_occ, g_m at rows image − offset."""
    n0, n1, n2 = gmap.shape
    ng = coef.shape[1]
    fpp = 4.0 * math.pi * math.pi
    fx, fy, fz, dx, dy, dz, lo, m_img = _factor_scratch(images, half, ng)
    w = np.empty(ng)
    wm = np.empty(ng)
    step = np.zeros(3)
    step[2] = orth[2, 2] / n2
    rb = np.empty(3)
    for t in range(images.shape[0]):
        a = images[t]
        r2max = radius[a] * radius[a]
        if r2max == 0.0:
            continue
        inv_occ = 1.0 / occ_of_image[a] if occ_of_image[a] != 0.0 else 0.0
        i0, j0, k0_all, klo, khi = _atom_factors(a, frac, minv, half, orth, (n0, n1, n2), xy_ortho, m_img, lo,
                                                  fx, fy, fz, dx, dy, dz)
        gx0 = gx1 = gx2 = go = 0.0
        m00 = m11 = m22 = m01 = m02 = m12 = 0.0
        for ti in range(2 * half[a, 0] + 2):
            for tj in range(2 * half[a, 1] + 2):
                if xy_ortho:
                    rb[0] = dx[ti]
                    rb[1] = dy[tj]
                else:
                    d0 = (i0 + ti) / n0 - frac[a, 0]
                    d1 = (j0 + tj) / n1 - frac[a, 1]
                    rb[0] = orth[0, 0] * d0 + orth[0, 1] * d1
                    rb[1] = orth[1, 1] * d1
                rb[2] = -orth[2, 2] * frac[a, 2]
                x = rb[0]
                y = rb[1]
                k0, k1 = _row_range(rb, step, r2max, klo, khi)
                if k1 < k0:
                    continue
                _row_weights(coef[a], m_img, fx, fy, ti, tj, rb, xy_ortho, w)
                for g in range(ng):
                    wm[g] = w[g] * m_img[g]
                ii = (i0 + ti) % n0
                jj = (j0 + tj) % n1
                for k in range(k0, k1 + 1):
                    tk = k - k0_all
                    z = dz[tk]
                    gval = gmap[ii, jj, k % n2] * dvol
                    s1 = 0.0
                    for g in range(ng):
                        s1 += wm[g] * fz[g, tk]
                    # ∂ρ/∂x_atom = 8π² Σ_g m_g ρ_g r (r = x − x_atom)
                    c = gval * 2.0 * fpp * s1
                    gx0 += c * x
                    gx1 += c * y
                    gx2 += c * z
                    if not (with_occ or with_shape):  # coordinate refinement: positions only
                        continue
                    s0 = 0.0
                    s2 = 0.0
                    for g in range(ng):
                        v = w[g] * fz[g, tk]
                        s0 += v
                        s2 += v * m_img[g] * m_img[g]
                    if with_occ:
                        go += gval * s0 * inv_occ
                    if with_shape:
                        # ∂ρ/∂M = Σ_g ρ_g (−½ m_g I + 4π² m_g² r rᵀ)
                        d = -0.5 * gval * s1
                        e = gval * fpp * s2
                        m00 += d + e * x * x
                        m11 += d + e * y * y
                        m22 += d + e * z * z
                        m01 += e * x * y
                        m02 += e * x * z
                        m12 += e * y * z
        r = a - offset
        g_x[r, 0] += gx0
        g_x[r, 1] += gx1
        g_x[r, 2] += gx2
        g_occ[r] += go
        g_m[r, 0, 0] += m00
        g_m[r, 1, 1] += m11
        g_m[r, 2, 2] += m22
        g_m[r, 0, 1] += m01
        g_m[r, 1, 0] += m01
        g_m[r, 0, 2] += m02
        g_m[r, 2, 0] += m02
        g_m[r, 1, 2] += m12
        g_m[r, 2, 1] += m12


def _is_orthogonal(orth: np.ndarray) -> bool:
    return bool(np.all(np.abs(orth - np.diag(np.diag(orth))) <= 1e-9 * np.abs(np.diag(orth)).max()))


def _c_perpendicular(orth: np.ndarray) -> bool:
    """c ⟂ a and b (α = β = 90°: orthorhombic, tetragonal, hexagonal, cubic cells, cryo-EM
    boxes): the factorised kernels apply. (gemmi's orthogonalisation puts a along x and b in
    the xy plane, so then c lies along z.)"""
    scale = np.abs(np.diag(orth)).max()
    return bool(abs(orth[0, 2]) <= 1e-9 * scale and abs(orth[1, 2]) <= 1e-9 * scale
                and np.all(np.abs(np.tril(orth, -1)) <= 1e-9 * scale))


def _chunks(n: int, n_chunks: int):
    edges = np.linspace(0, n, n_chunks + 1).astype(int)
    return [slice(edges[i], edges[i + 1]) for i in range(n_chunks) if edges[i + 1] > edges[i]]


@dataclass
class _Prepared:
    frac: np.ndarray
    coef: np.ndarray
    minv: np.ndarray
    radius: np.ndarray
    half: np.ndarray
    rc: np.ndarray
    atom: np.ndarray
    iso: np.ndarray  # per image: every Gaussian's M is a multiple of the identity


def _prepare(sc: Scatterers, shape, b_add: float, cutoff: float) -> _Prepared:
    frac, u_img, rc, atom = _images(sc)
    coef, minv, radius, half = _gaussians(sc, u_img, atom, b_add, shape, cutoff)
    diag = minv[:, :, 0, 0]
    iso = np.all(np.abs(minv - diag[:, :, None, None] * np.eye(3)) <= 1e-12 * np.abs(diag)[:, :, None, None],
                 axis=(1, 2, 3))
    return _Prepared(np.ascontiguousarray(frac), coef, np.ascontiguousarray(minv), radius, half, rc, atom, iso)


def atom_density_grid(sc: Scatterers, shape, b_add: float = 0.0, cutoff: float = 1e-6, threads: int | None = None,
                      prepared: _Prepared | None = None, dtype=np.float64) -> np.ndarray:
    """Electron (or electrostatic-potential) density of all symmetry images on the cell grid (e/Å³)."""
    threads = kernel_threads(threads)
    p = prepared or _prepare(sc, shape, b_add, cutoff)
    parts = _chunks(len(p.frac), max(1, threads))

    ortho = _c_perpendicular(sc.orth_matrix) and FACTORISED_KERNELS
    xy_ortho = _is_orthogonal(sc.orth_matrix)

    def run(sl):
        g = np.zeros(shape, dtype=dtype)
        if not ortho:
            return _spread(g, p.frac[sl], p.coef[sl], p.minv[sl], p.radius[sl], p.half[sl], sc.orth_matrix)
        images = np.arange(sl.start, sl.stop)
        iso = p.iso[sl]
        _spread_ortho(g, images[iso], p.frac, p.coef, p.minv, p.radius, p.half, sc.orth_matrix, xy_ortho)
        rest = images[~iso]
        if len(rest):
            _spread(g, p.frac[rest], p.coef[rest], p.minv[rest], p.radius[rest], p.half[rest], sc.orth_matrix)
        return g

    if len(parts) == 1:
        return run(parts[0])
    with ThreadPoolExecutor(len(parts)) as ex:
        grids = list(ex.map(run, parts))
    total = grids.pop()
    while grids:
        total += grids.pop()  # in place: one grid of memory per thread, no extra sum array
    return total


def _miller_to_rfft(hkl: np.ndarray, shape):
    """Indices into an rfftn array for each h, and whether F(h) is the conjugate of the entry."""
    hkl = np.asarray(hkl, dtype=np.int64)
    neg = hkl[:, 2] < 0
    h = np.where(neg[:, None], -hkl, hkl)
    return (h[:, 0] % shape[0], h[:, 1] % shape[1], h[:, 2]), neg


def fft_structure_factors(sc: Scatterers, hkl: np.ndarray, d_min: float | None = None, rate: float = 1.5,
                          cutoff: float = 1e-6, threads: int | None = None) -> np.ndarray:
    """F(h) at Miller indices hkl by the FFT route (complex)."""
    threads = kernel_threads(threads)
    cell = _cell(sc)
    if d_min is None:
        d_min = _d_min(sc, hkl)
    shape = grid_shape(cell, None if len(sc.rot) == 1 else _sg_placeholder(sc), d_min, rate)
    b_add = choose_blur(sc, shape, d_min)
    rho = atom_density_grid(sc, shape, b_add, cutoff, threads)
    spectrum = scipy.fft.rfftn(rho, workers=threads)
    idx, neg = _miller_to_rfft(hkl, shape)
    vals = spectrum[idx]
    f = np.where(neg, vals, np.conj(vals)) * (cell.volume / rho.size)
    s2 = _s2(sc, hkl)
    return f * np.exp(b_add * s2 / 4.0)


def fft_gradient(sc: Scatterers, hkl: np.ndarray, dtarget_df: np.ndarray, d_min: float | None = None,
                 rate: float = 1.5, cutoff: float = 1e-6, threads: int | None = None) -> StructureFactorGradient:
    """Gradient of a target with respect to coordinates, B, occupancy and U by the FFT route."""
    threads = kernel_threads(threads)
    cell = _cell(sc)
    if d_min is None:
        d_min = _d_min(sc, hkl)
    shape = grid_shape(cell, None if len(sc.rot) == 1 else _sg_placeholder(sc), d_min, rate)
    b_add = choose_blur(sc, shape, d_min)
    # g(x_j) = Re Σ_h conj(D'(h)) e^{2πi h·j/n} = Re(N · ifftn(C))[j], C[h] = conj(D'(h))
    spec = np.zeros(shape, dtype=np.complex128)
    h = np.asarray(hkl, dtype=np.int64)
    d_unblur = np.asarray(dtarget_df) * np.exp(b_add * _s2(sc, hkl) / 4.0)
    np.add.at(spec, (h[:, 0] % shape[0], h[:, 1] % shape[1], h[:, 2] % shape[2]), np.conj(d_unblur))
    gmap = np.ascontiguousarray(np.real(scipy.fft.ifftn(spec, workers=threads)) * spec.size)
    return gather_gradient(sc, gmap, b_add, cell.volume / gmap.size, cutoff, threads)


def gather_gradient(sc: Scatterers, gmap: np.ndarray, b_add: float, dvol: float, cutoff: float = 1e-6,
                    threads: int | None = None, prepared: _Prepared | None = None,
                    positions_only: bool = False, with_adp: bool = True) -> StructureFactorGradient:
    """∂T/∂p = Σ_grid gmap · ∂ρ_blur/∂p · dvol for every scatterer (ρ_blur spread with `b_add`);
    with `positions_only` the B, U and occupancy parts are zero (not computed); with `with_adp`
    False only the B and U parts are."""
    threads = kernel_threads(threads)
    shape = gmap.shape
    gmap = np.ascontiguousarray(gmap)
    p = prepared or _prepare(sc, shape, b_add, cutoff)
    occ_img = sc.occ[p.atom]
    parts = _chunks(len(p.frac), max(1, threads))

    ortho = _c_perpendicular(sc.orth_matrix) and FACTORISED_KERNELS
    xy_ortho = _is_orthogonal(sc.orth_matrix)
    with_shape, with_occ = not positions_only and with_adp, not positions_only

    def run(sl):
        if not ortho:
            return _gather(gmap, p.frac[sl], p.coef[sl], p.minv[sl], p.radius[sl], p.half[sl], sc.orth_matrix,
                           occ_img[sl], dvol, with_shape, p.iso[sl], with_occ)
        n = sl.stop - sl.start
        g_x, g_occ, g_m = np.zeros((n, 3)), np.zeros(n), np.zeros((n, 3, 3))
        images = np.arange(sl.start, sl.stop)
        iso = p.iso[sl]
        # the kernel indexes the whole arrays by image and writes rows image − start
        _gather_ortho(gmap, images[iso], p.frac, p.coef, p.minv, p.radius, p.half, sc.orth_matrix, xy_ortho, occ_img,
                      dvol, with_shape, with_occ, g_x, g_occ, g_m, sl.start)
        rest = images[~iso]
        if len(rest):
            r = _gather(gmap, p.frac[rest], p.coef[rest], p.minv[rest], p.radius[rest], p.half[rest], sc.orth_matrix,
                        occ_img[rest], dvol, with_shape, p.iso[rest], with_occ)
            g_x[rest - sl.start], g_occ[rest - sl.start], g_m[rest - sl.start] = r
        return g_x, g_occ, g_m

    if len(parts) == 1:  # single-threaded (batch members): no pool to start
        res = [run(parts[0])]
    else:
        with ThreadPoolExecutor(len(parts)) as ex:
            res = list(ex.map(run, parts))
    g_x = np.concatenate([r[0] for r in res])
    g_occ = np.concatenate([r[1] for r in res])
    g_m = np.concatenate([r[2] for r in res])
    n = len(sc)
    # one image per atom, unrotated (a P 1 box, or the asymmetric unit of CrystalStructureFactors):
    # the images' gradients are the atoms' (the general route's einsums and scatters cost ~10 ms
    # an evaluation on 18,000 atoms)
    identity = len(sc.rot) == 1 and np.array_equal(sc.rot[0], np.eye(3))
    # back to the original atom: x_img = Rc x + t → ∂T/∂x = Rcᵀ ∂T/∂x_img; U_img = Rc U Rcᵀ
    if identity:
        gx_atom = g_x
    else:
        gx_atom = np.zeros((n, 3))
        np.add.at(gx_atom, p.atom, np.einsum("aji,aj->ai", p.rc, g_x))
    if positions_only:
        return StructureFactorGradient(xyz=gx_atom, b_iso=np.zeros(n), occ=np.zeros(n), u=np.zeros((n, 6)))
    if not with_shape:
        gu = np.zeros((n, 3, 3))
    elif identity:
        gu = 8 * np.pi ** 2 * g_m
    else:
        gu = np.zeros((n, 3, 3))
        np.add.at(gu, p.atom, 8 * np.pi ** 2 * np.einsum("aji,ajk,akl->ail", p.rc, g_m, p.rc))
    g_occ_atom = g_occ if identity else np.bincount(p.atom, weights=g_occ, minlength=n)
    g_u6 = np.stack([gu[:, 0, 0], gu[:, 1, 1], gu[:, 2, 2], 2 * gu[:, 0, 1], 2 * gu[:, 0, 2], 2 * gu[:, 1, 2]], 1)
    g_b = np.trace(gu, axis1=1, axis2=2) / (8 * np.pi ** 2)
    return StructureFactorGradient(xyz=gx_atom, b_iso=g_b, occ=g_occ_atom, u=g_u6)


def _cell(sc: Scatterers) -> gemmi.UnitCell:
    O = sc.orth_matrix
    a, b, c = (np.linalg.norm(O[:, i]) for i in range(3))
    alpha = math.degrees(math.acos(O[:, 1] @ O[:, 2] / (b * c)))
    beta = math.degrees(math.acos(O[:, 0] @ O[:, 2] / (a * c)))
    gamma = math.degrees(math.acos(O[:, 0] @ O[:, 1] / (a * b)))
    return gemmi.UnitCell(a, b, c, alpha, beta, gamma)


def _sg_placeholder(sc: Scatterers) -> gemmi.SpaceGroup:
    """The space group whose operators the scatterers carry (found from the operator set)."""
    ops = gemmi.GroupOps([gemmi.Op(_op_triplet(R, t)) for R, t in zip(sc.rot, sc.trans)])
    sg = gemmi.find_spacegroup_by_ops(ops)
    return sg if sg is not None else gemmi.SpaceGroup("P 1")


def _op_triplet(R, t) -> str:
    axes = "xyz"
    parts = []
    for i in range(3):
        terms = []
        for j in range(3):
            v = int(round(R[i, j]))
            if v:
                terms.append(("+" if v > 0 else "-") + axes[j])
        frac = t[i] % 1.0
        if frac > 1e-9:
            num = int(round(frac * 12))
            terms.append(f"+{num}/12")
        parts.append("".join(terms).lstrip("+"))
    return ",".join(parts)


def _s2(sc: Scatterers, hkl: np.ndarray) -> np.ndarray:
    s = np.asarray(hkl, dtype=np.float64) @ sc.frac_matrix
    return (s * s).sum(axis=1)


def _d_min(sc: Scatterers, hkl: np.ndarray) -> float:
    return float(1.0 / np.sqrt(_s2(sc, hkl).max()))
