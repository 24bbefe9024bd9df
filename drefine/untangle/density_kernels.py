"""Numba kernels of the density half of divide and concur, one atom at a time.

Each atom j carries density variables ρ_j(s, h) for every symmetry operator s and used
reflection h. On the concur manifold they are m_j(s, h; r) = a_j(h) exp(2πi h·(R_s F r + t_s)).
For one atom the kernel does the whole concur-and-update of an RRR step in one pass over its row
(ops × reflections), so the atoms × reflections array is read and written once per iteration and
never copied:

1. ρ̃ = 2 P_D(ρ) − ρ = ρ + 2 p_j c(h) (the structure-factor projection adds p_j c(h) to every
   variable of a reflection, c = (F − Σ p ρ)/Σ p²: see `projections.project_structure_factor`);
2. the position r minimising Σ_c η_c |r_c − r|² + g Σ w_h |ρ̃ − m(r)|² by Gauss–Newton steps in the
   tangent space (∂m/∂r = i q m, q = 2π h R_s F). |m|² = a² does not depend on r, so the normal
   matrix η I + g Σ w a² q qᵀ is fixed per atom (`density_normal_matrices`); each step needs only
   the right-hand side Σ η (r_c − r) + g Σ w a Im(conj(e) ρ̃) q;
3. the RRR update ρ ← ρ + β (m(r) − P_D(ρ)), with the gap |m(r) − P_D(ρ)|² (metric g w) and the
   sums Σ p m(r) (the model's structure factor) and Σ p ρ (for the next projection).

Phase factors are products of per-axis tables exp(2πi h x_s), exp(2πi k y_s), exp(2πi l z_s)
(x_s the fractional image position), built by recurrence. Reflections are walked in runs of
consecutive l at fixed (h, k) (`reflection_runs`; sorted reflections give long runs): within a run
the phase factor is one complex product of the run's exp(2πi(h x + k y)) with a contiguous slice
of the l table, and the h and k parts of the gradient sum are taken once per run. Atoms are spread over threads in blocks,
each block with its own per-reflection sums, so results do not depend on the thread count's
scheduling (the block partition is fixed by `n_blocks`).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

TWO_PI = 2.0 * math.pi


@njit(cache=True, nogil=True)
def _axis_tables(xs, lo, n_axis, out):
    """out[a, i] = exp(2πi (lo[a] + i) xs[a]) for the three axes."""
    for a in range(3):
        step = complex(math.cos(TWO_PI * xs[a]), math.sin(TWO_PI * xs[a]))
        ph = TWO_PI * lo[a] * xs[a]
        v = complex(math.cos(ph), math.sin(ph))
        for i in range(n_axis[a]):
            out[a, i] = v
            v *= step
            if i % 16 == 15:  # re-anchor now and then: the recurrence's rounding grows with length
                ph = TWO_PI * (lo[a] + i + 1) * xs[a]
                v = complex(math.cos(ph), math.sin(ph))


@njit(cache=True, nogil=True)
def _image_frac(r, fmat, rot, trans, s, out):
    """Fractional coordinates of symmetry image s of Cartesian position r."""
    f0 = fmat[0, 0] * r[0] + fmat[0, 1] * r[1] + fmat[0, 2] * r[2]
    f1 = fmat[1, 0] * r[0] + fmat[1, 1] * r[1] + fmat[1, 2] * r[2]
    f2 = fmat[2, 0] * r[0] + fmat[2, 1] * r[1] + fmat[2, 2] * r[2]
    for a in range(3):
        out[a] = rot[s, a, 0] * f0 + rot[s, a, 1] * f1 + rot[s, a, 2] * f2 + trans[s, a]


@njit(cache=True, nogil=True)
def _solve3(m, b):
    """x = m⁻¹ b for a symmetric positive definite 3×3 m (Cramer's rule)."""
    c00 = m[1, 1] * m[2, 2] - m[1, 2] * m[2, 1]
    c01 = m[1, 2] * m[2, 0] - m[1, 0] * m[2, 2]
    c02 = m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0]
    det = m[0, 0] * c00 + m[0, 1] * c01 + m[0, 2] * c02
    c10 = m[0, 2] * m[2, 1] - m[0, 1] * m[2, 2]
    c11 = m[0, 0] * m[2, 2] - m[0, 2] * m[2, 0]
    c12 = m[0, 1] * m[2, 0] - m[0, 0] * m[2, 1]
    c20 = m[0, 1] * m[1, 2] - m[0, 2] * m[1, 1]
    c21 = m[0, 2] * m[1, 0] - m[0, 0] * m[1, 2]
    c22 = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    x = np.empty(3)
    x[0] = (c00 * b[0] + c10 * b[1] + c20 * b[2]) / det
    x[1] = (c01 * b[0] + c11 * b[1] + c21 * b[2]) / det
    x[2] = (c02 * b[0] + c12 * b[1] + c22 * b[2]) / det
    return x


