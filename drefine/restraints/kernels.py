"""Numba kernels: value and gradient of each geometry restraint term.

Every term is a sum of squared normalised deviations, Σ ((x − x_ideal)/σ)², with x the bond
length (Å), angle (rad), periodic torsion deviation (rad), chiral volume (Å³) or distance of
an atom to its least-squares plane (Å). Gradients are exact (checked against central finite
differences in the tests). Each kernel adds its gradient into `grad` (N×3) and returns the term.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def bond_term(xyz, atoms, ideal, sigma, grad):
    f = 0.0
    for k in range(atoms.shape[0]):
        i, j = atoms[k, 0], atoms[k, 1]
        dx = xyz[i, 0] - xyz[j, 0]
        dy = xyz[i, 1] - xyz[j, 1]
        dz = xyz[i, 2] - xyz[j, 2]
        d = math.sqrt(dx * dx + dy * dy + dz * dz)
        w = 1.0 / (sigma[k] * sigma[k])
        diff = d - ideal[k]
        f += w * diff * diff
        if d > 0.0:
            g = 2.0 * w * diff / d
            grad[i, 0] += g * dx
            grad[i, 1] += g * dy
            grad[i, 2] += g * dz
            grad[j, 0] -= g * dx
            grad[j, 1] -= g * dy
            grad[j, 2] -= g * dz
    return f


@njit(cache=True, nogil=True, inline="always")
def _add3(grad, i, s, x, y, z):
    """grad[i] += s · (x, y, z), in scalars (the kernels below accumulate this way)."""
    grad[i, 0] += s * x
    grad[i, 1] += s * y
    grad[i, 2] += s * z


@njit(cache=True, nogil=True)
def angle_term(xyz, atoms, ideal, sigma, grad):
    f = 0.0
    for k in range(atoms.shape[0]):
        i, j, m = atoms[k, 0], atoms[k, 1], atoms[k, 2]
        ux, uy, uz = xyz[i, 0] - xyz[j, 0], xyz[i, 1] - xyz[j, 1], xyz[i, 2] - xyz[j, 2]
        vx, vy, vz = xyz[m, 0] - xyz[j, 0], xyz[m, 1] - xyz[j, 1], xyz[m, 2] - xyz[j, 2]
        uu = ux * ux + uy * uy + uz * uz
        vv = vx * vx + vy * vy + vz * vz
        if uu == 0.0 or vv == 0.0:
            continue
        inv_uv = 1.0 / math.sqrt(uu * vv)
        cos_t = (ux * vx + uy * vy + uz * vz) * inv_uv
        cos_t = min(1.0, max(-1.0, cos_t))
        theta = math.acos(cos_t)
        w = 1.0 / (sigma[k] * sigma[k])
        diff = theta - ideal[k]
        f += w * diff * diff
        sin_t = math.sqrt(max(1e-12, 1.0 - cos_t * cos_t))
        # dθ/du = -(v/|v| - cosθ u/|u|) / (|u| sinθ) = -(v/(|u||v|) - cosθ u/|u|²) / sinθ, likewise
        # for v; the divisions are taken once per angle (they were half of the term's time)
        g = 2.0 * w * diff * (-1.0 / sin_t)
        cu, cv = cos_t / uu, cos_t / vv
        dux, duy, duz = vx * inv_uv - cu * ux, vy * inv_uv - cu * uy, vz * inv_uv - cu * uz
        dvx, dvy, dvz = ux * inv_uv - cv * vx, uy * inv_uv - cv * vy, uz * inv_uv - cv * vz
        _add3(grad, i, g, dux, duy, duz)
        _add3(grad, m, g, dvx, dvy, dvz)
        _add3(grad, j, -g, dux + dvx, duy + dvy, duz + dvz)
    return f


@njit(cache=True, nogil=True)
def _dihedral_and_gradient(p0, p1, p2, p3, g0, g1, g2, g3):
    """Dihedral angle (rad, IUPAC sign, as gemmi.calculate_dihedral) and its gradient.

    With F = p0−p1, G = p1−p2, H = p3−p2, A = F×G, B = H×G: φ = atan2((B×A)·G/|G|, A·B), and
    the gradient is the closed form of Blondel & Karplus (1996), J. Comput. Chem. 17, 1132.
    """
    # written out in scalars: numpy temporaries (differences, cross products) cost more than the
    # arithmetic here, and the torsion and Ramachandran terms call this for every dihedral
    fx, fy, fz = p0[0] - p1[0], p0[1] - p1[1], p0[2] - p1[2]
    gx, gy, gz = p1[0] - p2[0], p1[1] - p2[1], p1[2] - p2[2]
    hx, hy, hz = p3[0] - p2[0], p3[1] - p2[1], p3[2] - p2[2]
    ax, ay, az = fy * gz - fz * gy, fz * gx - fx * gz, fx * gy - fy * gx  # A = F × G
    bx, by, bz = hy * gz - hz * gy, hz * gx - hx * gz, hx * gy - hy * gx  # B = H × G
    lg = math.sqrt(gx * gx + gy * gy + gz * gz)
    aa = ax * ax + ay * ay + az * az
    bb = bx * bx + by * by + bz * bz
    if aa < 1e-20 or bb < 1e-20 or lg == 0.0:
        g0[:] = 0.0
        g1[:] = 0.0
        g2[:] = 0.0
        g3[:] = 0.0
        return 0.0
    bax, bay, baz = by * az - bz * ay, bz * ax - bx * az, bx * ay - by * ax  # B × A
    phi = math.atan2((bax * gx + bay * gy + baz * gz) / lg, ax * bx + ay * by + az * bz)
    fg = fx * gx + fy * gy + fz * gz
    hg = hx * gx + hy * gy + hz * gz
    a_ = (ax, ay, az)
    b_ = (bx, by, bz)
    for c in range(3):
        ga = a_[c] / aa
        gb = b_[c] / bb
        g0[c] = -lg * ga
        g3[c] = lg * gb
        g1[c] = lg * ga + fg / lg * ga - hg / lg * gb
        g2[c] = -lg * gb - fg / lg * ga + hg / lg * gb
    return phi


@njit(cache=True, nogil=True)
def torsion_term(xyz, atoms, ideal, sigma, period, grad):
    f = 0.0
    g0 = np.empty(3)
    g1 = np.empty(3)
    g2 = np.empty(3)
    g3 = np.empty(3)
    for k in range(atoms.shape[0]):
        a, b, c, d = atoms[k, 0], atoms[k, 1], atoms[k, 2], atoms[k, 3]
        phi = _dihedral_and_gradient(xyz[a], xyz[b], xyz[c], xyz[d], g0, g1, g2, g3)
        per = 2.0 * math.pi / period[k]
        diff = (phi - ideal[k] + 0.5 * per) % per - 0.5 * per
        w = 1.0 / (sigma[k] * sigma[k])
        f += w * diff * diff
        g = 2.0 * w * diff
        for q in range(3):
            grad[a, q] += g * g0[q]
            grad[b, q] += g * g1[q]
            grad[c, q] += g * g2[q]
            grad[d, q] += g * g3[q]
    return f


@njit(cache=True, nogil=True)
def chiral_term(xyz, atoms, ideal, sigma, both, grad):
    # in scalars: three np.cross temporaries per centre cost more than the arithmetic
    f = 0.0
    for k in range(atoms.shape[0]):
        o, i, j, m = atoms[k, 0], atoms[k, 1], atoms[k, 2], atoms[k, 3]
        ax, ay, az = xyz[i, 0] - xyz[o, 0], xyz[i, 1] - xyz[o, 1], xyz[i, 2] - xyz[o, 2]
        bx, by, bz = xyz[j, 0] - xyz[o, 0], xyz[j, 1] - xyz[o, 1], xyz[j, 2] - xyz[o, 2]
        cx, cy, cz = xyz[m, 0] - xyz[o, 0], xyz[m, 1] - xyz[o, 1], xyz[m, 2] - xyz[o, 2]
        bcx, bcy, bcz = by * cz - bz * cy, bz * cx - bx * cz, bx * cy - by * cx  # b × c
        cax, cay, caz = cy * az - cz * ay, cz * ax - cx * az, cx * ay - cy * ax  # c × a
        abx, aby, abz = ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx  # a × b
        vol = ax * bcx + ay * bcy + az * bcz
        target = ideal[k]
        if both[k] and vol * target < 0.0:
            target = -target
        w = 1.0 / (sigma[k] * sigma[k])
        diff = vol - target
        f += w * diff * diff
        g = 2.0 * w * diff
        _add3(grad, i, g, bcx, bcy, bcz)
        _add3(grad, j, g, cax, cay, caz)
        _add3(grad, m, g, abx, aby, abz)
        _add3(grad, o, -g, bcx + cax + abx, bcy + cay + aby, bcz + caz + abz)
    return f


@njit(cache=True, nogil=True)
def smallest_eigenvector_sym3(a00, a01, a02, a11, a12, a22):
    """Unit eigenvector of the smallest eigenvalue of a symmetric 3×3 matrix, in closed form.

    LAPACK's eigh through numba costs ~2 µs a call and allocates; a plane term calls it once per
    plane per evaluation (thousands of planes), so this was half of the geometry target's time.
    Eigenvalues by the trigonometric formula (Smith 1961); the eigenvector is the longest cross
    product of two rows of A − λI. Returns (0, 0, 0) when the smallest eigenvalue is not simple
    (collinear or coincident points): the caller then falls back to eigh.
    """
    a00, a01, a02, a11, a12, a22 = float(a00), float(a01), float(a02), float(a11), float(a12), float(a22)
    q = (a00 + a11 + a22) / 3.0
    b00, b11, b22 = a00 - q, a11 - q, a22 - q
    p1 = a01 * a01 + a02 * a02 + a12 * a12
    p = math.sqrt((b00 * b00 + b11 * b11 + b22 * b22 + 2.0 * p1) / 6.0)
    if p == 0.0:
        return 0.0, 0.0, 0.0
    det = b00 * (b11 * b22 - a12 * a12) - a01 * (a01 * b22 - a12 * a02) + a02 * (a01 * a12 - b11 * a02)
    r = min(max(det / (2.0 * p * p * p), -1.0), 1.0)
    lam = q + 2.0 * p * math.cos(math.acos(r) / 3.0 + 2.0 * math.pi / 3.0)
    r0x, r0y, r0z = a00 - lam, a01, a02
    r1x, r1y, r1z = a01, a11 - lam, a12
    r2x, r2y, r2z = a02, a12, a22 - lam
    best_x, best_y, best_z, best = 0.0, 0.0, 0.0, 0.0
    for ux, uy, uz, vx, vy, vz in ((r0x, r0y, r0z, r1x, r1y, r1z), (r0x, r0y, r0z, r2x, r2y, r2z),
                                   (r1x, r1y, r1z, r2x, r2y, r2z)):
        cx, cy, cz = uy * vz - uz * vy, uz * vx - ux * vz, ux * vy - uy * vx
        n2 = cx * cx + cy * cy + cz * cz
        if n2 > best:
            best_x, best_y, best_z, best = cx, cy, cz, n2
    # a simple smallest eigenvalue leaves A − λI of rank 2: some cross product is of order p⁴
    if best <= 1e-20 * p * p * p * p:
        return 0.0, 0.0, 0.0
    n = math.sqrt(best)
    return best_x / n, best_y / n, best_z / n


@njit(cache=True, nogil=True)
def plane_normal(xyz, atoms, start, stop):
    """Centroid (cx, cy, cz) and unit normal (nx, ny, nz) of the least-squares plane through
    atoms[start:stop], as scalars (two small arrays per plane were half of the plane term's time)."""
    n = stop - start
    cx = cy = cz = 0.0
    for k in range(start, stop):
        i = atoms[k]
        cx += xyz[i, 0]
        cy += xyz[i, 1]
        cz += xyz[i, 2]
    cx /= n
    cy /= n
    cz /= n
    c00 = c01 = c02 = c11 = c12 = c22 = 0.0
    for k in range(start, stop):
        i = atoms[k]
        dx, dy, dz = xyz[i, 0] - cx, xyz[i, 1] - cy, xyz[i, 2] - cz
        c00 += dx * dx
        c01 += dx * dy
        c02 += dx * dz
        c11 += dy * dy
        c12 += dy * dz
        c22 += dz * dz
    nx, ny, nz = smallest_eigenvector_sym3(c00, c01, c02, c11, c12, c22)
    if nx == 0.0 and ny == 0.0 and nz == 0.0:
        cov = np.array([[c00, c01, c02], [c01, c11, c12], [c02, c12, c22]])
        _, vecs = np.linalg.eigh(cov)
        nx, ny, nz = vecs[0, 0], vecs[1, 0], vecs[2, 0]
    return cx, cy, cz, nx, ny, nz


@njit(cache=True, nogil=True)
def plane_term(xyz, atoms, start, sigma, grad):
    """Σ over planes of Σ_i (n·(x_i − c)/σ)² with (c, n) the least-squares plane.

    The plane minimises the sum, so by the envelope theorem its own dependence on the
    coordinates drops out of the gradient: ∂/∂x_i = 2 d_i n / σ², exact.
    """
    f = 0.0
    for p in range(start.shape[0] - 1):
        s, e = start[p], start[p + 1]
        if e - s < 3:
            continue
        cx, cy, cz, nx, ny, nz = plane_normal(xyz, atoms, s, e)
        w = 1.0 / (sigma[p] * sigma[p])
        for k in range(s, e):
            i = atoms[k]
            d = (xyz[i, 0] - cx) * nx + (xyz[i, 1] - cy) * ny + (xyz[i, 2] - cz) * nz
            f += w * d * d
            _add3(grad, i, 2.0 * w * d, nx, ny, nz)
    return f
