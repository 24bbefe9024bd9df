"""RRR over positions and density variables together: the untangling run (divide and concur).

The iterate holds every constraint's position replicas (`constraints.DivideAndConcur`) and every
atom's density variables (`density_engine.DensityEngine`). One step:
1. divide: geometry projections of the replicas; the structure-factor projection of the density
   variables (per reflection, Σ occ ρ = F_target, folded into the density kernel);
2. reflect: 2 P_D(x) − x;
3. concur: each atom's position from its reflected replicas (weights η) and density variables
   (weight g·w_h, Gauss–Newton in the tangent space), every replica and density variable then set
   to that position;
4. x ← x + β (P_C(2 P_D(x) − x) − P_D(x)); the gap |P_C(…) − P_D(x)| (Å: the metric's RMS per unit
   of replica weight) and R on the used reflections are recorded.

The data: F_target = |F_obs| e^{iφ} / k_total − F_bulk, the atoms' share of the observed structure
factor (scale, anisotropy and flat bulk solvent fitted to the current model), on the used
reflections: |s| ≥ s_cut (|k| ≥ 0.4·2π Å⁻¹ by default; lower resolution carries no weight and is
left out), work set only unless asked. φ from the data (`phases_deg`) or from the current model.
The density metric is g / ⟨|F_target|²⟩ per variable: with the data on unit mean-square scale, g
(default 0.1) is a relative weight between the density and the geometry's η (10 per geometry
replica, 1 per exclusion replica).

Two stages (Mandaiya & Elser): after the first, the density variables restart on the manifold at
the positions reached (and model phases, scale and bulk solvent are refitted), then RRR runs again.
`closing_stage`: one more such stage, for a model a search after RRR has changed.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..density.direct import scatterers_of_model
from ..density.fmodel import compute_fmodel
from ..errors import DrefineError
from ..io.reflections import ReflectionTable
from ..model.arrays import Model
from ..restraints.nonbonded import find_nonbonded_pairs
from ..restraints.topology import Restraints
from .constraints import DivideAndConcur, _Exclusion
from .density_engine import DensityEngine, DensitySpec

CHECKPOINT_VERSION = 1


@dataclass
class UntangleOptions:
    iterations: tuple[int, ...] = (300, 200)  # RRR iterations per stage
    beta: float = 0.5
    g: float = 0.1  # density weight relative to the geometry (data on unit mean-square scale), stage 1
    g_final: float = 0.1  # the same for the stages after the first
    restart_replicas: bool = False
    s_cut: float = 0.4  # Å⁻¹: reflections with |s| = |k|/2π below this carry no weight
    concur_steps: int = 3  # Gauss–Newton steps of the density concur
    use_free: bool = False  # also use the free set (then R-free is not free)
    exclusion_every: int = 10  # iterations between re-listing exclusion pairs
    motif_tolerance: float = 0.05  # Å, tolerance ball of rigid motifs (angles, chirality)
    bond_tolerance: float = 1.0  # bond windows: ideal ± this × the dictionary's σ, stage 1
    # the same for the stages after the first. Tighter there: a window of ±σ is flat, so inside it the
    # data alone set a bond, and on 1AHO otw39 conformers left a little squeezed by the untangling
    # ended Ala39's N–CA 0.016 Å short and long (1.443 / 1.476 Å for 1.459); 0.3 holds bonds within
    # ±0.006 Å of ideal for the last stage (see BENCHMARKS.md, session 24)
    bond_tolerance_final: float = 0.3
    peptide_motifs: bool = False  # peptide units as rigid trans/cis motifs (off: see README)
    torsion_motifs: bool = False  # side-chain torsions as rigid motifs at their allowed values (experimental)
    rigid_groups: bool = True  # planes inside a residue (rings, guanidinium, ...) as rigid planar motifs
    checkpoint_every: int = 50
    chunks: int = 1  # atom chunks of the density variables (one per dask worker is natural)
    representation: str = "array"  # "array" or "series" (see density_engine)
    double_precision: bool = False  # density variables in complex128 instead of complex64
    memmap: bool = False  # density variables in disk-backed memory maps (in `workdir`)

    def as_dict(self) -> dict:
        return asdict(self)


def r_factor(f_obs: np.ndarray, f_model: np.ndarray) -> float:
    """Σ| |F_o| − |F_m| | / Σ |F_o| with the least-squares scale between them (1 when on scale)."""
    fo, fm = np.abs(f_obs), np.abs(f_model)
    k = float((fo * fm).sum() / max((fm * fm).sum(), 1e-300))
    return float(np.abs(fo - k * fm).sum() / max(fo.sum(), 1e-300))


@dataclass
class StageData:
    f_target: np.ndarray  # (n_used,) complex, electrons
    f_bulk: np.ndarray  # (n_used,) complex, the bulk-solvent share (model scale)
    f_obs: np.ndarray  # (n_used,) |F_obs| / k_total
    g_metric: float
    fit: dict = field(default_factory=dict)


class Untangler:
    """An untangling run: setup, stages, steps, checkpoints. `log(str)` receives progress lines."""

    def __init__(self, model: Model, restraints: Restraints, table: ReflectionTable,
                 options: UntangleOptions | None = None, phases_deg: np.ndarray | None = None, client=None,
                 workdir: str | Path | None = None):
        self.opt = options or UntangleOptions()
        self.model, self.table, self.client = model, table, client
        self.phases_deg = phases_deg
        self.workdir = Path(workdir) if workdir else None
        sc = scatterers_of_model(model, cell=table.cell, spacegroup=table.spacegroup)
        self.atoms = sc.atom_index
        s = 1.0 / table.d
        self.used = (s >= self.opt.s_cut) & np.isfinite(table.f_obs) & (table.f_obs > 0)
        if not self.opt.use_free:
            self.used &= table.work
        if phases_deg is not None:
            self.used &= np.isfinite(phases_deg)
        # the density kernels walk reflections in runs of consecutive l: order used ones by (h, k, l)
        used = np.flatnonzero(self.used)
        hkl_used = table.hkl[used].astype(np.int64)
        self.used_index = used[np.lexsort((hkl_used[:, 2], hkl_used[:, 1], hkl_used[:, 0]))]
        if not self.used.any():
            raise DrefineError(f"no reflection with d ≤ {1 / self.opt.s_cut:.2f} Å to untangle against "
                               f"(data to {table.d_min:.2f} Å)")
        spec = DensitySpec(table.hkl[self.used_index], sc.rot, sc.trans, sc.frac_matrix,
                           np.ones(int(self.used.sum())), sc.types)
        memmap_dir = None
        if self.opt.memmap:
            if self.workdir is None:
                raise DrefineError("memmap storage needs a work folder")
            memmap_dir = self.workdir
            memmap_dir.mkdir(parents=True, exist_ok=True)
        self.engine = DensityEngine(spec, sc.types.type_of_atom, model.atoms.b_iso[self.atoms],
                                    model.atoms.occupancy[self.atoms], n_chunks=self.opt.chunks, client=client,
                                    representation=self.opt.representation,
                                    dtype=np.complex128 if self.opt.double_precision else np.complex64,
                                    memmap_dir=memmap_dir, beta=self.opt.beta)
        nb = find_nonbonded_pairs(model, restraints, model.atoms.xyz, buffer=1.0)
        self.geometry = DivideAndConcur(model, restraints, nb, bond_tol_scale=self.opt.bond_tolerance,
                                        motif_tolerance=self.opt.motif_tolerance,
                                        peptides=self.opt.peptide_motifs, torsions=self.opt.torsion_motifs,
                                        rigid_groups=self.opt.rigid_groups)
        self.xyz = model.atoms.xyz.copy()
        self.replicas = self.geometry.replicas(self.xyz)
        self.stage = 0
        self.iteration = 0  # within the stage
        self.history: list[dict] = []
        self.stage_reports: list[dict] = []
        self.data: StageData | None = None

    # -- data of a stage ---------------------------------------------------------------------------
    def model_at(self, xyz: np.ndarray) -> Model:
        m = self.model.copy()
        m.atoms.xyz = np.asarray(xyz, dtype=np.float64).copy()
        return m

    def r_factors(self, xyz: np.ndarray, model: Model | None = None) -> dict:
        """R with bulk solvent refitted: work, free, all reflections and the used ones (of `model`,
        default the input model, at positions xyz)."""
        t = self.table
        m = self.model_at(xyz) if model is None else model
        fm = compute_fmodel(m, t)
        ok = np.isfinite(t.f_obs)
        return {"r_work": fm.r_work, "r_free": fm.r_free, "r_all": r_factor(t.f_obs[ok], fm.f_model[ok]),
                "r_used": r_factor(t.f_obs[self.used], fm.f_model[self.used]),
                "k_sol": fm.scale.k_sol, "b_sol": fm.scale.b_sol}

    def _stage_data(self) -> StageData:
        t = self.table
        fm = compute_fmodel(self.model_at(self.xyz), t)
        s_vec = np.asarray(t.hkl, dtype=np.float64) @ np.array(t.cell.frac.mat.tolist())
        s2 = (s_vec ** 2).sum(1)
        k_tot = fm.scale.k_total(s_vec)
        bulk = fm.scale.k_sol * np.exp(-fm.scale.b_sol * s2 / 4.0) * fm.f_mask
        phi = np.deg2rad(self.phases_deg) if self.phases_deg is not None else np.angle(fm.f_model)
        u = self.used_index
        f_obs = t.f_obs[u] / k_tot[u]
        f_target = f_obs * np.exp(1j * phi[u]) - bulk[u]
        g = self.opt.g if self.stage == 0 else self.opt.g_final
        g_metric = g / float(np.mean(np.abs(f_target) ** 2))
        return StageData(f_target, bulk[u], f_obs, g_metric,
                         {"k_sol": fm.scale.k_sol, "b_sol": fm.scale.b_sol, "r_work": fm.r_work,
                          "r_free": fm.r_free,
                          "phases": "data" if self.phases_deg is not None else "model"})

    def start_stage(self) -> dict:
        """Fit scale and solvent at the current positions, take phases, put the density variables on
        the manifold there (the two-stage restart)."""
        self.data = self._stage_data()
        self.geometry.set_bond_tolerance(self._bond_scale())
        self.engine.start(self.xyz[self.atoms])
        if self.opt.restart_replicas:
            self.replicas = self.geometry.replicas(self.xyz)
        self.iteration = 0
        report = {"stage": self.stage + 1, **self.data.fit}
        self.stage_reports.append(report)
        return report

    def _bond_scale(self) -> float:
        return self.opt.bond_tolerance if self.stage == 0 else self.opt.bond_tolerance_final

    # -- one RRR step ------------------------------------------------------------------------------
    def step(self) -> dict:
        geo, opt, data = self.geometry, self.opt, self.data
        if self.iteration % opt.exclusion_every == 0 and self.iteration:
            self.replicas = geo.refresh_exclusions(self.replicas, self.xyz)
        pd = geo.divide(self.replicas)
        reflected = 2.0 * pd - self.replicas
        rsum = geo.replica_sums(reflected)
        eta = geo.eta_sum
        start = np.where(eta[:, None] > 0, rsum / np.maximum(eta, 1e-300)[:, None], self.xyz)
        a = self.atoms
        pos_a, gap2_density, f_model = self.engine.step(data.f_target, rsum[a], eta[a], start[a], data.g_metric,
                                                        opt.concur_steps)
        pos = start
        pos[a] = pos_a
        diff = pos[geo.owner] - pd
        gap2_geometry = float((geo.eta * (diff ** 2).sum(1)).sum())
        self.replicas = self.replicas + opt.beta * diff
        self.xyz = pos
        self.iteration += 1
        norm = float(geo.eta.sum())
        rec = {"stage": self.stage + 1, "iteration": self.iteration,
               "gap": float(np.sqrt((gap2_geometry + gap2_density) / norm)),
               "gap_geometry": float(np.sqrt(gap2_geometry / norm)),
               "gap_density": float(np.sqrt(gap2_density / norm)),
               "r_used": r_factor(data.f_obs, f_model + data.f_bulk)}
        self.history.append(rec)
        return rec

    def estimate(self) -> np.ndarray:
        """The solution estimate: concurred positions of P_D(x) (Å, n_atoms × 3); at a fixed point of
        RRR it equals the positions the steps report."""
        geo = self.geometry
        pd = geo.divide(self.replicas)
        rsum = geo.replica_sums(pd)
        eta = geo.eta_sum
        start = np.where(eta[:, None] > 0, rsum / np.maximum(eta, 1e-300)[:, None], self.xyz)
        a = self.atoms
        pos_a, _, _ = self.engine.step(self.data.f_target, rsum[a], eta[a], start[a], self.data.g_metric,
                                       self.opt.concur_steps, estimate=True)
        start[a] = pos_a
        return start

    # -- checkpoints -------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        return {"version": CHECKPOINT_VERSION, "n_atoms": len(self.model.atoms),
                "n_used": int(self.used.sum()), "options": {k: v for k, v in self.opt.as_dict().items()
                                                            if k not in ("checkpoint_every", "chunks")}}

    def save_checkpoint(self, folder: str | Path) -> Path:
        """Everything needed to continue exactly: written to a temporary folder, then swapped in."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        ex = self.geometry.exclusion
        np.savez(tmp / "state.npz", xyz=self.xyz, replicas=self.replicas, s=self.engine.s,
                 f_target=self.data.f_target, f_bulk=self.data.f_bulk, f_obs=self.data.f_obs,
                 g_metric=self.data.g_metric, ex_atoms=ex.atoms, ex_r_min=ex.r_min, ex_rot=ex.rot,
                 ex_trans=ex.trans, nb_xyz=self.geometry.nonbonded.xyz_at_search)
        for k, st in enumerate(self.engine.state()):
            np.savez(tmp / f"density_{k:03d}.npz", **st)
        meta = {**self.fingerprint(), "stage": self.stage, "iteration": self.iteration, "history": self.history,
                "stage_reports": self.stage_reports, "n_chunks": len(self.engine.slices)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old.exists():
            shutil.rmtree(old)
        return folder

    def load_checkpoint(self, folder: str | Path) -> None:
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        mine = self.fingerprint()
        if {k: meta.get(k) for k in mine} != json.loads(json.dumps(mine)):
            raise DrefineError(f"{folder}: the checkpoint was made for other inputs or options; "
                               "run without --resume, or with the same inputs and options")
        if meta["n_chunks"] != len(self.engine.slices):
            raise DrefineError(f"{folder}: the checkpoint has {meta['n_chunks']} density chunks, this run "
                               f"{len(self.engine.slices)}; resume with --chunks {meta['n_chunks']}")
        st = np.load(folder / "state.npz")
        self.xyz, self.replicas = st["xyz"], st["replicas"]
        self.data = StageData(st["f_target"], st["f_bulk"], st["f_obs"], float(st["g_metric"]))
        geo = self.geometry
        geo.exclusion = _Exclusion(st["ex_atoms"], st["ex_r_min"], st["ex_rot"], st["ex_trans"])
        geo.nonbonded = find_nonbonded_pairs(self.model, geo.restraints, st["nb_xyz"], buffer=1.0)
        geo._layout()
        states = [dict(np.load(folder / f"density_{k:03d}.npz")) for k in range(meta["n_chunks"])]
        self.engine.restore(states, st["s"])
        self.stage, self.iteration = meta["stage"], meta["iteration"]
        geo.set_bond_tolerance(self._bond_scale())
        self.history, self.stage_reports = meta["history"], meta["stage_reports"]

    # -- the whole run -----------------------------------------------------------------------------
    def run(self, progress=None, checkpoint: str | Path | None = None, resumed: bool = False) -> None:
        """All stages from where the run stands. `progress(record)` after each step. Ctrl-C (SIGINT)
        is held until the step under way has finished, so the checkpoint written then is a
        consistent state; KeyboardInterrupt is raised after it."""
        opt = self.opt
        last_save = time.monotonic()
        with _deferred_interrupt() as interrupted:
            try:
                while self.stage < len(opt.iterations):
                    if not resumed or self.data is None:
                        self.start_stage()
                    resumed = False
                    while self.iteration < opt.iterations[self.stage]:
                        rec = self.step()
                        if progress is not None:
                            progress(rec)
                        if interrupted():
                            raise KeyboardInterrupt
                        # also at each stage's end: the searches after RRR take minutes, and an
                        # interrupt there resumes from the end of RRR, not from the last multiple of N
                        if checkpoint and (self.iteration % opt.checkpoint_every == 0
                                           or self.iteration == opt.iterations[self.stage]
                                           or time.monotonic() - last_save > 600):
                            self.save_checkpoint(checkpoint)
                            last_save = time.monotonic()
                    self.stage += 1
                    self.iteration = 0
                    self.data = None
            except KeyboardInterrupt:
                if checkpoint and self.data is not None:
                    self.save_checkpoint(checkpoint)
                raise


def closing_stage(done: Untangler, model: Model, client=None, workdir: str | Path | None = None) -> Untangler:
    """An untangling run of one stage with the last stage's settings (iterations, bond windows, g),
    from `model`: a model that a swap search after RRR changed. Its swapped atoms sit where local
    refinements at an automatic weight and a whole-model ML refinement left them, and nothing but RRR
    holds the geometry to its windows again: on lotswrong the residue swap search left 14 bonds and
    angles beyond 4σ (by the shared scorer), and with this stage after it 1 (BENCHMARKS.md, session
    29). The density variables, replicas and data start afresh at the model's positions, B and
    occupancies."""
    o = done.opt
    opt = replace(o, iterations=(o.iterations[-1],), bond_tolerance=o.bond_tolerance_final, g=o.g_final)
    return Untangler(model, done.geometry.restraints, done.table, opt, phases_deg=done.phases_deg, client=client,
                     workdir=workdir)


@contextlib.contextmanager
def _deferred_interrupt():
    """Within: SIGINT only sets a flag (the yielded callable reads it); a second Ctrl-C interrupts
    at once. Outside the main thread (e.g. on a dask worker) nothing changes."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: flag["set"]
    finally:
        signal.signal(signal.SIGINT, previous)
