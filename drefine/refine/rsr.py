"""The real-space refinement protocol (what `drefine rsr` runs), given a model, a map and settings.

1. The map is cut to a box around the model (margin `box_margin` Å) unless it is a crystal's
   unit cell: memory and time then follow the model, not the map (a zarr map is read only in
   the chunks the box touches). The box is normalised to zero mean and unit σ.
2. Optional map sharpening/blurring by B (`sharpen`: a number, or "auto": the B in −100..+100 Å²
   that maximises the correlation of the map with the start model's map inside the model mask).
3. Optional rigid-body refinement of chains or of groups given as gemmi selections (atom-centred
   target, 6 parameters a group).
4. Macro-cycle 1 at a provisional weight; then, unless a weight is given, the weight scan on
   the model it reached (a batch of tasks on the dask cluster); then the remaining macro-cycles
   with the atom-centred target and a final cycle with the map-model least-squares target.
5. Optional per-atom isotropic B refinement against the map (map-model target, B of bonded atoms
   restrained to be similar).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import gemmi
import numpy as np
from scipy.optimize import minimize
from scipy.spatial.transform import Rotation

from ..density.map_fit import _pearson, model_map_on_grid
from ..density.model_map import model_map_gradient
from ..errors import DrefineError
from ..io.maps import DensityMap, blur_sharpen, mask_around_atoms
from ..model.arrays import Model
from ..restraints.topology import Restraints
from ..targets.map_targets import AtomCentredMapTarget, normalised_map
from .mirror_flips import judge_mirror_flips
from .peptide_flips import flip_new_outliers
from .realspace import CycleStats, RealSpaceSettings, refine_coordinates
from .weight import weight_scan

PROVISIONAL_WEIGHT = 5.0
#: L-BFGS iterations of each weight-scan trial (an 8-residue segment): on 4hg7 and 5fuu at 3 Å,
#: 100 chose the same weight as 200 in 60 % of the time; 60 chose another on 5fuu
SCAN_ITERATIONS = 100


@dataclass
class RSROptions:
    resolution: float
    weight: float | None = None  # None: automatic
    macro_cycles: int = 2  # atom-centred cycles, cycle 1 included; the final LS cycle comes on top
    final_target: str = "ls"
    final_minimiser: str = "fisher"  # the final map-model cycle: Fisher-scoring steps or "lbfgs"
    sharpen: float | str | None = None  # B in Å², "auto" or None
    rigid_body: bool = False  # each chain, unless rigid_groups are given
    rigid_groups: tuple[str, ...] = ()  # gemmi selections (e.g. "A/1-50"), one rigid group each
    refine_b: bool = False
    box_margin: float = 6.0
    source: str = "electron"
    seed: int = 0
    n_segments: int = 8
    rama_restraints: bool = True
    peptide_flips: bool = True  # try flipping the peptides of residues that became Ramachandran outliers
    mirror_flips: bool = True  # judge the mirror images of either-handed chiral centres and proline puckers
    rama_dir: str | None = None


@dataclass
class RSRResult:
    xyz: np.ndarray
    b_iso: np.ndarray
    cycles: list[CycleStats]
    weight: float
    weight_scan: dict | None
    sharpen_b: float
    map_box: DensityMap
    notes: list[str] = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    peptide_flips: dict | None = None  # {"tried": [...], "flipped": [...]} residue labels
    mirror_flips: dict | None = None  # {"judged": n, "flipped": [...]} labels of the mirrored atoms


def is_crystal_map(dmap: DensityMap, model: Model) -> bool:
    """A map of a crystal's unit cell with its symmetry (keep whole and periodic)."""
    sg = dmap.spacegroup
    return bool(dmap.is_full_cell and model.has_crystal_cell and sg is not None and sg.number > 1)


