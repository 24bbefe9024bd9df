"""Automatic data/restraint weight for real-space refinement, found by a parallel segment scan.

The phenix way (cctbx mmtbx/refinement/real_space/weight.py), made a batch of tasks: the
model is cut into short random segments (seeded); every segment is refined alone (the rest of
the model fixed) against the atom-centred map target with each trial weight; per segment the
trial with the best map fit whose bond and angle RMSD (restraints touching the segment, no
hydrogens; restraints wholly inside the segment: those reaching fixed neighbours cannot be
satisfied by the segment alone) stay within the targets (default 0.01 Å, 1.0°) is kept; segments whose choice lies
more than 2 robust SDs (in log weight) from the median are dropped; the weight is the geometric
mean of the rest. One task per segment (all weights), so tasks are coarse; each carries only
its segment's problem (the restraints and contacts it reaches, and the map within 6 Å of the
segment's atoms, in single precision), so nothing model- or map-sized travels. Serial and
parallel runs give identical results.
"""
from __future__ import annotations

from copy import copy
from dataclasses import dataclass, field, replace

import numpy as np

from ..io.maps import DensityMap
from ..model.arrays import Model
from ..parallel.cluster import gather_results
from ..restraints.nonbonded import find_nonbonded_pairs
from ..restraints.target import GeometryTarget
from ..restraints.topology import Restraints
from ..targets.map_targets import AtomCentredMapTarget
from .realspace import geometry_rmsd, minimise

TRIAL_WEIGHTS = (1.0, 2.0, 4.0, 7.0, 12.0, 20.0, 35.0, 60.0, 100.0)
SEGMENT_RESIDUES = 8
NEIGHBOUR_BUFFER = 1.0  # Å, as GeometryTarget's default search buffer
SEGMENT_MAP_MARGIN = 6.0  # Å of map around a segment's atoms: trials move atoms far less


@dataclass
class WeightScanResult:
    weight: float
    per_segment: list[dict] = field(default_factory=list)
    kept: int = 0
    targets: tuple[float, float] = (0.01, 1.0)

    def as_dict(self) -> dict:
        return {"weight": self.weight, "segments": len(self.per_segment), "kept": self.kept,
                "bond_target": self.targets[0], "angle_target": self.targets[1], "per_segment": self.per_segment}


