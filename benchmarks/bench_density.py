"""Density benchmarks, drefine and gemmi side by side in one run (issue: density and structure factors).

Parts (each run in its own subprocess so that peak memory is that part's alone):
  fcalc     structure factors of models/pdb5fuu.ent at 2 Å in a P 1 box padded by 10 Å (FFT route)
  modelmap  its electron model map at 3 Å on a d/3 grid
  interp    map value + gradient at all 20,735 atom positions (tricubic), in memory and chunked
Usage: python benchmarks/bench_density.py [--parts fcalc,modelmap,interp] [--repeat 3]
Prints one line per part and tool: wall seconds (median of repeats, after one warm-up) and peak RSS.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
from common import DATA

MODEL = DATA / "models" / "pdb5fuu.ent"


def boxed_structure():
    import gemmi

    st = gemmi.read_structure(str(MODEL))
    st.setup_entities()
    xyz = np.array([cra.atom.pos.tolist() for cra in st[0].all()])
    lo = xyz.min(0) - 10.0
    size = xyz.max(0) + 10.0 - lo
    for cra in st[0].all():
        p = cra.atom.pos
        cra.atom.pos = gemmi.Position(p.x - lo[0], p.y - lo[1], p.z - lo[2])
    st.cell = gemmi.UnitCell(size[0], size[1], size[2], 90, 90, 90)
    st.spacegroup_hm = "P 1"
    st.setup_cell_images()
    return st


def run_part(part: str, tool: str, repeat: int) -> dict:
    import gemmi

    from drefine.model.arrays import Model, arrays_from_structure

    st = boxed_structure()
    atoms, residues = arrays_from_structure(st)
    model = Model(st, atoms, residues, str(MODEL))
    times = []
    info = {}
    for k in range(repeat + 1):
        t0 = time.perf_counter()
        if part == "fcalc":
            d_min = 2.0
            if tool == "drefine":
                from drefine.density.direct import scatterers_of_model
                from drefine.density.fft import fft_structure_factors

                hkl = np.array(gemmi.make_miller_array(st.cell, st.find_spacegroup(), d_min, 0, True))
                f = fft_structure_factors(scatterers_of_model(model), hkl, d_min=d_min)
            else:
                dc = gemmi.DensityCalculatorX()
                dc.d_min = d_min
                dc.rate = 1.5
                dc.set_refmac_compatible_blur(st[0])
                dc.grid.setup_from(st)
                dc.put_model_density_on_grid(st[0])
                asu = gemmi.transform_map_to_f_phi(dc.grid).prepare_asu_data(dmin=d_min, unblur=dc.blur)
                f = asu.value_array
            info["n_reflections"] = len(f)
        elif part == "modelmap":
            d_min = 3.0
            if tool == "drefine":
                from drefine.density.fft import grid_shape
                from drefine.density.model_map import model_map

                shape = grid_shape(st.cell, None, d_min, rate=1.5)
                m = model_map(model, st.cell, shape, d_min, source="electron")
            else:
                dc = gemmi.DensityCalculatorE()
                dc.d_min = d_min
                dc.rate = 1.5
                dc.set_refmac_compatible_blur(st[0])
                dc.grid.setup_from(st, spacing=d_min / 3)
                dc.put_model_density_on_grid(st[0])
                asu = gemmi.transform_map_to_f_phi(dc.grid).prepare_asu_data(dmin=d_min, unblur=dc.blur)
                m = np.array(asu.transform_f_phi_to_map(exact_size=[dc.grid.nu, dc.grid.nv, dc.grid.nw]))
            info["grid"] = list(m.shape)
        elif part == "interp":
            from drefine.density.fft import grid_shape
            from drefine.density.model_map import model_map
            from drefine.io.maps import DensityMap

            if k == 0:
                shape = grid_shape(st.cell, None, 3.0, rate=1.5)
                data = model_map(model, st.cell, shape, 3.0)
                dmap = DensityMap(data=data, cell=st.cell, sampling=np.array(shape), start=np.zeros(3, int),
                                  origin=np.zeros(3))
                grid = gemmi.FloatGrid(data.astype(np.float32), st.cell, gemmi.SpaceGroup("P 1"))
                t0 = time.perf_counter()
            if tool == "drefine":
                from drefine.density.interpolate import interpolate

                interpolate(dmap, atoms.xyz)
            elif tool == "drefine-chunked":
                import dask.array as da

                from drefine.density.interpolate import interpolate_chunked
                from drefine.io.maps import DensityMap as DM
                cmap = DM(data=da.from_array(dmap.data, chunks=(64, 64, 64)), cell=dmap.cell,
                          sampling=dmap.sampling, start=dmap.start, origin=dmap.origin)
                interpolate_chunked(cmap, atoms.xyz)
            else:
                pos = [gemmi.Position(*p) for p in atoms.xyz]
                [grid.tricubic_interpolation(p) for p in pos]
            info["atoms"] = len(atoms)
        if k > 0:
            times.append(time.perf_counter() - t0)
    return {"part": part, "tool": tool, "wall_s": float(np.median(times)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **info}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="fcalc,modelmap,interp")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("PART", "TOOL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_part(a.one[0], a.one[1], a.repeat)))
        return
    tools = {"fcalc": ["drefine", "gemmi"], "modelmap": ["drefine", "gemmi"],
             "interp": ["drefine", "drefine-chunked", "gemmi"]}
    print(f"# {platform.machine()} {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, model {MODEL.name}")
    for part in a.parts.split(","):
        for tool in tools[part]:
            out = subprocess.run([sys.executable, __file__, "--one", part, tool, "--repeat", str(a.repeat)],
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                print(f"{part} {tool}: failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            extra = {k: v for k, v in r.items() if k not in ("part", "tool", "wall_s", "peak_rss_mb")}
            print(f"{part:9s} {tool:16s} wall_s={r['wall_s']:.3f} peak_rss_mb={r['peak_rss_mb']:.0f} {extra}")


if __name__ == "__main__":
    main()