def map_box_around(dmap: DensityMap, xyz: np.ndarray, margin: float) -> DensityMap:
    """The part of the map within `margin` Å of the atoms' bounding box, as its own P 1 box
    (start 0, origin at its corner) so that model maps and FFTs work on the box alone."""
    g = dmap.index_of_xyz(xyz)
    pad = margin * np.linalg.norm(dmap.index_matrix, axis=1)
    lo = np.maximum(np.floor(g.min(0) - pad).astype(int), 0)
    hi = np.minimum(np.ceil(g.max(0) + pad).astype(int) + 1, np.array(dmap.shape))
    if np.any(hi - lo < 4):
        raise DrefineError("the map does not cover the model")
    block = dmap.data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    data = np.asarray(block.compute() if hasattr(block, "compute") else block, dtype=np.float64)
    corner = dmap.xyz_of_index(lo[None].astype(np.float64))[0]
    vox = dmap.orth_matrix / np.array(dmap.sampling)[None, :]
    edges = vox * data.shape
    lengths = np.linalg.norm(edges, axis=0)
    cosines = [edges[:, 1] @ edges[:, 2] / (lengths[1] * lengths[2]), edges[:, 0] @ edges[:, 2] / (lengths[0] * lengths[2]),
               edges[:, 0] @ edges[:, 1] / (lengths[0] * lengths[1])]
    cell = gemmi.UnitCell(*lengths, *np.degrees(np.arccos(np.clip(cosines, -1, 1))))
    return DensityMap(data=data, cell=cell, sampling=np.array(data.shape), start=np.zeros(3, dtype=int),
                      origin=corner, spacegroup=gemmi.SpaceGroup("P 1"), source=dmap.source)


def choose_sharpening(model: Model, dmap: DensityMap, d_min: float, source: str,
                      candidates=tuple(range(-100, 101, 20))) -> tuple[float, list[dict]]:
    """B (Å²) whose sharpened/blurred map correlates best with the start model's map in its mask."""
    idx = model.model_atoms(0)
    calc = model_map_on_grid(model, dmap, d_min, source, idx)
    mask = mask_around_atoms(dmap, model.atoms.xyz[idx], 2.5)
    scores = []
    for b in candidates:
        data = blur_sharpen(dmap, float(b)).data if b else np.asarray(dmap.data)
        scores.append({"b": float(b), "cc_mask": _pearson(np.asarray(data)[mask], calc[mask])})
    best = max(scores, key=lambda s: s["cc_mask"])
    return best["b"], scores


def _fit_group(xyz: np.ndarray, group: np.ndarray, target: AtomCentredMapTarget) -> np.ndarray:
    """New coordinates of `group` after the rotation (about its centre) and translation that
    maximise the atom-centred target; 6 parameters, numerical gradient (cheap: interpolation only)."""
    x0 = xyz[group]
    centre = x0.mean(0)

    def moved(p):
        return Rotation.from_rotvec(p[:3]).apply(x0 - centre) + centre + p[3:]

    def fun(p):
        full = xyz.copy()
        full[group] = moved(p)
        return target.value_and_gradient(full)[0]

    res = minimize(fun, np.zeros(6), method="L-BFGS-B", jac="3-point", options={"maxiter": 50})
    return moved(res.x)


def rigid_body_fit(model: Model, dmap: DensityMap, groups: list[np.ndarray], periodic: bool) -> np.ndarray:
    """Rotate and translate each group (about its centre) to maximise the atom-centred target."""
    xyz = model.atoms.xyz.copy()
    for g in groups:
        xyz[g] = _fit_group(xyz, g, AtomCentredMapTarget(model, dmap, g, periodic=periodic))
    return xyz


