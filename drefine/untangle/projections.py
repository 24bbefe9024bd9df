"""The divide projections of divide-and-concur, each on many constraints at once.

Every constraint owns replicas of the positions of its atoms; a divide projection moves one
constraint's replicas to the nearest point of its constraint set (Gravel & Elser 2008; Mandaiya
& Elser, multi-conformer untangling). All functions take stacked arrays (one row per constraint)
and return new arrays; none loops over constraints in Python.

- bonds: |a − b| within [d − tol, d + tol]: both ends moved symmetrically along their axis.
- rigid motifs (angles, dihedrals, planes, chirality, rings): the set is every rigid placement
  (rotation, no reflection, plus translation) of one of the allowed ideal motifs, thickened by a
  tolerance ball of radius `tol` in the constraint's 3k-dimensional space. The nearest placement
  is Kabsch's (SVD) superposition, the nearest allowed motif the one with the smallest residual;
  a point within `tol` of it is left alone, one further is pulled to distance `tol`.
- volume exclusion: |a − b| ≥ r_min, both pushed apart symmetrically when closer.
- structure factor, per reflection: the affine set Σ_j p_j ρ_j = F (ρ the atoms' density
  variables, p their occupancy weights): ρ' = ρ + p̄ (F − Σ p ρ) / Σ |p|².
- planes: the k points within a tolerance of a common plane (least-squares plane by SVD).
- disulfides: which cysteine conformers pair, by minimum-cost matching (scipy's Hungarian
  `linear_sum_assignment`), each chosen pair then projected like a bond.
And the concur projection's position part: all replicas of an atom to their η-weighted mean.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

_AXIS = np.array([1.0, 0.0, 0.0])
_EPS = 1e-12  # relative: distances within this of the set's boundary count as inside


def _pair_to_distance(a: np.ndarray, b: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move a and b symmetrically along a − b so that |a − b| = target."""
    d = a - b
    dist = np.linalg.norm(d, axis=1)
    u = np.where(dist[:, None] > 1e-12, d / np.maximum(dist, 1e-300)[:, None], _AXIS)
    centre = 0.5 * (a + b)
    return centre + 0.5 * target[:, None] * u, centre - 0.5 * target[:, None] * u


