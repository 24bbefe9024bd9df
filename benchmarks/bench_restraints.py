"""Restraint setup + one target/gradient evaluation on a large model (issue: foundation).

Usage: python benchmarks/bench_restraints.py [MODEL] [--repeat N]
Default MODEL: $DREFINE_TEST_DATA/models/pdb5fuu.ent (20,735 atoms; its sugars have no
dictionary in the shared monomer library and are left unrestrained). JIT warm-up runs first
on the same model and is reported separately. Prints one line of key=value results.
"""
import argparse
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
from common import DATA

from drefine.io.models import read_model
from drefine.restraints.target import GeometryTarget
from drefine.restraints.topology import build_restraints


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", nargs="?", default=str(DATA / "models" / "pdb5fuu.ent"))
    ap.add_argument("--monlib", default=os.environ.get("DREFINE_MONLIB", str(DATA / "monlib")))
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    t0 = time.perf_counter()
    model = read_model(a.model)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = build_restraints(model, a.monlib, unknown_residues="skip")
    GeometryTarget(model, r).value_and_gradient(model.atoms.xyz)
    t_warm = time.perf_counter() - t0
    setups, evals, totals = [], [], []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        r = build_restraints(model, a.monlib, unknown_residues="skip")
        target = GeometryTarget(model, r)
        t1 = time.perf_counter()
        target.value_and_gradient(model.atoms.xyz)
        t2 = time.perf_counter()
        setups.append(t1 - t0)
        evals.append(t2 - t1)
        totals.append(t2 - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model={Path(a.model).name} atoms={len(model.atoms)} restrained={len(r.atom_indices)} "
          f"bonds={len(r.bond_ideal)} angles={len(r.angle_ideal)} torsions={len(r.torsion_ideal)} "
          f"chirals={len(r.chiral_ideal)} planes={len(r.plane_sigma)} pairs={len(target.pairs)} "
          f"read_s={t_read:.3f} first_call_s={t_warm:.3f} setup_s={np.median(setups):.3f} "
          f"eval_s={np.median(evals):.4f} setup_plus_eval_s={np.median(totals):.3f} "
          f"peak_rss_mb={peak_mb:.0f} cpu={platform.processor() or platform.machine()} cores={os.cpu_count()}")


if __name__ == "__main__":
    main()