def refine_b_factors(model: Model, dmap: DensityMap, d_min: float, restraints: Restraints, source: str,
                     sigma_db: float = 10.0, iterations: int = 30) -> np.ndarray:
    """Per-atom isotropic B (Å²) against the map-model target; bonded atoms' B kept similar."""
    idx = restraints.atom_indices
    obs = np.asarray(dmap.data, dtype=np.float64)
    mask = mask_around_atoms(dmap, model.atoms.xyz[idx], 3.0)
    norm = float((obs[mask] ** 2).sum())
    bonds = restraints.bond_atoms
    work = model.copy()
    sampling = tuple(int(n) for n in dmap.sampling)

    def fun(b):
        work.atoms.b_iso[idx] = b
        calc = model_map_on_grid(work, dmap, d_min, source, idx)
        c, o = calc[mask], obs[mask]
        k = float((c * o).sum() / (c * c).sum())
        diff = np.zeros_like(calc)
        diff[mask] = k * c - o
        f = float((diff ** 2).sum() / norm)
        gr = model_map_gradient(work, dmap.cell, sampling, d_min, 2 * k * diff / norm, source=source,
                                origin=dmap.origin, atoms=idx)
        g = np.zeros(len(model.atoms))
        g[idx] = gr.b_iso
        # restraint: Σ ((B_i − B_j)/σ)² over bonds, scaled like the data term (per atom)
        db = work.atoms.b_iso[bonds[:, 0]] - work.atoms.b_iso[bonds[:, 1]]
        scale = 1.0 / max(len(idx), 1)
        f += scale * float(((db / sigma_db) ** 2).sum())
        np.add.at(g, bonds[:, 0], scale * 2 * db / sigma_db ** 2)
        np.add.at(g, bonds[:, 1], -scale * 2 * db / sigma_db ** 2)
        return f, g[idx]

    res = minimize(fun, model.atoms.b_iso[idx].copy(), jac=True, method="L-BFGS-B",
                   bounds=[(2.0, 300.0)] * len(idx), options={"maxiter": iterations})
    out = model.atoms.b_iso.copy()
    out[idx] = res.x
    return out


