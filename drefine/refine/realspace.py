"""Real-space refinement of coordinates against a map: macro-cycles of L-BFGS on
w · T_map + T_geometry, with the atom-centred map target for the routine cycles and, optionally,
the map-model least-squares target for the final cycle, by default minimised by Fisher-scoring
steps (`refine.scoring`; the target's diagonal Gauss-Newton curvature is
`MapModelLSTarget.curvature`): each step costs one model map and its gradient plus one model map,
where L-BFGS on the target needs ~1.3 of each per iteration (5fuu at 2 Å: 6.6 s against 19 s for
the cycle, RMSD to the truth 0.055 against 0.056 Å).

The data/restraint weight w multiplies a map target that is a sum over atoms (in units of the
map's σ per carbon-equivalent atom) against a restraint target that is a sum of squared
z-scores, so one w suits models of any size; it is found by `weight_scan` unless given.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from ..io.maps import DensityMap
from ..model.arrays import Model
from ..restraints.target import GeometryTarget
from ..restraints.topology import Restraints
from ..targets.map_targets import AtomCentredMapTarget, MapModelLSTarget
from ..validate.geometry import angles_deg, bond_lengths


@dataclass
class RealSpaceSettings:
    """What a real-space refinement does (units: Å, Å²)."""

    resolution: float
    weight: float = 30.0
    macro_cycles: int = 5
    iterations: int = 50  # L-BFGS iterations per atom-centred macro-cycle
    final_target: str = "atom"  # "atom" or "ls" (map-model least squares) for the last cycle
    final_iterations: int = 40  # L-BFGS iterations of the final map-model cycle (final_minimiser "lbfgs")
    final_minimiser: str = "fisher"  # "fisher": scoring steps for the final map-model cycle, or "lbfgs"
    final_steps: int = 8  # scoring steps of the final cycle at most (and final_steps // 3 per weight halving)
    final_inner_iterations: int = 15  # L-BFGS iterations on each step's model (restraints exact)
    source: str = "electron"
    periodic: bool = False
    refine_hydrogens: bool = True
    converged_shift: float = 0.02  # Å RMS: stop the atom-centred cycles once one moves atoms less than this
    bond_target: float = 0.01  # Å; the final map-model cycle may not leave bonds worse than this ...
    angle_target: float = 1.0  # degrees; ... or angles (unless they were worse before it) ...
    final_tolerance: float = 1.0  # ... by more than this factor
    final_retries: int = 3  # times the final cycle's weight is halved to meet the targets ...
    retry_iterations: int = 20  # ... each time continuing from where the heavier weight left the atoms


@dataclass
class CycleStats:
    cycle: int
    target: str
    weight: float
    map_term: float
    geometry_term: float
    bonds_rmsd: float
    angles_rmsd: float
    shift_rms: float
    iterations: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        return d | self.extra


def geometry_rmsd(xyz: np.ndarray, r: Restraints, is_h: np.ndarray) -> tuple[float, float]:
    """Bond (Å) and angle (°) RMSD over restraints without hydrogens."""
    bh = ~is_h[r.bond_atoms].any(1)
    ah = ~is_h[r.angle_atoms].any(1)
    b = bond_lengths(xyz, r.bond_atoms[bh]) - r.bond_ideal[bh]
    a = angles_deg(xyz, r.angle_atoms[ah]) - np.degrees(r.angle_ideal[ah])
    return float(np.sqrt(np.mean(b ** 2))) if len(b) else 0.0, float(np.sqrt(np.mean(a ** 2))) if len(a) else 0.0


def minimise(data, geom: GeometryTarget, weight: float, xyz: np.ndarray, movable: np.ndarray,
             iterations: int) -> tuple[np.ndarray, dict]:
    """L-BFGS (scipy) on the coordinates of `movable` atoms; the others stay where they are."""
    base = xyz.copy()
    terms = {"map": 0.0, "geometry": 0.0}

    def fun(x):
        full = base.copy()
        full[movable] = x.reshape(-1, 3)
        fd, gd = data.value_and_gradient(full)
        fg, gg = geom.value_and_gradient(full)
        terms["map"], terms["geometry"] = fd, fg
        return weight * fd + fg, (weight * gd + gg)[movable].ravel()

    res = minimize(fun, base[movable].ravel(), jac=True, method="L-BFGS-B",
                   options={"maxiter": iterations, "maxcor": 20, "ftol": 1e-10, "gtol": 1e-6})
    out = base.copy()
    out[movable] = res.x.reshape(-1, 3)
    fun(res.x)
    return out, {"iterations": int(res.nit), "map": terms["map"], "geometry": terms["geometry"]}


def scoring_minimise(target, geom: GeometryTarget, weight: float, xyz: np.ndarray, movable: np.ndarray,
                     steps: int, iterations: int = 15, converged_shift: float = 0.005) -> tuple[np.ndarray, dict]:
    """Fisher-scoring steps (`refine.scoring`) on the coordinates of `movable` atoms for a target
    with `value`, `value_and_gradient` and a diagonal `curvature` (the map-model LS target): up to
    `steps` steps, fewer once one moves the atoms less than `converged_shift` Å RMS. Each step
    costs one model map and its gradient plus one model map, against ~1.3 of each per L-BFGS
    iteration on the target itself."""
    from .scoring import Damping, scoring_step

    base = xyz.copy()

    def full(x):
        out = base.copy()
        out[movable] = x.reshape(-1, 3)
        return out

    def restraints(x):
        v, g = geom.value_and_gradient(full(x))
        return v, g[movable].ravel()

    damping = Damping()
    x = base[movable].ravel()
    done, t, r = 0, float("nan"), float("nan")
    for done in range(1, steps + 1):
        here = full(x)
        t0, g0 = target.value_and_gradient(here)
        h = np.repeat(target.curvature(here)[movable], 3)
        step = scoring_step(x, t0, g0[movable].ravel(), h, restraints, lambda v: (target.value(full(v)), None),
                            weight, damping, None, iterations)
        shift = float(np.sqrt(((step.x - x).reshape(-1, 3) ** 2).sum(1).mean()))
        x, t, r = step.x, step.data, step.restraints
        if not step.accepted or shift < converged_shift:
            break
    return full(x), {"iterations": done, "map": t, "geometry": r}


def refine_coordinates(model: Model, dmap: DensityMap, restraints: Restraints, settings: RealSpaceSettings,
                       movable: np.ndarray | None = None, progress: Callable[[CycleStats], None] | None = None,
                       map_target: AtomCentredMapTarget | None = None, rama=None) -> tuple[np.ndarray, list[CycleStats]]:
    """Macro-cycles of coordinate refinement; returns the new coordinates (all atoms) and statistics."""
    xyz = model.atoms.xyz.copy()
    idx = restraints.atom_indices
    is_h = model.atoms.is_hydrogen
    if movable is None:
        movable = idx if settings.refine_hydrogens else idx[~is_h[idx]]
    geom = GeometryTarget(model, restraints, rama=rama)
    data = map_target or AtomCentredMapTarget(model, dmap, idx, periodic=settings.periodic)
    start = xyz.copy()
    stats: list[CycleStats] = []
    n_cycles = settings.macro_cycles + (1 if settings.final_target == "ls" else 0)
    converged = False
    for c in range(1, n_cycles + 1):
        final_ls = settings.final_target == "ls" and c == n_cycles
        if converged and not final_ls:
            continue
        t0 = time.perf_counter()
        before = xyz.copy()
        geom.update(xyz)
        target = (MapModelLSTarget(model, dmap, settings.resolution, idx, settings.source, periodic=settings.periodic)
                  if final_ls else data)
        scale = _ls_weight_scale(model, dmap, idx, target, data, xyz) if final_ls else 1.0
        weight = settings.weight * scale
        scoring = final_ls and settings.final_minimiser == "fisher"
        if scoring:
            new, info = scoring_minimise(target, geom, weight, xyz, movable, settings.final_steps,
                                         settings.final_inner_iterations)
        else:
            new, info = minimise(target, geom, weight, xyz, movable,
                                 settings.final_iterations if final_ls else settings.iterations)
        b, a = geometry_rmsd(new, restraints, is_h)
        if final_ls:
            # The final target has no geometry of its own in the weight scan: keep it honest.
            b0, a0 = geometry_rmsd(xyz, restraints, is_h)
            tries = 0
            b_lim = max(settings.bond_target * settings.final_tolerance, b0)
            a_lim = max(settings.angle_target * settings.final_tolerance, a0)
            while (b > b_lim or a > a_lim) and tries < settings.final_retries:
                # the lighter weight's optimum is near the heavier one's: continue from there
                # (a restart from the cycle's start costs the whole cycle again)
                weight *= 0.5
                tries += 1
                if scoring:
                    new, info = scoring_minimise(target, geom, weight, new, movable, max(settings.final_steps // 3, 1),
                                                 settings.final_inner_iterations)
                else:
                    new, info = minimise(target, geom, weight, new, movable, settings.retry_iterations)
                b, a = geometry_rmsd(new, restraints, is_h)
            info["weight_halvings"] = tries
        xyz = new
        shift = float(np.sqrt(((xyz[movable] - start[movable]) ** 2).sum(1).mean()))
        # report the nominal weight (the one the scan chose, halved if the guard acted); the final
        # target's gradient-matching scale is kept apart
        extra = {"weight_halvings": info["weight_halvings"], "ls_gradient_scale": scale} if final_ls else {}
        st = CycleStats(c, "map-model LS" if final_ls else "atom-centred", weight / scale, info["map"],
                        info["geometry"], b, a, shift, info["iterations"], time.perf_counter() - t0, extra)
        stats.append(st)
        if progress:
            progress(st)
        if not final_ls and np.sqrt(((xyz[movable] - before[movable]) ** 2).sum(1).mean()) < settings.converged_shift:
            converged = True
    return xyz, stats


def _ls_weight_scale(model, dmap, idx, ls_target, ac_target, xyz) -> float:
    """Scale that gives the LS target's gradient the atom-centred target's size at the start of the
    final cycle, so that one weight means the same for both targets."""
    _, g_ls = ls_target.value_and_gradient(xyz)
    _, g_ac = ac_target.value_and_gradient(xyz)
    n_ls, n_ac = np.linalg.norm(g_ls[idx]), np.linalg.norm(g_ac[idx])
    return float(n_ac / n_ls) if n_ls > 0 else 1.0