def reflection_runs(hkl: np.ndarray) -> np.ndarray:
    """Runs of consecutive entries with equal (h, k) and l rising by one: (n_runs, 5) int64 rows of
    (first index, length, h, k, first l). Any order is valid; sorted by (h, k, l) gives long runs."""
    hkl = np.asarray(hkl, dtype=np.int64)
    if len(hkl) == 0:
        return np.zeros((0, 5), dtype=np.int64)
    new = np.ones(len(hkl), dtype=bool)
    new[1:] = (hkl[1:, 0] != hkl[:-1, 0]) | (hkl[1:, 1] != hkl[:-1, 1]) | (hkl[1:, 2] != hkl[:-1, 2] + 1)
    start = np.flatnonzero(new)
    length = np.diff(np.append(start, len(hkl)))
    return np.stack([start, length, hkl[start, 0], hkl[start, 1], hkl[start, 2]], axis=1)


@njit(cache=True, nogil=True)
def _op_tables(r, lo, n_axis, fmat, rot, trans, tables, xs):
    """tables[s] = the per-axis phase tables of symmetry image s of Cartesian position r."""
    for s in range(tables.shape[0]):
        _image_frac(r, fmat, rot, trans, s, xs)
        _axis_tables(xs, lo, n_axis, tables[s])


@njit(cache=True, nogil=True)
def _values_row(r, amp_j, runs, lo, n_axis, fmat, rot, trans, out_row, weight, tables, xs, ehk):
    """out_row[s, i] += weight · m_j(s, h_i; r)."""
    n_ops = out_row.shape[0]
    _op_tables(r, lo, n_axis, fmat, rot, trans, tables, xs)
    for q in range(runs.shape[0]):
        i0, n, l0 = runs[q, 0], runs[q, 1], runs[q, 4] - lo[2]
        for s in range(n_ops):
            ehk[s] = weight * tables[s, 0, runs[q, 2] - lo[0]] * tables[s, 1, runs[q, 3] - lo[1]]
        for t in range(n):
            a = amp_j[i0 + t]
            for s in range(n_ops):
                out_row[s, i0 + t] += a * (ehk[s] * tables[s, 2, l0 + t])