def run_rsr(model: Model, dmap: DensityMap, restraints: Restraints, opt: RSROptions, client=None,
            log: Callable[[str], None] = print) -> RSRResult:
    """The whole real-space protocol (module docstring); `client` runs the weight scan's tasks."""
    timing = {}
    t0 = time.perf_counter()
    idx = restraints.atom_indices
    xyz0 = model.atoms.xyz[idx]
    notes = []
    crystal = is_crystal_map(dmap, model)
    box = dmap.load() if crystal else map_box_around(dmap, xyz0, opt.box_margin + opt.resolution)
    periodic = crystal
    sharpen_b = 0.0
    if opt.sharpen == "auto":
        sharpen_b, scores = choose_sharpening(model, box, opt.resolution, opt.source)
        notes.append(f"automatic sharpening: B = {sharpen_b:+.0f} Å² (CC_mask with the start model's map "
                     + ", ".join(f"{s['b']:+.0f}: {s['cc_mask']:.3f}" for s in scores) + ")")
    elif opt.sharpen not in (None, 0, 0.0):
        sharpen_b = float(opt.sharpen)
    if sharpen_b:
        box = blur_sharpen(box, sharpen_b)
    box = normalised_map(box)
    timing["map_s"] = time.perf_counter() - t0
    work = model.copy()
    if opt.rigid_body or opt.rigid_groups:
        t = time.perf_counter()
        if opt.rigid_groups:
            from ..model.perturb import selection_mask

            groups = [np.intersect1d(np.flatnonzero(selection_mask(model, cid)), idx) for cid in opt.rigid_groups]
            what = f"{len(groups)} group(s)"
        else:
            groups = [idx[model.residues.chain_index[model.atoms.residue_index[idx]] == c]
                      for c in np.unique(model.residues.chain_index[model.atoms.residue_index[idx]])]
            what = f"{len(groups)} chain(s)"
        work.atoms.xyz = rigid_body_fit(work, box, groups, periodic)
        shift = np.sqrt(((work.atoms.xyz[idx] - xyz0) ** 2).sum(1).mean())
        log(f"rigid body: {what}, RMS shift {shift:.3f} Å")
        timing["rigid_body_s"] = time.perf_counter() - t
    rama = None
    if opt.rama_restraints:
        from ..restraints.ramachandran import ramachandran_restraints

        rama = ramachandran_restraints(model, restraints, opt.rama_dir)
        notes.append(f"Ramachandran restraints on {len(rama)} residues ({rama.source})" if rama is not None
                     else "Ramachandran restraints not used: no Top500 tables found (--rama-data DIR)")
        log(notes[-1])
    cycles: list[CycleStats] = []

    def report(st: CycleStats):
        st.cycle = len(cycles) + 1
        cycles.append(st)
        log(f"cycle {st.cycle:2d} {st.target:13s} w {st.weight:7.2f}  bonds {st.bonds_rmsd:.4f} Å  "
            f"angles {st.angles_rmsd:.2f}°  shift {st.shift_rms:.3f} Å  ({st.iterations} it, {st.seconds:.1f} s)")

    scan = None
    weight = opt.weight
    remaining = opt.macro_cycles
    t = time.perf_counter()
    if weight is None:
        xyz, _ = refine_coordinates(work, box, restraints, RealSpaceSettings(
            opt.resolution, weight=PROVISIONAL_WEIGHT, macro_cycles=1, final_target="atom", periodic=periodic,
            source=opt.source), progress=report, rama=rama)
        work.atoms.xyz = xyz
        remaining -= 1
        ts = time.perf_counter()
        result = weight_scan(work, box, restraints, client=client, n_segments=opt.n_segments,
                             iterations=SCAN_ITERATIONS, periodic=periodic, seed=opt.seed, rama=rama)
        weight, scan = result.weight, result.as_dict()
        timing["weight_scan_s"] = time.perf_counter() - ts
        log(f"weight scan: {result.kept} of {len(result.per_segment)} segments kept, weight {weight:.2f} "
            f"({timing['weight_scan_s']:.1f} s)")
    settings = RealSpaceSettings(opt.resolution, weight=weight, macro_cycles=max(remaining, 0), final_target="atom",
                                 periodic=periodic, source=opt.source, final_minimiser=opt.final_minimiser)
    xyz, _ = refine_coordinates(work, box, restraints, settings, progress=report, rama=rama)
    work.atoms.xyz = xyz
    mirror = None
    if opt.mirror_flips:
        tm = time.perf_counter()
        xyz, mirror = judge_mirror_flips(work, xyz, box, restraints, rama, weight, periodic)
        work.atoms.xyz = xyz
        if mirror.judged:
            notes.append(f"mirror flips (either-handed chiral centres, proline puckers): {len(mirror.flipped)} of "
                         f"{mirror.judged} taken" + (f" ({', '.join(mirror.flipped)})" if mirror.flipped else ""))
            log(notes[-1])
        timing["mirror_flips_s"] = time.perf_counter() - tm
    flips = None
    if rama is not None and opt.peptide_flips:
        tf = time.perf_counter()
        xyz, flips = flip_new_outliers(model, xyz, box, restraints, rama, weight, periodic, model.atoms.xyz)
        work.atoms.xyz = xyz
        if flips.tried:
            notes.append(f"peptide flips: {len(flips.flipped)} of {len(flips.tried)} new Ramachandran outlier(s) "
                         f"flipped ({', '.join(flips.flipped) or 'none'}; tried {', '.join(flips.tried)})"
                         + (f", {len(flips.escaped)} cured by a strong-Ramachandran escape ({', '.join(flips.escaped)})"
                            if flips.escaped else ""))
            log(notes[-1])
        timing["peptide_flips_s"] = time.perf_counter() - tf
    if opt.final_target == "ls":
        xyz, _ = refine_coordinates(work, box, restraints, replace(settings, macro_cycles=0, final_target="ls"),
                                    progress=report, rama=rama)
        work.atoms.xyz = xyz
    timing["coordinates_s"] = time.perf_counter() - t - timing.get("weight_scan_s", 0.0)
    b_iso = model.atoms.b_iso.copy()
    if opt.refine_b:
        t = time.perf_counter()
        b_iso = refine_b_factors(work, box, opt.resolution, restraints, opt.source)
        log(f"B refinement: mean B {b_iso[idx].mean():.1f} Å² (was {model.atoms.b_iso[idx].mean():.1f})")
        timing["b_factors_s"] = time.perf_counter() - t
    return RSRResult(xyz=xyz, b_iso=b_iso, cycles=cycles, weight=float(weight), weight_scan=scan,
                     sharpen_b=sharpen_b, map_box=box, notes=notes, timing=timing,
                     peptide_flips=flips.as_dict() if flips is not None else None,
                     mirror_flips=mirror.as_dict() if mirror is not None else None)
