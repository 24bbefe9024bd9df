"""Real-space refinement benchmark: drefine rsr (and servalcat side by side) on synthetic and real maps.

Cases, made with the shared, independent tools/make_case.py (model in a padded P 1 box, gemmi
electron model map at D_MIN, start shaken by 0.5 Å RMS with seed 7):
  4hg7 at 2, 3 and 4 Å; 5fuu (protein part) at 2, 3 and 4 Å; and the real map em/3j6b_chain9 at 3.2 Å.
Every output is scored by tools/metrics.py (RMSD to truth, geometry on the CCP4 library, CC).
servalcat refine_spa_norefmac (10 cycles, --hydrogen no, same library) runs in the same session on
the cases named by --servalcat (needs the peers' venv: tools/peers_setup.sh).
Also: the weight scan alone on 5fuu at 3 Å with 1 and 2 workers (--scan-workers), and the start-up
stages of a process on this stack (--startup: interpreter, numpy/gemmi, scipy, numba's first kernel).

Usage: python benchmarks/bench_rsr.py [--cases 4hg7_3.0,...] [--servalcat 4hg7_3.0,5fuu_3.0]
                                      [--work DIR] [--scan-workers] [--startup]
Prints one line per run; paste the table into BENCHMARKS.md.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import DATA, DREFINE, MONLIB, SERVALCAT, TOOLS

MODELS = {"4hg7": DATA / "xray" / "4hg7" / "4hg7.pdb", "5fuu": DATA / "models" / "pdb5fuu.ent"}
ALL_CASES = [f"{m}_{d}" for m in ("4hg7", "5fuu") for d in ("2.0", "3.0", "4.0")] + ["3j6b"]


def make_case(work: Path, case: str) -> Path:
    d = work / case
    if not (d / "map.mrc").exists():
        name, res = case.split("_")
        subprocess.run([sys.executable, str(TOOLS / "make_case.py"), str(MODELS[name]), res, "0.5", "7", str(d)],
                       check=True, env=dict(os.environ, MONLIB=str(MONLIB)), capture_output=True)
    return d


def timed(cmd, log: Path, cwd: Path) -> tuple[float, float, int]:
    """Run a command in `cwd`; wall seconds, peak RSS (MB) of its largest process, exit code."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", *cmd], stdout=fh, stderr=subprocess.STDOUT,
                           cwd=cwd, check=False)
    wall = time.perf_counter() - t0
    peak = [ln for ln in log.read_text().splitlines() if ln.startswith("PEAK_KB")]
    return wall, (int(peak[-1].split()[1]) / 1024 if peak else float("nan")), p.returncode


def metrics(model: Path, truth: Path, mp: Path | None = None, d_min: str | None = None) -> dict:
    cmd = [sys.executable, str(TOOLS / "metrics.py"), str(model), str(truth)] + ([str(mp), d_min] if mp else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MONLIB=str(MONLIB)), check=False)
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return dict(kv.split("=") for kv in line.split() if "=" in kv)


