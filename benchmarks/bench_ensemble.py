"""Ensemble throughput: drefine ensemble on 1 and 2 workers, and servalcat two at a time.

Case: the shared tools/make_case.py 4hg7 model in a P 1 box with its 3 Å electron model map
(truth.pdb, map.mrc); 32 members, each the truth shaken by 0.5 Å RMS with seed 100 + i (drefine
makes them itself; the same starts are written for servalcat with drefine's shake_coordinates).
Quality of every member by the shared tools/metrics.py (RMSD to truth, bond/angle RMSD).
Also (--big): 100 members of 5fuu (protein part) against its 3 Å map, peak memory recorded.

Usage: python benchmarks/bench_ensemble.py [--work DIR] [--members 32] [--big | --only-big] [--no-servalcat]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
DATA = Path(os.environ.get("DREFINE_TEST_DATA", HERE.parents[2] / "shared" / "data"))
TOOLS = DATA.parent / "tools"
MONLIB = DATA / "monlib"
SERVALCAT = Path(os.environ.get("PEERS_DIR", "/tmp/peers")) / "venv" / "bin" / "servalcat"


def make_case(work: Path, name: str, model: Path) -> Path:
    d = work / name
    if not (d / "map.mrc").exists():
        subprocess.run([sys.executable, TOOLS / "make_case.py", model, "3.0", "0.5", "7", d], check=True,
                       env=dict(os.environ, MONLIB=str(MONLIB)), capture_output=True)
    return d


def metrics(model: Path, truth: Path) -> dict:
    out = subprocess.run([sys.executable, TOOLS / "metrics.py", model, truth], capture_output=True, text=True,
                         env=dict(os.environ, MONLIB=str(MONLIB)), check=False)
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split() if "=" in kv) if _num(v)}


def _num(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def run_drefine(d: Path, n: int, workers: int, tag: str) -> dict:
    out = d / f"ens_{tag}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resume of the last benchmark's
    cmd = ["/usr/bin/time", "-f", "PEAK_KB %M", "drefine", "ensemble", d / "truth.pdb", d / "map.mrc", "--resolution",
           "3", "--n", str(n), "--rmsd", "0.5", "--seed", "100", "--monlib", MONLIB, "--unknown-residues", "skip",
           "--workers", str(workers), "-o", out]
    t0 = time.perf_counter()
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(p.stdout + p.stderr)
    peak = [ln for ln in p.stderr.splitlines() if ln.startswith("PEAK_KB")]
    rep = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "batch_s": rep["timing"]["batch_s"], "per_min": rep["timing"]["members_per_minute"],
            "peak_mb": int(peak[-1].split()[1]) / 1024 if peak else float("nan"), "out": out,
            "mean_rmsf": rep["final"]["mean_rmsf"]}


def quality(paths: list[Path], truth: Path) -> dict:
    with ThreadPoolExecutor(2) as ex:
        rows = list(ex.map(lambda p: metrics(p, truth), paths))
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in ("rmsd", "bond_rmsd", "angle_rmsd")}


def run_servalcat(d: Path, n: int) -> dict:
    from drefine.io.models import read_model, write_model
    from drefine.model.perturb import shake_coordinates

    sd = d / "servalcat_ens"
    sd.mkdir(exist_ok=True)
    truth = read_model(d / "truth.pdb")
    starts = []
    for i in range(n):
        p = sd / f"start_{i:04d}.pdb"
        if not p.exists():
            write_model(shake_coordinates(truth, 0.5, 100 + i)[0], p)
        starts.append(p)

    def one(i):
        wd = sd / f"m{i:04d}"
        wd.mkdir(exist_ok=True)
        subprocess.run([SERVALCAT, "refine_spa_norefmac", "--model", starts[i], "--map", d / "map.mrc", "--resolution",
                        "3.0", "--monlib", MONLIB, "--hydrogen", "no", "--ncycle", "10", "-o", "out"], cwd=wd,
                       capture_output=True, check=False)
        return wd / "out.pdb"

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as ex:  # two at a time on the two cores
        outs = list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "per_min": 60 * n / wall, "outs": [o for o in outs if o.exists()]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/drefine_bench_ensemble")
    ap.add_argument("--members", type=int, default=32)
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--no-servalcat", action="store_true")
    ap.add_argument("--only-big", action="store_true", help="skip the 4hg7 throughput runs")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.only_big:
        args.big = True
    d = make_case(work, "4hg7_3.0", DATA / "xray/4hg7/4hg7.pdb")
    n = 0 if args.only_big else args.members
    print("| run | members | wall s | batch s | members/min | peak MB | RMSD to truth Å | bonds Å | angles ° |")
    res = {}
    for workers in (1, 2) if n else ():
        r = run_drefine(d, n, workers, f"w{workers}")
        q = quality(sorted((r["out"] / "members").glob("*.cif")), d / "truth.pdb")
        res[workers] = r
        print(f"| drefine, {workers} worker(s) | {n} | {r['wall_s']:.1f} | {r['batch_s']:.1f} | {r['per_min']:.1f} | "
              f"{r['peak_mb']:.0f} | {q['rmsd']:.3f} | {q['bond_rmsd']:.4f} | {q['angle_rmsd']:.2f} |", flush=True)
    if n:
        print(f"speed-up 2 vs 1 worker (members/min): {res[2]['per_min'] / res[1]['per_min']:.2f}x")
    if n and not args.no_servalcat and SERVALCAT.exists():
        s = run_servalcat(d, n)
        q = quality(s["outs"], d / "truth.pdb")
        print(f"| servalcat, 2 at a time | {len(s['outs'])} | {s['wall_s']:.1f} | {s['wall_s']:.1f} | {s['per_min']:.1f} "
              f"| | {q['rmsd']:.3f} | {q['bond_rmsd']:.4f} | {q['angle_rmsd']:.2f} |", flush=True)
        print(f"drefine (2 workers, whole command) / servalcat throughput: "
              f"{(60 * n / res[2]['wall_s']) / s['per_min']:.2f}x")
    if args.big:
        b = make_case(work, "5fuu_3.0", DATA / "models/pdb5fuu.ent")
        r = run_drefine(b, 100, 2, "big")
        print(f"5fuu, 100 members, 2 workers: wall {r['wall_s']:.0f} s, {r['per_min']:.2f} members/min, peak "
              f"{r['peak_mb']:.0f} MB (largest process), mean RMSF {r['mean_rmsf']:.3f} Å")


if __name__ == "__main__":
    main()
