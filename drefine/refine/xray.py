"""Reciprocal-space refinement: coordinates, B (or U) and conformer occupancies against |F_obs|.

One macro-cycle:
  1. F_calc of the current model (one P 1 FFT of the model's atoms, symmetry in reciprocal
     space: `density.crystal_fft`), the bulk-solvent mask and its transform (rebuilt when an
     atom has moved more than 0.4 Å since the last one), and the fit of
     k_overall, B_aniso, k_sol, B_sol to the work set (`density.bulk_solvent`); R-work and
     R-free of this model are recorded here.
  2. For the ML target, σA parameters D and S per resolution bin (from the test set when it
     has ≥ 30 reflections per bin, else the work set: `targets.xray_targets`).
     Twinned data (`twin_law`): the target (ML or LS) sees the twinned model amplitude
     √((1 − α)|Fm(h)|² + α|Fm(Th)|²) (`TwinnedTarget`), the scale and solvent are fitted to
     it too, the twin fraction α (started at the H-test's estimate) is refitted here, R values
     are the twinned model's, and the maps are made from proportionally detwinned F_obs.
  3. Minimise, scale and solvent held fixed, all refined parameters together:
       T = w · T_data + T_geometry(xyz) + (w / w_n) · T_ADP(B or U),
     with B (U) and occupancies rescaled so their curvatures are comparable with the
     coordinates' (a diagonal preconditioner: see `ParameterLayout`), bounds on B ≥ 1 Å²
     and on occupancies (Σ over a residue's conformers = 1, or ≤ 1). Two minimisers:
     - "fisher" (default): Fisher scoring, as REFMAC and servalcat do, but with the restraints
       exact. T_data is replaced by its quadratic model at the cycle's start, g₀·δ + ½λ δᵀHδ
       with H the diagonal Fisher curvature per atom parameter (`targets.curvature`), and
       model + restraints are minimised by L-BFGS-B (30 iterations; restraint evaluations cost
       ~1 ms, an F_calc ~60 ms). One F_calc at the result accepts the step if the true
       objective fell; otherwise it is solved again with λ × 4. λ (≥ 1) follows the ratio of
       actual to predicted decrease like a trust region. A cycle takes up to 4 such steps, a
       next one only while the last moved the atoms by more than 0.05 Å RMS (a far start:
       the quadratic model holds only near its centre). Cost: 2 structure-factor
       evaluations a step (the gradient, and F at the new point, which the next step and the
       next cycle's scaling reuse) instead of ~14 for 10 L-BFGS iterations on the exact T.
       `coupling_cutoff` > 0 (`--fisher-coupling`) adds the curvature between coordinates and
       B of atoms closer than that (`targets.curvature.pair_coupling`, tapered so that the
       model stays positive semi-definite): on 3 %-noise synthetic data from a 0.3 Å shake it
       converges like L-BFGS (RMSD to the truth 0.017 Å against 0.031 Å with the diagonal
       alone), on real data (5orl) it changed nothing at 10–90 % more time, hence off.
     - "lbfgs": L-BFGS-B on the exact T, `iterations` (10) a cycle. Anisotropic U always use it.
  4. Geometry statistics; the automatic weight is adjusted (below).

Weights. Both restraint terms are Σ z² = −2 ln(prior), so the data term's natural weight w_n
puts it on the same scale: w_n = 2 for the ML target (−ln L), and N_work / T_LS(start) for least
squares (σ rescaled so that the weighted residuals have unit variance). The ADP restraints always
act at that natural ratio (the factor w / w_n). Automatic coordinate weight: w₀ = w_n, then after
every cycle, with a and b the angle and bond RMSD: when a > 1.4°, w ← w · min(1.2°/a, b*/b, 1);
otherwise w ← w · max(b*/b, ⅓) when b > 0.013 Å, and w ← w · min(√(b*/b), 1 + 2(1.4° − a)/1.4°, 2)
when b < 0.007 Å (b* = 0.010 Å): restrained deviations grow about linearly with w, and an
overshoot costs R-free, so the way up is slower. If the last cycle still ends beyond 0.015 Å or
1.5°, one more cycle runs at half the weight. `--weight W` fixes w. The test set never enters T
(R-free stays honest).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
from scipy.optimize import minimize

from ..density.bulk_solvent import (
    BulkSolventScale,
    fit_bulk_solvent,
    mask_grid_shape,
    mask_structure_factors,
    solvent_mask,
)
from ..density.crystal_fft import (
    ChunkedStructureFactors,
    CrystalStructureFactors,
    MovingSubsetStructureFactors,
)
from ..density.direct import scatterers_of_model
from ..density.form_factors import u_cart_of_atoms
from ..density.model_map import REFINEMENT_ACCURACY
from ..errors import DrefineError
from ..io.reflections import ReflectionTable
from ..model.arrays import Model
from ..model.occupancy import Q_MIN, OccupancyGroups, occupancy_groups
from ..restraints.adp import ADPPairs, adp_pairs, b_similarity_term, u_similarity_term
from ..restraints.target import GeometryTarget
from ..restraints.topology import Restraints
from ..targets.curvature import diagonal_curvature, pair_coupling
from ..targets.xray_targets import (
    LeastSquaresTarget,
    MaximumLikelihoodTarget,
    MLParameters,
    TwinnedTarget,
    estimate_ml_parameters,
)
from .realspace import geometry_rmsd
from .scoring import Damping, scoring_step

B_MIN, B_MAX = 1.0, 500.0  # Å²
U_MIN = B_MIN / (8 * np.pi ** 2)  # Å², the smallest eigenvalue an anisotropic U may take
BOND_BAND = (0.007, 0.013)  # Å
BOND_AIM = 0.010  # Å
ANGLE_MAX = 1.4  # °
FINAL_LIMITS = (0.015, 1.5)  # Å, °
ANISO_REFLECTIONS_PER_PARAMETER = 4.0
MASK_REUSE_SHIFT = 0.4  # Å: the solvent mask is rebuilt when more than MASK_REUSE_FRACTION of the atoms
# have moved further since it was made (below a mask grid step; 5orl: 3 masks in 10 cycles instead
# of 5 at 0.2 Å, 0.85 s less, R-free 0.2491 against 0.2493) ...
MASK_REUSE_FRACTION = 0.01  # ... a few atoms may: one atom moving d changes the mask by ~π(r + r_probe)²d
# (~9 Å³ for an O moving 0.4 Å) against the solvent's ~10⁵ Å³, while new waters sliding in
# elongated density rebuilt it every cycle (4hg7 --waters: 5 masks of ~0.1 s) ...
MASK_REBUILD_SHIFT = 2.0  # Å: ... and none may move further than this
FISHER_MAX_STEPS = 4  # scoring steps a macro-cycle at most ...
FISHER_REPEAT_SHIFT = 0.05  # Å: ... another while the last one moved the atoms by more (RMS)


@dataclass
class XrayOptions:
    """Settings of `refine_xray` (units: Å, Å²)."""

    target: str = "ml"  # "ml" or "ls"
    cycles: int = 10
    weight: float | None = None  # None: automatic
    adp: str = "auto"  # "iso", "aniso", "fixed" or "auto" (aniso when the data support it)
    occupancies: bool = True
    coordinates: bool = True  # False: B factors (and occupancies) only, every atom where it is
    bulk_solvent: bool = True
    ls_weighting: str = "sigma"  # least squares: "sigma" (1/σ²) or "unit"
    iterations: int = 10  # L-BFGS iterations per macro-cycle (minimiser "lbfgs")
    source: str = "xray"
    threads: int | None = None
    chunks: int = 0  # > 0: structure factors as this many atom-chunk tasks (on `client` when given)
    geometry_rescue: bool = True  # one more cycle at half the weight when the geometry ends beyond the limits
    minimiser: str = "fisher"  # "fisher" (1–4 scoring steps a cycle) or "lbfgs" (see the module docstring)
    inner_iterations: int = 30  # Fisher: L-BFGS iterations on the quadratic data model + restraints
    coupling_cutoff: float = 0.0  # Å; > 0: the Fisher model couples atoms closer than this (off: diagonal)
    initial_weight: float | None = None  # automatic weight: start here instead of the natural weight
    first_cycle: int = 1  # the number of the first cycle (logs, XrayCycle): a run continued in parts
    initial_scale: BulkSolventScale | None = None  # a run continued in parts: bulk solvent and scale
    # to start the first fit from (skips the grid search over k_sol, B_sol)
    final_accuracy: bool = True  # False: the end state keeps the cycles' F_calc accuracy (~1e-3) and
    # mask, for a part whose end only feeds a water update (the report-accuracy pass cost ~0.3 s)
    twin_law: str | None = None  # refine against data twinned by this law ("h,-k,-l")
    initial_twin_fraction: float | None = None  # twin fraction α to start from (default: the H-test's)


@dataclass
class XrayCycle:
    cycle: int
    r_work: float
    r_free: float
    target: float
    weight: float
    bonds_rmsd: float
    angles_rmsd: float
    k_sol: float
    b_sol: float
    b_mean: float
    evaluations: int
    seconds: float
    geometry_target: float = float("nan")  # the restraint target at the cycle's end (unweighted)
    objective: float = float("nan")  # weight · data + geometry + ADP similarity at the cycle's end
    twin_fraction: float | None = None  # α at the cycle's start (twin refinement)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class XrayResult:
    xyz: np.ndarray
    b_iso: np.ndarray
    u_aniso: np.ndarray
    has_aniso: np.ndarray
    occupancy: np.ndarray
    cycles: list[XrayCycle]
    weight: float
    adp: str
    scale: BulkSolventScale
    f_calc: np.ndarray
    f_model: np.ndarray
    ml: MLParameters
    occupancy_groups: OccupancyGroups
    notes: list[str] = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    twin: dict | None = None  # law, fraction (α) and per-cycle fractions of a twin refinement
    f_obs_maps: np.ndarray | None = None  # detwinned Fo for σA and maps (twin refinement), else None

    def maps_table(self, table: ReflectionTable) -> ReflectionTable:
        """The table to make σA-weighted maps from: `table`, or a copy with the detwinned Fo."""
        if self.f_obs_maps is None:
            return table
        import dataclasses

        return dataclasses.replace(table, f_obs=self.f_obs_maps)

    def applied_to(self, model: Model) -> Model:
        """A copy of `model` (the one refined) with the refined coordinates, B, U, and occupancies."""
        return _with_state(model, self.xyz, self.b_iso, self.u_aniso, self.has_aniso, self.occupancy)


def mask_is_stale(xyz: np.ndarray, xyz_at_mask: np.ndarray) -> bool:
    """Whether the atoms (Å) have moved enough since the mask was made to make it again (the
    MASK_REUSE_* and MASK_REBUILD_SHIFT rule)."""
    if xyz.shape != xyz_at_mask.shape:
        return True
    if not len(xyz):
        return False
    shift = np.sqrt(((xyz - xyz_at_mask) ** 2).sum(1))
    return bool(shift.max() > MASK_REBUILD_SHIFT or (shift > MASK_REUSE_SHIFT).mean() > MASK_REUSE_FRACTION)


class XrayData:
    """F_calc, F_model and the data target of model 0 against a reflection table.

    Bulk solvent (F_bulk = k_sol e^{−B_sol s²/4} F_mask) and k_total = k_overall e^{−sᵀB_aniso s/4}
    are refreshed by `rescale` and held fixed between calls (within a macro-cycle)."""

    def __init__(self, model: Model, table: ReflectionTable, options: XrayOptions, client=None):
        self.model, self.table, self.options = model, table, options
        self.atoms = model.model_atoms(0)
        self.sc = scatterers_of_model(model, atoms=self.atoms, source=options.source, cell=table.cell,
                                      spacegroup=table.spacegroup)
        # the minimiser sees a ~1e-3-accurate F_calc and its exact gradient; reported R values and
        # map coefficients use the default (~1e-5) accuracy
        # (and a coarser grid, d_min/2.5 rather than /3: ~30 % faster at the same ~1e-3 accuracy)
        if options.chunks > 0 or client is not None:
            n = options.chunks or max(1, len(client.scheduler_info().get("workers", {})))
            self.calc = ChunkedStructureFactors(self.sc, table.hkl, table.d_min, n, client, rate=1.25,
                                                accuracy=REFINEMENT_ACCURACY)
        else:
            self.calc = CrystalStructureFactors(self.sc, table.hkl, table.d_min, rate=1.25,
                                                threads=options.threads, accuracy=REFINEMENT_ACCURACY)
        self.report_calc = CrystalStructureFactors(self.sc, table.hkl, table.d_min, threads=options.threads)
        self.frac_matrix = self.sc.frac_matrix
        self.s_vec = np.asarray(table.hkl, dtype=np.float64) @ self.frac_matrix
        self.s2 = (self.s_vec ** 2).sum(1)
        self.k_total = np.ones(len(table))
        self.f_bulk = np.zeros(len(table), dtype=np.complex128)
        self.scale: BulkSolventScale | None = None
        self._mask_xyz: np.ndarray | None = None
        self._f_mask = None
        work = table.work & np.isfinite(table.f_obs)
        if options.twin_law:
            from ..validate.twinning import h_test, twin_mates

            # α starts at the H-test's estimate from the intensities, then follows the model (`rescale`)
            intensity = table.i_obs if table.i_obs is not None else table.f_obs ** 2
            start = options.initial_twin_fraction
            if start is None:
                start = h_test(table.hkl, np.asarray(intensity, dtype=np.float64), table.centric, table.spacegroup,
                               options.twin_law)["twin_fraction"]
            mate = twin_mates(table, options.twin_law)
            work = work & (mate >= 0)
        if options.target == "ls":
            sigma = table.sigma_f
            self.target = LeastSquaresTarget(table.f_obs, sigma, work, options.ls_weighting)
        else:
            self.target = MaximumLikelihoodTarget(table.f_obs, np.nan_to_num(table.sigma_f), table.epsilon.astype(float),
                                                  table.centric, table.bin, work, table.test & np.isfinite(table.f_obs))
        if options.twin_law:
            if isinstance(self.target, MaximumLikelihoodTarget):
                self.target.test = self.target.test & (mate >= 0)
            self.target = TwinnedTarget(self.target, mate, fraction=float(np.nan_to_num(start)))
        self.evaluations = 0

    def set_state(self, xyz, b_iso, u_aniso, has_aniso, occupancy) -> None:
        i = self.atoms
        self.sc.frac = xyz[i] @ self.frac_matrix.T
        self.sc.u_cart = u_cart_of_atoms(b_iso[i], u_aniso[i], has_aniso[i])
        self.sc.occ = occupancy[i].copy()

    def f_calc(self, report: bool = False) -> np.ndarray:
        return (self.report_calc if report else self.calc).structure_factors(self.sc)

    def rescale(self, model: Model, report: bool = False, f_calc: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """New mask, bulk solvent and scale for the current state; returns (F_calc, F_model).
        `f_calc`: the current state's F_calc when the caller has it already."""
        t = self.table
        f_calc = self.f_calc(report) if f_calc is None else f_calc
        if not self.options.bulk_solvent:
            f_mask = np.zeros_like(f_calc)
        elif self._mask_xyz is None or report or mask_is_stale(model.atoms.xyz[self.atoms], self._mask_xyz):
            mask = solvent_mask(model, mask_grid_shape(model, t.d_min), threads=self.options.threads)
            f_mask = mask_structure_factors(mask, t.cell, t.hkl, threads=self.options.threads)
            self._f_mask, self._mask_xyz = f_mask, model.atoms.xyz[self.atoms].copy()
        else:
            f_mask = self._f_mask
        twin = (self.target.mate, self.target.fraction) if isinstance(self.target, TwinnedTarget) else None
        self.scale = fit_bulk_solvent(t.hkl, t.f_obs, f_calc, f_mask, t.cell, t.spacegroup, t.work, t.test, t.bin,
                                      with_solvent=self.options.bulk_solvent, start=self.scale, twin=twin)
        self.k_total = self.scale.k_total(self.s_vec)
        self.f_bulk = self.scale.k_sol * np.exp(-self.scale.b_sol * self.s2 / 4.0) * f_mask
        f_model = self.k_total * (f_calc + self.f_bulk)
        if isinstance(self.target, MaximumLikelihoodTarget):
            self.target.update(f_model)
        elif isinstance(self.target, TwinnedTarget):
            # the scale and R values above are the twinned model's at the last α; α follows
            self.target.update(f_model)
        return f_calc, f_model

    def move_overall_b_to_atoms(self, b_iso, u_aniso, has_aniso, atoms):
        """Give the isotropic part Δ of the overall B_aniso to the atoms (B += Δ, U += Δ/8π²) and
        to B_sol, leaving F_model unchanged: otherwise atomic B and the overall scale drift
        against each other, the pair being degenerate."""
        delta = self.scale.b_iso
        b_iso, u_aniso = b_iso.copy(), u_aniso.copy()
        b_iso[atoms] = np.maximum(b_iso[atoms] + delta, B_MIN)
        an = atoms[has_aniso[atoms]]
        u_aniso[an, :3] += delta / (8 * np.pi ** 2)
        self.scale.b_aniso = self.scale.b_aniso - delta * np.eye(3)
        self.scale.b_sol += delta
        self.k_total = self.scale.k_total(self.s_vec)
        self.f_bulk = self.f_bulk * np.exp(-delta * self.s2 / 4.0)
        return b_iso, u_aniso

    def natural_weight(self) -> float:
        """Weight that puts T_data on the −2 ln L scale of the restraints (module docstring)."""
        if isinstance(self.target, MaximumLikelihoodTarget) or (
                isinstance(self.target, TwinnedTarget) and isinstance(self.target.inner, MaximumLikelihoodTarget)):
            return 2.0
        f_model = self.k_total * (self.f_calc() + self.f_bulk)
        value, _ = self.target.value_and_derivative(f_model, self.k_total)
        n = int(self.target.work.sum())
        return n / value if value > 0 else 1.0

    def value_and_gradient(self, need_adp: bool, need_occ: bool, f_calc: np.ndarray | None = None):
        """T_data and its gradient (per scatterer: xyz Å⁻¹, B, occupancy, U); `f_calc`: the
        current state's F_calc when the caller has it already."""
        self.evaluations += 1
        if f_calc is None:
            f_calc = self.f_calc()
        f_model = self.k_total * (f_calc + self.f_bulk)
        value, d = self.target.value_and_derivative(f_model, self.k_total)
        g = self.calc.gradient(self.sc, d, positions_only=not (need_adp or need_occ), with_adp=need_adp)
        return value, g

    def value(self) -> tuple[float, np.ndarray]:
        """T_data of the current state and its F_calc (no gradient)."""
        self.evaluations += 1
        f_calc = self.f_calc()
        value, _ = self.target.value_and_derivative(self.k_total * (f_calc + self.f_bulk), self.k_total)
        return value, f_calc

    def coupling(self, f_calc: np.ndarray, layout: ParameterLayout, cutoff: float) -> scipy.sparse.csr_matrix:
        """The data curvature between the parameters (coordinates, B) of different atoms closer
        than `cutoff` Å (`targets.curvature.pair_coupling`), as a sparse symmetric matrix over
        `layout`'s packed parameters; pairs with a fixed atom are left out."""
        xyz = self.sc.frac @ self.sc.orth_matrix.T
        i, j, xx, bb, xb = pair_coupling(self.sc, xyz, self.s2, self._reflection_curvature(f_calc), cutoff)
        ai, aj = self.sc.atom_index[i], self.sc.atom_index[j]
        n_atoms = len(self.model.atoms)
        px = np.full(n_atoms, -1, dtype=np.int64)
        px[layout.xyz_atoms] = 3 * np.arange(len(layout.xyz_atoms))
        pb = np.full(n_atoms, -1, dtype=np.int64)
        pb[layout.b_atoms] = layout.sizes[0] + np.arange(len(layout.b_atoms))
        rows, cols, vals = [], [], []

        def put(r, c, v):  # both triangles
            ok = (r >= 0) & (c >= 0)
            rows.extend([r[ok], c[ok]])
            cols.extend([c[ok], r[ok]])
            vals.extend([v[ok], v[ok]])

        ri, rj = px[ai], px[aj]

        def coordinate(r, a):  # packed index of coordinate a, −1 for a fixed atom
            return np.where(r >= 0, r + a, -1)

        # coordinate blocks (packed coordinates are Å)
        for a in range(3):
            for b in range(3):
                put(coordinate(ri, a), coordinate(rj, b), xx[:, a, b])
        # B–B and coordinate–B (packed B is B / s_b)
        put(pb[ai], pb[aj], bb * layout.s_b ** 2)
        for a in range(3):
            put(coordinate(ri, a), pb[aj], xb[:, a] * layout.s_b)  # x_i, B_j: −γ r̂
            put(pb[ai], coordinate(rj, a), -xb[:, a] * layout.s_b)  # B_i, x_j: +γ r̂
        n = int(sum(layout.sizes))
        if not rows:
            return scipy.sparse.csr_matrix((n, n))
        return scipy.sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                       shape=(n, n))

    def _reflection_curvature(self, f_calc: np.ndarray) -> np.ndarray:
        """The target's curvature per reflection along F's phase at F_calc."""
        return self.target.curvature(self.k_total * (f_calc + self.f_bulk), self.k_total)

    def curvature(self, f_calc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Diagonal data curvature per scatterer (coordinate, B, occupancy) at F_calc
        (`targets.curvature`)."""
        return diagonal_curvature(self.sc, self.s2, self._reflection_curvature(f_calc))


class ParameterLayout:
    """Which parameters are refined, packed into one vector with diagonal preconditioning.

    Curvatures of T_data per parameter, averaged over the data (|s| up to 1/d_min, uniform in
    volume): ∂F/∂x ~ 2π s_x F gives ⟨4π²s²/3⟩, ∂F/∂B = −s²/4 F gives ⟨s⁴/16⟩; B enters as
    B/s_B with s_B = √(⟨4π²s²/3⟩ / ⟨s⁴/16⟩) (≈ 30 Å² at 1.7 Å), and a conformer occupancy q as
    q/s_q with s_q = q̄ √(⟨4π²s²/3⟩ / n_atoms).

    Anisotropic U enters through its Cholesky factor, U = L Lᵀ (L lower triangular, diagonal
    at least √U_min): every value the minimiser tries is positive definite, so no step ends on
    a U the density cannot be made of (the minimiser had stalled there). L enters as L/s_L with
    s_L = (s_B/8π²)/(2 l̄) per atom (dU ≈ 2 l dl, l̄ the atom's starting √U_eq)."""

    def __init__(self, model: Model, movable_xyz: np.ndarray, b_atoms: np.ndarray, u_atoms: np.ndarray,
                 groups: OccupancyGroups | None, s2: np.ndarray, u_start: np.ndarray | None = None):
        """`u_start`: the U (n_atoms × 6, Å²) refinement starts from (default: the model's)."""
        self.n = len(model.atoms)
        self.xyz_atoms, self.b_atoms, self.u_atoms = movable_xyz, b_atoms, u_atoms
        self.groups = groups if groups is not None and groups.n_conformers else None
        kx = 4 * np.pi ** 2 * float(np.mean(s2)) / 3.0
        kb = float(np.mean(s2 ** 2)) / 16.0
        self.s_b = float(np.sqrt(kx / kb))
        self.s_u = self.s_b / (8 * np.pi ** 2)
        u0 = model.atoms.u_aniso if u_start is None else u_start
        u_eq = np.maximum(u0[u_atoms, :3].mean(axis=1), U_MIN) if len(u_atoms) else np.zeros(0)
        self.s_l = (self.s_u / (2.0 * np.sqrt(u_eq)))[:, None]
        if self.groups is not None:
            dep = self.groups.is_dependent()
            n_at = np.bincount(self.groups.conformer_of_atom, minlength=self.groups.n_conformers)[~dep]
            q = self.groups.free_parameters(model.atoms.occupancy)
            self.s_q = np.maximum(q, 0.2) * np.sqrt(kx / np.maximum(n_at, 1))
        else:
            self.s_q = np.zeros(0)
        self.sizes = (3 * len(movable_xyz), len(b_atoms), 6 * len(u_atoms), len(self.s_q))

    def pack(self, xyz, b_iso, u_aniso, occ_free) -> np.ndarray:
        l6 = cholesky_u6(positive_definite_u6(u_aniso[self.u_atoms], U_MIN)) / self.s_l
        return np.concatenate([xyz[self.xyz_atoms].ravel(), b_iso[self.b_atoms] / self.s_b,
                               l6.ravel(), occ_free / self.s_q if len(self.s_q) else []])

    def split(self, x):
        a, b, c, _ = np.cumsum(self.sizes)
        return (x[:a].reshape(-1, 3), x[a:b] * self.s_b, u6_of_cholesky(x[b:c].reshape(-1, 6) * self.s_l),
                x[c:] * self.s_q)

    def gradient(self, x, g_xyz, g_b, g_u, g_q) -> np.ndarray:
        """The packed gradient at `x`, given ∂T/∂xyz, ∂T/∂B, ∂T/∂U (six components) and ∂T/∂q."""
        _, b, c, _ = np.cumsum(self.sizes)
        g_l = cholesky_gradient(x[b:c].reshape(-1, 6) * self.s_l, g_u[self.u_atoms]) * self.s_l
        return np.concatenate([g_xyz[self.xyz_atoms].ravel(), g_b[self.b_atoms] * self.s_b,
                               g_l.ravel(), g_q * self.s_q if len(self.s_q) else []])

    def curvature(self, h_xyz: np.ndarray, h_b: np.ndarray, h_q: np.ndarray) -> np.ndarray:
        """The packed diagonal curvature from per-atom curvatures of a coordinate (Å⁻²) and of B
        (Å⁻⁴), both over Model.atoms, and of each free occupancy. Not for anisotropic U (the
        Fisher minimiser leaves those to L-BFGS: `refine_xray`)."""
        if self.sizes[2]:
            raise ValueError("no diagonal curvature for anisotropic U")
        return np.concatenate([np.repeat(h_xyz[self.xyz_atoms], 3), h_b[self.b_atoms] * self.s_b ** 2,
                               h_q * self.s_q ** 2 if len(self.s_q) else []])

    def bounds(self) -> list[tuple]:
        l_min = np.sqrt(U_MIN) / self.s_l[:, 0]
        l_bounds = [b for lo in l_min for b in ([(lo, None)] * 3 + [(None, None)] * 3)]
        return ([(None, None)] * self.sizes[0] + [(B_MIN / self.s_b, B_MAX / self.s_b)] * self.sizes[1]
                + l_bounds + [(Q_MIN / s, 1.0 / s) for s in self.s_q])


def positive_definite_u6(u6: np.ndarray, u_min: float) -> np.ndarray:
    """U (six components: 11, 22, 33, 12, 13, 23; Å²) with eigenvalues raised to at least u_min."""
    if not len(u6):
        return u6
    w, v = np.linalg.eigh(_u33(u6))
    m = np.einsum("aij,aj,akj->aik", v, np.maximum(w, u_min), v)
    return np.stack([m[:, 0, 0], m[:, 1, 1], m[:, 2, 2], m[:, 0, 1], m[:, 0, 2], m[:, 1, 2]], axis=1)


def cholesky_u6(u6: np.ndarray) -> np.ndarray:
    """The Cholesky factor L of each U = L Lᵀ as (l11, l22, l33, l21, l31, l32)."""
    if not len(u6):
        return np.zeros((0, 6))
    c = np.linalg.cholesky(_u33(u6))
    return np.stack([c[:, 0, 0], c[:, 1, 1], c[:, 2, 2], c[:, 1, 0], c[:, 2, 0], c[:, 2, 1]], axis=1)


def u6_of_cholesky(l6: np.ndarray) -> np.ndarray:
    """U = L Lᵀ as six components (11, 22, 33, 12, 13, 23) from (l11, l22, l33, l21, l31, l32)."""
    l11, l22, l33, l21, l31, l32 = l6.T
    return np.stack([l11 * l11, l21 * l21 + l22 * l22, l31 * l31 + l32 * l32 + l33 * l33,
                     l11 * l21, l11 * l31, l21 * l31 + l22 * l32], axis=1)


def cholesky_gradient(l6: np.ndarray, g_u6: np.ndarray) -> np.ndarray:
    """∂T/∂L from ∂T/∂U (six components, each off-diagonal U_ij one parameter) through U = L Lᵀ."""
    l11, l22, l33, l21, l31, l32 = l6.T
    g11, g22, g33, g12, g13, g23 = g_u6.T
    return np.stack([2 * g11 * l11 + g12 * l21 + g13 * l31,
                     2 * g22 * l22 + g23 * l32,
                     2 * g33 * l33,
                     2 * g22 * l21 + g12 * l11 + g23 * l31,
                     2 * g33 * l31 + g13 * l11 + g23 * l21,
                     2 * g33 * l32 + g23 * l22], axis=1)


def choose_adp_mode(requested: str, n_reflections: int, n_atoms: int) -> str:
    """"auto": anisotropic when there are ≥ 4 work reflections per parameter with xyz + U
    (9 per atom), else isotropic."""
    if requested != "auto":
        return requested
    return "aniso" if n_reflections >= ANISO_REFLECTIONS_PER_PARAMETER * 9 * n_atoms else "iso"


def _movable_coordinates(model: Model, restraints: Restraints, atoms: np.ndarray) -> np.ndarray:
    """Atoms whose coordinates refine: those with a restraint, and single-atom residues (waters,
    ions: held by repulsion and the data). Atoms of residues left unrestrained (no dictionary)
    stay where they are, since nothing would keep their shape."""
    covered = np.zeros(len(model.atoms), dtype=bool)
    covered[restraints.bond_atoms.ravel()] = True
    res = model.atoms.residue_index[atoms]
    counts = np.bincount(res, minlength=len(model.residues))
    single = counts[res] == 1
    return atoms[covered[atoms] | single]


def refine_xray(model: Model, table: ReflectionTable, restraints: Restraints, options: XrayOptions,
                log: Callable[[str], None] = print, client=None, movable: np.ndarray | None = None) -> XrayResult:
    """Macro-cycles of reciprocal-space refinement of model 0 (see the module docstring).

    `client`: a dask.distributed Client; F_calc and its gradient then run as atom-chunk tasks on
    its workers (`options.chunks` of them, default one per worker), with results identical to
    the same chunks computed in-process (`options.chunks` without a client). `movable`: a boolean
    mask of the atoms whose coordinates may move (default all restrained ones), for local
    refinement."""
    t_start = time.perf_counter()
    if options.target not in ("ml", "ls"):
        raise DrefineError(f"unknown target {options.target!r} (ml or ls)")
    notes: list[str] = []
    a = model.atoms
    atoms = model.model_atoms(0)
    xyz, b_iso = a.xyz.copy(), a.b_iso.copy()
    u_aniso, has_aniso, occ = a.u_aniso.copy(), a.has_aniso.copy(), a.occupancy.copy()
    data = XrayData(model, table, options, client)
    if options.initial_scale is not None:
        data.scale = copy.deepcopy(options.initial_scale)  # rescale updates it in place
    n_work = int((table.work & np.isfinite(table.f_obs)).sum())
    adp = choose_adp_mode(options.adp, n_work, len(atoms))
    if adp == "aniso":
        # every atom becomes anisotropic, starting from its isotropic B
        iso = ~has_aniso[atoms]
        u_aniso[atoms[iso], :3] = (b_iso[atoms[iso]] / (8 * np.pi ** 2))[:, None]
        u_aniso[atoms[iso], 3:] = 0.0
        has_aniso[atoms] = True
        b_atoms, u_atoms = np.zeros(0, np.int64), atoms
    elif adp == "iso":
        b_atoms, u_atoms = atoms[~has_aniso[atoms]], np.zeros(0, np.int64)
        if len(b_atoms) < len(atoms):
            notes.append(f"{len(atoms) - len(b_atoms)} anisotropic atoms keep their U (--adp aniso refines them)")
    elif adp == "fixed":
        b_atoms, u_atoms = np.zeros(0, np.int64), np.zeros(0, np.int64)
    else:
        raise DrefineError(f"unknown --adp {adp!r} (iso, aniso, fixed, auto)")
    groups = occupancy_groups(model, atoms) if options.occupancies else None
    if groups is not None and groups.n_conformers:
        notes.append(f"occupancies of {groups.n_groups} residues with alternate conformers refined "
                     f"({int(groups.sum_to_one.sum())} summing to 1, the others to at most 1)")
    mask = movable
    movable = _movable_coordinates(model, restraints, atoms) if options.coordinates else np.zeros(0, np.int64)
    if mask is not None:
        movable = movable[np.asarray(mask, dtype=bool)[movable]]
    if options.coordinates and len(movable) < len(atoms) and mask is None:
        notes.append(f"{len(atoms) - len(movable)} atoms of unrestrained residues keep their coordinates")
    if mask is not None:  # a local refinement: the ADPs refined (if any) are the movable atoms' too
        local = np.asarray(mask, dtype=bool)
        b_atoms, u_atoms = b_atoms[local[b_atoms]], u_atoms[local[u_atoms]]
    if mask is not None and groups is None and isinstance(data.calc, CrystalStructureFactors):
        # a local refinement: only the movable atoms are transformed at each evaluation
        row = np.full(len(a), -1, dtype=np.int64)
        row[data.sc.atom_index] = np.arange(len(data.sc.atom_index))
        data.calc = MovingSubsetStructureFactors(data.calc, row[movable])
    layout = ParameterLayout(model, movable, b_atoms, u_atoms, groups, data.s2[table.work], u_start=u_aniso)
    q_free = groups.free_parameters(occ) if layout.groups is not None else np.zeros(0)
    if layout.groups is not None:
        occ = layout.groups.expand(q_free, occ)
    geometry = GeometryTarget(model, restraints)
    pairs: ADPPairs = adp_pairs(restraints)
    is_h = a.is_hydrogen
    need_adp = bool(len(b_atoms) or len(u_atoms))
    need_occ = layout.groups is not None
    for note in notes:
        log(note)
    twinned = f" on F_twin (twin law {options.twin_law})" if options.twin_law else ""
    log(f"target {'maximum likelihood' if options.target == 'ml' else 'least squares'}{twinned}, ADP {adp}, "
        f"{layout.sizes[0]} coordinates, {layout.sizes[1]} B, {layout.sizes[2]} U, {layout.sizes[3]} occupancies; "
        f"{n_work} work and {int(table.test.sum())} test reflections to {table.d_min:.2f} Å")

    def unpack(x):
        """Put the packed parameters `x` into the state (xyz, b_iso, u_aniso, occ) and `data`."""
        nonlocal xyz, b_iso, u_aniso, occ
        pxyz, pb, pu, pq = layout.split(x)
        xyz = xyz.copy()
        xyz[movable] = pxyz
        if len(b_atoms):
            b_iso = b_iso.copy()
            b_iso[b_atoms] = pb
        if len(u_atoms):
            u_aniso = u_aniso.copy()
            u_aniso[u_atoms] = pu  # positive definite by construction (U = L Lᵀ)
        if need_occ:
            occ = layout.groups.expand(pq, occ)
        data.set_state(xyz, b_iso, u_aniso, has_aniso, occ)

    def data_part(x, f_calc=None):
        """T_data at the state `x` was unpacked to, and its packed gradient."""
        t_data, g = data.value_and_gradient(need_adp, need_occ, f_calc)
        g_xyz = np.zeros((len(a), 3))
        g_xyz[atoms] = g.xyz
        g_b = np.zeros(len(a))
        g_u = np.zeros((len(a), 6))
        if len(b_atoms):
            g_b[atoms] = g.b_iso
        if len(u_atoms):
            g_u[atoms] = g.u
        g_q = np.zeros(0)
        if need_occ:
            g_occ = np.zeros(len(a))
            g_occ[atoms] = g.occ
            g_q = layout.groups.chain_rule(g_occ)
        return t_data, layout.gradient(x, g_xyz, g_b, g_u, g_q)

    def restraint_part(x, adp_weight):
        """(T_geometry, T_ADP, packed gradient of their sum) at the state `x` was unpacked to."""
        t_geom, g_xyz = geometry.value_and_gradient(xyz)
        g_b = np.zeros(len(a))
        g_u = np.zeros((len(a), 6))
        t_adp = 0.0
        if len(b_atoms):
            t_adp = adp_weight * b_similarity_term(b_iso, pairs, g_b)
            g_b *= adp_weight
        if len(u_atoms):
            t_adp = adp_weight * u_similarity_term(u_aniso, pairs, g_u, has_aniso)
            g_u *= adp_weight
        g_q = np.zeros(len(layout.s_q))
        return t_geom, t_adp, layout.gradient(x, g_xyz, g_b, g_u, g_q)

    def objective(x, weight, adp_weight, stats):
        unpack(x)
        t_data, g_data = data_part(x)
        t_geom, t_adp, g_rest = restraint_part(x, adp_weight)
        stats.update(data=t_data, geometry=t_geom, adp=t_adp)
        return weight * t_data + t_geom + t_adp, weight * g_data + g_rest

    damping = Damping()

    def fisher_step(x0, weight, adp_weight, stats, f_calc0):
        """One scoring step from `x0` (`refine.scoring`): returns the point it ends at and its F_calc."""
        unpack(x0)
        if f_calc0 is None:
            data.evaluations += 1
            f_calc0 = data.f_calc()
        t0, g0 = data_part(x0, f_calc0)
        h_x, h_b, h_o = data.curvature(f_calc0)
        per_atom = [np.zeros(len(a)) for _ in range(3)]
        for full, part in zip(per_atom, (h_x, h_b, h_o)):
            full[data.sc.atom_index] = part
        h_q = layout.groups.curvature_chain_rule(per_atom[2]) if need_occ else np.zeros(0)

        def restraints_at(x):
            unpack(x)
            tg, ta, g = restraint_part(x, adp_weight)
            return tg + ta, g

        def data_at(x):
            unpack(x)
            return data.value()

        step = scoring_step(x0, t0, g0, layout.curvature(per_atom[0], per_atom[1], h_q), restraints_at, data_at,
                            weight, damping, layout.bounds(), options.inner_iterations,
                            data.coupling(f_calc0, layout, options.coupling_cutoff) if options.coupling_cutoff > 0
                            else None)
        tg, ta, _ = restraint_part(step.x, adp_weight)
        stats.update(data=step.data, geometry=tg, adp=ta)
        return step.x, (step.extra if step.accepted else f_calc0)

    if options.minimiser not in ("lbfgs", "fisher"):
        raise DrefineError(f"unknown minimiser {options.minimiser!r} (lbfgs or fisher)")
    use_fisher = options.minimiser == "fisher" and not len(u_atoms)
    if options.minimiser == "fisher" and len(u_atoms):
        # from a 0.3 Å shake the diagonal model of U (6 per atom, far from quadratic) overshot
        # and the refinement lagged L-BFGS's (RMSD to the truth 0.022 against 0.014 Å)
        log("anisotropic U: L-BFGS on the whole target (the Fisher step models B, not U)")
    f_calc_now = None
    data.set_state(xyz, b_iso, u_aniso, has_aniso, occ)
    weight = options.weight
    w_natural = None
    cycles: list[XrayCycle] = []
    extra_cycle_done = False
    n_cycles = options.cycles
    c = 0
    while c < n_cycles:
        c += 1
        t0 = time.perf_counter()
        data.set_state(xyz, b_iso, u_aniso, has_aniso, occ)
        f_calc_now, f_model = data.rescale(_with_state(model, xyz, b_iso, u_aniso, has_aniso, occ), f_calc=f_calc_now)
        r_work, r_free = data.scale.r_work, data.scale.r_free
        twin_fraction = data.target.fraction if isinstance(data.target, TwinnedTarget) else None
        if need_adp and mask is None:  # a local refinement's fixed atoms' B anchor the overall B: no drift
            delta = data.scale.b_iso
            clipped = bool(np.any(b_iso[atoms] + delta < B_MIN))
            b_iso, u_aniso = data.move_overall_b_to_atoms(b_iso, u_aniso, has_aniso, atoms)
            data.set_state(xyz, b_iso, u_aniso, has_aniso, occ)
            # every atom's B went up by Δ: F_calc is the old one times e^{−Δs²/4} (unless B_MIN clipped one)
            f_calc_now = None if clipped else f_calc_now * np.exp(-delta * data.s2 / 4.0)
        geometry.update(xyz)
        if w_natural is None:
            w_natural = data.natural_weight()
        if weight is None and options.initial_weight is not None:
            weight = options.initial_weight
            log(f"automatic weight: start at {weight:.4g}")
        if weight is None:
            weight = w_natural
            log(f"automatic weight: start at the natural weight {weight:.4g}")
        x0 = layout.pack(xyz, b_iso, u_aniso, q_free)
        stats: dict = {}
        evals0 = data.evaluations
        if use_fisher:
            x_end = x0
            for _step in range(FISHER_MAX_STEPS):
                x_prev = x_end
                x_end, f_calc_now = fisher_step(x_end, weight, weight / w_natural, stats, f_calc_now)
                dxyz = (x_end[:layout.sizes[0]] - x_prev[:layout.sizes[0]]).reshape(-1, 3)
                shift = float(np.sqrt((dxyz ** 2).sum(1).mean())) if len(dxyz) else 0.0
                if shift < FISHER_REPEAT_SHIFT:
                    break
        else:
            res = minimize(objective, x0, args=(weight, weight / w_natural, stats), jac=True, method="L-BFGS-B",
                           bounds=layout.bounds(),
                           options={"maxiter": options.iterations, "maxcor": 20, "ftol": 1e-12, "gtol": 1e-8})
            x_end = res.x
            objective(x_end, weight, weight / w_natural, stats)
            f_calc_now = None
        if need_occ:
            q_end = layout.split(x_end)[3]
            q_free = layout.groups.project(q_end)
            occ = layout.groups.expand(q_free, occ)
            if not np.array_equal(q_free, q_end):
                f_calc_now = None  # the projection moved them
        bonds, angles = geometry_rmsd(xyz, restraints, is_h)
        rec = XrayCycle(cycle=c + options.first_cycle - 1, r_work=r_work, r_free=r_free, target=float(stats["data"]), weight=float(weight),
                        bonds_rmsd=bonds, angles_rmsd=angles, k_sol=data.scale.k_sol, b_sol=data.scale.b_sol,
                        b_mean=float(b_iso[atoms].mean()), evaluations=data.evaluations - evals0,
                        seconds=time.perf_counter() - t0, geometry_target=float(stats["geometry"]),
                        objective=float(weight * stats["data"] + stats["geometry"] + stats["adp"]),
                        twin_fraction=twin_fraction)
        cycles.append(rec)
        log(f"cycle {rec.cycle:2d}  R-work {r_work:.4f}  R-free {r_free:.4f}  target {rec.target:.6g}  w {weight:.4g}  "
            f"bonds {bonds:.4f} Å  angles {angles:.2f}°  <B> {rec.b_mean:.1f} Å²  "
            + (f"twin α {twin_fraction:.3f}  " if twin_fraction is not None else "")
            + f"({rec.evaluations} evaluations, {rec.seconds:.1f} s)")
        if options.weight is None:
            weight = _adjust_weight(weight, bonds, angles)
        if (options.geometry_rescue and c == n_cycles and not extra_cycle_done and (bonds > FINAL_LIMITS[0] or angles > FINAL_LIMITS[1])):
            extra_cycle_done = True
            n_cycles += 1
            weight = weight * 0.5
            log(f"geometry beyond {FINAL_LIMITS[0]} Å / {FINAL_LIMITS[1]}° after the last cycle: one more at "
                f"weight {weight:.4g}")
    data.set_state(xyz, b_iso, u_aniso, has_aniso, occ)
    final_model = _with_state(model, xyz, b_iso, u_aniso, has_aniso, occ)
    f_calc, f_model = data.rescale(final_model, report=options.final_accuracy)
    twin, f_obs_maps = None, None
    if isinstance(data.target, TwinnedTarget):
        f_obs_maps = data.target.detwinned(f_model)
        twin = {"law": options.twin_law, "fraction": data.target.fraction,
                "fraction_per_cycle": [c.twin_fraction for c in cycles],
                "reflections_without_mate": int((~data.target.usable & np.isfinite(table.f_obs)).sum())}
    if isinstance(data.target, MaximumLikelihoodTarget):
        ml = data.target.params  # estimated for this F_model by the rescale
    else:
        fo_ml = table.f_obs if f_obs_maps is None else f_obs_maps
        ml = estimate_ml_parameters(fo_ml, np.nan_to_num(table.sigma_f), np.abs(f_model),
                                    table.epsilon.astype(float), table.centric, table.bin,
                                    table.work & np.isfinite(fo_ml), table.test & np.isfinite(fo_ml))
    end = "final  " if options.final_accuracy else f"after cycle {cycles[-1].cycle}:"
    log(f"{end} R-work {data.scale.r_work:.4f}  "
        f"R-free {data.scale.r_free:.4f}  k_sol {data.scale.k_sol:.3f}  B_sol {data.scale.b_sol:.1f} Å²")
    return XrayResult(xyz=xyz, b_iso=b_iso, u_aniso=u_aniso, has_aniso=has_aniso, occupancy=occ, cycles=cycles,
                      weight=float(cycles[-1].weight), adp=adp, scale=data.scale, f_calc=f_calc, f_model=f_model,
                      ml=ml, occupancy_groups=groups if groups is not None else occupancy_groups(model, np.zeros(0, int)),
                      notes=notes, timing={"refinement_s": time.perf_counter() - t_start,
                                           "evaluations": data.evaluations},
                      twin=twin, f_obs_maps=f_obs_maps)


def _u33(u6: np.ndarray) -> np.ndarray:
    m = np.empty((len(u6), 3, 3))
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = u6[:, 0], u6[:, 1], u6[:, 2]
    m[:, 0, 1] = m[:, 1, 0] = u6[:, 3]
    m[:, 0, 2] = m[:, 2, 0] = u6[:, 4]
    m[:, 1, 2] = m[:, 2, 1] = u6[:, 5]
    return m


def _with_state(model: Model, xyz, b_iso, u_aniso, has_aniso, occ) -> Model:
    m = model.copy()
    m.atoms.xyz, m.atoms.b_iso, m.atoms.u_aniso = xyz.copy(), b_iso.copy(), u_aniso.copy()
    m.atoms.has_aniso, m.atoms.occupancy = has_aniso.copy(), occ.copy()
    return m


def _adjust_weight(weight: float, bonds: float, angles: float) -> float:
    """Angles beyond ANGLE_MAX or bonds beyond the band lower the weight; bonds below the band
    raise it only when the angles leave room."""
    if angles > ANGLE_MAX:
        weight *= min(1.2 / angles, float(np.clip(BOND_AIM / max(bonds, 1e-6), 1 / 3, 1.0)))
    elif bonds > BOND_BAND[1]:
        weight *= max(BOND_AIM / bonds, 1 / 3)
    elif bonds < BOND_BAND[0]:
        # cautiously up (R-free pays for an overshoot), and less so the closer the angles are to their limit
        weight *= min(np.sqrt(BOND_AIM / max(bonds, 1e-6)), 1.0 + 2.0 * (ANGLE_MAX - angles) / ANGLE_MAX, 2.0)
    return weight


def map_coefficients(table: ReflectionTable, f_model: np.ndarray, ml: MLParameters) -> dict[str, np.ndarray]:
    """σA-weighted 2mFo−DFc and mFo−DFc (Read 1986) with the model's phases.

    m = I₁(X)/I₀(X) (acentric) or tanh(X) (centric) as in the ML target, X = 2 Fo D |Fm| / Σ
    (acentric) or Fo D |Fm| / Σ (centric), Σ = ε S + 2σ² (σ² centric); 2mFo − DFc for acentric
    and mFo for centric reflections (their phase error is 0 or 180°: no factor two). Reflections
    without Fo get DFc in the 2mFo−DFc map and 0 in the difference map. Returns amplitudes and
    phases (degrees) for FWT/PHWT, DELFWT/PHDELWT, plus FOM and FC/PHIC."""
    from scipy.special import i0e, i1e

    fo = table.f_obs
    have = np.isfinite(fo)
    fo0 = np.where(have, fo, 0.0)
    sig = np.nan_to_num(table.sigma_f)
    eps = table.epsilon.astype(float)
    cen = table.centric
    d = ml.d[table.bin]
    s = ml.s[table.bin]
    fm = np.abs(f_model)
    var = eps * s + np.where(cen, sig * sig, 2 * sig * sig)
    x = np.where(cen, fo0 * d * fm / var, 2 * fo0 * d * fm / var)
    m = np.where(cen, np.tanh(x), i1e(x) / i0e(x))
    m = np.where(have, m, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        phase = np.where(fm > 0, f_model / fm, 1.0)
    dfc = d * fm
    two = np.where(have, np.where(cen, m * fo0, 2 * m * fo0 - dfc), dfc)
    diff = np.where(have, m * fo0 - dfc, 0.0)
    c2 = two * phase
    c1 = diff * phase
    return {"FWT": np.abs(c2), "PHWT": np.degrees(np.angle(c2)), "DELFWT": np.abs(c1),
            "PHDELWT": np.degrees(np.angle(c1)), "FOM": m, "FC": fm, "PHIC": np.degrees(np.angle(f_model))}
