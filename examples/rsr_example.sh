#!/usr/bin/env bash
# The main job on the bundled example, with nothing but drefine installed: make a 3 Å cryo-EM-like
# map of the example protein, shake the model by 0.4 Å RMS, and refine it back into the map.
# Outputs go to ./drefine_example/ (refined model, JSON report, log).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-drefine_example}"
mkdir -p "$out"
drefine fmodel "$here/hth40.cif" --resolution 3 --electron --map "$out/map.mrc"
drefine shake "$here/hth40.cif" --rms 0.4 --seed 1 -o "$out/start.cif" --no-validate
drefine rsr "$out/start.cif" "$out/map.mrc" --resolution 3 -o "$out/refined"