def run_drefine(d: Path, case: str, res: str, extra=()) -> str:
    if case == "3j6b":
        model, mp = DATA / "em/3j6b_chain9/3J6B_9.pdb", DATA / "em/3j6b_chain9/2566_3J6B_9.mrc"
    else:
        model, mp = d / "start.pdb", d / "map.mrc"
    out = d / "drefine"
    wall, peak, code = timed([DREFINE, "rsr", str(model), str(mp), "--resolution", res, "--monlib", str(MONLIB),
                              "--unknown-residues", "skip", "-o", str(out), *extra], d / "run_drefine.txt", d)
    if code:
        return f"{case:9s} drefine   FAILED (see {d / 'run_drefine.txt'})"
    import json

    rep = json.loads((d / "drefine.json").read_text())
    if case == "3j6b":
        return (f"{case:9s} drefine   wall_s={wall:.1f} peak_mb={peak:.0f} cc_mask {rep['start']['cc_mask']:.4f}->"
                f"{rep['final']['cc_mask']:.4f} bonds={rep['final']['bonds_rmsd']:.4f} "
                f"angles={rep['final']['angles_rmsd']:.2f} rama_outliers {rep['start']['rama_outliers']:.2f}%->"
                f"{rep['final']['rama_outliers']:.2f}% new_rama_outliers={rep['final']['new_rama_outliers']} "
                f"weight={rep['final']['weight']:.1f}")
    m = metrics(Path(f"{out}.pdb"), d / "truth.pdb", d / "map.mrc", res)
    return (f"{case:9s} drefine   wall_s={wall:.1f} peak_mb={peak:.0f} rmsd={m.get('rmsd')} "
            f"bonds={m.get('bond_rmsd')} angles={m.get('angle_rmsd')} cc_mask={m.get('cc_mask')} "
            f"bonds_lost_vs_truth={int(m.get('nbond_ref', 0)) - int(m.get('nbond', 0))} "
            f"max_ref_bond_dev={m.get('max_bond_dev_ref')} weight={rep['final']['weight']:.1f}")


def run_servalcat(d: Path, case: str, res: str) -> str:
    if not SERVALCAT.exists():
        return f"{case:9s} servalcat not installed (run tools/peers_setup.sh)"
    work = d / "servalcat"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    wall, peak, code = timed([str(SERVALCAT), "refine_spa_norefmac", "--map", str(d / "map.mrc"), "--model",
                              str(d / "start.pdb"), "-d", res, "--monlib", str(MONLIB), "--hydrogen", "no",
                              "--ncycle", "10", "-o", "out"], work / "run_servalcat.txt", work)
    out = sorted(work.glob("out*.pdb")) or sorted(work.glob("out*.mmcif"))
    if code or not out:
        return f"{case:9s} servalcat FAILED (see {work / 'run_servalcat.txt'})"
    m = metrics(out[0], d / "truth.pdb", d / "map.mrc", res)
    return (f"{case:9s} servalcat wall_s={wall:.1f} peak_mb={peak:.0f} rmsd={m.get('rmsd')} "
            f"bonds={m.get('bond_rmsd')} angles={m.get('angle_rmsd')} cc_mask={m.get('cc_mask')} "
            f"bonds_lost_vs_truth={int(m.get('nbond_ref', 0)) - int(m.get('nbond', 0))}")