def make_segments(model: Model, restraints: Restraints, n_segments: int, length: int = SEGMENT_RESIDUES,
                  seed: int = 0) -> list[np.ndarray]:
    """Atom indices of `n_segments` random, non-overlapping runs of `length` polymer residues."""
    a = model.atoms
    idx = restraints.atom_indices
    res_of = a.residue_index[idx]
    polymer = np.unique(res_of[np.isin(model.residues.entity_type[res_of], ("polymer",))])
    if len(polymer) == 0:
        polymer = np.unique(res_of)
    rng = np.random.default_rng(seed)
    n_runs = max(1, len(polymer) // length)
    starts = rng.permutation(n_runs)[:n_segments] * length
    segments = []
    for s in sorted(starts.tolist()):
        residues = polymer[s:s + length]
        segments.append(idx[np.isin(res_of, residues)])
    return segments


@dataclass
class SegmentProblem:
    """One segment's trials, self-contained and small (what a task receives): the geometry
    target over the segment and the atoms its restraints and contacts reach, renumbered; their
    positions (Å); the segment's atoms within them; its atom-centred weights; and the map around
    the segment's atoms (a float32 box cut from a cryo-EM map, or None for a periodic crystal map,
    which the tasks share as they share the Ramachandran tables: a problem's
    `geometry.rama.potential` is None).
    Shipping a segment's own small box instead of the whole map is the dask-image pattern:
    each task gets only the slice it reads."""

    geometry: GeometryTarget
    xyz: np.ndarray
    segment: np.ndarray
    map_weights: np.ndarray
    n_heavy: int
    is_h: np.ndarray
    dmap: DensityMap | None
    periodic: bool


def segment_problem(model: Model, dmap: DensityMap, restraints: Restraints, segment: np.ndarray, rama, pairs,
                    periodic: bool) -> SegmentProblem:
    """The trials' problem for one segment (see SegmentProblem)."""
    geom, atoms = GeometryTarget(model, restraints, movable=segment, rama=rama, pairs=pairs).compacted(segment)
    if geom.rama is not None:
        geom.rama = replace(geom.rama, potential=None)
    xyz = model.atoms.xyz[atoms]
    box = None
    if not periodic:
        from .rsr import map_box_around  # (rsr imports this module)

        # the map target reads the segment's atoms only (the others are fixed); single precision
        # halves what a task carries again (the interpolation kernel reads float32 as it is)
        box = map_box_around(dmap, model.atoms.xyz[segment], SEGMENT_MAP_MARGIN)
        box = replace(box, data=box.data.astype(np.float32))
    is_h = model.atoms.is_hydrogen
    return SegmentProblem(geometry=geom, xyz=xyz, segment=np.searchsorted(atoms, segment),
                          map_weights=AtomCentredMapTarget(model, dmap, segment).weights,
                          n_heavy=int((~is_h[segment]).sum()), is_h=is_h[atoms], dmap=box, periodic=periodic)


def segment_trials(problem: SegmentProblem, shared: tuple, weights, iterations: int,
                   targets: tuple[float, float] | None = None) -> list[dict]:
    """Refine one segment with the trial weights in increasing order; statistics of each trial.
    `shared`: (the periodic map or None, the Ramachandran potential or None).
    With `targets` (bond Å, angle °), stop after two consecutive trials beyond them: geometry only
    worsens with the weight, so heavier trials could not be chosen. (A task.)"""
    p = problem
    shared_map, potential = shared
    data = AtomCentredMapTarget(None, p.dmap if p.dmap is not None else shared_map, p.segment, periodic=p.periodic,
                                weights=p.map_weights)
    geometry = copy(p.geometry)
    if geometry.rama is not None:
        geometry.rama = replace(geometry.rama, potential=potential)
    # geometry statistics over the restraints wholly inside the segment
    interior = geometry.restraints.touching(p.segment, every=True)
    out = []
    beyond = 0
    for w in sorted(weights):
        xyz, _ = minimise(data, geometry, w, p.xyz, p.segment, iterations)
        b, a = geometry_rmsd(xyz, interior, p.is_h)
        fit = -data.value_and_gradient(xyz)[0] / max(float(data.weights.sum()), 1e-12)
        out.append({"weight": float(w), "bonds_rmsd": b, "angles_rmsd": a, "map_fit": float(fit),
                    "n_atoms": p.n_heavy})
        if targets is not None:
            beyond = beyond + 1 if (b > targets[0] or a > targets[1]) else 0
            if beyond >= 2:
                break
    return out


def choose_weight(trials_per_segment: list[list[dict]], bond_target: float, angle_target: float) -> WeightScanResult:
    """Best map fit within the geometry targets per segment, outliers dropped, geometric mean."""
    chosen = []
    for trials in trials_per_segment:
        ok = [t for t in trials if t["bonds_rmsd"] <= bond_target and t["angles_rmsd"] <= angle_target]
        best = max(ok, key=lambda t: t["map_fit"]) if ok else min(trials, key=lambda t: t["weight"])
        chosen.append(best["weight"])
    logw = np.log(np.array(chosen))
    med = np.median(logw)
    mad = 1.4826 * np.median(np.abs(logw - med))
    keep = np.abs(logw - med) <= 2 * mad + 1e-9
    w = float(np.exp(logw[keep].mean()))
    per = [{"chosen": c, "kept": bool(k), "trials": t} for c, k, t in zip(chosen, keep, trials_per_segment)]
    return WeightScanResult(weight=w, per_segment=per, kept=int(keep.sum()), targets=(bond_target, angle_target))


def weight_scan(model: Model, dmap: DensityMap, restraints: Restraints, client=None, n_segments: int = 8,
                weights=TRIAL_WEIGHTS, iterations: int = 60, bond_target: float = 0.01, angle_target: float = 1.0,
                periodic: bool = False, seed: int = 0, rama=None) -> WeightScanResult:
    """The automatic weight; trials run as one batch of tasks on `client` (None: in this process)."""
    segments = make_segments(model, restraints, n_segments, seed=seed)
    dmap = dmap.load()
    # one neighbour search for all segments (each problem keeps its segment's contacts)
    pairs = find_nonbonded_pairs(model, restraints, model.atoms.xyz, buffer=NEIGHBOUR_BUFFER,
                                 near=np.concatenate(segments))
    shared = (dmap if periodic else None, rama.potential if rama is not None else None)
    targets = (bond_target, angle_target)

    # the restraints that touch any segment, once: each problem then picks its own from these few
    near = restraints.touching(np.concatenate(segments))

    def problem(k):
        return segment_problem(model, dmap, near, segments[k], rama, pairs, periodic)

    if client is None:
        results = [segment_trials(problem(k), shared, weights, iterations, targets) for k in range(len(segments))]
    else:
        if any(x is not None for x in shared):
            shared = client.scatter([shared], broadcast=True)[0]  # one future for the pair
        # each task is submitted as soon as its problem is made (workers start while the rest are
        # made), the largest segments first, so that the last tasks to start are short ones
        order = sorted(range(len(segments)), key=lambda k: -len(segments[k]))
        futures = {k: client.submit(segment_trials, problem(k), shared, tuple(weights), iterations, targets,
                                    pure=False) for k in order}
        results = gather_results(client, [futures[k] for k in range(len(segments))])
    return choose_weight(results, bond_target, angle_target)
