"""Batches of whole refinements as dask tasks: ensembles of perturbed starts and weight grids.

Every member is one coarse task (perturb, refine, score, write its own files); the model, the
data and the restraints are scattered to the workers once, never embedded in each task. Results
stream back as tasks finish (`as_completed`), each member's files are written by the task into
the output folder at once (atomically), and a member whose files exist is not run again with
`resume`. A task that raises is retried (`retries`, on any worker); a worker that dies takes its
running tasks with it and the scheduler reruns them elsewhere (dask's allowed-failures); a member
that still fails is reported by name. Members are deterministic (their seed, single-threaded
kernels on workers and here alike), so a run gives the same files wherever its tasks ran.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import DrefineError
from ..io.atomic import write_json
from ..io.models import write_model
from ..model.arrays import Model
from ..model.perturb import shake_coordinates


@dataclass
class Member:
    """One refinement of a batch: its name, the seed of its perturbation and its settings."""

    name: str
    seed: int | None  # None: the start model as given
    rmsd: float = 0.0  # Å of the seeded perturbation
    regularise: int = 0  # geometry-only L-BFGS iterations after the perturbation (0: none)
    weight: float | None = None
    sharpen_b: float | None = None  # Å²


@dataclass
class BatchResult:
    done: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the output folder (resume)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    # refined coordinates (atoms, 3) Å of the members run now, by name: the ensemble statistics
    # need not read their files back (members resumed from the folder are read from it)
    xyz: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, summary: dict, xyz: np.ndarray) -> None:
        self.done.append(summary)
        self.xyz[summary["name"]] = xyz


def member_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    return out_dir / "members" / f"{name}.cif", out_dir / "members" / f"{name}.json"


def _geometry(model: Model, restraints, xyz) -> tuple[float, float]:
    from ..refine.realspace import geometry_rmsd

    return geometry_rmsd(xyz, restraints, model.atoms.is_hydrogen)


def run_member(payload: dict, member: Member, out_dir: str) -> tuple[dict, np.ndarray]:
    """One task: perturb (seeded), refine, score, write PREFIX.cif and PREFIX.json; return the
    summary and the refined coordinates (atoms, 3) Å. Single-threaded kernels: members run side
    by side, one per core, and give the same numbers wherever they run."""
    from ..threads import single_threaded

    with single_threaded():
        return _run_member(payload, member, out_dir)


def _run_member(payload: dict, member: Member, out_dir: str) -> tuple[dict, np.ndarray]:
    t0 = time.perf_counter()
    model: Model = payload["model"]
    restraints = payload["restraints"]
    start = model if member.seed is None else shake_coordinates(model, member.rmsd, member.seed)[0]
    if member.seed is not None and member.regularise:
        start = regularised(start, restraints, member.regularise)
    summary: dict = {"name": member.name, "seed": member.seed, "rmsd_shake": member.rmsd}
    if payload["mode"] == "rsr":
        from ..density.map_fit import map_model_fit
        from ..refine.rsr import run_rsr

        opt = replace(payload["options"], weight=member.weight if member.weight is not None else payload["options"].weight)
        if member.sharpen_b is not None:
            opt = replace(opt, sharpen=member.sharpen_b)
        result = run_rsr(start, payload["data"], restraints, opt, client=None, log=lambda s: None)
        refined = start.copy()
        refined.atoms.xyz, refined.atoms.b_iso = result.xyz, result.b_iso
        box = result.map_box
        if result.sharpen_b:  # score against the map as given, so that runs with other B compare
            from ..refine.rsr import is_crystal_map, map_box_around

            box = payload["data"] if is_crystal_map(payload["data"], refined) else map_box_around(
                payload["data"], refined.atoms.xyz[restraints.atom_indices], opt.box_margin + opt.resolution)
        fit = map_model_fit(refined, box, opt.resolution, source=opt.source)
        summary.update(weight=result.weight, sharpen_b=result.sharpen_b, cc_mask=fit["cc_mask"], cc_box=fit["cc_box"],
                       per_residue_cc=fit.get("per_residue", {}).get("values", {}))
    else:
        from ..refine.xray import XrayOptions, refine_xray

        opt: XrayOptions = payload["options"]
        if member.weight is not None:
            opt = replace(opt, weight=member.weight)
        result = refine_xray(start, payload["data"], restraints, opt, log=lambda s: None)
        refined = result.applied_to(start)
        summary.update(weight=result.weight, r_work=result.scale.r_work, r_free=result.scale.r_free)
    bonds, angles = _geometry(refined, restraints, refined.atoms.xyz)
    summary.update(bonds_rmsd=bonds, angles_rmsd=angles, seconds=time.perf_counter() - t0)
    cif, js = member_paths(Path(out_dir), member.name)
    cif.parent.mkdir(parents=True, exist_ok=True)
    write_model(refined, cif)
    write_json(js, summary)  # written last: its presence marks the member done
    return summary, refined.atoms.xyz


def regularised(model: Model, restraints, iterations: int) -> Model:
    """The perturbed model relaxed against the geometry restraints alone (L-BFGS, `iterations`):
    a cheap stand-in for a short restrained randomisation, so that every start has sane bonds
    and angles. It keeps the part of the displacement that does not strain the geometry (about
    40 % of the RMS of a 0.5 Å Gaussian shake): shake harder for the same spread."""
    from scipy.optimize import minimize

    from ..restraints.target import GeometryTarget

    geom = GeometryTarget(model, restraints)
    idx = restraints.atom_indices
    base = model.atoms.xyz.copy()

    def fun(x):
        xyz = base.copy()
        xyz[idx] = x.reshape(-1, 3)
        f, g = geom.value_and_gradient(xyz)
        return f, g[idx].ravel()

    res = minimize(fun, base[idx].ravel(), jac=True, method="L-BFGS-B", options={"maxiter": iterations})
    out = model.copy()
    out.atoms.xyz[idx] = res.x.reshape(-1, 3)
    return out


def run_batch(payload: dict, members: list[Member], out_dir: Path, client=None, resume: bool = False,
              retries: int = 2, log: Callable[[str], None] = print) -> BatchResult:
    """Run every member not yet done; `client` None runs them here, one after the other."""
    t0 = time.perf_counter()
    out = BatchResult()
    todo = []
    for m in members:
        _, js = member_paths(out_dir, m.name)
        if js.exists():
            if not resume:
                raise DrefineError(f"{out_dir} already holds results ({js.name}): use --resume to finish the run, "
                                   "or another output folder")
            out.done.append(json.loads(js.read_text()))
            out.skipped.append(m.name)
        else:
            todo.append(m)
    if out.skipped:
        log(f"resume: {len(out.skipped)} members already done, {len(todo)} to run")
    total = len(members)
    if client is None:
        for m in todo:
            try:
                out.add(*run_member(payload, m, str(out_dir)))
            except Exception as e:  # noqa: BLE001 - reported by name, the batch goes on
                out.failed[m.name] = f"{type(e).__name__}: {e}"
            _progress(log, len(out.done) + len(out.failed), total, m.name, t0)
    else:
        from distributed import as_completed

        shared = client.scatter(payload, broadcast=True)
        futures = {client.submit(run_member, shared, m, str(out_dir), key=f"drefine-{out_dir.name}-{m.name}",
                                 retries=retries, pure=False): m for m in todo}
        try:
            for fut in as_completed(futures):
                m = futures[fut]
                try:
                    out.add(*fut.result())
                except Exception as e:  # noqa: BLE001 - reported by name, the batch goes on
                    out.failed[m.name] = f"{type(e).__name__}: {e}"
                _progress(log, len(out.done) + len(out.failed), total, m.name, t0)
        except KeyboardInterrupt:
            client.cancel(list(futures))
            raise
    for name, why in out.failed.items():
        log(f"member {name} failed{'' if client is None else f' after {retries + 1} tries'}: {why}")
    order = {m.name: i for i, m in enumerate(members)}
    out.done.sort(key=lambda s: order.get(s["name"], len(order)))
    out.seconds = time.perf_counter() - t0
    return out


def _progress(log, k: int, n: int, name: str, t0: float) -> None:
    width = 30
    filled = round(width * k / max(n, 1))
    log(f"[{'#' * filled}{'.' * (width - filled)}] {k}/{n}  {name}  {time.perf_counter() - t0:.1f} s")


def ensemble_members(n: int, rmsd: float, seed: int = 0, weight: float | None = None, seeds=None,
                     regularise: int = 0) -> list[Member]:
    """N members with seeds seed, seed+1, ... (or the given `seeds`) and the same settings."""
    seeds = list(seeds) if seeds else [seed + i for i in range(n)]
    return [Member(name=f"member_{i:04d}", seed=int(s), rmsd=rmsd, weight=weight, regularise=regularise)
            for i, s in enumerate(seeds)]


def grid_members(weights, sharpen_bs=(None,)) -> list[Member]:
    """The start model refined once per (weight, sharpening B)."""
    out = []
    for w in weights:
        for b in sharpen_bs:
            tag = f"w{w:g}" + ("" if b is None else f"_b{b:g}")
            out.append(Member(name=tag, seed=None, weight=float(w), sharpen_b=None if b is None else float(b)))
    return out


def ensemble_statistics(model: Model, restraints, out_dir: Path, done: list[dict],
                        coordinates: dict[str, np.ndarray] | None = None) -> dict:
    """Per-atom RMSF (Å) about the ensemble mean, per-residue mean RMSF and CC spread.
    `coordinates`: refined coordinates by member name (`BatchResult.xyz`); members without are
    read from their files."""
    from ..io.models import read_model

    idx = restraints.atom_indices
    coordinates = coordinates or {}

    def refined(name: str) -> np.ndarray:
        xyz = coordinates.get(name)
        return (xyz if xyz is not None else read_model(member_paths(out_dir, name)[0]).atoms.xyz)[idx]

    xyz = np.stack([refined(s["name"]) for s in done])
    mean = xyz.mean(axis=0)
    rmsf = np.sqrt(((xyz - mean) ** 2).sum(axis=2).mean(axis=0))
    res = model.atoms.residue_index[idx]
    n_res = len(model.residues)
    per_res = np.bincount(res, weights=rmsf, minlength=n_res) / np.maximum(np.bincount(res, minlength=n_res), 1)
    have = np.unique(res)
    cc_rows = [s.get("per_residue_cc", {}) for s in done]
    labels = [model.residues.label(int(r)) for r in have]
    cc = np.array([[row.get(lab, np.nan) for lab in labels] for row in cc_rows]) if cc_rows and cc_rows[0] else None
    out = {"n_members": len(done), "mean_rmsf": float(rmsf.mean()), "max_rmsf": float(rmsf.max()),
           "per_residue": [{"residue": lab, "rmsf": float(per_res[r])} for lab, r in zip(labels, have)]}
    if cc is not None:
        for row, m, s in zip(out["per_residue"], np.nanmean(cc, axis=0), np.nanstd(cc, axis=0)):
            row.update(cc_mean=float(m), cc_spread=float(s))
    return {"summary": out, "rmsf": rmsf, "xyz": xyz, "atoms": idx}


def ensemble_model_map(payload: dict, xyz: np.ndarray, atoms: np.ndarray, atoms_per_map: int = 10_000):
    """The members' model maps averaged (a DensityMap on the map box around all members): the
    density the ensemble as a whole predicts. `xyz` (members, atoms, 3) Å for the rows `atoms`.
    The map is linear in the atoms, so members are pooled into one model and spread together:
    one FFT pair per pool of up to `atoms_per_map` atoms instead of one per member (32 members of
    744 atoms: 0.30 → 0.14 s; pools of 10,000 atoms keep the peak ~20 MB, 200,000 took 48 MB).
    Occupancies stay as they are (the density cutoff of each atom's sphere is absolute) and the
    sum is divided by N at the end."""
    from ..density.map_fit import model_map_on_grid
    from ..refine.rsr import map_box_around

    model, opt = payload["model"], payload["options"]
    box = map_box_around(payload["data"], xyz.reshape(-1, 3), opt.box_margin + opt.resolution)
    n_members = len(xyz)
    per_pool = max(1, atoms_per_map // max(len(atoms), 1))
    total = np.zeros(box.data.shape)
    for first in range(0, n_members, per_pool):
        part = xyz[first:first + per_pool]
        pooled = model.copy()
        pooled.atoms = model.atoms.take(np.tile(atoms, len(part)))
        pooled.atoms.xyz = part.reshape(-1, 3).astype(pooled.atoms.xyz.dtype)
        pooled.atoms.model_index[:] = 0
        total += model_map_on_grid(pooled, box, opt.resolution, opt.source)
    return replace(box, data=(total / n_members).astype(np.float32))
