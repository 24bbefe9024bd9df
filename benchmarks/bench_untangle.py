"""Untangling the 1AHO challenge: `drefine untangle` on otw39, otw1 and lotswrong, and its speed.

Every case runs the command as a user would (defaults: the crossing search before RRR, RRR, the
residue swap search (and a closing RRR stage when it swaps) and the B/occupancy cycles; --phases
PHI: refme.mtz carries the true phases; --truth only for the report), under /usr/bin/time for the peak memory. Scored by the shared
tools/untangle_check.py (tangled residues, Ala39 N–CA against the ALA monomer's ideal, |Z| > 4 count), by
Ala39's N–CA against the in-chain ideal of gemmi's topology (`ala39_in_chain`), and by the command's own
report (R on all and on the used reflections, before and after). Speed: iterations per second of
short RRR-only runs in-process and on a local dask cluster with 1 and 2 workers (density chunks as
actors).

Usage: python benchmarks/bench_untangle.py [--work DIR] [--cases otw39,otw1,lotswrong] [--speed-only | --skip-speed]
       [--iterations 300,200] [--crossing-cycles N] [--keep-checkpoint]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import DATA, DREFINE, TOOLS

CASE = DATA / "untangle"
LABIN = "F=F,SIGF=SIGF,FREE=FreeR_flag"


def check(model: Path) -> dict:
    out = subprocess.run([sys.executable, TOOLS / "untangle_check.py", model, CASE / "ground_truth.pdb",
                          DATA / "monlib", "1", "38", "39", "40"], capture_output=True, text=True, check=False)
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return {**dict(kv.split("=", 1) for kv in line.split() if "=" in kv), **ala39_in_chain(model)}


def ala39_in_chain(model: Path) -> dict:
    """Ala39 N–CA minus the in-chain ideal: the restraint gemmi's topology applies with the shared
    monomer library (the ALA monomer's N–CA, 1.483 Å, is the free zwitterion's NH3+–CA, which
    untangle_check.py reads; in a chain the peptide link's modification makes it 1.453 Å), and the
    bond length itself."""
    import gemmi

    st = gemmi.read_structure(str(model))
    st.setup_entities()
    st.remove_hydrogens()
    monlib = gemmi.read_monomer_lib(str(DATA / "monlib"), st[0].get_all_residue_names())
    topo = gemmi.prepare_topology(st, monlib, h_change=gemmi.HydrogenChange.NoChange, warnings=None)
    ala39 = {tuple(a.pos.tolist()) for ch in st[0] for r in ch if r.seqid.num == 39 and r.name == "ALA"
             for a in r if a.name in ("N", "CA")}
    out = {}
    for t in topo.bonds:
        a1, a2 = t.atoms
        if {a1.name, a2.name} == {"N", "CA"} and tuple(a1.pos.tolist()) in ala39:
            alt = a1.altloc or a2.altloc or "-"
            out[f"ala39_NCA_length_{alt}"] = f"{t.calculate():.4f}"
            out[f"ala39_NCA_dev_in_chain_{alt}"] = f"{t.calculate() - t.restr.value:.3f}"
    return out


def run(work: Path, name: str, extra: list[str], tag: str) -> dict:
    prefix = work / f"{name}_{tag}"
    cmd = ["/usr/bin/time", "-f", "PEAK_KB %M", DREFINE, "untangle", CASE / f"{name}.pdb", CASE / "refme.mtz",
           "--labin", LABIN, "--phases", "PHI", "--truth", CASE / "ground_truth.pdb", "-o", prefix, *extra]
    t0 = time.perf_counter()
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{name}: drefine untangle failed:\n{p.stderr[-2000:]}")
    peak = next(int(x.split()[1]) for x in p.stderr.splitlines() if x.startswith("PEAK_KB"))
    rep = json.loads(Path(f"{prefix}.json").read_text())
    return {"case": name, "tag": tag, "wall_s": round(wall, 1), "peak_mb": round(peak / 1024),
            "iterations_per_s": rep["timing"]["iterations_per_s"],
            "start": {k: rep["start"].get(k) for k in ("r_work", "r_free", "r_all", "r_used", "n_tangled")},
            "final": {k: rep["final"].get(k) for k in ("r_work", "r_free", "r_all", "r_used", "n_tangled",
                                                       "bonds_rmsd", "angles_rmsd")},
            "after_rrr": {k: rep.get("after_rrr", {}).get(k) for k in ("r_work", "r_free", "r_all", "r_used")},
            "crossings_accepted": {k: v.get("accepted") for k, v in rep.get("crossings", {}).items()},
            "rrr_s": rep["timing"].get("rrr_s"),
            "check_start": check(CASE / f"{name}.pdb"), "check_final": check(Path(f"{prefix}.cif"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/drefine_bench_untangle")
    ap.add_argument("--cases", default="otw39,otw1,lotswrong")
    ap.add_argument("--iterations", default=None, help="passed to --iterations (default: the command's)")
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--crossing-cycles", type=int, default=None,
                    help="passed to drefine untangle (default: the command's, 1)")
    ap.add_argument("--extra", default="", metavar="OPTIONS",
                    help="further drefine untangle options for the cases, e.g. '--no-residue-swaps'")
    ap.add_argument("--keep-checkpoint", action="store_true",
                    help="keep each case's checkpoint (the state RRR ended in) for later study")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    speed = []
    modes = () if args.skip_speed else (("inprocess", []), ("dask1", ["--scheduler", "local", "--workers", "1"]),
                                        ("dask2", ["--scheduler", "local", "--workers", "2"]))
    for tag, extra in modes:
        # RRR alone: the crossing search and B/occupancy cycles after it are not part of the rate
        r = run(work, "otw39", ["--iterations", "30", "--crossing-cycles", "0", "--adp-cycles", "0", *extra],
                f"speed_{tag}")
        speed.append({"mode": tag, "iterations_per_s": r["iterations_per_s"], "wall_s": r["wall_s"],
                      "peak_mb": r["peak_mb"]})
        print(json.dumps(speed[-1]), flush=True)
    results["speed"] = speed
    if not args.speed_only:
        results["cases"] = []
        for name in args.cases.split(","):
            extra = ["--iterations", args.iterations] if args.iterations else []
            extra += ["--keep-checkpoint"] if args.keep_checkpoint else []
            extra += ["--crossing-cycles", str(args.crossing_cycles)] if args.crossing_cycles is not None else []
            extra += args.extra.split()
            r = run(work, name, extra, "default")
            results["cases"].append(r)
            print(json.dumps(r), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {work / 'results.json'}")


if __name__ == "__main__":
    main()