def scan_workers(work: Path, rounds: int = 7) -> list[str]:
    """The weight scan alone (5fuu, 3 Å, 16 segments) on 1 and 2 local workers (drefine's own local
    clusters, as `drefine rsr --scheduler local` starts them, both up at once): after warm-up,
    `rounds` rounds of one scan on each, one after the other, so that the machine's drifting
    speed cancels in each round's ratio; medians, and the weights chosen."""
    code = (
        "import sys,time;import numpy as np;from drefine.parallel.cluster import task_client;"
        "from drefine.io.models import read_model;from drefine.io.maps import read_map;"
        "from drefine.restraints.topology import build_restraints;from drefine.refine.weight import weight_scan;"
        "from drefine.refine.rsr import map_box_around;from drefine.targets.map_targets import normalised_map;"
        "from drefine.refine.rsr import SCAN_ITERATIONS as it\n"
        "if __name__=='__main__':\n"
        f" d='{work / '5fuu_3.0'}';m=read_model(d+'/start.pdb');r=build_restraints(m,'{MONLIB}',unknown_residues='skip')\n"
        " b=normalised_map(map_box_around(read_map(d+'/map.mrc'),m.atoms.xyz,9.0))\n"
        " ctx={n:task_client(None,n) for n in (1,2)};cl={n:c.__enter__() for n,c in ctx.items()}\n"
        # warm every worker up (numba's cache loads on a worker's first task): a few small scans
        " [weight_scan(m,b,r,client=cl[n],n_segments=4*n,iterations=20) for n in (1,2) for _ in range(3)]\n"
        " ts={1:[],2:[]};ws=set()\n"
        f" for _ in range({rounds}):\n"
        "  for n in (1,2):\n"
        "   t=time.perf_counter();w=weight_scan(m,b,r,client=cl[n],n_segments=16,iterations=it)\n"
        "   ts[n].append(time.perf_counter()-t);ws.add(round(w.weight,3))\n"
        " q=[a/b_ for a,b_ in zip(ts[1],ts[2])]\n"
        " print(f'scan 1 worker {np.median(ts[1]):.2f} s, 2 workers {np.median(ts[2]):.2f} s (medians of "
        f"{rounds}); 2 vs 1: median of the rounds\\' ratios {{np.median(q):.2f}}x (all {{[round(x,2) for x in q]}}); "
        "weights chosen {sorted(ws)}')\n"
        " [c.__exit__(None,None,None) for c in ctx.values()]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    return [out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"scan FAILED: {out.stderr[-2000:]}"]


#: start-up stages of a Python process on drefine's stack, each a whole `python -c` run: the
#: interpreter; + numpy and gemmi; + scipy's minimiser and FFT; + numba and the load of one cached
#: kernel (drefine's tricubic interpolation on a tiny map; numba initialises its compiler target on
#: the first load, cached or not); and `drefine rsr --help` (the CLI's imports)
STARTUP_STAGES = {
    "python": "pass",
    "+ numpy, gemmi": "import numpy, gemmi",
    "+ scipy.optimize, scipy.fft": "import numpy, gemmi, scipy.optimize, scipy.fft",
    "+ numba, one cached kernel": (
        "import numpy as np, gemmi, scipy.optimize, scipy.fft\n"
        "from drefine.io.maps import DensityMap\nfrom drefine.density.interpolate import interpolate\n"
        "m = DensityMap(np.zeros((8, 8, 8)), gemmi.UnitCell(8, 8, 8, 90, 90, 90), (8, 8, 8), (0, 0, 0))\n"
        "interpolate(m, np.full((1, 3), 4.0))"),
}


def startup_floor(rounds: int = 7) -> list[str]:
    """Median wall time (s) of each start-up stage over `rounds` runs (after one warm run each),
    and of `drefine rsr --help`: the part of a whole-process time no refinement code can save."""
    out = []
    runs = [(name, [sys.executable, "-c", code]) for name, code in STARTUP_STAGES.items()]
    runs.append(("drefine rsr --help", [DREFINE, "rsr", "--help"]))
    for name, cmd in runs:
        subprocess.run(cmd, capture_output=True, check=True)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True)
            times.append(time.perf_counter() - t0)
        out.append(f"startup {name:30s} {sorted(times)[len(times) // 2]:.2f} s (median of {rounds}; "
                   f"{min(times):.2f}-{max(times):.2f})")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(ALL_CASES))
    ap.add_argument("--servalcat", default="4hg7_3.0,5fuu_3.0")
    ap.add_argument("--work", default=os.environ.get("TMPDIR", "/tmp") + "/drefine_bench_rsr")
    ap.add_argument("--scan-workers", action="store_true")
    ap.add_argument("--startup", action="store_true", help="time the start-up stages of a process on this stack")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {time.strftime('%Y-%m-%d')} {os.cpu_count()} cores; cases in {work}")
    for case in filter(None, a.cases.split(",")):  # --cases "" runs none (e.g. only --scan-workers)
        res = "3.2" if case == "3j6b" else case.split("_")[1]
        d = work / case if case == "3j6b" else make_case(work, case)
        d.mkdir(exist_ok=True)
        print(run_drefine(d, case, res), flush=True)
        if case in a.servalcat.split(","):
            print(run_servalcat(d, case, res), flush=True)
    if a.startup:
        for line in startup_floor():
            print(line, flush=True)
    if a.scan_workers:
        make_case(work, "5fuu_3.0")
        for line in scan_workers(work):
            print(line, flush=True)


if __name__ == "__main__":
    main()
