"""Reciprocal-space refinement benchmark: drefine xray and servalcat refine_xtal_norefmac side by side.

Cases (real data in ../shared/data/xray):
  deposited   5orl, 4hg7, 1l2h from their deposited models, 10 cycles, both tools
  shaken      the same starts shaken by 0.3 Å RMS (seed 1), drefine only
  ml_vs_ls    5orl with 10 % of the atoms deleted (seed 2) and the rest shaken by 0.3 Å, against
              F_calc of the full model with 3 % noise (drefine fmodel): ML and LS targets
  esd         6mw0 (0.78 Å): full normal-matrix esds against B/occupancy
  timing      with --rounds N: only the timing rounds (drefine, with --waters also that, and
              servalcat back to back per case; medians of the per-round ratios)
1l2h's data are twinned (α ≈ 0.35): its rows add cctbx's R with the twin law, and servalcat runs
once more with --twin for reference.
Inputs for both tools are the same file: hydrogens removed, residues the shared monomer library
lacks removed (5orl: ADP, A4W, Mg, Cl; TPO 288 turned into THR), as the issue describes.
One yardstick for both tools: cctbx's mmtbx.model_vs_data (R-work, R-free) and the shared
tools/metrics.py (bond/angle RMSD on the CCP4 library, RMSD to the start or truth). Wall time is
the whole process; peak RSS of the largest process.

Usage: python benchmarks/bench_xray.py [--parts deposited,shaken,ml_vs_ls,esd] [--work DIR]
       [--drefine-args "..."] [--no-servalcat] [--waters] [--rounds N] [--cases 5orl,4hg7,1l2h]
Needs the peers' venv (tools/peers_setup.sh) for servalcat and cctbx.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gemmi
import numpy as np
from common import DATA, DREFINE, MONLIB, PEERS_BIN, TOOLS

# twinned data (phenix.xtriage: 1l2h's H-test α 0.35 for h,-k,-l): the yardstick's R is also
# given with the twin law (cctbx's twin_f_model), and servalcat runs once more with --twin
TWIN_LAWS = {"1l2h": "h,-k,-l"}
CASES = {
    "5orl": (DATA / "xray/5orl/5orl.pdb", DATA / "xray/5orl/5orl_phases.mtz", "FP,SIGFP,FREE"),
    "4hg7": (DATA / "xray/4hg7/4hg7.pdb", DATA / "xray/4hg7/4hg7.mtz", "FP,SIGFP,FREE"),
    "1l2h": (DATA / "xray/1l2h/1l2h.cif.gz", DATA / "xray/1l2h/1l2h.mtz.gz", "IMEAN,SIGIMEAN,FreeR_flag"),
}


def timed(cmd, log: Path, cwd: Path) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", *map(str, cmd)], stdout=fh,
                           stderr=subprocess.STDOUT, cwd=cwd, check=False)
    wall = time.perf_counter() - t0
    peak = [ln for ln in log.read_text().splitlines() if ln.startswith("PEAK_KB")]
    return wall, (int(peak[-1].split()[1]) / 1024 if peak else float("nan")), p.returncode


def prepare(model: Path, out: Path) -> Path:
    """Hydrogens and residues without a dictionary in the shared library removed; TPO → THR."""
    st = gemmi.read_structure(str(model))
    st.remove_hydrogens()
    have = {p.stem.upper() for p in MONLIB.glob("?/*.cif")}
    for m in st:
        for ch in m:
            for i in range(len(ch) - 1, -1, -1):
                r = ch[i]
                if r.name == "TPO":
                    r.name, r.het_flag = "THR", "A"
                    for j in range(len(r) - 1, -1, -1):
                        if r[j].name in ("P", "O1P", "O2P", "O3P"):
                            del r[j]
                elif r.name not in have:
                    del ch[i]
    st.remove_empty_chains()
    st.setup_entities()
    st.write_pdb(str(out))
    return out


def model_vs_data(model: Path, data: Path, twin_law: str | None = None) -> tuple[float, float]:
    if data.suffix == ".gz":  # cctbx reads MTZ only uncompressed
        plain = model.parent / data.stem
        if not plain.exists():
            plain.write_bytes(gzip.decompress(data.read_bytes()))
        data = plain
    extra = [f"twin_law={twin_law}"] if twin_law else []
    out = subprocess.run([PEERS_BIN / "mmtbx.model_vs_data", model, data, *extra], capture_output=True, text=True,
                         check=False)
    rw = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("r_work:")]
    rf = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("r_free:")]
    if not rw or not rf:
        return float("nan"), float("nan")
    return float(rw[-1].split()[-1]), float(rf[-1].split()[-1])


def geometry(model: Path, ref: Path) -> dict:
    out = subprocess.run([sys.executable, TOOLS / "metrics.py", model, ref], capture_output=True, text=True,
                         env=dict(os.environ, MONLIB=str(MONLIB)), check=False)
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return dict(kv.split("=") for kv in line.split() if "=" in kv)


DREFINE_ARGS: list[str] = []  # extra arguments for every drefine xray run (--drefine-args)
WATERS = False  # --waters: the deposited part also runs drefine with --waters


def run_drefine(start: Path, data: Path, out: Path, extra=()) -> dict:
    wall, peak, code = timed([DREFINE, "xray", start, data, "--monlib", MONLIB, "--unknown-residues", "skip",
                              "-o", out, *extra, *DREFINE_ARGS], out.with_suffix(".txt"), out.parent)
    if code:
        return {"failed": str(out.with_suffix(".txt"))}
    rep = json.loads(out.with_suffix(".json").read_text())
    return {"wall_s": wall, "peak_mb": peak, "own_r": (rep["start"]["r_work"], rep["start"]["r_free"],
                                                       rep["final"]["r_work"], rep["final"]["r_free"]),
            "model": Path(f"{out}.pdb")}


def run_servalcat(start: Path, data: Path, labin: str, out: Path, extra=()) -> dict:
    wall, peak, code = timed([PEERS_BIN / "servalcat", "refine_xtal_norefmac", "--hklin", data, "--model", start,
                              "--monlib", MONLIB, "--hydrogen", "no", "--ncycle", "10", "-s", "xray", "--labin",
                              labin, "-o", out.name, *extra], out.with_suffix(".txt"), out.parent)
    if code:
        return {"failed": str(out.with_suffix(".txt"))}
    return {"wall_s": wall, "peak_mb": peak, "model": out.parent / f"{out.name}.pdb"}


_START_TWIN_R: dict = {}


def row(case, tool, res, start_r, ref):
    if "failed" in res:
        return f"| {case} | {tool} | FAILED ({res['failed']}) |"
    name = case.split()[0]
    rw, rf = model_vs_data(res["model"], CASES[name][1])
    g = geometry(res["model"], ref)
    twin = ""
    if name in TWIN_LAWS:  # the same yardstick with the twin law: start → final
        key = (ref, ref.stat().st_mtime_ns)  # the start's, once for all rows of its case
        if key not in _START_TWIN_R:
            _START_TWIN_R[key] = model_vs_data(ref, CASES[name][1], TWIN_LAWS[name])
        tw0 = _START_TWIN_R[key]
        tw = model_vs_data(res["model"], CASES[name][1], TWIN_LAWS[name])
        twin = f" twin-aware {tw0[0]:.4f}/{tw0[1]:.4f} → {tw[0]:.4f}/{tw[1]:.4f} |"
    return (f"| {case} | {tool} | {res['wall_s']:.1f} | {res['peak_mb']:.0f} | {start_r[0]:.4f}/{start_r[1]:.4f} | "
            f"{rw:.4f}/{rf:.4f} | {rf - rw:.4f} | {g.get('bond_rmsd')} | {g.get('angle_rmsd')} | {g.get('rmsd')} |"
            + twin)


def part_deposited(work: Path, shaken: bool, servalcat: bool = True):
    for case, (model, data, labin) in CASES.items():
        d = work / case
        d.mkdir(parents=True, exist_ok=True)
        start = prepare(model, d / "start.pdb")
        start_r = model_vs_data(start, data)
        if shaken:
            subprocess.run(["drefine", "shake", start, "--rms", "0.3", "--seed", "1", "-o", d / "shaken.pdb",
                            "--no-validate"], check=True, capture_output=True)
            res = run_drefine(d / "shaken.pdb", data, d / "drefine_shaken")
            print(row(f"{case} shaken 0.3 Å", "drefine", res, model_vs_data(d / "shaken.pdb", data), start), flush=True)
            if WATERS:
                res = run_drefine(d / "shaken.pdb", data, d / "drefine_shaken_waters", ("--waters",))
                print(row(f"{case} shaken 0.3 Å", "drefine --waters", res, model_vs_data(d / "shaken.pdb", data),
                          start), flush=True)
            continue
        print(row(case, "drefine", run_drefine(start, data, d / "drefine"), start_r, start), flush=True)
        if WATERS:  # the same with one ordered-solvent update (4hg7's entry had 97 waters, stripped here)
            print(row(case, "drefine --waters", run_drefine(start, data, d / "drefine_waters", ("--waters",)),
                      start_r, start), flush=True)
        if servalcat:
            print(row(case, "servalcat", run_servalcat(start, data, labin, d / "servalcat"), start_r, start),
                  flush=True)
            if case in TWIN_LAWS:
                print(row(case, "servalcat --twin", run_servalcat(start, data, labin, d / "servalcat_twin",
                                                                  ("--twin",)), start_r, start), flush=True)


def part_timing(work: Path, rounds: int):
    """Wall time only, in rounds: each round runs every case's drefine (and drefine --waters) and
    servalcat back to back, so a ratio is taken within a round and the VM's drifting speed
    (±20 % over minutes) cancels; the medians over rounds are printed. Needs the starts the
    deposited part prepared."""
    tools = ["drefine"] + (["drefine --waters"] if WATERS else []) + ["servalcat"]
    walls = {(c, t): [] for c in CASES for t in tools}
    for k in range(rounds):
        for case, (model, data, labin) in CASES.items():
            d = work / case
            start = d / "start.pdb"
            if not start.exists():
                d.mkdir(parents=True, exist_ok=True)
                prepare(model, start)
            for tool in tools:
                if tool == "servalcat":
                    res = run_servalcat(start, data, labin, d / "t_servalcat")
                else:
                    res = run_drefine(start, data, d / "t_drefine", ("--waters",) if "waters" in tool else ())
                walls[case, tool].append(res.get("wall_s", float("nan")))
        print(f"round {k + 1}: " + ", ".join(f"{c} {t} {walls[c, t][-1]:.1f} s" for c in CASES for t in tools),
              flush=True)
    print("| case | tool | wall s (median) | of servalcat's: per round | median |")
    print("|---|---|---|---|---|")
    for case in CASES:
        sv = np.array(walls[case, "servalcat"])
        for tool in tools:
            w = np.array(walls[case, tool])
            ratios = w / sv
            print(f"| {case} | {tool} | {np.median(w):.1f} | {', '.join(f'{r:.2f}' for r in ratios)} | "
                  f"{np.median(ratios):.2f} |", flush=True)


def part_ml_vs_ls(work: Path):
    d = work / "ml_vs_ls"
    d.mkdir(parents=True, exist_ok=True)
    truth = prepare(CASES["5orl"][0], d / "truth.pdb")
    subprocess.run(["drefine", "fmodel", truth, "--resolution", "1.7", "--noise", "0.03", "--seed", "3",
                    "--mtz", d / "data.mtz"], check=True, capture_output=True)
    st = gemmi.read_structure(str(truth))
    rng = np.random.default_rng(2)
    n = st[0].count_atom_sites()
    drop = set(rng.choice(n, size=n // 10, replace=False).tolist())
    k = 0
    flags = []  # per atom in file order: deleted?
    for ch in st[0]:
        for res in ch:
            for _ in res:
                flags.append(k in drop)
                k += 1
    k = 0
    for ch in st[0]:
        for res in ch:
            keep = flags[k:k + len(res)]
            k += len(res)
            for j in range(len(res) - 1, -1, -1):
                if keep[j]:
                    del res[j]
    st.remove_empty_chains()
    st.write_pdb(str(d / "incomplete.pdb"))
    subprocess.run(["drefine", "shake", d / "incomplete.pdb", "--rms", "0.3", "--seed", "4", "-o", d / "start.pdb",
                    "--no-validate"], check=True, capture_output=True)
    for target in ("ml", "ls"):
        res = run_drefine(d / "start.pdb", d / "data.mtz", d / target, ("--target", target))
        if "failed" in res:
            print(f"| 5orl −10 % | {target} | FAILED |")
            continue
        g = geometry(res["model"], truth)
        g0 = geometry(d / "start.pdb", truth)
        r = res["own_r"]
        print(f"| 5orl −10 % atoms, 0.3 Å shake | {target} | {res['wall_s']:.1f} | {r[1]:.4f} → {r[3]:.4f} | "
              f"{r[2]:.4f} | {g0.get('rmsd')} → {g.get('rmsd')} | {g.get('bond_rmsd')} | {g.get('angle_rmsd')} |",
              flush=True)


def part_esd(work: Path):
    d = work / "6mw0"
    d.mkdir(parents=True, exist_ok=True)
    res = run_drefine(DATA / "xray/6mw0/6mw0.cif", DATA / "xray/6mw0/6mw0-sf.cif.gz", d / "drefine")
    rep = json.loads((d / "drefine.json").read_text())
    u = rep["details"]["uncertainties"]
    st = gemmi.read_structure(str(d / "drefine.cif"))
    b = np.array([a.b_iso / max(a.occ, 0.01) for r in st[0][0] for a in r])
    e = np.array([np.sqrt(a["x"] ** 2 + a["y"] ** 2 + a["z"] ** 2) for a in u["atoms"]])
    rank = np.corrcoef(np.argsort(np.argsort(e)), np.argsort(np.argsort(b[: len(e)])))[0, 1]
    print(f"6mw0: {u['method']}, {u['n_parameters']} parameters, {u['n_observations']} reflections, esd "
          f"{e.min():.4f}-{e.max():.4f} Å (mean {e.mean():.4f}), GoF {u['goodness_of_fit']:.2f}, "
          f"Spearman(esd, B/occ) {rank:.2f}, wall {res.get('wall_s', float('nan')):.1f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="deposited,shaken,ml_vs_ls,esd")
    ap.add_argument("--work", default="/tmp/drefine_bench_xray")
    ap.add_argument("--drefine-args", default="", help="extra arguments for every drefine xray run")
    ap.add_argument("--no-servalcat", action="store_true", help="drefine only (deposited part)")
    ap.add_argument("--waters", action="store_true", help="deposited and shaken parts: also drefine with --waters")
    ap.add_argument("--rounds", type=int, default=0,
                    help="after the deposited part, this many timing rounds of it (medians of per-round ratios); "
                         "--parts timing runs the rounds alone")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    args = ap.parse_args()
    for name in list(CASES):
        if name not in args.cases.split(","):
            del CASES[name]
    DREFINE_ARGS.extend(args.drefine_args.split())
    global WATERS
    WATERS = args.waters
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    print("| case | tool | wall s | peak MB | start R-work/R-free | final R-work/R-free | gap | bonds Å | angles ° "
          "| RMSD to start Å |")
    if "deposited" in parts:
        part_deposited(work, shaken=False, servalcat=not args.no_servalcat)
    if ("deposited" in parts or "timing" in parts) and args.rounds > 0 and not args.no_servalcat:
        part_timing(work, args.rounds)
    if "shaken" in parts:
        part_deposited(work, shaken=True)
    if "ml_vs_ls" in parts:
        print("| case | target | wall s | R-free start → end | R-work | RMSD to truth (kept atoms) Å | bonds Å | angles ° |")
        part_ml_vs_ls(work)
    if "esd" in parts:
        part_esd(work)


if __name__ == "__main__":
    main()