@njit(cache=True, nogil=True)
def _concur_atom(row, amp_j, p_j, c, w, g, beta, runs, lo, n_axis, fmat, rot, trans, q_mats, normal_j,
                 rsum_j, eta_j, start_j, steps, f_model, s_new, tables, xs, ehk, reflect, update):
    """Concur and RRR-update one atom's row (n_ops, n_refl) in place, Gauss–Newton from start_j;
    returns (r, gap²). The concur sees ρ + reflect·p·c: reflect = 2 for the RRR step (2 P_D − x),
    1 for the concur of P_D(x) itself (the solution estimate; then update=False: nothing written).
    Operators are the innermost loop, so per-reflection arrays (c, w, a, the sums) are touched once
    per reflection, not once per operator."""
    n_ops = row.shape[0]
    r = start_j.copy()
    mat = np.empty((3, 3))
    for a in range(3):
        for b in range(3):
            mat[a, b] = g * normal_j[a, b] + (eta_j if a == b else 0.0)
    acc = np.empty((n_ops, 3))
    sv = np.empty(n_ops)
    sl = np.empty(n_ops)
    rhs = np.empty(3)
    pc = reflect * p_j
    for _ in range(steps):
        _op_tables(r, lo, n_axis, fmat, rot, trans, tables, xs)
        acc[:] = 0.0
        for q in range(runs.shape[0]):
            i0, n, l0 = runs[q, 0], runs[q, 1], runs[q, 4] - lo[2]
            for s in range(n_ops):
                ehk[s] = tables[s, 0, runs[q, 2] - lo[0]] * tables[s, 1, runs[q, 3] - lo[1]]
                sv[s] = 0.0
                sl[s] = 0.0
            for t in range(n):
                i = i0 + t
                wa = w[i] * amp_j[i]
                zc = pc * c[i]
                for s in range(n_ops):
                    e = ehk[s] * tables[s, 2, l0 + t]
                    z = complex(row[s, i]) + zc
                    v = wa * (e.real * z.imag - e.imag * z.real)  # Im(conj(e) z)
                    sv[s] += v
                    sl[s] += v * t
            for s in range(n_ops):
                acc[s, 0] += sv[s] * runs[q, 2]
                acc[s, 1] += sv[s] * runs[q, 3]
                acc[s, 2] += sv[s] * runs[q, 4] + sl[s]
        for a in range(3):  # q = 2π h R_s F: rhs = Σ η (r_c − r) + g Σ v q
            rhs[a] = rsum_j[a] - eta_j * r[a]
            for s in range(n_ops):
                rhs[a] += g * (acc[s, 0] * q_mats[s, 0, a] + acc[s, 1] * q_mats[s, 1, a] + acc[s, 2] * q_mats[s, 2, a])
        dr = _solve3(mat, rhs)
        for a in range(3):
            r[a] += dr[a]
    gap2 = 0.0
    if not update:
        return r, gap2
    _op_tables(r, lo, n_axis, fmat, rot, trans, tables, xs)
    for q in range(runs.shape[0]):
        i0, n, l0 = runs[q, 0], runs[q, 1], runs[q, 4] - lo[2]
        for s in range(n_ops):
            ehk[s] = tables[s, 0, runs[q, 2] - lo[0]] * tables[s, 1, runs[q, 3] - lo[1]]
        for t in range(n):
            i = i0 + t
            a_i = amp_j[i]
            pc_i = p_j * c[i]
            fm = 0j
            sn = 0j
            g2 = 0.0
            for s in range(n_ops):
                m = a_i * (ehk[s] * tables[s, 2, l0 + t])
                rho = complex(row[s, i])
                d = m - (rho + pc_i)
                g2 += d.real * d.real + d.imag * d.imag
                row[s, i] = rho + beta * d
                fm += m
                sn += complex(row[s, i])  # as stored (single precision rounding included)
            gap2 += g * w[i] * g2
            f_model[i] += p_j * fm
            s_new[i] += p_j * sn
    return r, gap2


@njit(cache=True, nogil=True)
def _thread_scratch(n_ops, n_tab):
    """Per-thread work arrays: phase tables (n_ops, 3, n_tab), the run's exp(2πi(hx + ky)) per
    operator, an image position."""
    return np.empty((n_ops, 3, n_tab), dtype=np.complex128), np.empty(n_ops, dtype=np.complex128), np.empty(3)


