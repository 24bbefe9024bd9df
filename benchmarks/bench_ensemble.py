"""Ensemble throughput: drefine ensemble on 1 and 2 workers, and servalcat two at a time.

Case: the shared tools/make_case.py 4hg7 model in a P 1 box with its 3 Å electron model map
(truth.pdb, map.mrc); 32 members, each the truth shaken by 0.5 Å RMS with seed 100 + i (drefine
makes them itself; the same starts are written for servalcat with drefine's shake_coordinates).
Quality of every member by the shared tools/metrics.py (RMSD to truth, bond/angle RMSD).
Also (--big): 100 members of 5fuu (protein part) against its 3 Å map, peak memory recorded.

Usage: python benchmarks/bench_ensemble.py [--work DIR] [--members 32] [--rounds 3] [--big | --only-big]
       [--no-servalcat]
Rounds: 1 worker, 2 workers and servalcat one after the other, the ratios taken within each round
and their median reported (this machine's speed drifts by ±20 % over minutes).
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
from common import DATA, DREFINE, MONLIB, SERVALCAT, TOOLS


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
    cmd = ["/usr/bin/time", "-f", "PEAK_KB %M", DREFINE, "ensemble", d / "truth.pdb", d / "map.mrc", "--resolution",
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
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of (1 worker, 2 workers, servalcat) run one after the other: the ratios are "
                         "taken within a round, so that the machine's drifting speed cancels")
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
    servalcat = n and not args.no_servalcat and SERVALCAT.exists()
    rows = []
    for k in range(args.rounds if n else 0):
        row = {w: run_drefine(d, n, w, f"w{w}") for w in (1, 2)}
        if servalcat:
            row["servalcat"] = run_servalcat(d, n)
        rows.append(row)
        if k == 0:  # the members are the same in every round (seeded): their quality once
            for w in (1, 2):
                q = quality(sorted((row[w]["out"] / "members").glob("*.cif")), d / "truth.pdb")
                print(f"quality, drefine {w} worker(s): RMSD to truth {q['rmsd']:.3f} Å, bonds "
                      f"{q['bond_rmsd']:.4f} Å, angles {q['angle_rmsd']:.2f}°, peak {row[w]['peak_mb']:.0f} MB")
            if servalcat:
                q = quality(row["servalcat"]["outs"], d / "truth.pdb")
                print(f"quality, servalcat ({len(row['servalcat']['outs'])} of {n}): RMSD to truth {q['rmsd']:.3f} "
                      f"Å, bonds {q['bond_rmsd']:.4f} Å, angles {q['angle_rmsd']:.2f}°")
            print("| round | 2 workers: wall s | batch s | members/min | 1 worker: members/min | 2 vs 1 | "
                  "servalcat wall s | whole command vs servalcat | batch vs servalcat |")
        print(_round_row(k + 1, row, n), flush=True)
    if len(rows) > 1:
        ratios = [row[2]["per_min"] / row[1]["per_min"] for row in rows]
        line = f"median of {len(rows)} rounds: 2 vs 1 worker {np.median(ratios):.2f}x"
        if servalcat:
            whole = [row["servalcat"]["wall_s"] / row[2]["wall_s"] for row in rows]
            line += f", whole command vs servalcat {np.median(whole):.2f}x"
        print(line)
    if args.big:
        b = make_case(work, "5fuu_3.0", DATA / "models/pdb5fuu.ent")
        r = run_drefine(b, 100, 2, "big")
        print(f"5fuu, 100 members, 2 workers: wall {r['wall_s']:.0f} s, {r['per_min']:.2f} members/min, peak "
              f"{r['peak_mb']:.0f} MB (largest process), mean RMSF {r['mean_rmsf']:.3f} Å")


def _round_row(k: int, row: dict, n: int) -> str:
    one, two = row[1], row[2]
    cells = [f"{k}", f"{two['wall_s']:.1f}", f"{two['batch_s']:.1f}", f"{two['per_min']:.1f}", f"{one['per_min']:.1f}",
             f"{two['per_min'] / one['per_min']:.2f}x"]
    s = row.get("servalcat")
    if s:  # throughput: members per minute, servalcat's whole run against drefine's whole command / batch
        cells += [f"{s['wall_s']:.1f}", f"{s['wall_s'] / two['wall_s']:.2f}x", f"{s['wall_s'] / two['batch_s']:.2f}x"]
    else:
        cells += ["", "", ""]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
