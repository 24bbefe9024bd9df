"""Structure factors and their gradients for a crystal: one P 1 FFT of the asymmetric-unit atoms.

`fft.fft_structure_factors` spreads every symmetry image on the grid (12 images per atom in
P6₁22): exact, but the spreading and the gradient gather then cost n_atoms × n_operators.
Here only the model's own atoms are spread, and symmetry is applied in reciprocal space:

  F(h) = Σ_k e^{2πi h·t_k} F₁(h R_k),   F₁ the transform of the asymmetric-unit density,

because ρ(x) = Σ_k ρ₁(S_k⁻¹x) and ∫ρ₁(R y + t) e^{2πi h·(R y + t)} dy picks F₁ at hR. The
gradient of a target T with D(h) = ∂T/∂Re F + i ∂T/∂Im F follows by the chain rule: every
operator sends D₁(hR_k) = D(h) e^{−2πi h·t_k} to the P 1 gradient map (one real inverse FFT),
which is then gathered at the n atoms only. Refinement evaluates this dozens of times per
cycle, so the calculator keeps everything that depends only on the reflections and the cell
(expanded indices, operator phases, |s|²). Checked against direct summation in the tests.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools

import numpy as np
import scipy.fft

from ..parallel.cluster import gather_results
from ..threads import kernel_threads
from .direct import Scatterers, StructureFactorGradient
from .fft import _cell, _miller_to_rfft, _prepare, atom_density_grid, choose_blur, gather_gradient, grid_shape
from .model_map import REFINEMENT_ACCURACY, REPORT_ACCURACY


@dataclasses.dataclass(frozen=True)
class _ReflectionSetup:
    """What a calculator keeps that depends only on the reflections, operators, cell and grid."""

    phase: np.ndarray
    idx: tuple
    neg: np.ndarray
    s2: np.ndarray
    g_idx: tuple
    g_conj: np.ndarray
    g_factor: np.ndarray
    g_order: np.ndarray
    g_where: np.ndarray
    g_starts: np.ndarray


_SETUP_CACHE: dict[bytes, _ReflectionSetup] = {}
_SETUP_CACHE_SIZE = 4  # a refinement's two calculators (refinement and report grids), and one more table's
_SETUP_CACHE_BYTES = 1 << 30  # and at most this much kept (a worker outlives its tables)


def _reflection_setup(hkl, rot, trans, frac_matrix, shape) -> _ReflectionSetup:
    """The reflection-side set-up (~45 ms for 4hg7's 21,000 reflections), kept for calculators
    made again on the same reflections and grid: the second part of a `--waters` run, every
    member of an ensemble. Keyed by a digest of the inputs; the arrays are shared read-only."""
    key = hashlib.blake2b(b"".join(np.ascontiguousarray(a).tobytes() for a in (hkl, rot, trans, frac_matrix))
                          + repr(shape).encode(), digest_size=20).digest()
    if key in _SETUP_CACHE:
        return _SETUP_CACHE[key]
    # h R_k for every operator: (n, k, 3); integral for crystallographic operators
    # (matmul, not einsum: 10× faster here, and the same integers)
    h = hkl.astype(np.float64)
    expanded = np.rint(np.matmul(h[None], rot)).transpose(1, 0, 2).astype(np.int64)
    phase = np.exp(2j * np.pi * (h @ trans.T))
    flat = expanded.reshape(-1, 3)
    idx, neg = _miller_to_rfft(flat, shape)
    s = h @ frac_matrix
    # gradient spectrum in rfft layout: h with l < 0 is stored as its Friedel mate −h (conjugated);
    # planes l = 0 (and the Nyquist plane) are not mirrored by irfftn, so their entries count twice
    mate = np.where(flat[:, 2:3] < 0, -flat, flat)
    g_idx = (mate[:, 0] % shape[0], mate[:, 1] % shape[1], mate[:, 2])
    edge = (mate[:, 2] == 0) | (2 * mate[:, 2] == shape[2])
    # many (h, operator) pairs land on one spectrum entry: sums over runs of a sorted order,
    # made once (np.add.at over the n × operators entries took ~10 ms an evaluation on 5orl)
    flat_idx = np.ravel_multi_index(g_idx, (shape[0], shape[1], shape[2] // 2 + 1))
    g_order = np.argsort(flat_idx, kind="stable")
    g_where, g_starts = np.unique(flat_idx[g_order], return_index=True)
    out = _ReflectionSetup(phase, idx, neg, (s * s).sum(1), g_idx, flat[:, 2] < 0, np.where(edge, 1.0, 0.5),
                           g_order, g_where, g_starts)
    for a in (out.phase, *out.idx, out.neg, out.s2, *out.g_idx, out.g_conj, out.g_factor, out.g_order,
              out.g_where, out.g_starts):
        a.flags.writeable = False
    size = _setup_bytes(out)
    if size > _SETUP_CACHE_BYTES:
        return out  # too large to keep: its calculator holds it while it lives
    while _SETUP_CACHE and (len(_SETUP_CACHE) >= _SETUP_CACHE_SIZE
                            or sum(map(_setup_bytes, _SETUP_CACHE.values())) + size > _SETUP_CACHE_BYTES):
        _SETUP_CACHE.pop(next(iter(_SETUP_CACHE)))
    _SETUP_CACHE[key] = out
    return out


def _setup_bytes(setup: _ReflectionSetup) -> int:
    return sum(a.nbytes for a in (setup.phase, *setup.idx, setup.neg, setup.s2, *setup.g_idx, setup.g_conj,
                                  setup.g_factor, setup.g_order, setup.g_where, setup.g_starts))


class CrystalStructureFactors:
    """F_calc(h) and ∂T/∂parameters for fixed reflections `hkl` of a crystal (any space group)."""

    def __init__(self, sc: Scatterers, hkl: np.ndarray, d_min: float, rate: float = 1.5, threads: int | None = None,
                 accuracy: dict | None = None):
        """`accuracy`: {"alias", "cutoff"} as in `model_map` (default: the reporting accuracy,
        ~1e-5 relative; `REFINEMENT_ACCURACY` is ~1e-3 with single-precision grids, ~3× cheaper)."""
        threads = kernel_threads(threads)
        hkl = np.asarray(hkl, dtype=np.int64)
        self.hkl = hkl
        self.threads = threads
        accuracy = accuracy or REPORT_ACCURACY
        self.alias, self.cutoff = accuracy["alias"], accuracy["cutoff"]
        self.dtype = np.float32 if accuracy is REFINEMENT_ACCURACY else np.float64
        self.cell = _cell(sc)
        self.shape = grid_shape(self.cell, None, d_min, rate)
        self.d_min = d_min
        self.n_ops = len(sc.rot)
        prepared = _reflection_setup(hkl, sc.rot, sc.trans, sc.frac_matrix, tuple(self.shape))
        self.phase, self._idx, self._neg, self.s2 = prepared.phase, prepared.idx, prepared.neg, prepared.s2
        self._g_idx, self._g_conj, self._g_factor = prepared.g_idx, prepared.g_conj, prepared.g_factor
        self._g_order, self._g_where, self._g_starts = prepared.g_order, prepared.g_where, prepared.g_starts

    @staticmethod
    def asymmetric_unit(sc: Scatterers) -> Scatterers:
        """The same atoms without symmetry images (operators are applied in reciprocal space)."""
        return dataclasses.replace(sc, rot=np.eye(3)[None], trans=np.zeros((1, 3)))

    def _b_add(self, sc: Scatterers) -> float:
        # depends on the ADPs only: kept while they stay (coordinate steps; its eigenvalues of
        # every atom's U were ~2 ms of each evaluation)
        key = sc.u_cart.tobytes()
        if getattr(self, "_blur_key", None) != key:
            self._blur_key, self._blur = key, choose_blur(sc, self.shape, self.d_min, self.alias)
        return self._blur

    def _prepared(self, p1: Scatterers, b_add: float):
        """Per-Gaussian set-up of the atoms, shared by F and the gradient at the same parameters
        (the minimiser asks for both at every point)."""
        key = (p1.frac.tobytes(), p1.u_cart.tobytes(), p1.occ.tobytes(), b_add)
        if getattr(self, "_key", None) != key:
            self._key, self._prep = key, _prepare(p1, self.shape, b_add, self.cutoff)
        return self._prep

    def structure_factors(self, sc: Scatterers) -> np.ndarray:
        """F_calc at the calculator's reflections (complex, e⁻ for X-rays)."""
        p1 = self.asymmetric_unit(sc)
        b_add = self._b_add(p1)
        rho = atom_density_grid(p1, self.shape, b_add, self.cutoff, self.threads, dtype=self.dtype,
                                prepared=self._prepared(p1, b_add))
        spectrum = scipy.fft.rfftn(rho, workers=self.threads)
        vals = spectrum[self._idx]
        f1 = np.where(self._neg, vals, np.conj(vals)).reshape(len(self.hkl), self.n_ops)
        f = (f1 * self.phase).sum(axis=1) * (self.cell.volume / rho.size)
        return f * np.exp(b_add * self.s2 / 4.0)

    def gradient(self, sc: Scatterers, dtarget_df: np.ndarray, positions_only: bool = False,
                 with_adp: bool = True) -> StructureFactorGradient:
        """∂T/∂(x, B, occupancy, U) for D(h) = ∂T/∂Re F + i ∂T/∂Im F at the calculator's reflections
        (`positions_only`: x only; `with_adp` False: x and occupancy)."""
        p1 = self.asymmetric_unit(sc)
        b_add = self._b_add(p1)
        d = np.asarray(dtarget_df) * np.exp(b_add * self.s2 / 4.0)
        d1 = (d[:, None] * np.conj(self.phase)).ravel()
        c = np.conj(d1)  # g(x) = Re Σ c e^{2πi h·x}
        c = np.where(self._g_conj, np.conj(c), c) * self._g_factor
        n = int(np.prod(self.shape))
        spec = np.zeros((self.shape[0], self.shape[1], self.shape[2] // 2 + 1),
                        dtype=np.complex64 if self.dtype == np.float32 else np.complex128)
        vals = (c * n).astype(spec.dtype)[self._g_order]
        spec.reshape(-1)[self._g_where] = np.add.reduceat(vals, self._g_starts)
        gmap = scipy.fft.irfftn(spec, s=self.shape, workers=self.threads)
        return gather_gradient(p1, gmap, b_add, self.cell.volume / n, self.cutoff, self.threads,
                               prepared=self._prepared(p1, b_add), positions_only=positions_only,
                               with_adp=with_adp)


def _atom_chunk(sc: Scatterers, sl: slice | np.ndarray) -> Scatterers:
    """The scatterers at `sl` (a slice or an index array)."""
    return dataclasses.replace(sc, frac=sc.frac[sl], occ=sc.occ[sl], u_cart=sc.u_cart[sl], is_aniso=sc.is_aniso[sl],
                               atom_index=sc.atom_index[sl],
                               types=dataclasses.replace(sc.types, type_of_atom=sc.types.type_of_atom[sl]))


def _chunk_structure_factors(calc: CrystalStructureFactors, chunk: Scatterers) -> np.ndarray:
    """One task: F_calc of an atom chunk."""
    return calc.structure_factors(chunk)


def _chunk_gradient(calc: CrystalStructureFactors, chunk: Scatterers, d: np.ndarray,
                    positions_only: bool, with_adp: bool) -> StructureFactorGradient:
    """One task: the gradient with respect to an atom chunk's parameters."""
    return calc.gradient(chunk, d, positions_only=positions_only, with_adp=with_adp)


class ChunkedStructureFactors:
    """F_calc and gradients as a sum over atom chunks, each chunk one task (F is linear in the atoms).

    With a dask `client` the chunks run on its workers (the calculator is sent once); without,
    the same chunks run here one after the other, so results are bitwise identical either way
    (each chunk is computed single-threaded and the chunk sums are added in chunk order). Every
    chunk pays a full FFT: this layout is for many workers and large models, not for a laptop,
    where `CrystalStructureFactors` with threads is faster."""

    def __init__(self, sc: Scatterers, hkl: np.ndarray, d_min: float, n_chunks: int, client=None,
                 rate: float = 1.5, accuracy: dict | None = None):
        self.calc = CrystalStructureFactors(sc, hkl, d_min, rate=rate, threads=1, accuracy=accuracy)
        self.shape = self.calc.shape
        bounds = np.linspace(0, len(sc), max(1, min(n_chunks, len(sc))) + 1).astype(int)
        self.slices = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        self.client = client
        self._remote = client.scatter(self.calc, broadcast=True) if client is not None else None

    def _map(self, fn, *args_per_chunk):
        if self.client is None:
            return [fn(self.calc, *a) for a in zip(*args_per_chunk)]
        futures = [self.client.submit(fn, self._remote, *a, pure=False) for a in zip(*args_per_chunk)]
        return gather_results(self.client, futures)

    def structure_factors(self, sc: Scatterers) -> np.ndarray:
        parts = self._map(_chunk_structure_factors, [_atom_chunk(sc, s) for s in self.slices])
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        return total

    def gradient(self, sc: Scatterers, dtarget_df: np.ndarray, positions_only: bool = False,
                 with_adp: bool = True) -> StructureFactorGradient:
        n = len(self.slices)
        parts = self._map(_chunk_gradient, [_atom_chunk(sc, s) for s in self.slices], [dtarget_df] * n,
                          [positions_only] * n, [with_adp] * n)
        return StructureFactorGradient(xyz=np.concatenate([p.xyz for p in parts]),
                                       b_iso=np.concatenate([p.b_iso for p in parts]),
                                       occ=np.concatenate([p.occ for p in parts]),
                                       u=np.concatenate([p.u for p in parts]))


class MovingSubsetStructureFactors:
    """F_calc and gradients when only a few atoms move: F is linear in the atoms, so the fixed
    atoms' F is computed once and only the moving ones are transformed at each call.

    For local refinements (the crossing search refines ~10–80 of 2,000 atoms, 60 iterations,
    dozens of times): the density of the moving atoms is spread and transformed alone, so an
    evaluation costs two FFTs instead of spreading and gathering every atom. The fixed part is
    recomputed if any fixed atom's position, U or occupancy changes, so the result never
    depends on that assumption; gradients are for positions only (zero for the fixed atoms)."""

    def __init__(self, calc, moving: np.ndarray):
        """`calc`: a calculator with `structure_factors(sc)` and `gradient(sc, d, ...)` (e.g.
        `CrystalStructureFactors`); `moving`: scatterer indices of the atoms that move."""
        self.calc = calc
        self.moving = np.asarray(moving, dtype=np.int64)
        self._key = None
        self._f_fixed = None

    def _split(self, sc: Scatterers) -> tuple[Scatterers, Scatterers]:
        fixed = np.ones(len(sc), dtype=bool)
        fixed[self.moving] = False
        return _atom_chunk(sc, self.moving), _atom_chunk(sc, np.flatnonzero(fixed))

    def structure_factors(self, sc: Scatterers) -> np.ndarray:
        moving, fixed = self._split(sc)
        key = (fixed.frac.tobytes(), fixed.u_cart.tobytes(), fixed.occ.tobytes())
        if key != self._key:
            self._key, self._f_fixed = key, self.calc.structure_factors(fixed)
        return self._f_fixed + self.calc.structure_factors(moving)

    def gradient(self, sc: Scatterers, dtarget_df: np.ndarray, positions_only: bool = False,
                 with_adp: bool = True) -> StructureFactorGradient:
        """Gradients of the moving atoms (zero for the fixed ones): positions, and with
        `positions_only=False` also their B, U and occupancy."""
        moving, _ = self._split(sc)
        g = self.calc.gradient(moving, dtarget_df, positions_only=positions_only, with_adp=with_adp)
        n = len(sc)
        out = StructureFactorGradient(xyz=np.zeros((n, 3)), b_iso=np.zeros(n), occ=np.zeros(n), u=np.zeros((n, 6)))
        out.xyz[self.moving] = g.xyz
        if not positions_only:
            out.b_iso[self.moving] = g.b_iso
            out.occ[self.moving] = g.occ
            out.u[self.moving] = g.u
        return out