def project_bonds(a: np.ndarray, b: np.ndarray, ideal: np.ndarray, tol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest (a', b') with ideal − tol ≤ |a' − b'| ≤ ideal + tol (Å); rows are constraints."""
    dist = np.linalg.norm(a - b, axis=1)
    target = np.clip(dist, ideal - tol, ideal + tol)
    # rounding of a point just projected must not move it again (exact idempotence)
    move = np.abs(target - dist) > _EPS * np.maximum(ideal, 1.0)
    a2, b2 = a.copy(), b.copy()
    if move.any():
        a2[move], b2[move] = _pair_to_distance(a[move], b[move], target[move])
    return a2, b2


def project_exclusion(a: np.ndarray, b: np.ndarray, r_min: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest (a', b') with |a' − b'| ≥ r_min (Å)."""
    dist = np.linalg.norm(a - b, axis=1)
    close = dist < r_min - _EPS * np.maximum(r_min, 1.0)
    a2, b2 = a.copy(), b.copy()
    if close.any():
        a2[close], b2[close] = _pair_to_distance(a[close], b[close], r_min[close])
    return a2, b2


def kabsch_placement(x: np.ndarray, motif: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For stacks x (n, k, 3) and motif (n, k, 3): the proper rigid placement of each motif
    nearest to x (n, k, 3), and the squared distance to it (n,)."""
    cx = x.mean(axis=1, keepdims=True)
    cm = motif.mean(axis=1, keepdims=True)
    h = np.einsum("nki,nkj->nij", motif - cm, x - cx)
    u, _, vt = np.linalg.svd(h)
    det = np.sign(np.linalg.det(np.einsum("nij,njk->nik", u, vt)))
    fix = np.ones((len(x), 3))
    fix[:, 2] = det  # no reflections: chirality is part of the motif
    rot = np.einsum("nji,nj,nkj->nik", vt, fix, u)  # R = V diag(1,1,det) Uᵀ
    placed = np.einsum("nij,nkj->nki", rot, motif - cm) + cx
    return placed, ((x - placed) ** 2).sum(axis=(1, 2))


def project_rigid_motifs(x: np.ndarray, motifs: np.ndarray, tol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (n, k, 3) replicas; motifs (n, m, k, 3) the m allowed ideal motifs of each constraint
    (pad with copies when constraints have fewer); tol (n,) Å in the 3k-space. Returns the
    projected replicas and which motif was taken."""
    n, m = motifs.shape[:2]
    best = np.full(n, np.inf)
    placed = np.empty_like(x)
    which = np.zeros(n, dtype=np.int64)
    for j in range(m):  # a handful of motifs (e.g. trans/cis, rotamers): not a loop over constraints
        p, d2 = kabsch_placement(x, motifs[:, j])
        better = d2 < best
        best = np.where(better, d2, best)
        placed[better] = p[better]
        which[better] = j
    dist = np.sqrt(best)
    scale = np.where(dist > tol, tol / np.maximum(dist, 1e-300), 1.0)
    return placed + (x - placed) * scale[:, None, None], which


def project_structure_factor(rho: np.ndarray, p: np.ndarray, f_target: np.ndarray) -> np.ndarray:
    """rho, p (n_refl, n_var) complex; f_target (n_refl,) complex. Nearest rho' (Euclidean in the
    complex components) with Σ_j p_j rho'_j = f_target for every reflection."""
    resid = f_target - (p * rho).sum(axis=1)
    norm = (np.abs(p) ** 2).sum(axis=1)
    step = np.where(norm > 0, resid / np.where(norm > 0, norm, 1.0), 0.0)
    return rho + np.conj(p) * step[:, None]


def project_structure_factor_dask(rho, p, f_target):
    """The same on dask arrays chunked by reflections (rows); columns must be one chunk."""
    import dask.array as da

    return da.map_blocks(lambda r, q, f: project_structure_factor(r, q, f[:, 0]), rho, p, f_target[:, None],
                         dtype=rho.dtype)


def concur_positions(replicas: np.ndarray, atom: np.ndarray, eta: np.ndarray, n_atoms: int) -> np.ndarray:
    """η-weighted mean position of each atom over its replicas (n_atoms, 3); atoms without
    replicas get NaN. Every replica then takes its atom's mean: `mean[atom]`."""
    w = np.bincount(atom, weights=eta, minlength=n_atoms)
    s = np.stack([np.bincount(atom, weights=eta * replicas[:, c], minlength=n_atoms) for c in range(3)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return s / w[:, None]


def match_disulfides(sg_a: np.ndarray, sg_b: np.ndarray, ideal: float = 2.03) -> np.ndarray:
    """Minimum-cost pairing of two sets of SG positions (conformers of the cysteines that may
    bridge): cost (|a − b| − ideal)²; returns index pairs (k, 2)."""
    cost = (np.linalg.norm(sg_a[:, None, :] - sg_b[None, :, :], axis=2) - ideal) ** 2
    rows, cols = linear_sum_assignment(cost)
    return np.stack([rows, cols], axis=1)


def project_coplanar(x: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """x (n, k, 3): nearest configurations whose k points lie within `tol` (Å, in the 3k-space) of a
    common plane. The nearest coplanar configuration moves every point along the normal of the
    least-squares plane (through the centroid, normal = the smallest right singular vector); a
    point within tol of it stays, one further is pulled to distance tol."""
    c = x.mean(axis=1, keepdims=True)
    _, sv, vt = np.linalg.svd(x - c)
    normal = vt[:, 2]  # (n, 3)
    off = np.einsum("nki,ni->nk", x - c, normal)  # signed distances to the plane
    dist = sv[:, 2]
    keep = np.where(dist > tol, 1.0 - tol / np.maximum(dist, 1e-300), 0.0)
    moved = x - (keep[:, None] * off)[:, :, None] * normal[:, None, :]
    inside = dist <= tol * (1.0 + _EPS)
    return np.where(inside[:, None, None], x, moved)


def project_disulfides(x: np.ndarray, ideal: float, tol: float) -> np.ndarray:
    """x (n, 2m, 3): the SG replicas of the m conformers of two bridged cysteines, [i_1..i_m, j_1..j_m].
    The set: some one-to-one pairing of i's and j's conformers with every pair's S–S bond within
    ideal ± tol. Nearest point: every pair's bond projection costs (|d| − clip(|d|))²/2; the
    pairing is the minimum-cost matching (Hungarian), then the chosen pairs are projected."""
    n, k2 = x.shape[:2]
    m = k2 // 2
    ii, jj = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    d = np.linalg.norm(x[:, ii.ravel()] - x[:, m + jj.ravel()], axis=2)  # (n, m*m)
    cost = (0.5 * (d - np.clip(d, ideal - tol, ideal + tol)) ** 2).reshape(n, m, m)
    out = x.copy()
    for k in range(n):  # a handful of disulfides
        rows, cols = linear_sum_assignment(cost[k])
        a, b = project_bonds(x[k, rows], x[k, m + cols], np.full(m, ideal), np.full(m, tol))
        out[k, rows], out[k, m + cols] = a, b
    return out