def _table_layout(hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = hkl.min(axis=0).astype(np.int64)
    return lo, (hkl.max(axis=0) - lo + 1).astype(np.int64)


@njit(cache=True, nogil=True, parallel=True)
def _step_chunk(rho, hist_pos, hist_w, corr, amp, p, c, w, g, beta, runs, lo, n_axis, fmat, rot, trans, q_mats,
                normal, rsum, eta, start, steps, n_blocks, reflect, update, series):
    """One step for a chunk of atoms. Array representation: rho (n_atoms, n_ops, n_refl) updated in
    place. Series representation (`series`): rho is a (n_atoms, n_ops, 0) placeholder of the scratch
    dtype and each row is rebuilt as ρ_j = Σ_k hist_w[k] m_j(hist_pos[j, k]) − p_j corr."""
    n_atoms, n_ops = rho.shape[0], rho.shape[1]
    n_refl = amp.shape[1]
    pos = np.empty((n_atoms, 3))
    gaps = np.zeros(n_atoms)
    f_blocks = np.zeros((n_blocks, n_refl), dtype=np.complex128)
    s_blocks = np.zeros((n_blocks, n_refl), dtype=np.complex128)
    n_tab = n_axis.max()
    for b in prange(n_blocks):
        tables, ehk, xs = _thread_scratch(n_ops, n_tab)
        scratch = np.empty((n_ops, n_refl if series else 0), dtype=rho.dtype)
        for j in range(b * n_atoms // n_blocks, (b + 1) * n_atoms // n_blocks):
            if series:
                row = scratch
                for s in range(n_ops):
                    for i in range(n_refl):
                        row[s, i] = -p[j] * corr[i]
                for k in range(hist_pos.shape[1]):
                    if hist_w[k] != 0.0:
                        _values_row(hist_pos[j, k], amp[j], runs, lo, n_axis, fmat, rot, trans, row, hist_w[k],
                                    tables, xs, ehk)
            else:
                row = rho[j]
            r, gap2 = _concur_atom(row, amp[j], p[j], c, w, g, beta, runs, lo, n_axis, fmat, rot, trans, q_mats,
                                   normal[j], rsum[j], eta[j], start[j], steps, f_blocks[b], s_blocks[b], tables, xs,
                                   ehk, reflect, update)
            pos[j] = r
            gaps[j] = gap2
    return pos, gaps, f_blocks.sum(axis=0), s_blocks.sum(axis=0)


@njit(cache=True, nogil=True, parallel=True)
def _values_chunk(xyz, amp, p, runs, lo, n_axis, fmat, rot, trans, n_ops, out, n_blocks):
    """out[j] = m_j(r_j) for every atom (n_atoms, n_ops, n_refl); returns Σ p m."""
    n_atoms = xyz.shape[0]
    n_refl = amp.shape[1]
    f_blocks = np.zeros((n_blocks, n_refl), dtype=np.complex128)
    n_tab = n_axis.max()
    for b in prange(n_blocks):
        tables, ehk, xs = _thread_scratch(n_ops, n_tab)
        row = np.empty((n_ops, n_refl), dtype=np.complex128)
        for j in range(b * n_atoms // n_blocks, (b + 1) * n_atoms // n_blocks):
            row[:] = 0.0
            _values_row(xyz[j], amp[j], runs, lo, n_axis, fmat, rot, trans, row, 1.0, tables, xs, ehk)
            for s in range(n_ops):
                for i in range(n_refl):
                    out[j, s, i] = row[s, i]
                    f_blocks[b, i] += p[j] * row[s, i]
    return f_blocks.sum(axis=0)


@njit(cache=True, nogil=True, parallel=True)
def density_normal_matrices(amp, w, hkl, q_mats):
    """Σ_{s,h} w_h a_j(h)² q_s(h) q_s(h)ᵀ per atom (n_atoms, 3, 3), q_s(h) = h · q_mats[s] (Å⁻¹)."""
    n_atoms, n_refl = amp.shape
    n_ops = q_mats.shape[0]
    out = np.zeros((n_atoms, 3, 3))
    for j in prange(n_atoms):
        hh = np.zeros((3, 3))
        for i in range(n_refl):
            v = w[i] * amp[j, i] * amp[j, i]
            for a in range(3):
                for b in range(3):
                    hh[a, b] += v * hkl[i, a] * hkl[i, b]
        for s in range(n_ops):  # qᵀ q summed: Q_sᵀ (Σ v h hᵀ) Q_s
            for a in range(3):
                for b in range(3):
                    t = 0.0
                    for u in range(3):
                        for v2 in range(3):
                            t += q_mats[s, u, a] * hh[u, v2] * q_mats[s, v2, b]
                    out[j, a, b] += t
    return out
