"""Ensembles and weight grids as dask tasks: a real scheduler and two worker processes on
127.0.0.1, one killed with SIGKILL mid-batch, every member still there and identical to a serial
run; --resume after the client is killed runs only the missing members. No shared data needed."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gemmi
import numpy as np
import pytest

from drefine.cli import main
from drefine.io.models import read_model
from drefine.parallel.batch import ensemble_statistics
from drefine.restraints.topology import build_restraints

ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture(scope="module")
def example_map(example_model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    assert main(["fmodel", str(example_model_path), "--resolution", "3", "--electron", "--map", str(d / "map.mrc")]) == 0
    return d / "map.mrc"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    """A dask scheduler and two single-threaded worker processes (no nanny: SIGKILL kills the worker)."""
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    log = open(tmp_path / "dask.log", "w")  # noqa: SIM115 - open for the fixture's lifetime
    sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                              str(port), "--no-dashboard"], stdout=log, stderr=log, env=ENV)
    workers = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nthreads", "1",
                                 "--no-nanny", "--no-dashboard", "--name", f"w{k}"], stdout=log, stderr=log, env=ENV)
               for k in range(2)]
    from distributed import Client

    deadline = time.time() + 60
    while True:
        try:
            with Client(addr, timeout="5s") as c:
                if len(c.scheduler_info()["workers"]) == 2:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError("dask workers did not start")
        time.sleep(0.5)
    yield addr, workers
    for p in [*workers, sched]:
        if p.poll() is None:
            p.kill()
        p.wait()
    log.close()


def _ensemble_cmd(model, mp, out, *extra):
    return [sys.executable, "-m", "drefine.cli", "ensemble", str(model), str(mp), "--resolution", "3", "--n", "6",
            "--rmsd", "0.4", "--seed", "11", "--weight", "7", "-o", str(out), *extra]


def _members(out: Path) -> dict[str, np.ndarray]:
    return {p.stem: read_model(p).atoms.xyz for p in sorted((out / "members").glob("*.cif"))}


def test_ensemble_survives_a_killed_worker_and_equals_a_serial_run(example_model_path, example_map, cluster, tmp_path):
    addr, workers = cluster
    out = tmp_path / "dist"
    run = subprocess.Popen(_ensemble_cmd(example_model_path, example_map, out, "--scheduler", addr),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not list(out.glob("members/*.json")):
        assert time.time() < deadline and run.poll() is None, "no member finished"
        time.sleep(0.05)
    workers[1].send_signal(signal.SIGKILL)  # mid-batch: members are still running or waiting
    text, _ = run.communicate(timeout=600)
    assert run.returncode == 0, text
    assert len(list((out / "members").glob("*.json"))) == 6
    serial = tmp_path / "serial"
    assert main(_ensemble_cmd(example_model_path, example_map, serial, "--scheduler", "inprocess")[3:]) == 0
    a, b = _members(out), _members(serial)
    assert a.keys() == b.keys() and len(a) == 6
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["n_members"] == 6 and summary["final"]["mean_rmsf"] > 0
    # the statistics came from the coordinates the tasks returned: the same as from the files
    # (what a resumed run reads for the members it did not run), to the files' precision
    model = read_model(example_model_path)
    from_files = ensemble_statistics(model, build_restraints(model), out, summary["members"])["summary"]
    assert from_files["mean_rmsf"] == pytest.approx(summary["final"]["mean_rmsf"], rel=1e-5)
    got = [row["rmsf"] for row in summary["details"]["per_residue"]]
    assert [row["rmsf"] for row in from_files["per_residue"]] == pytest.approx(got, rel=1e-5, abs=1e-7)
    st = gemmi.read_structure(str(out / "ensemble.cif"))
    assert len(st) == 6
    for f in ("summary.html", "spread.png", "ensemble_map.mrc"):
        assert (out / f).stat().st_size > 0


def test_resume_runs_only_the_missing_members(example_model_path, example_map, tmp_path):
    out = tmp_path / "resume"
    cmd = _ensemble_cmd(example_model_path, example_map, out, "--scheduler", "inprocess")
    run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(list(out.glob("members/*.json"))) < 2:
        assert time.time() < deadline and run.poll() is None
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)  # the client dies mid-run
    run.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "members").glob("*.json")}
    assert 2 <= len(done_before) < 6
    # without --resume the folder is not overwritten
    again = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert again.returncode == 1 and "--resume" in again.stderr
    finish = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, check=False)
    assert finish.returncode == 0, finish.stdout + finish.stderr
    assert f"resume: {len(done_before)} members already done, {6 - len(done_before)} to run" in finish.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (out / "members").glob("*.json")}
    assert len(after) == 6 and all(after[k] == v for k, v in done_before.items())


def test_weight_scan_table_and_recommendation(example_model_path, example_map, tmp_path, capsys):
    out = tmp_path / "ws"
    assert main(["weight-scan", str(example_model_path), str(example_map), "--resolution", "3", "--weights",
                 "0.5,5,500", "-o", str(out), "--scheduler", "inprocess"]) == 0
    rep = json.loads((out / "weight_scan.json").read_text())
    runs = {s["name"]: s for s in rep["members"]}
    assert set(runs) == {"w0.5", "w5", "w500"}
    # more weight on the map: better fit and looser geometry
    assert runs["w500"]["bonds_rmsd"] > runs["w0.5"]["bonds_rmsd"]
    assert rep["final"]["recommended_weight"] in (0.5, 5.0, 500.0)
    rec = runs[rep["final"]["recommended_run"]]
    assert rec["bonds_rmsd"] <= 0.01 and rec["angles_rmsd"] <= 1.0
    assert (out / "weight_scan.png").stat().st_size > 0
    assert "recommended weight" in capsys.readouterr().out


def test_regularised_start_has_sane_geometry_and_keeps_its_displacement(example_model_path):
    from drefine.model.perturb import shake_coordinates
    from drefine.parallel.batch import regularised
    from drefine.refine.realspace import geometry_rmsd
    from drefine.restraints.topology import build_restraints

    model = read_model(example_model_path)
    rs = build_restraints(model)
    shaken, _ = shake_coordinates(model, 0.5, 3)
    relaxed = regularised(shaken, rs, 50)
    h = model.atoms.is_hydrogen
    b_shaken, _ = geometry_rmsd(shaken.atoms.xyz, rs, h)
    b_relaxed, a_relaxed = geometry_rmsd(relaxed.atoms.xyz, rs, h)
    assert b_shaken > 0.3 and b_relaxed < 0.03 and a_relaxed < 4.0
    moved = np.sqrt(((relaxed.atoms.xyz - model.atoms.xyz) ** 2).sum(1).mean())
    assert moved > 0.15  # still a perturbed start (about 40 % of the RMS survives)


def test_ensemble_model_map_matches_the_data_it_came_from(example_model_path, example_map):
    """Two members at the true positions: their averaged model map is the map the data were made
    from (CC > 0.99 on the same box); shifting one member by 1 Å lowers it."""
    from drefine.io.maps import read_map
    from drefine.parallel.batch import ensemble_model_map
    from drefine.refine.rsr import RSROptions, map_box_around
    from drefine.restraints.topology import build_restraints

    model = read_model(example_model_path)
    atoms = build_restraints(model).atom_indices
    data = read_map(example_map).load()
    opt = RSROptions(resolution=3.0)
    payload = {"model": model, "data": data, "options": opt, "mode": "rsr"}
    xyz = model.atoms.xyz[atoms]

    def cc(members):
        members = np.stack(members)
        m = ensemble_model_map(payload, members, atoms)
        box = map_box_around(data, members.reshape(-1, 3), opt.box_margin + opt.resolution)
        assert m.data.shape == box.data.shape
        return float(np.corrcoef(np.asarray(m.data).ravel(), np.asarray(box.data).ravel())[0, 1])

    same = cc([xyz, xyz])
    shifted = cc([xyz, xyz + np.array([1.0, 0, 0])])
    assert same > 0.99 and shifted < same - 0.02


def test_ensemble_model_map_pools_members_exactly(example_model_path, example_map):
    """Members pooled into one spread (in pools of two here) give the average of the members' own
    model maps, each computed alone."""
    from drefine.density.map_fit import model_map_on_grid
    from drefine.io.maps import read_map
    from drefine.model.perturb import shake_coordinates
    from drefine.parallel.batch import ensemble_model_map
    from drefine.refine.rsr import RSROptions, map_box_around
    from drefine.restraints.topology import build_restraints

    model = read_model(example_model_path)
    atoms = build_restraints(model).atom_indices
    data = read_map(example_map).load()
    opt = RSROptions(resolution=3.0)
    payload = {"model": model, "data": data, "options": opt, "mode": "rsr"}
    xyz = np.stack([shake_coordinates(model, 0.4, seed)[0].atoms.xyz[atoms] for seed in range(5)])
    pooled = ensemble_model_map(payload, xyz, atoms, atoms_per_map=2 * len(atoms))
    box = map_box_around(data, xyz.reshape(-1, 3), opt.box_margin + opt.resolution)
    member = model.copy()
    alone = []
    for x in xyz:
        member.atoms.xyz[atoms] = x
        alone.append(model_map_on_grid(member, box, opt.resolution, opt.source, atoms))
    expected = np.mean(alone, axis=0)
    assert np.abs(np.asarray(pooled.data) - expected).max() < 1e-5 * np.abs(expected).max()


def test_workers_keep_glibc_malloc_thresholds_and_run_no_stack_sampler():
    """dask's nanny would start workers with MALLOC_TRIM_THRESHOLD_ set (every large array then
    faulted in anew), and workers sample their task's stack every 10 ms; the local cluster's
    workers have neither, and the lines batch jobs export do the same for dask's nanny and
    workers there (read back through dask's own config in a fresh process)."""
    import os
    import subprocess
    import sys

    from drefine.parallel.cluster import batch_job_prologue, task_client

    with task_client(None, 1) as client:
        seen = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        sampling = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
    assert list(seen.values()) == [None]
    assert list(sampling.values()) == [False]
    exported = dict(ln.removeprefix("export ").split("=", 1) for ln in batch_job_prologue() if "DASK_" in ln)
    exported = {k: v.strip('"') for k, v in exported.items()}
    code = ("import dask; from distributed.nanny import _get_env_variables; "
            "print(sorted(_get_env_variables('distributed.nanny.pre-spawn-environ')), "
            "dask.config.get('distributed.worker.profile.enabled'))")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **exported), capture_output=True,
                         text=True, check=True).stdout
    assert "OMP_NUM_THREADS" in out and "MALLOC_TRIM_THRESHOLD_" not in out and out.strip().endswith("False")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={k: v for k, v in os.environ.items() if k not in exported}).stdout
    assert "MALLOC_TRIM_THRESHOLD_" in plain and plain.strip().endswith("True")  # dask's defaults


_GATHER_SCRIPT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever started us
from drefine.parallel.cluster import gather_results, task_client
with task_client(None, 1) as client:
    futures = [client.submit(time.sleep, 60, pure=False) for _ in range(6)]
    print("gathering", flush=True)
    try:
        gather_results(client, futures)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
sys.exit(130)
"""


def test_interrupting_a_gather_prints_no_tracebacks_and_stops():
    """Ctrl-C while tasks run: the script stops within seconds, and distributed's waiters do
    not print an AllExit traceback per future as the client closes (client.gather does)."""
    p = subprocess.Popen([sys.executable, "-c", _GATHER_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)
    assert p.stdout.readline().strip() == "gathering"
    time.sleep(2)
    p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError("the interrupted gather did not stop within 40 s") from None
    assert p.returncode == 130 and "interrupted" in out
    assert "never retrieved" not in err and "AllExit" not in err, err[-2000:]
