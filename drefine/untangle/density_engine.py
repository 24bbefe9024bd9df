"""The density variables of divide and concur, held in atom chunks, stepped in place.

The iterate's density part is atoms × symmetry operators × used reflections (about 2,000 × 4 ×
29,000 for the 1AHO challenge: 1.9 GB in single precision). It is split into atom chunks; each
chunk (`DensityChunk`) keeps its rows and does the concur-and-update of an RRR step for its atoms
in one pass (`density_kernels`). The structure-factor projection needs, per reflection, only the
sum S(h) = Σ p ρ over all atoms, which every chunk returns with its step: reflection-wise work is
then a few vectors of length n_refl on the driver, so no reflection-chunked copy of the array is
ever made. Chunks run in the driver's process (numba threads), on dask workers as actors that
keep their rows in worker memory between iterations (`DensityEngine(client=...)`), or with their
rows in a disk-backed memory map (`storage="memmap"`) when the array does not fit in memory; numba
kernels need one contiguous buffer, which a memory map gives and a zarr store would not.

Two exact representations of the rows:
- "array": the rows themselves (complex64 by default; complex128 on request);
- "series": after t RRR steps every row is a geometric series of on-manifold terms,
  ρ_j = Σ_k w_k m_j(r_jk) − p_j C(h), with w_k = β(1 − β)^(t−k) (and (1 − β)^t for the start) and a
  per-reflection correction C shared by all atoms. Keeping the last positions r_jk (until their
  weight drops below 1e-13) and C reproduces the rows without storing them: memory O(atoms ×
  history), compute (history length + 4) passes instead of 4. Both give the same positions to
  rounding (tests/test_untangle.py).
Results do not depend on thread counts or on where chunks run: partitions and summation orders
are fixed by the chunking alone.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..density.form_factors import ScatteringTypes
from . import density_kernels as K

BLOCKS_PER_CHUNK = 8
SERIES_TOLERANCE = 1e-13


@dataclass
class DensitySpec:
    """What every chunk shares: reflections, symmetry, cell, form factors, weights."""

    hkl: np.ndarray  # (n_refl, 3) int64, the used reflections
    rot: np.ndarray  # (n_ops, 3, 3) fractional rotations (centring included)
    trans: np.ndarray  # (n_ops, 3) fractional translations
    frac_matrix: np.ndarray  # (3, 3) F: fractional = F · Cartesian (Å)
    w: np.ndarray  # (n_refl,) reflection weights of the metric
    types: ScatteringTypes  # form factors of the atoms' scattering types

    def __post_init__(self):
        self.hkl = np.ascontiguousarray(self.hkl, dtype=np.int64)
        self.lo, self.n_axis = K._table_layout(self.hkl)
        self.runs = K.reflection_runs(self.hkl)
        self.q_mats = np.ascontiguousarray(2 * np.pi * np.einsum("suv,va->sua", self.rot, self.frac_matrix))
        self.s2 = ((self.hkl @ self.frac_matrix) ** 2).sum(axis=1)

    @property
    def n_ops(self) -> int:
        return len(self.rot)

    @property
    def n_refl(self) -> int:
        return len(self.hkl)

    def amplitudes(self, type_of_atom: np.ndarray, b_iso: np.ndarray) -> np.ndarray:
        """a_j(h) = f(s) e^{−B s²/4} (n_atoms, n_refl) float32 (electrons)."""
        s2 = self.s2
        f_type = self.types.f0(s2)
        out = np.empty((len(type_of_atom), len(s2)), dtype=np.float32)
        for start in range(0, len(type_of_atom), 256):  # bounded float64 temporaries
            sl = slice(start, start + 256)
            out[sl] = f_type[type_of_atom[sl]] * np.exp(-np.outer(b_iso[sl], s2) / 4.0)
        return out


class DensityChunk:
    """The density variables of a run of atoms and their step (runs in-process or as a dask actor)."""

    def __init__(self, spec: DensitySpec, type_of_atom: np.ndarray, b_iso: np.ndarray, occ: np.ndarray,
                 representation: str = "array", dtype=np.complex64, memmap_path: str | None = None,
                 beta: float = 0.5):
        self.spec = spec
        self.p = np.ascontiguousarray(occ, dtype=np.float64)
        self.amp = spec.amplitudes(np.asarray(type_of_atom), np.asarray(b_iso, dtype=np.float64))
        self.normal = K.density_normal_matrices(self.amp, spec.w, spec.hkl, spec.q_mats)
        self.representation = representation
        self.beta = beta
        n = len(self.p)
        self.n_blocks = min(BLOCKS_PER_CHUNK, max(n, 1))
        if representation == "array":
            shape = (n, spec.n_ops, spec.n_refl)
            if memmap_path:
                self.rho = np.lib.format.open_memmap(memmap_path, mode="w+", dtype=dtype, shape=shape)
            else:
                self.rho = np.zeros(shape, dtype=dtype)
            self.corr_dummy = np.zeros(0, dtype=np.complex128)
        elif representation == "series":
            self.max_hist = math.ceil(math.log(SERIES_TOLERANCE) / math.log(1.0 - beta)) + 1
            self.hist_pos = np.zeros((n, 0, 3))
            self.hist_w = np.zeros(0)
            self.corr = np.zeros(spec.n_refl, dtype=np.complex128)
        else:
            raise ValueError(f"unknown representation {representation!r}")

    def nbytes(self) -> int:
        if self.representation == "array":
            return int(self.rho.nbytes + self.amp.nbytes)
        return int(self.hist_pos.nbytes + self.amp.nbytes)

    def start(self, xyz: np.ndarray) -> np.ndarray:
        """Density variables on the manifold at positions xyz (n, 3) Å; returns Σ p m (n_refl,)."""
        sp = self.spec
        xyz = np.ascontiguousarray(xyz, dtype=np.float64)
        if self.representation == "array":
            return K._values_chunk(xyz, self.amp, self.p, sp.runs, sp.lo, sp.n_axis, sp.frac_matrix, sp.rot,
                                   sp.trans, sp.n_ops, self.rho, self.n_blocks)
        self.hist_pos = xyz[:, None, :].copy()
        self.hist_w = np.ones(1)
        self.corr[:] = 0.0
        return self._model_sum(xyz)

    def _model_sum(self, xyz):
        sp = self.spec
        total = np.zeros(sp.n_refl, dtype=np.complex128)
        for start in range(0, len(xyz), 64):  # bounded scratch for the series representation
            sl = slice(start, start + 64)
            scratch = np.empty((len(xyz[sl]), sp.n_ops, sp.n_refl), dtype=np.complex128)
            total += K._values_chunk(np.ascontiguousarray(xyz[sl]), self.amp[sl], self.p[sl], sp.runs, sp.lo,
                                     sp.n_axis, sp.frac_matrix, sp.rot, sp.trans, sp.n_ops, scratch,
                                     min(self.n_blocks, len(xyz[sl])))
        return total

    def step(self, c: np.ndarray, rsum: np.ndarray, eta: np.ndarray, start: np.ndarray, g: float, steps: int,
             estimate: bool = False):
        """One concur-and-update (see `density_kernels`). c (n_refl,) complex: the structure-factor
        correction; rsum (n, 3) Σ η r_c of the reflected replicas; eta (n,) Σ η; start (n, 3) where
        Gauss–Newton starts (Å). Returns the concurred positions (n, 3), per-atom gap² (n,),
        Σ p m(r) and Σ p ρ_new (n_refl,). `estimate`: the concur of P_D(x) instead (rsum from the
        projected replicas), the iterate left as it is."""
        reflect, update = (1.0, False) if estimate else (2.0, True)
        sp = self.spec
        c = np.ascontiguousarray(c, dtype=np.complex128)
        rsum = np.ascontiguousarray(rsum, dtype=np.float64)
        eta = np.ascontiguousarray(eta, dtype=np.float64)
        start = np.ascontiguousarray(start, dtype=np.float64)
        series = self.representation == "series"
        if series:
            rho, hist_pos, hist_w, corr = (np.zeros((len(self.p), sp.n_ops, 0), dtype=np.complex128), self.hist_pos,
                                           self.hist_w, self.corr)
        else:
            rho, hist_pos, hist_w, corr = self.rho, np.zeros((len(self.p), 0, 3)), np.zeros(0), self.corr_dummy
        pos, gaps, f_model, s_new = K._step_chunk(
            rho, hist_pos, hist_w, corr, self.amp, self.p, c, sp.w, g, self.beta, sp.runs, sp.lo, sp.n_axis,
            sp.frac_matrix, sp.rot, sp.trans, sp.q_mats, self.normal, rsum, eta, start, steps, self.n_blocks, reflect,
            update, series)
        if estimate or not series:
            return pos, gaps, f_model, s_new
        # ρ' = (1 − β) ρ + β m(r) − β p c: every term's weight shrinks, r joins, C takes c
        w = np.append(self.hist_w * (1.0 - self.beta), self.beta)
        hist = np.concatenate([self.hist_pos, pos[:, None, :]], axis=1)
        keep = slice(max(0, len(w) - self.max_hist), None)
        self.hist_w, self.hist_pos = w[keep], np.ascontiguousarray(hist[:, keep])
        self.corr = (1.0 - self.beta) * self.corr + self.beta * c
        return pos, gaps, f_model, s_new

    def state(self) -> dict:
        if self.representation == "array":
            return {"rho": np.asarray(self.rho)}
        return {"hist_pos": self.hist_pos, "hist_w": self.hist_w, "corr": self.corr}

    def restore(self, state: dict) -> None:
        if self.representation == "array":
            self.rho[...] = state["rho"]
        else:
            self.hist_pos, self.hist_w, self.corr = state["hist_pos"], state["hist_w"], state["corr"]

    def flush(self) -> None:
        if isinstance(getattr(self, "rho", None), np.memmap):
            self.rho.flush()


def atom_chunks(n_atoms: int, n_chunks: int) -> list[slice]:
    n_chunks = max(1, min(n_chunks, n_atoms))
    edges = np.linspace(0, n_atoms, n_chunks + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]


class DensityEngine:
    """All density variables of a run: chunks in-process or as actors on a dask cluster.

    The driver-side structure-factor projection: c(h) = (F(h) − S(h)) / Σ_{j,s} p_j², S = Σ p ρ.
    """

    def __init__(self, spec: DensitySpec, type_of_atom: np.ndarray, b_iso: np.ndarray, occ: np.ndarray,
                 n_chunks: int = 1, client=None, representation: str = "array", dtype=np.complex64,
                 memmap_dir: str | Path | None = None, beta: float = 0.5):
        self.spec, self.client = spec, client
        self.n_atoms = len(occ)
        self.occ = np.asarray(occ, dtype=np.float64)
        self.p2 = float((self.occ ** 2).sum() * spec.n_ops)
        self.slices = atom_chunks(self.n_atoms, n_chunks)
        self.chunks = []
        for k, sl in enumerate(self.slices):
            args = (spec, type_of_atom[sl], b_iso[sl], self.occ[sl], representation, dtype,
                    str(Path(memmap_dir) / f"density_{k:03d}.npy") if memmap_dir else None, beta)
            if client is None:
                self.chunks.append(DensityChunk(*args))
            else:
                self.chunks.append(client.submit(DensityChunk, *args, actor=True, pure=False))
        if client is not None:
            self.chunks = [f.result() for f in self.chunks]
        self.s = np.zeros(spec.n_refl, dtype=np.complex128)

    def _gather(self, calls):
        if self.client is None:
            return calls
        return [c.result() for c in calls]

    def start(self, xyz: np.ndarray) -> np.ndarray:
        """Density variables on the manifold at xyz (n_atoms, 3); returns the model's F (n_refl,)."""
        parts = self._gather([ch.start(xyz[sl]) for ch, sl in zip(self.chunks, self.slices)])
        f = np.zeros(self.spec.n_refl, dtype=np.complex128)
        for p in parts:
            f += p
        self.s = f.copy()
        return f

    def correction(self, f_target: np.ndarray) -> np.ndarray:
        """c(h): the structure-factor projection's per-reflection step."""
        return (f_target - self.s) / self.p2

    def step(self, f_target: np.ndarray, rsum: np.ndarray, eta: np.ndarray, start: np.ndarray, g: float,
             steps: int, estimate: bool = False):
        """The density half of one RRR step; returns (positions, gap² total, F_model at them).
        `estimate`: positions of the concur of P_D(x) only (F_model and S not computed)."""
        c = self.correction(f_target)
        parts = self._gather([ch.step(c, rsum[sl], eta[sl], start[sl], g, steps, estimate)
                              for ch, sl in zip(self.chunks, self.slices)])
        if estimate:
            return np.concatenate([p[0] for p in parts]), 0.0, None
        pos = np.concatenate([p[0] for p in parts])
        gap2 = float(sum(float(p[1].sum()) for p in parts))
        f_model = np.zeros(self.spec.n_refl, dtype=np.complex128)
        s = np.zeros(self.spec.n_refl, dtype=np.complex128)
        for p in parts:
            f_model += p[2]
            s += p[3]
        self.s = s
        return pos, gap2, f_model

    def state(self) -> list[dict]:
        return self._gather([ch.state() for ch in self.chunks])

    def restore(self, states: list[dict], s: np.ndarray) -> None:
        self._gather([ch.restore(st) for ch, st in zip(self.chunks, states)])
        self.s = np.asarray(s, dtype=np.complex128)

    def nbytes(self) -> int:
        return int(sum(self._gather([ch.nbytes() for ch in self.chunks])))
