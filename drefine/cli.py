"""The `drefine` command line: program setup only; the algorithms live in the library modules."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .errors import DrefineError

DESCRIPTION = """drefine: distributed, array-parallel refinement of atomic models.

subcommands available now:
  validate   geometry, clashes, Ramachandran/rotamers, B-factors and occupancies of a model
  shake      perturb coordinates by a given RMS shift (seeded), e.g. to make refinement tests
  fmodel     synthetic data from a model: structure factors (MTZ) and/or a model map (CCP4/MRC)
  rsr        real-space refinement against a map (cryo-EM or crystallographic), weight found automatically
  xray       reciprocal-space refinement against X-ray data (ML or LS), with 2mFo-DFc / mFo-DFc maps
  ensemble   many perturbed starts refined as tasks on a dask cluster: RMSF, CC spread, averaged map
  weight-scan  a grid of weights (and sharpening B) refined as tasks: fit against geometry, recommendation
  untangle   multi-conformer untangling by iterative projections (RRR, divide and concur) against X-ray data
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not np.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0: {text!r}")
    return v


def _common(p: argparse.ArgumentParser, output_help: str) -> None:
    p.add_argument("-o", "--output", metavar="PATH", help=output_help)
    p.add_argument("--json", metavar="PATH", help="write a machine-readable JSON report (shape in README)")
    p.add_argument("--monlib", metavar="DIR",
                   help="CCP4 monomer library (default: $DREFINE_MONLIB, then $CLIBD_MON, then the built-in "
                        "dictionary of the 20 amino acids and water)")
    p.add_argument("--dict", metavar="CIF", action="append", default=[],
                   help="extra restraint dictionary (CCP4 monomer CIF), e.g. for a ligand; repeatable")
    p.add_argument("--unknown-residues", choices=("error", "skip"), default="error",
                   help="residues without a dictionary: stop with a message (default) or leave them "
                        "unrestrained (they still take part in non-bonded repulsion)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="drefine", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"drefine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    v = sub.add_parser("validate", help="validate a model's geometry and more",
                       description="Validate a model (PDB/mmCIF): bond/angle RMSD and RMSZ with the worst "
                                   "outliers, chirality and planarity, clashes and clashscore, Ramachandran "
                                   "and rotamer outliers (Top500 tables), B-factor statistics, occupancy "
                                   "sums of alternate conformers. Models of a multi-model file (NMR "
                                   "ensembles) are validated as parallel tasks on a dask cluster.")
    v.add_argument("model", metavar="MODEL", help="PDB or mmCIF file")
    _common(v, "also write the text report to this file")
    v.add_argument("--rama-data", metavar="DIR",
                   help="directory with Top500 rama500-*.data / rota500-*.data tables (default: "
                        "$DREFINE_RAMA_DATA, then $DREFINE_TEST_DATA/validation/rama-data)")
    v.add_argument("--mtz", metavar="DATA",
                   help="reflection data (MTZ or mmCIF structure factors): adds R-work/R-free with fitted bulk "
                        "solvent and scale")
    v.add_argument("--labin", metavar="F,SIGF,FREE", help="columns of --mtz (default: chosen automatically)")
    v.add_argument("--map", metavar="MAP", help="a map (CCP4/MRC or zarr): adds CC_mask, CC_box and per-residue CC; "
                                               "needs --resolution")
    v.add_argument("--resolution", type=_positive_float, metavar="Å", help="resolution of --map in Å")
    v.add_argument("--scattering", choices=("auto", "electron", "xray"), default="auto",
                   help="form factors of the model map for --map: electron (cryo-EM) or xray; auto: xray when the "
                        "model has a crystal cell, else electron")
    v.add_argument("--truth", metavar="MODEL",
                   help="a two-conformer ground truth: count tangled residues (Untangle challenge rule)")
    v.add_argument("--models", choices=("first", "all"), default="all",
                   help="multi-model files: validate the first or all models (default all)")
    v.add_argument("--scheduler", metavar="ADDRESS",
                   help="dask scheduler for multi-model files: tcp://HOST:PORT of a running one, or "
                        "'inprocess'; default: a local cluster started for the job")
    v.add_argument("--workers", type=int, metavar="N", help="workers of the local cluster (default: cores)")

    s = sub.add_parser("shake", help="perturb coordinates by a given RMS (seeded)",
                       description="Add random Gaussian shifts to atom positions, scaled so that their RMS is "
                                   "exactly --rms Å over the moved atoms. Reproducible with --seed.")
    s.add_argument("model", metavar="MODEL", help="PDB or mmCIF file")
    _common(s, "output model (mmCIF unless it ends in .pdb); required")
    s.add_argument("--rms", type=_positive_float, default=0.5, metavar="Å", help="RMS shift in Å (default 0.5)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--selection", metavar="CID",
                   help="move only these atoms (gemmi selection syntax, e.g. 'A/10-40' or '/*/*/CA')")
    s.add_argument("--no-validate", action="store_true", help="skip the geometry report of the shaken model")

    f = sub.add_parser("fmodel", help="synthetic structure factors or model map from a model",
                       description="Structure factors of a model to --resolution, with flat bulk solvent, optional "
                                   "relative noise and a free set (--mtz), and/or its model map at that resolution "
                                   "(--map; a P 1 box padded around the model when the model has no crystal cell).")
    f.add_argument("model", metavar="MODEL", help="PDB or mmCIF file")
    f.add_argument("--resolution", type=_positive_float, required=True, metavar="Å", help="d_min in Å")
    f.add_argument("--mtz", metavar="OUT.mtz", help="write F, SIGF, FreeR_flag (0 = test) and PHI")
    f.add_argument("--map", metavar="OUT.mrc", help="write the model map (CCP4/MRC)")
    f.add_argument("-o", "--output", metavar="PATH", help="same as --mtz or --map, chosen by the suffix")
    f.add_argument("--json", metavar="PATH", help="write a machine-readable JSON report")
    f.add_argument("--electron", action="store_true", help="electron form factors (cryo-EM) instead of X-ray")
    f.add_argument("--noise", type=_positive_float, default=0.0, metavar="FRACTION",
                   help="relative Gaussian noise on |F| (e.g. 0.03), seeded")
    f.add_argument("--free-fraction", type=_positive_float, default=0.05, help="test-set fraction (default 0.05)")
    f.add_argument("--seed", type=int, default=0, help="random seed for noise and free set (default 0)")
    f.add_argument("--k-sol", type=_positive_float, default=0.35, help="bulk-solvent scale (default 0.35; 0: none)")
    f.add_argument("--b-sol", type=_positive_float, default=46.0, metavar="Å²", help="bulk-solvent B (default 46)")
    f.add_argument("--box-padding", type=_positive_float, default=10.0, metavar="Å",
                   help="padding of the P 1 box for --map when the model has no crystal cell (default 10)")
    f.add_argument("--monlib", metavar="DIR", help=argparse.SUPPRESS)

    r = sub.add_parser("rsr", help="real-space refinement against a map",
                       description="Refine coordinates (and optionally B factors, rigid groups) against a map: "
                                   "macro-cycles of L-BFGS on the atom-centred map target plus geometry restraints, "
                                   "mirror flips of either-handed chiral centres (Val CB, Leu CG) and proline "
                                   "puckers taken where the map prefers them, "
                                   "peptide flips (then strong-Ramachandran escapes) tried for residues that became "
                                   "Ramachandran outliers, a final cycle on the map-model least-squares target by "
                                   "Fisher-scoring steps; the data/restraint weight found by "
                                   "a segment scan (a batch of tasks: in-process, or on a dask cluster with "
                                   "--scheduler). Writes PREFIX.cif (and .pdb when it fits), PREFIX.json (per-cycle "
                                   "statistics and validation) and PREFIX.log.")
    r.add_argument("model", metavar="MODEL", help="PDB or mmCIF file")
    r.add_argument("map", metavar="MAP", help="CCP4/MRC map or zarr store")
    r.add_argument("--resolution", type=_positive_float, required=True, metavar="Å", help="map resolution in Å")
    _common(r, "output prefix (default: MODEL name + '_rsr' in the current directory)")
    r.add_argument("--weight", type=_positive_float, metavar="W",
                   help="fix the data/restraint weight (default: found by the segment scan)")
    r.add_argument("--macro-cycles", type=int, default=2,
                   help="atom-centred macro-cycles, the first (before the weight scan) included; the final "
                        "map-model cycle comes on top (default 2)")
    r.add_argument("--final-target", choices=("ls", "atom"), default="ls",
                   help="target of the last cycle: map-model least squares (default) or atom-centred")
    r.add_argument("--final-minimiser", choices=("fisher", "lbfgs"), default="fisher",
                   help="the final map-model cycle by Fisher-scoring steps (default: up to 8, each one model map "
                        "and its gradient plus one model map) or by 40 L-BFGS iterations")
    r.add_argument("--sharpen", metavar="B|auto", default=None,
                   help="sharpen (B < 0) or blur (B > 0) the map by B Å² first, or 'auto' to choose B")
    r.add_argument("--rigid-body", action="store_true", help="rigid-body fit of each chain before the cycles")
    r.add_argument("--rigid-groups", metavar="CID[;CID...]",
                   help="rigid-body fit of these groups instead (gemmi selections separated by ';', "
                        "e.g. 'A/1-60;A/61-120')")
    r.add_argument("--refine-b", action="store_true", help="refine per-atom isotropic B against the map at the end")
    r.add_argument("--scattering", choices=("electron", "xray"), default="electron",
                   help="form factors of model maps: electron (cryo-EM, default) or xray")
    r.add_argument("--seed", type=int, default=0, help="seed of the weight scan's segments (default 0)")
    r.add_argument("--scheduler", metavar="ADDRESS",
                   help="dask scheduler for the weight scan: tcp://HOST:PORT, 'local' (a local cluster started "
                        "for the job), or 'inprocess' (default: the 8-segment scan takes about a second, "
                        "less than starting a local cluster)")
    r.add_argument("--workers", type=int, metavar="N", help="workers of the local cluster (default: cores)")
    r.add_argument("--rama-data", metavar="DIR",
                   help="Top500 tables for Ramachandran restraints and validation (as in validate)")
    r.add_argument("--no-rama-restraints", action="store_true",
                   help="do not restrain φ/ψ to the Top500 distributions (on by default when tables are found)")
    r.add_argument("--no-peptide-flips", action="store_true",
                   help="do not try flipping the peptides next to residues that became Ramachandran outliers, "
                        "nor the strong-Ramachandran escapes after them (tried by default before the final cycle; "
                        "kept when the local map fit plus restraints prefer them and the outlier is cured)")
    r.add_argument("--no-mirror-flips", action="store_true",
                   help="do not judge mirror images: by default, before the final cycle, each either-handed "
                        "chiral centre (Val CB, Leu CG: the library allows both hands) is mirrored through its "
                        "substituents' plane and each proline CG through its CA-CB-CD plane (the other pucker), "
                        "and the flip is kept when the local map fit plus restraints prefer it; atoms of "
                        "alternate conformers are left alone")
    x = sub.add_parser("xray", help="reciprocal-space refinement against X-ray (or electron/neutron) data",
                       description="Refine coordinates, B factors (isotropic or anisotropic) and the occupancies of "
                                   "alternate conformers against amplitudes or intensities (French-Wilson): bulk "
                                   "solvent and scale re-fitted every cycle, maximum-likelihood (default) or "
                                   "least-squares target plus geometry and ADP restraints, automatic weight, minimised by "
                                   "Fisher-scoring steps (default) or L-BFGS. Writes "
                                   "PREFIX.cif (and .pdb when it fits), PREFIX.mtz (FWT/PHWT 2mFo-DFc, DELFWT/PHDELWT "
                                   "mFo-DFc, FC/PHIC, FOM, the data and free flags), PREFIX_2mFo-DFc.ccp4, "
                                   "PREFIX_mFo-DFc.ccp4, PREFIX.json and PREFIX.log.")
    x.add_argument("model", metavar="MODEL", help="PDB or mmCIF file")
    x.add_argument("data", metavar="DATA", help="MTZ or mmCIF structure factors (optionally .gz)")
    _common(x, "output prefix (default: MODEL name + '_xray' in the current directory)")
    x.add_argument("--target", choices=("ml", "ls"), default="ml",
                   help="maximum likelihood with σA (default) or least squares")
    x.add_argument("--ls-weighting", choices=("sigma", "unit"), default="sigma",
                   help="least-squares weights: 1/σ² (default; σ floored at a tenth of the median σ, so that a "
                        "bookkeeping σ such as F = 0, σ = 0.001 cannot carry the target) or 1")
    x.add_argument("--resolution", type=_positive_float, metavar="Å", help="high-resolution limit (default: all data)")
    x.add_argument("--labin", metavar="LABELS", help="columns, e.g. FP,SIGFP,FREE or I,SIGI or F=FP,SIGF=SIGFP")
    x.add_argument("--free-value", type=int, metavar="N", help="flag value of the test set (default: guessed)")
    x.add_argument("--free-fraction", type=_positive_float, default=0.05,
                   help="test-set fraction when the data have no free flags (default 0.05)")
    x.add_argument("--seed", type=int, default=0, help="seed of a new free set (default 0)")
    x.add_argument("--cycles", type=int, default=10, help="macro-cycles (default 10)")
    x.add_argument("--minimiser", choices=["fisher", "lbfgs"], default="fisher",
                   help="per macro-cycle: Fisher-scoring steps (default; 1-4 a cycle, each L-BFGS on the "
                        "diagonal quadratic model of the data term plus the exact restraints, then one F_calc to "
                        "accept it) or L-BFGS on the whole target (an F_calc and its gradient at every iteration)")
    x.add_argument("--fisher-coupling", type=float, default=0.0, metavar="Å",
                   help="Fisher step: also couple atoms closer than this (e.g. 6; slower, converges further on "
                        "high signal-to-noise data; default 0: the diagonal alone)")
    x.add_argument("--iterations", type=int, default=None,
                   help="L-BFGS iterations on each scoring step's model (default 30), or per macro-cycle with "
                        "--minimiser lbfgs (default 10)")
    x.add_argument("--weight", type=_positive_float, metavar="W",
                   help="fix the data weight (default: automatic, see README)")
    x.add_argument("--waters", action="store_true",
                   help="update the ordered solvent once, after 40%% of the cycles: remove waters whose 2mFo-DFc "
                        "density is below 1σ, whose B is above 80 Å² or that lost their hydrogen-bond partner, and "
                        "add waters at mFo-DFc peaks of 3σ or more with 2mFo-DFc of 1σ or more, 2.45-3.4 Å from an "
                        "N or O and no closer to any atom (symmetry included), starting at the mean B of the model's "
                        "waters (or 1.35× its atoms' mean B); needs 2 cycles or more and data to 3 Å or better")
    x.add_argument("--adp", choices=("auto", "iso", "aniso", "fixed"), default="auto",
                   help="B-factor refinement: auto (anisotropic when ≥ 4 reflections per parameter), iso, "
                        "aniso or fixed")
    x.add_argument("--no-occupancies", action="store_true",
                   help="keep occupancies (default: refine alternate conformers, summing to one)")
    x.add_argument("--no-bulk-solvent", action="store_true", help="no flat bulk-solvent model")
    x.add_argument("--twin", default="auto", metavar="auto|off|LAW",
                   help="twinned data: auto (default) refines with the twin law when the L-test and H-test find "
                        "twinning (twin fraction > 0.1), off refines as untwinned, or a twin law such as h,-k,-l; "
                        "with a twin law the target (ml or ls) compares F_obs with twinned model amplitudes "
                        "√((1-α)|Fm(h)|²+α|Fm(Th)|²), α is refined and the maps are detwinned")
    x.add_argument("--esd", choices=("auto", "full", "diagonal", "none"), default="auto",
                   help="standard uncertainties: full normal matrix (auto: up to 1,500 parameters), "
                        "a diagonal approximation, or none")
    x.add_argument("--scattering", choices=("xray", "electron", "neutron"), default="xray",
                   help="form factors (default xray)")
    x.add_argument("--rama-data", metavar="DIR", help="Top500 tables for validation (as in validate)")
    x.add_argument("--scheduler", metavar="ADDRESS",
                   help="run structure factors and gradients as atom-chunk tasks on a dask cluster: "
                        "tcp://HOST:PORT, or 'local' (a local cluster); default: in this process, threaded "
                        "(fastest on one machine)")
    x.add_argument("--workers", type=int, metavar="N", help="workers of the local cluster (default: cores)")
    x.add_argument("--chunks", type=int, default=0, metavar="N",
                   help="atom chunks (tasks) per structure-factor evaluation (default: one per worker with "
                        "--scheduler; given without --scheduler, the same chunks run in-process, with "
                        "identical results)")
    u = sub.add_parser("untangle", help="untangle alternate conformers by RRR (divide and concur) against X-ray data",
                       description="Untangle a multi-conformer model (atoms swapped between alternate conformers) by "
                                   "the Reflect-Reflect-Relax iteration of divide and concur: replicas of atom "
                                   "positions per geometry constraint (bonds, angles, chirality, planes, disulfide "
                                   "pairing, volume exclusion with symmetry) and per-atom density variables tied to "
                                   "the observed structure factors, in two stages. Before RRR, "
                                   "conformer crossings (bonds where the conformers swap) are undone by relabelling "
                                   "where the data and restraints prefer it (judged by paired local refinements; "
                                   "--crossing-cycles 0 skips this); after RRR, parts of residues (a terminal atom, the N, "
                                   "the C=O, the side chain) are relabelled the same way, followed by one more RRR stage "
                                   "when any was (--no-residue-swaps skips this); at the end B factors and occupancies are "
                                   "refined for a few cycles. Writes PREFIX.cif (and .pdb), PREFIX.json (gap and R per iteration, R and "
                                   "geometry before and after), PREFIX.png (gap and R plot) and PREFIX.log; a "
                                   "checkpoint folder PREFIX_checkpoint/ and the crossing search's result PREFIX_crossings.npz while it "
                                   "runs (--resume continues from them).")
    u.add_argument("model", metavar="MODEL", help="PDB or mmCIF file with alternate conformers")
    u.add_argument("data", metavar="DATA", help="MTZ or mmCIF structure factors (amplitudes or intensities)")
    _common(u, "output prefix (default: MODEL name + '_untangle' in the current directory)")
    u.add_argument("--labin", metavar="LABELS", help="columns, e.g. F,SIGF,FREE or F=F,SIGF=SIGF,FREE=FreeR_flag")
    u.add_argument("--phases", metavar="PHI",
                   help="phase column (degrees) to use; default: phases of the current model (bulk solvent "
                        "included), refreshed between the stages")
    u.add_argument("--iterations", metavar="N1[,N2]", default="300,200",
                   help="RRR iterations of stage 1 and stage 2 (default 300,200; one number: one stage)")
    u.add_argument("--beta", type=_positive_float, default=0.5, help="RRR step β (default 0.5)")
    u.add_argument("--g", type=_positive_float, default=None, metavar="G",
                   help="weight of the density variables relative to the geometry (default 0.1; see README)")
    u.add_argument("--low-cut", type=_positive_float, default=0.4, metavar="1/Å",
                   help="reflections with |s| = |k|/2π below this carry no weight (default 0.4, i.e. d > 2.5 Å)")
    u.add_argument("--bond-tolerance", metavar="S1[,S2]", default="1,0.3",
                   help="bond windows: ideal ± S × the dictionary's σ, in stage 1 and in the stages after it "
                        "(one number: every stage; default 1,0.3: loose while untangling, tight at the end, so "
                        "that no bond is left wherever the data put it inside a wide window)")
    u.add_argument("--peptide-motifs", action="store_true",
                   help="also constrain peptide units (CA-C-O-N-CA-H) as rigid trans/cis motifs (0.15 Å); off by "
                        "default: on 1AHO they pulled Ala39's N-CA 0.04 Å off ideal")
    u.add_argument("--torsion-motifs", action="store_true",
                   help="experimental: also constrain every torsion inside a residue (side-chain chi and the "
                        "like) as a rigid 4-atom motif at the dictionary's allowed values, the nearest taken, "
                        "within the displacement its sigma allows")
    u.add_argument("--no-rigid-groups", dest="rigid_groups", action="store_false",
                   help="keep the dictionary's planes inside residues (rings, guanidinium, carboxylates, amides) as "
                        "coplanarity sets instead of rigid planar motifs fitted to the dictionary's bonds and angles")
    u.add_argument("--use-free", action="store_true",
                   help="also use the free set (default: work set only, so R-free stays free)")
    u.add_argument("--truth", metavar="MODEL",
                   help="a two-conformer ground truth for the report only: tangled residues before and after, "
                        "and for each one left which truth conformer each of its atoms is nearer")
    u.add_argument("--resume", action="store_true", help="continue from PREFIX_checkpoint/ (and PREFIX_crossings.npz) after an interrupt")
    u.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="iterations between checkpoints (default 50; also every 10 minutes and on Ctrl-C)")
    u.add_argument("--keep-checkpoint", action="store_true", help="keep the checkpoint folder and PREFIX_crossings.npz after success")
    u.add_argument("--crossing-cycles", type=int, default=1, metavar="N",
                   help="before RRR, look for bonds where the conformers cross and try swapping the conformers' "
                        "atoms on one side; each swap and the model are refined alike and locally (N coordinate "
                        "macro-cycles) and a swap the data and restraints prefer, leaving no bond or angle beyond "
                        "4 sigma, is kept (default 1; 0 skips the search)")
    u.add_argument("--crossings-after-rrr", action="store_true",
                   help="experimental: search for crossings again after RRR (on 1AHO otw1 and otw39 it accepted a "
                        "wrong swap of Ser40's OG; see BENCHMARKS.md); swaps made there are followed by one more RRR "
                        "stage, as with --residue-swaps")
    u.add_argument("--residue-swaps", action=argparse.BooleanOptionalAction, default=True,
                   help="after RRR, try relabelling parts of each two-conformer residue (a terminal atom, the N, "
                        "the carbonyl C=O, the side chain), each judged by local refinement of positions and B "
                        "factors three bonds out against the same refinement of the model; kept when the "
                        "objective falls by 0.1%% or more with no bond or angle beyond 4 sigma "
                        "(--crossing-cycles macro-cycles, at least 1); when it makes swaps, one more RRR stage "
                        "follows (the last stage's settings), which holds the geometry to its windows again "
                        "(default: on; --no-residue-swaps skips it). Adds 13-19 min on 1AHO otw39/otw1 on 2 cores "
                        "(27 on lotswrong, 4 rounds, and the stage ~7 min). On lotswrong it leaves 10 residues "
                        "tangled where the run without it leaves 21; on otw39 and otw1 it makes no swap "
                        "(BENCHMARKS.md, sessions 29-30)")
    u.add_argument("--adp-cycles", type=int, default=3, metavar="N",
                   help="after RRR, refine B factors and conformer occupancies (coordinates fixed) for N ML "
                        "macro-cycles: the input's were refined for the tangled model (default 3; 0: keep them)")
    u.add_argument("--representation", choices=("array", "series"), default="array",
                   help="density variables as arrays (default; atoms × operators × reflections, single "
                        "precision) or as their exact geometric series (little memory, more compute)")
    u.add_argument("--double", action="store_true", help="density variables in double precision")
    u.add_argument("--memmap", action="store_true",
                   help="density variables in disk-backed memory maps in PREFIX_density/ (for arrays larger "
                        "than memory; removed at the end)")
    u.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the density chunks as actors on a dask cluster: tcp://HOST:PORT or 'local' (a "
                        "local cluster); default: in this process, threaded")
    u.add_argument("--workers", type=int, metavar="N", help="workers of the local cluster (default: cores)")
    u.add_argument("--chunks", type=int, default=0, metavar="N",
                   help="atom chunks of the density variables (default: one per worker, 1 in-process)")
    for name, helptext, desc in (
            ("ensemble", "refine many perturbed copies of a model (dask tasks)",
             ("Make N perturbed starts (seeded Gaussian shifts of a given RMS), refine each with the same settings "
              "(rsr against a map, xray against reflections) as tasks on a dask cluster, and write every member "
              "(DIR/members/), the ensemble as one multi-model file, per-atom RMSF and positional spread, the "
              "per-residue spread of CC (maps), the ensemble-averaged model map (maps), summary.json, summary.html "
              "and plots along the chain. --resume finishes an interrupted run.")),
            ("weight-scan", "refine with each of a grid of weights (and sharpening B) as dask tasks",
             ("Refine the start model once per weight (and per sharpening B with --sharpen-b) as tasks on a dask "
              "cluster; write a table and a plot of map fit (CC_mask, or R-free) against bond/angle RMSD, and the "
              "recommended weight: the best fit whose geometry stays within the targets."))):
        e = sub.add_parser(name, help=helptext, description=desc)
        e.add_argument("model", metavar="MODEL", help="PDB or mmCIF file")
        e.add_argument("data", metavar="DATA", help="map (CCP4/MRC, zarr) or reflections (MTZ, SF-mmCIF)")
        _common(e, f"output folder (default: MODEL name + '_{name}')")
        e.add_argument("--mode", choices=("auto", "rsr", "xray"), default="auto",
                       help="real-space (map) or reciprocal-space (reflections) refinement; auto: from DATA")
        e.add_argument("--resolution", type=_positive_float, metavar="Å",
                       help="map resolution (rsr, required) or high-resolution cut (xray)")
        e.add_argument("--scattering", choices=("electron", "xray", "neutron"), default=None,
                       help="form factors (default: electron for maps, xray for reflections)")
        e.add_argument("--scheduler", metavar="ADDRESS",
                       help="tcp://HOST:PORT of a running dask scheduler, 'local' (default: a local cluster started "
                            "for the job) or 'inprocess' (one member after the other, no cluster)")
        e.add_argument("--workers", type=int, metavar="N", help="workers of the local cluster (default: cores)")
        e.add_argument("--cluster", choices=("slurm", "pbs"),
                       help="start workers as batch jobs through dask-jobqueue (see deploy/)")
        e.add_argument("--jobs", type=int, default=1, help="batch jobs with --cluster (default 1)")
        e.add_argument("--job-cores", type=int, default=2, help="worker processes per batch job (default 2)")
        e.add_argument("--job-memory", default="8GB", help="memory per batch job (default 8GB)")
        e.add_argument("--job-walltime", default="02:00:00", help="wall time per batch job (default 02:00:00)")
        e.add_argument("--queue", help="batch queue or partition")
        e.add_argument("--resume", action="store_true",
                       help="keep the members already in the output folder and run only the missing ones")
        e.add_argument("--retries", type=int, default=2, help="retries of a failing member (default 2)")
        if name == "ensemble":
            e.add_argument("--n", type=int, help="number of members (or give --shake-seeds)")
            e.add_argument("--rmsd", type=_positive_float, default=0.5, metavar="Å",
                           help="RMS of the seeded perturbation of each start (default 0.5)")
            e.add_argument("--seed", type=int, default=0, help="seed of member 0; member i uses seed + i")
            e.add_argument("--shake-seeds", metavar="S1,S2,...",
                           help="explicit seeds, one member each (instead of --n/--seed)")
            e.add_argument("--regularise", type=int, default=0, metavar="N",
                           help="relax each perturbed start against the geometry restraints alone for N L-BFGS "
                                "iterations (sane bonds and angles; about 40 %% of the RMS shift survives); default 0")
            e.add_argument("--weight", type=_positive_float, metavar="W",
                           help="data/restraint weight for every member (rsr default: one weight scan of the "
                                "start model, shared by all; xray default: automatic per member)")
        else:
            e.add_argument("--weights", required=True, metavar="W1,W2,...", help="weights to try")
            e.add_argument("--sharpen-b", metavar="B1,B2,...",
                           help="sharpening (B < 0) or blurring B values in Å² to cross with the weights (rsr)")
    return parser


def _validate_one(path: str, model_index: int, opts: dict) -> dict:
    """One model's validation (a task: it reads the file itself, so no arrays travel)."""
    from .io.models import read_model
    from .validate.report import validate_structure

    model = read_model(path)
    return validate_structure(model, model_index=model_index, **opts)


def cmd_validate(args) -> int:
    from .io.atomic import atomic_write, write_json
    from .io.models import read_model
    from .restraints.monlib import find_monlib
    from .validate.ramachandran import find_rama_data
    from .validate.report import Stopwatch, format_text, new_report

    clock = Stopwatch()
    if args.map and not args.resolution:
        raise DrefineError("--map needs --resolution (the map's resolution in Å)")
    model = read_model(args.model)
    find_monlib(args.monlib)  # fail early on a bad --monlib
    rama = find_rama_data(args.rama_data)
    if args.rama_data and rama is None:
        raise DrefineError(f"--rama-data {args.rama_data}: no rama500-*.data tables there")
    opts = {"rama_dir": args.rama_data, "monlib_dir": args.monlib, "extra_dicts": tuple(args.dict),
                "unknown_residues": args.unknown_residues}
    n_models = model.n_models if args.models == "all" else 1
    if n_models == 1:
        from .validate.report import validate_structure

        results = [validate_structure(model, **opts)]
    else:
        from .parallel.cluster import gather_results, task_client

        with task_client(args.scheduler, args.workers) as client:
            if client is None:
                results = [_validate_one(args.model, k, opts) for k in range(n_models)]
            else:
                futures = client.map(_validate_one, [str(Path(args.model).resolve())] * n_models,
                                     range(n_models), [opts] * n_models, pure=False)
                results = gather_results(client, futures)
    report = new_report("validate", {"model": str(args.model), "n_models": model.n_models,
                                     "monlib": results[0]["details"]["topology"]["dictionary"],
                                     "rama_data": str(rama) if rama else None})
    report["final"] = results[0]["final"]
    report["details"] = results[0]["details"]
    if args.map:
        fit = _fit_to_map(model, args.map, args.resolution, args.scattering)
        report["inputs"].update(map=str(args.map), resolution=args.resolution)
        report["final"].update(cc_mask=fit["cc_mask"], cc_box=fit["cc_box"])
        report["details"]["map_fit"] = fit
    if args.mtz:
        data = _fit_to_reflections(model, args.mtz, args.labin)
        report["inputs"]["data"] = str(args.mtz)
        report["final"].update(r_work=data["r_work"], r_free=data["r_free"])
        report["details"]["data"] = data
    if args.truth:
        from .untangle.tangling import naming_only, tangled_residues

        truth_model = read_model(args.truth)
        tangled = tangled_residues(model, truth_model)
        report["inputs"]["truth"] = str(args.truth)
        report["final"]["n_tangled"] = len(tangled)
        report["details"]["tangled_residues"] = tangled
        report["details"]["tangled_by_names_only"] = naming_only(model, truth_model)
    if n_models > 1:
        report["models"] = [r["final"] for r in results]
    report["timing"]["wall_s"] = clock.seconds()
    text = format_text(results[0], f"drefine validate {args.model}" + (" (model 1)" if n_models > 1 else ""))
    if args.map:
        fit = report["details"]["map_fit"]
        worst = ", ".join(f"{w['residue']} {w['cc']:.2f}" for w in fit.get("per_residue", {}).get("worst", [])[:5])
        text += (f"\nmap {args.map} at {args.resolution} Å: CC_mask {fit['cc_mask']:.4f}  CC_box {fit['cc_box']:.4f}"
                 f"  per-residue CC mean {fit.get('per_residue', {}).get('mean', float('nan')):.3f}; lowest: {worst}")
    if args.mtz:
        d = report["details"]["data"]
        text += (f"\ndata {args.mtz}: {d['n_reflections']} reflections to {d['d_min']:.2f} Å  R-work {d['r_work']:.4f}"
                 f"  R-free {d['r_free']:.4f}  (k_sol {d['k_sol']:.2f}, B_sol {d['b_sol']:.0f} Å²)")
        if d.get("twinned"):
            t = d["twinned"]
            text += (f"\n  the data look twinned (twin law {t['law']}, fraction {t['fraction']:.2f} by the H-test): "
                     f"with the twin law R-work {t['r_work']:.4f}  R-free {t['r_free']:.4f}")
    if args.truth:
        text += (f"\ntangled residues against {args.truth}: {report['final']['n_tangled']}"
                 + (f" ({', '.join(report['details']['tangled_residues'])})" if report["final"]["n_tangled"] else "")
                 + _names_only_note(report["details"]["tangled_by_names_only"]))
    if n_models > 1:
        text += "\nper model: " + ", ".join(
            f"{k + 1}: bonds {r['final']['bonds_rmsd']:.3f} clashscore {r['final']['clashscore']:.1f}"
            for k, r in enumerate(results))
    print(text)
    if args.output:
        atomic_write(args.output, text + "\n")
    if args.json:
        write_json(args.json, report)
    return 0


def _fit_to_reflections(model, path, labin=None) -> dict:
    """R-work/R-free of model 0 against reflection data, bulk solvent and scale fitted."""
    from .density.fmodel import compute_fmodel
    from .io.reflections import read_reflections

    table = read_reflections(path, labin=labin)
    fm = compute_fmodel(model, table)
    out = {"n_reflections": len(table), "d_min": table.d_min, "d_max": table.d_max,
           "n_free": int(table.test.sum()), "columns": table.columns_used, "notes": table.notes,
           "r_work": fm.r_work, "r_free": fm.r_free, **{k: v for k, v in fm.scale.as_dict().items()
                                                        if k not in ("r_work", "r_free")}}
    from .validate.twinning import twin_mates, twinning_report

    out["twinning"] = twinning = twinning_report(table)
    out["twinned"] = None
    if twinning["twin_law"]:
        # the R values of the twinned model too (scale and solvent fitted to it, α the H-test's),
        # comparable with what `drefine xray` reports for these data
        from .density.bulk_solvent import fit_bulk_solvent

        twin = (twin_mates(table, twinning["twin_law"]), twinning["twin_fraction"])
        sc = fit_bulk_solvent(table.hkl, table.f_obs, fm.f_calc, fm.f_mask, table.cell, table.spacegroup, table.work,
                              table.test, table.bin, twin=twin)
        out["twinned"] = {"law": twinning["twin_law"], "fraction": twinning["twin_fraction"], "r_work": sc.r_work,
                          "r_free": sc.r_free}
    return out


def _fit_to_map(model, path, resolution, scattering="auto") -> dict:
    """CC_mask, CC_box and per-residue CC of model 0 against a map at `resolution` Å."""
    from .density.map_fit import map_model_fit
    from .io.maps import read_map

    dmap = read_map(path)
    if resolution < 2 * float(np.max(dmap.voxel_size)) - 1e-6:
        raise DrefineError(f"--resolution {resolution} Å is finer than the map's Nyquist limit "
                           f"{2 * float(np.max(dmap.voxel_size)):.2f} Å (voxels of {np.max(dmap.voxel_size):.2f} Å)")
    from .refine.rsr import is_crystal_map

    xyz = model.atoms.xyz[model.model_atoms(0)]
    inside = dmap.covers(xyz, periodic=is_crystal_map(dmap, model))
    if inside == 0:
        raise DrefineError(f"the map {path} does not cover the model: none of its {len(xyz)} atoms is inside the "
                           "map box (wrong map, or an ORIGIN/NSTART the model was not built against?)")
    source = scattering if scattering != "auto" else ("xray" if model.has_crystal_cell else "electron")
    fit = map_model_fit(model, dmap, resolution, source=source)
    fit["scattering"] = source
    if inside < 1.0:
        fit["warning"] = f"{100 * (1 - inside):.1f} % of the atoms lie outside the map box"
    return fit


def cmd_fmodel(args) -> int:
    from .io.atomic import write_json
    from .io.models import read_model
    from .validate.report import Stopwatch, new_report

    clock = Stopwatch()
    mtz_out, map_out = args.mtz, args.map
    if args.output:
        if args.output.lower().endswith((".mtz",)):
            mtz_out = args.output
        elif args.output.lower().endswith((".mrc", ".map", ".ccp4")):
            map_out = args.output
        else:
            raise DrefineError(f"-o {args.output}: give a .mtz or a .mrc/.map/.ccp4 name")
    if not (mtz_out or map_out):
        raise DrefineError("nothing to write: give --mtz OUT.mtz and/or --map OUT.mrc")
    if args.resolution <= 0:
        raise DrefineError("--resolution must be a positive number of Å")
    model = read_model(args.model)
    source = "electron" if args.electron else "xray"
    report = new_report("fmodel", {"model": str(args.model), "resolution": args.resolution, "source": source})
    report["outputs"] = {}
    lines = []
    if mtz_out:
        from .density.synthetic import synthetic_reflections

        table = synthetic_reflections(model, args.resolution, source, args.k_sol, args.b_sol, args.noise,
                                      args.free_fraction, args.seed)
        table.to_mtz(mtz_out)
        report["final"].update(n_reflections=len(table), d_min=table.d_min, n_free=int(table.test.sum()))
        report["outputs"]["mtz"] = str(mtz_out)
        lines.append(f"{len(table)} reflections to {table.d_min:.2f} Å ({int(table.test.sum())} free) -> {mtz_out}")
    if map_out:
        from .density.maps_from_model import write_model_map

        info = write_model_map(model, map_out, args.resolution, source, args.box_padding)
        report["final"].update(map_grid=info["grid"], map_voxel=info["voxel"])
        report["outputs"]["map"] = str(map_out)
        lines.append(f"model map at {args.resolution} Å on a {'x'.join(map(str, info['grid']))} grid "
                     f"({info['box']}) -> {map_out}")
    report["timing"]["wall_s"] = clock.seconds()
    print("\n".join(lines))
    if args.json:
        write_json(args.json, report)
    return 0


def cmd_shake(args) -> int:
    from .io.atomic import write_json
    from .io.models import read_model, write_model
    from .model.perturb import selection_mask, shake_coordinates
    from .validate.report import Stopwatch, format_text, new_report, validate_structure

    if not args.output:
        raise DrefineError("shake needs an output file: -o OUT.cif")
    clock = Stopwatch()
    model = read_model(args.model)
    mask = selection_mask(model, args.selection) if args.selection else None
    shaken, rms = shake_coordinates(model, args.rms, args.seed, mask)
    result = None if args.no_validate else validate_structure(
        shaken, monlib_dir=args.monlib, extra_dicts=tuple(args.dict), unknown_residues=args.unknown_residues)
    write_model(shaken, args.output)
    report = new_report("shake", {"model": str(args.model), "rms": args.rms, "seed": args.seed,
                                  "selection": args.selection})
    moved = int(mask.sum()) if mask is not None else len(model.atoms)
    report["final"] = {**(result["final"] if result else {}), "rms_shift": rms, "n_moved": moved}
    if result:
        report["details"] = result["details"]
    report["outputs"] = {"model": str(args.output)}
    report["timing"]["wall_s"] = clock.seconds()
    print(f"shook {moved} atoms by {rms:.4f} Å RMS (seed {args.seed}) -> {args.output}")
    if result:
        print(format_text(result))
    if args.json:
        write_json(args.json, report)
    return 0


class _Log:
    """Progress lines: printed as they come, and kept for PREFIX.log."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        self.lines.append(msg)
        print(msg, flush=True)


def cmd_rsr(args) -> int:
    from .density.map_fit import map_model_fit
    from .io.atomic import atomic_write, write_json
    from .io.maps import read_map
    from .io.models import read_model, write_model_outputs
    from .parallel.cluster import task_client
    from .refine.rsr import RSROptions, run_rsr
    from .restraints.topology import build_restraints
    from .validate.report import Stopwatch, format_text, new_report, validate_structure

    clock = Stopwatch()
    log = _Log()

    if args.macro_cycles < 1:
        raise DrefineError("--macro-cycles must be at least 1")
    sharpen = args.sharpen
    if sharpen not in (None, "auto"):
        try:
            sharpen = float(sharpen)
        except ValueError:
            raise DrefineError(f"--sharpen takes a B in Å² or 'auto', not {args.sharpen!r}") from None
    model = read_model(args.model)
    idx0 = model.model_atoms(0)
    if len(idx0) == 0:
        raise DrefineError(f"{args.model}: the model has no atoms")
    dmap = read_map(args.map)
    nyquist = 2 * float(np.max(dmap.voxel_size))
    if args.resolution < nyquist - 1e-6:
        raise DrefineError(f"--resolution {args.resolution} Å is finer than the map's Nyquist limit {nyquist:.2f} Å")
    from .refine.rsr import is_crystal_map

    # a crystal's unit-cell map is periodic: it covers the model wherever the model lies
    inside = dmap.covers(model.atoms.xyz[idx0], periodic=is_crystal_map(dmap, model))
    if inside < 1.0:
        n_out = round((1 - inside) * len(idx0))
        raise DrefineError(f"the map does not cover the model: {n_out} of {len(idx0)} atoms "
                           f"({100 * (1 - inside):.1f} %) lie outside the map box")
    prefix = args.output or (Path(args.model).name.split(".")[0] + "_rsr")
    restraints = build_restraints(model, args.monlib, tuple(args.dict), unknown_residues=args.unknown_residues)
    opt = RSROptions(resolution=args.resolution, weight=args.weight, macro_cycles=args.macro_cycles,
                     final_target=args.final_target, final_minimiser=args.final_minimiser, sharpen=sharpen,
                     rigid_body=args.rigid_body,
                     rigid_groups=tuple(g.strip() for g in (args.rigid_groups or "").split(";") if g.strip()),
                     refine_b=args.refine_b, source=args.scattering, seed=args.seed,
                     rama_restraints=not args.no_rama_restraints, rama_dir=args.rama_data,
                     peptide_flips=not args.no_peptide_flips, mirror_flips=not args.no_mirror_flips)
    log(f"drefine rsr {args.model} against {args.map} at {args.resolution} Å: {len(idx0)} atoms, "
        f"{len(restraints.bond_ideal)} bonds, {len(restraints.chain_breaks)} chain breaks")
    scheduler = args.scheduler
    if scheduler is None:
        # measured on 5fuu (18,001 atoms, 2 cores): scan 0.9 s in-process; a local cluster made
        # the whole run 2.3 s slower (start-up, workers importing, the payload sent)
        scheduler = "inprocess"
    with task_client(None if scheduler == "local" else scheduler, args.workers) as client:
        result = run_rsr(model, dmap, restraints, opt, client=client, log=log)
    refined = model.copy()
    refined.atoms.xyz = result.xyz
    refined.atoms.b_iso = result.b_iso
    start_val = validate_structure(model, restraints, rama_dir=args.rama_data)
    end_val = validate_structure(refined, restraints, rama_dir=args.rama_data)
    fit0 = map_model_fit(model, result.map_box, args.resolution, source=args.scattering)
    fit1 = map_model_fit(refined, result.map_box, args.resolution, source=args.scattering)
    paths = write_model_outputs(refined, prefix)
    rama0 = start_val["details"]["ramachandran"]
    rama1 = end_val["details"]["ramachandran"]
    new_outliers = []
    if rama0.get("computed") and rama1.get("computed"):
        before = {o["residue"] for o in rama0["outliers"]}
        new_outliers = [o["residue"] for o in rama1["outliers"] if o["residue"] not in before]
    report = new_report("rsr", {"model": str(args.model), "map": str(args.map), "resolution": args.resolution,
                                "scheduler": scheduler})
    report["final"] = {**end_val["final"], "cc_mask": fit1["cc_mask"], "cc_box": fit1["cc_box"],
                       "weight": result.weight, "new_rama_outliers": len(new_outliers)}
    report["start"] = {**start_val["final"], "cc_mask": fit0["cc_mask"], "cc_box": fit0["cc_box"]}
    report["cycles"] = [c.as_dict() for c in result.cycles]
    report["details"] = {**end_val["details"], "map_fit": fit1, "weight_scan": result.weight_scan,
                         "sharpen_b": result.sharpen_b, "notes": result.notes, "peptide_flips": result.peptide_flips,
                         "mirror_flips": result.mirror_flips, "new_rama_outliers": new_outliers}
    report["outputs"] = {"model": [str(p) for p in paths], "log": f"{prefix}.log",
                         "json": args.json or f"{prefix}.json"}
    report["timing"] = {"wall_s": clock.seconds(), **{k: round(v, 3) for k, v in result.timing.items()}}
    log(f"CC_mask {fit0['cc_mask']:.4f} -> {fit1['cc_mask']:.4f}  bonds {start_val['final']['bonds_rmsd']:.4f} -> "
        f"{end_val['final']['bonds_rmsd']:.4f} Å  angles {start_val['final']['angles_rmsd']:.2f} -> "
        f"{end_val['final']['angles_rmsd']:.2f}°  new Ramachandran outliers {len(new_outliers)}")
    log(format_text(end_val, "final model"))
    log(f"wrote {', '.join(str(p) for p in paths)} in {report['timing']['wall_s']:.1f} s")
    write_json(report["outputs"]["json"], report)
    atomic_write(f"{prefix}.log", "\n".join(log.lines) + "\n")
    return 0


def _iteration_options(minimiser: str, iterations: int | None) -> dict:
    """`--iterations` goes to the minimiser in use (None: its default)."""
    if iterations is None:
        return {}
    return {"inner_iterations": iterations} if minimiser == "fisher" else {"iterations": iterations}


def cmd_xray(args) -> int:
    from .io.atomic import atomic_write, write_json
    from .io.maps import write_coefficient_map
    from .io.models import read_model, write_model_outputs
    from .io.reflections import check_cell_compatible, read_reflections
    from .refine.uncertainty import standard_uncertainties
    from .refine.xray import XrayOptions, map_coefficients, refine_xray
    from .restraints.topology import build_restraints
    from .validate.report import Stopwatch, format_text, new_report, validate_structure

    clock = Stopwatch()
    log = _Log()

    if args.cycles < 1 or (args.iterations is not None and args.iterations < 1):
        raise DrefineError("--cycles and --iterations must be at least 1")
    if args.waters and args.cycles < 2:
        raise DrefineError("--waters needs at least 2 cycles (the waters are refined after they are placed)")
    if not args.fisher_coupling >= 0:
        raise DrefineError(f"--fisher-coupling must be 0 or a distance in Å, not {args.fisher_coupling}")
    if args.chunks < 0:
        raise DrefineError("--chunks must be 0 or more")
    model = read_model(args.model)
    idx0 = model.model_atoms(0)
    if len(idx0) == 0:
        raise DrefineError(f"{args.model}: the model has no atoms")
    if not model.has_crystal_cell:
        raise DrefineError(f"{args.model}: the model has no crystal cell (CRYST1 / _cell), needed for X-ray data")
    table = read_reflections(args.data, labin=args.labin, free_test_value=args.free_value,
                             seed=args.seed, free_fraction=args.free_fraction)
    if args.resolution is not None:
        if args.resolution < table.d_min - 1e-3:
            raise DrefineError(f"--resolution {args.resolution} Å is beyond the data, which end at {table.d_min:.2f} Å")
        table = table.select(table.d >= args.resolution).with_bins()
    check_cell_compatible(table, model.cell)
    if model.n_models > 1:
        log(f"note: {args.model} has {model.n_models} models; only the first is refined")
    for note in table.notes:
        log(f"data: {note}")
    from .validate.twinning import twinning_note, twinning_report

    twinning = twinning_report(table)
    if twinning_note(twinning):
        log(f"data: {twinning_note(twinning)}")
    new_free = any(n.startswith("free set made") for n in table.notes)
    twin_law = _twin_law(args.twin, table, twinning, log, new_free=new_free)
    ls_weighting = args.ls_weighting
    if args.target == "ls" and ls_weighting == "sigma" and not np.any(np.nan_to_num(table.sigma_f) > 0):
        ls_weighting = "unit"
        log("data: every σ is zero or missing: least squares with unit weights instead of 1/σ²")
    if args.target == "ml" and not np.any(np.nan_to_num(table.sigma_f) > 0):
        log("data: every σ is zero or missing: the likelihood has no measurement-error term")
    prefix = args.output or (Path(args.model).name.split(".")[0] + "_xray")
    monlib = None
    if args.waters:
        # one library for the model and the waters the update adds (read once: ~60 ms a read)
        from .restraints.monlib import load_monlib

        names = model.residues.name[model.atoms.residue_index[idx0]].tolist() + ["HOH"]
        monlib = load_monlib(names, args.monlib, tuple(args.dict), allow_missing=args.unknown_residues == "skip")
    restraints = build_restraints(model, args.monlib, tuple(args.dict), unknown_residues=args.unknown_residues,
                                  monlib=monlib)
    opt = XrayOptions(target=args.target, cycles=args.cycles, weight=args.weight, adp=args.adp,
                      occupancies=not args.no_occupancies, bulk_solvent=not args.no_bulk_solvent,
                      ls_weighting=ls_weighting, source=args.scattering,
                      minimiser=args.minimiser, coupling_cutoff=args.fisher_coupling,
                      **_iteration_options(args.minimiser, args.iterations),
                      chunks=args.chunks, twin_law=twin_law)
    log(f"drefine xray {args.model} against {args.data}: {len(idx0)} atoms, {len(table)} reflections "
        f"({table.d_max:.2f}-{table.d_min:.2f} Å, {int(table.test.sum())} free), {table.spacegroup.hm}")
    start_model, start_restraints = model, restraints
    with (_no_client() if args.scheduler is None else _xray_client(args)) as client:
        if args.waters:
            model, restraints, result, waters = _refine_with_water_update(model, table, restraints, opt, args, log,
                                                                          client)
        else:
            result, waters = refine_xray(model, table, restraints, opt, log=log, client=client), None
    refined = result.applied_to(model)
    esd = standard_uncertainties(refined, table, result, mode=args.esd, source=args.scattering, log=log)
    coeffs = map_coefficients(result.maps_table(table), result.f_model, result.ml)
    start_val = validate_structure(start_model, start_restraints, rama_dir=args.rama_data)
    end_val = validate_structure(refined, restraints, rama_dir=args.rama_data)
    paths = write_model_outputs(refined, prefix, esd=esd.xyz if esd is not None else None)
    mtz_path = f"{prefix}.mtz"
    extra = {"FC": ("F", coeffs["FC"]), "PHIC": ("P", coeffs["PHIC"]), "FWT": ("F", coeffs["FWT"]),
             "PHWT": ("P", coeffs["PHWT"]), "DELFWT": ("F", coeffs["DELFWT"]), "PHDELWT": ("P", coeffs["PHDELWT"]),
             "FOM": ("W", coeffs["FOM"])}
    table_out = table.select(np.arange(len(table)))
    table_out.fom = None
    table_out.phases_deg = None
    table_out.to_mtz(mtz_path, extra=extra)
    if new_free:
        log(f"the data had no free set: the one made here (seed {args.seed}) is in {mtz_path} as FreeR_flag "
            "(0 = test); refine against that file next time to keep R-free honest")
    maps = {}
    for name, f, phi in (("2mFo-DFc", "FWT", "PHWT"), ("mFo-DFc", "DELFWT", "PHDELWT")):
        maps[name] = str(write_coefficient_map(f"{prefix}_{name}.ccp4", table.cell, table.spacegroup, table.hkl,
                                               coeffs[f], coeffs[phi]))
    first, _last = result.cycles[0], result.cycles[-1]
    report = new_report("xray", {"model": str(args.model), "data": str(args.data), "target": args.target,
                                 "columns": table.columns_used, "d_min": table.d_min, "d_max": table.d_max})
    report["start"] = {**start_val["final"], "r_work": first.r_work, "r_free": first.r_free}
    report["final"] = {**end_val["final"], "r_work": result.scale.r_work, "r_free": result.scale.r_free,
                       "r_free_minus_r_work": result.scale.r_free - result.scale.r_work, "weight": result.weight,
                       "adp": result.adp, "k_sol": result.scale.k_sol, "b_sol": result.scale.b_sol,
                       "mean_b": float(result.b_iso[idx0].mean())}
    report["cycles"] = [c.as_dict() for c in result.cycles]
    report["details"] = {**end_val["details"], "scale": result.scale.as_dict(), "sigmaa": result.ml.per_bin,
                         "notes": result.notes + table.notes, "free_set_made": new_free,
                         "occupancy_groups": _occupancy_report(result), "waters": waters, "twinning": twinning,
                         "twin": result.twin,
                         "uncertainties": esd.as_dict() if esd is not None else None}
    report["outputs"] = {"model": [str(p) for p in paths], "mtz": mtz_path, "maps": maps, "log": f"{prefix}.log",
                         "json": args.json or f"{prefix}.json"}
    report["timing"] = {"wall_s": clock.seconds(), **{k: round(v, 3) for k, v in result.timing.items()}}
    log(f"R-work {first.r_work:.4f} -> {result.scale.r_work:.4f}  R-free {first.r_free:.4f} -> {result.scale.r_free:.4f}"
        f"  bonds {start_val['final']['bonds_rmsd']:.4f} -> {end_val['final']['bonds_rmsd']:.4f} Å  angles "
        f"{start_val['final']['angles_rmsd']:.2f} -> {end_val['final']['angles_rmsd']:.2f}°")
    log(format_text(end_val, "final model"))
    log(f"wrote {', '.join(str(p) for p in paths)}, {mtz_path}, {', '.join(maps.values())} in "
        f"{report['timing']['wall_s']:.1f} s")
    write_json(report["outputs"]["json"], report)
    atomic_write(f"{prefix}.log", "\n".join(log.lines) + "\n")
    return 0


def _twin_law(choice: str, table, twinning: dict, log, new_free: bool = False) -> str | None:
    """The twin law to refine with (reciprocal notation), from --twin and the twinning tests.
    `new_free`: the free set was made here, so it is remade in twin pairs (`table.free` changes)."""
    from .validate.twinning import free_set_in_twin_pairs, law_matrix, law_text, twin_mates

    if choice == "off":
        return None
    if choice == "auto":
        law = twinning["twin_law"]
        if law is None:
            return None
        how = "found by the twinning tests (--twin off refines them as untwinned)"
        mate = twin_mates(table, law)
    else:
        try:
            law = law_text(law_matrix(choice))
            mate = twin_mates(table, law)
        except (ValueError, RuntimeError) as err:
            raise DrefineError(f"--twin {choice}: {err}") from None
        how = "as given"
    if new_free:
        table.free = free_set_in_twin_pairs(table.free, mate)
        log(f"data: the free set made here is chosen in twin pairs ({int(table.free.sum())} test reflections)")
    test = np.flatnonzero(table.test & (mate >= 0))
    leaked = int(table.work[mate[test]].sum())
    log(f"data: twin law {law} {how}: the target sees twinned model amplitudes, the twin fraction is refined, "
        "the maps are detwinned")
    if leaked:
        log(f"data: {leaked} of {len(test)} test reflections have their twin mate in the work set: R-free reads "
            "low under twinning (a free set chosen in twin pairs avoids this)")
    return law


def _xray_client(args):
    from .parallel.cluster import task_client

    return task_client(None if args.scheduler == "local" else args.scheduler, args.workers)


WATER_MAX_D_MIN = 3.0  # Å: no waters placed from data of lower resolution (few are ordered enough to be seen)


def _refine_with_water_update(model, table, restraints, opt, args, log, client):
    """`--waters`: the first 40 % of the cycles, one ordered-solvent update (waters failing the
    rules removed, new ones placed at difference-map peaks: refine/waters.py), then the rest of
    the cycles from the weight reached. Returns the new model, its restraints, the second
    part's result (with the first part's cycles before its own) and what changed."""
    import dataclasses

    from .io.maps import coefficient_grid
    from .refine.waters import (
        WaterCriteria,
        new_water_b,
        pick_waters,
        waters_to_remove,
        with_waters,
        without_atoms,
    )
    from .refine.xray import map_coefficients, refine_xray
    from .restraints.topology import build_restraints

    if table.d_min > WATER_MAX_D_MIN:
        log(f"--waters: no water update at {table.d_min:.2f} Å (waters are placed from data to "
            f"{WATER_MAX_D_MIN:g} Å or better)")
        return model, restraints, refine_xray(model, table, restraints, opt, log=log, client=client), {
            "skipped": f"d_min {table.d_min:.2f} Å > {WATER_MAX_D_MIN:g} Å"}
    first_cycles = max(1, round(0.4 * opt.cycles))
    # the first part's end feeds only the maps the waters are picked from: it keeps the cycles'
    # F_calc accuracy and mask (the report pass is the second part's)
    first = refine_xray(model, table, restraints, dataclasses.replace(opt, cycles=first_cycles, final_accuracy=False),
                        log=log, client=client)
    now = first.applied_to(model)
    coeffs = map_coefficients(first.maps_table(table), first.f_model, first.ml)
    difference = coefficient_grid(table.cell, table.spacegroup, table.hkl, coeffs["DELFWT"], coeffs["PHDELWT"])
    density = coefficient_grid(table.cell, table.spacegroup, table.hkl, coeffs["FWT"], coeffs["PHWT"])
    criteria = WaterCriteria()
    gone = waters_to_remove(now, density, criteria)
    removed = [now.atom_label(int(i)) for i in gone]
    now = without_atoms(now, gone)
    sites, heights = pick_waters(now, difference, density, criteria)
    b_new = new_water_b(now, criteria)
    now = with_waters(now, sites, b_new)
    log(f"waters after cycle {first_cycles}: {len(removed)} removed, {len(sites)} added at mFo-DFc peaks "
        f"of {criteria.peak_sigma:g}σ or more (B {b_new:.1f} Å² to start)")
    loaded = restraints.monlib if "HOH" in restraints.monlib.monlib.monomers else None  # else read again
    new_restraints = build_restraints(now, args.monlib, tuple(args.dict), unknown_residues=args.unknown_residues,
                                      monlib=loaded)
    rest = dataclasses.replace(opt, cycles=opt.cycles - first_cycles, initial_weight=first.weight,
                               first_cycle=first_cycles + 1, initial_scale=first.scale,
                               initial_twin_fraction=first.twin["fraction"] if first.twin else None)
    result = refine_xray(now, table, new_restraints, rest, log=log, client=client)
    result.cycles[:0] = first.cycles
    if result.twin:
        result.twin["fraction_per_cycle"] = [c.twin_fraction for c in result.cycles]
    report = {"after_cycle": first_cycles, "removed": removed, "added": len(sites),
              "added_peak_sigma": [round(float(h), 2) for h in heights], "criteria": dataclasses.asdict(criteria)}
    return now, new_restraints, result, report


def _read_phased_reflections(args):
    """The reflection table, with the phase column of --phases as its phases."""
    from .io.reflections import read_reflections

    table = read_reflections(args.data, labin=args.labin)
    if args.phases and table.columns_used.get("PHI") != args.phases:
        # the same columns again (as roles, however they were chosen), with this phase column
        roles = {k: v for k, v in table.columns_used.items() if k not in ("PHI", "FOM")}
        roles["PHI"] = args.phases
        table = read_reflections(args.data, labin=",".join(f"{k}={v}" for k, v in roles.items()))
    if args.phases and (table.phases_deg is None or not np.isfinite(table.phases_deg).any()):
        raise DrefineError(f"{args.data}: no phases in column {args.phases!r}")
    return table


def cmd_untangle(args) -> int:
    import time

    from .io.atomic import atomic_write, write_json
    from .io.models import read_model, write_model_outputs
    from .io.reflections import check_cell_compatible
    from .parallel.cluster import task_client
    from .restraints.topology import build_restraints
    from .untangle.report import plot_trajectory
    from .untangle.rrr import UntangleOptions, Untangler
    from .untangle.tangling import naming_only, tangled_atoms, tangled_residues
    from .validate.report import Stopwatch, format_text, new_report, validate_structure

    clock = Stopwatch()
    log = _Log()
    try:
        iterations = tuple(int(x) for x in args.iterations.split(","))
    except ValueError:
        raise DrefineError(f"--iterations takes N1[,N2], not {args.iterations!r}") from None
    if not iterations or min(iterations) < 1:
        raise DrefineError("--iterations: every stage needs at least one iteration")
    try:
        bond_tolerance = tuple(float(x) for x in args.bond_tolerance.split(","))
    except ValueError:
        raise DrefineError(f"--bond-tolerance takes S1[,S2], not {args.bond_tolerance!r}") from None
    if len(bond_tolerance) not in (1, 2) or not all(np.isfinite(t) and t > 0 for t in bond_tolerance):
        raise DrefineError(f"--bond-tolerance takes one or two positive numbers, not {args.bond_tolerance!r}")
    if not 0 < args.beta <= 1:
        raise DrefineError(f"--beta must be in (0, 1], got {args.beta}")
    if args.checkpoint_every < 1 or args.chunks < 0 or args.crossing_cycles < 0 or args.adp_cycles < 0:
        raise DrefineError("--checkpoint-every must be at least 1, and --chunks, --crossing-cycles and --adp-cycles "
                           "0 or more")
    model = read_model(args.model)
    if len(model.model_atoms(0)) == 0:
        raise DrefineError(f"{args.model}: the model has no atoms")
    if not model.has_crystal_cell:
        raise DrefineError(f"{args.model}: the model has no crystal cell (CRYST1 / _cell), needed for X-ray data")
    if model.n_models > 1:
        raise DrefineError(f"{args.model} has {model.n_models} models; untangle one model with alternate conformers")
    n_conf = int(np.count_nonzero(np.unique(model.atoms.altloc) != ""))
    truth = read_model(args.truth) if args.truth else None
    table = _read_phased_reflections(args)
    check_cell_compatible(table, model.cell)
    for note in table.notes:
        log(f"data: {note}")
    if n_conf < 2:
        log(f"note: {args.model} has no alternate conformers; nothing can be tangled, the run only regularises")
    prefix = args.output or (Path(args.model).name.split(".")[0] + "_untangle")
    checkpoint = Path(f"{prefix}_checkpoint")
    searched = Path(f"{prefix}_crossings.npz")  # the crossing search's result, so --resume need not repeat it
    for path in (checkpoint, searched):
        if path.exists() and not args.resume:
            raise DrefineError(f"{path} exists (an interrupted run): continue it with --resume, or remove it")
    if args.resume and not (checkpoint / "meta.json").exists() and not searched.exists():
        raise DrefineError(f"--resume: no checkpoint at {checkpoint}")
    restraints = build_restraints(model, args.monlib, tuple(args.dict), unknown_residues=args.unknown_residues)
    opt = UntangleOptions(iterations=iterations, beta=args.beta, s_cut=args.low_cut, use_free=args.use_free,
                          checkpoint_every=args.checkpoint_every, representation=args.representation,
                          double_precision=args.double, memmap=args.memmap, peptide_motifs=args.peptide_motifs,
                          bond_tolerance=bond_tolerance[0], bond_tolerance_final=bond_tolerance[-1],
                          torsion_motifs=args.torsion_motifs, rigid_groups=args.rigid_groups)
    if args.g is not None:
        opt.g = args.g
    phases = table.phases_deg if args.phases else None
    scheduler = args.scheduler
    start_tangled = tangled_residues(model, truth) if truth is not None else None
    with task_client(scheduler if scheduler not in (None, "local") else None, args.workers) \
            if scheduler is not None else _no_client() as client:
        n_workers = len(client.scheduler_info().get("workers", {})) if client is not None else 1
        opt.chunks = args.chunks or n_workers
        density_dir = Path(f"{prefix}_density")  # memory maps live apart from the checkpoint, which is swapped
        crossings: dict = {}
        report_closing = None  # R after the closing RRR stage, when a search after RRR made swaps
        rrr_model = model
        if args.crossing_cycles > 0 and n_conf >= 2:
            # crossings in the input first; saved, so that a resumed run starts RRR from the same model
            if args.resume and searched.exists():
                rrr_model = _load_searched(searched, model, args, crossings)
                log(f"crossing search (before rrr): taken from {searched} ({len(crossings['before_rrr']['accepted'])}"
                    " swap(s))")
            else:
                rrr_model = _resolve_crossings(model, table, restraints, args, log, client, crossings, "before_rrr")
                _save_searched(searched, model, rrr_model, args, crossings)
        u = Untangler(rrr_model, restraints, table, opt, phases_deg=phases, client=client,
                      workdir=density_dir if opt.memmap else None)
        log(f"drefine untangle {args.model} against {args.data}: {len(model.atoms)} atoms, {n_conf} conformers, "
            f"{int(u.used.sum())} of {len(table)} reflections used (d ≤ {1 / opt.s_cut:.2f} Å"
            f"{'' if opt.use_free else ', work set'}), {table.spacegroup.hm} ({u.engine.spec.n_ops} operators), "
            f"phases from {'column ' + args.phases if args.phases else 'the model'}; density variables "
            f"{u.engine.nbytes() / 1e9:.2f} GB in {opt.chunks} chunk(s)"
            f"{' on ' + str(n_workers) + ' dask worker(s)' if client is not None else ''}")
        start_r = u.r_factors(model.atoms.xyz, model)
        resumed = False
        if args.resume and (checkpoint / "meta.json").exists():
            u.load_checkpoint(checkpoint)
            resumed = True
            log(f"resumed from {checkpoint}: stage {u.stage + 1}, iteration {u.iteration}")
        elif args.resume:  # stopped after the crossing search, before RRR's first checkpoint
            log("resumed after the crossing search: RRR starts from the beginning")
        total = sum(iterations)
        t_run = time.perf_counter()
        done_at_start = len(u.history)
        log(f"start: R-work {start_r['r_work']:.4f} R-free {start_r['r_free']:.4f} R(all) {start_r['r_all']:.4f} "
            f"R(used) {start_r['r_used']:.4f}" + (f", {len(start_tangled)} tangled" if truth is not None else ""))

        def progress(rec):
            n = len(u.history)
            if rec["iteration"] % 10 and rec["iteration"] != iterations[rec["stage"] - 1]:
                return
            rate = (n - done_at_start) / max(time.perf_counter() - t_run, 1e-9)
            log(_rrr_progress_line(rec, rec["stage"], iterations[rec["stage"] - 1], rate, total - n))

        try:
            u.run(progress=progress, checkpoint=checkpoint, resumed=resumed)
        except KeyboardInterrupt:
            _log_interrupt(log, prefix, f"checkpoint at {checkpoint}; continue with the same command and --resume")
            raise
        seconds_rrr = time.perf_counter() - t_run
        n_run = len(u.history) - done_at_start  # RRR's own iterations (a closing stage adds its own later)
        refined = u.model_at(u.xyz)
        final_r = u.r_factors(u.xyz)
        rrr_r = dict(final_r)
        log(f"after RRR: R-work {final_r['r_work']:.4f} R-free {final_r['r_free']:.4f} R(all) {final_r['r_all']:.4f} "
            f"R(used) {final_r['r_used']:.4f}")
        try:
            if args.crossings_after_rrr and args.crossing_cycles > 0 and n_conf >= 2:
                refined = _resolve_crossings(refined, table, restraints, args, log, client, crossings, "after_rrr")
                final_r = u.r_factors(refined.atoms.xyz, refined)
                log(f"after the crossing search: R-work {final_r['r_work']:.4f} R-free {final_r['r_free']:.4f} "
                    f"R(all) {final_r['r_all']:.4f} R(used) {final_r['r_used']:.4f}")
            if args.residue_swaps and n_conf >= 2:
                refined = _resolve_crossings(refined, table, restraints, args, log, client, crossings,
                                             "residue_swaps")
                final_r = u.r_factors(refined.atoms.xyz, refined)
                log(f"after the residue swap search: R-work {final_r['r_work']:.4f} R-free {final_r['r_free']:.4f} "
                    f"R(all) {final_r['r_all']:.4f} R(used) {final_r['r_used']:.4f}")
            if any(crossings.get(k, {}).get("accepted") for k in ("after_rrr", "residue_swaps")):
                refined = _closing_stage(u, refined, client, density_dir, log)
                final_r = u.r_factors(refined.atoms.xyz, refined)
                report_closing = dict(final_r)
                log(f"after the closing RRR stage: R-work {final_r['r_work']:.4f} R-free {final_r['r_free']:.4f} "
                    f"R(all) {final_r['r_all']:.4f} R(used) {final_r['r_used']:.4f}")
        except KeyboardInterrupt:  # RRR's end is checkpointed: a resumed run repeats only what came after it
            _log_interrupt(log, prefix, f"RRR had finished (checkpoint at {checkpoint}); the same command with "
                                        "--resume repeats only the search after it (and the closing stage)")
            raise
    if args.adp_cycles > 0:
        from .refine.xray import XrayOptions, refine_xray

        res = refine_xray(refined, table, restraints, XrayOptions(target="ml", cycles=args.adp_cycles, adp="iso",
                                                                  occupancies=True, coordinates=False,
                                                                  minimiser="lbfgs"), log=log)
        refined.atoms.b_iso, refined.atoms.occupancy = res.b_iso, res.occupancy
        refined.atoms.u_aniso, refined.atoms.has_aniso = res.u_aniso, res.has_aniso
        final_r = u.r_factors(refined.atoms.xyz, refined)
    start_val = validate_structure(model, restraints)
    end_val = validate_structure(refined, restraints)
    paths = write_model_outputs(refined, prefix)
    png = plot_trajectory(u.history, f"{prefix}.png")
    report = new_report("untangle", {"model": str(args.model), "data": str(args.data), "phases": args.phases,
                                     "columns": table.columns_used, "d_min": table.d_min, "d_max": table.d_max})
    report["options"] = opt.as_dict()
    report["start"] = {**start_val["final"], **start_r}
    report["final"] = {**end_val["final"], **final_r, "gap": u.history[-1]["gap"] if u.history else None}
    report["after_rrr"] = rrr_r
    if report_closing is not None:
        report["after_closing_stage"] = report_closing
    if crossings:
        report["crossings"] = crossings
    if truth is not None:
        end_tangled = tangled_residues(refined, truth)
        report["start"]["n_tangled"] = len(start_tangled)
        report["final"]["n_tangled"] = len(end_tangled)
        report["details_tangled"] = {"start": start_tangled, "final": end_tangled,
                                     "final_by_names_only": naming_only(refined, truth),
                                     "final_atoms": tangled_atoms(refined, truth)}
    report["stages"] = u.stage_reports
    report["trajectory"] = u.history
    report["details"] = end_val["details"]
    report["timing"] = {"wall_s": clock.seconds(), "rrr_s": seconds_rrr,
                        "iterations_per_s": n_run / seconds_rrr if seconds_rrr > 0 else None}
    report["outputs"] = {"model": [str(p) for p in paths], "plot": str(png), "log": f"{prefix}.log",
                         "json": args.json or f"{prefix}.json"}
    log(f"R-work {start_r['r_work']:.4f} -> {final_r['r_work']:.4f}  R-free {start_r['r_free']:.4f} -> "
        f"{final_r['r_free']:.4f}  R(all) {start_r['r_all']:.4f} -> {final_r['r_all']:.4f}  R(used) "
        f"{start_r['r_used']:.4f} -> {final_r['r_used']:.4f}")
    if truth is not None:
        log(f"tangled residues: {len(start_tangled)} -> {len(end_tangled)}"
            + (f" ({', '.join(end_tangled)})" if end_tangled else "")
            + _names_only_note(report["details_tangled"]["final_by_names_only"]))
        for res, rows in report["details_tangled"]["final_atoms"].items():  # each atom's nearer truth conformer
            log(f"  {res}: " + "; ".join(f"{alt}: {row}" for alt, row in rows.items()))
    log(format_text(end_val, "final model"))
    write_json(report["outputs"]["json"], report)
    log(f"wrote {', '.join(str(p) for p in paths)}, {png} in {report['timing']['wall_s']:.1f} s")
    atomic_write(f"{prefix}.log", "\n".join(log.lines) + "\n")
    import shutil

    if not args.keep_checkpoint and checkpoint.exists():
        shutil.rmtree(checkpoint)
    if not args.keep_checkpoint and searched.exists():
        searched.unlink()
    if density_dir.exists():
        shutil.rmtree(density_dir)
    return 0


def _names_only_note(residues: list[str]) -> str:
    """The log's word on tangles of names alone (tangling.naming_only): still counted, since the
    challenge's rule counts them, but no data or restraint can see them."""
    if not residues:
        return ""
    return (f"; tangled by the names of equivalent atoms only (CD1/CD2 …, invisible to data and "
            f"restraints): {', '.join(residues)}")


def _closing_stage(u, model, client, density_dir: Path, log):
    """One more RRR stage (`untangle.rrr.closing_stage`) after a search after RRR made swaps; its
    iterations join the trajectory (and the plot) as the next stage. Returns the model at its end."""
    import time

    from .untangle.rrr import closing_stage

    u.engine = None  # the finished run's density variables (2 GB on 1AHO), before the new ones are made
    c = closing_stage(u, model, client=client, workdir=density_dir / "closing" if u.opt.memmap else None)
    n, first = c.opt.iterations[0], len(u.opt.iterations) + 1
    log(f"closing RRR stage (stage {first}, {n} iterations): the search after RRR made swaps; RRR holds the "
        "geometry to its windows again")
    t0 = time.perf_counter()

    def progress(rec):
        if rec["iteration"] % 10 == 0 or rec["iteration"] == n:
            rate = rec["iteration"] / max(time.perf_counter() - t0, 1e-9)
            log(_rrr_progress_line(rec, first, n, rate, n - rec["iteration"]))

    c.run(progress=progress)
    for rec in (*c.history, *c.stage_reports):
        rec["stage"] = first
    u.history.extend(c.history)
    u.stage_reports.extend(c.stage_reports)
    return c.model_at(c.xyz)


def _rrr_progress_line(rec: dict, stage: int, n: int, rate: float, left: int) -> str:
    """A progress line of an RRR run: iteration of its stage, gap (Å), R(used), rate, time left."""
    return (f"stage {stage} iteration {rec['iteration']}/{n}  gap {rec['gap']:.5f} Å  R(used) {rec['r_used']:.4f}  "
            f"{rate:.2f} it/s  ~{left / max(rate, 1e-9) / 60:.1f} min left")


def _log_interrupt(log, prefix, what: str) -> None:
    """An interrupted untangle run: say where it stands and how to go on, and keep the log."""
    from .io.atomic import atomic_write

    log(f"interrupted: {what}")
    atomic_write(f"{prefix}.log", "\n".join(log.lines) + "\n")


def _resolve_crossings(model, table, restraints, args, log, client, reports: dict, when: str):
    """The crossing search (untangle/crossings.py; `when` "residue_swaps": the residue swap search)
    with progress in the log; its report into reports[when]."""
    import time

    from .untangle.crossings import resolve_crossings, resolve_residue_swaps

    t0 = time.perf_counter()
    what = "residue swap search" if when == "residue_swaps" else f"crossing search ({when.replace('_', ' ')})"
    log(what)
    if when == "residue_swaps":
        out, rep = resolve_residue_swaps(model, table, restraints, cycles=max(args.crossing_cycles, 1), log=log,
                                         client=client)
    else:
        out, rep = resolve_crossings(model, table, restraints, cycles=args.crossing_cycles, log=log, client=client)
    reports[when] = {"accepted": rep.accepted, "rounds": rep.rounds, "seconds": time.perf_counter() - t0}
    log(f"{what}: {len(rep.accepted)} swap(s) in {time.perf_counter() - t0:.0f} s")
    return out


def _search_fingerprint(model, args) -> str:
    """What the crossing search's result depends on: the input model and the search options."""
    import hashlib

    h = hashlib.sha256()
    for arr in (model.atoms.xyz, model.atoms.b_iso, model.atoms.occupancy):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(repr((str(args.data), args.labin, args.crossing_cycles, args.monlib, tuple(args.dict))).encode())
    return h.hexdigest()


def _save_searched(path: Path, model, searched, args, reports: dict) -> None:
    """The model after the crossing search (positions and ADPs: swaps exchange both), atomically."""
    import io
    import json

    from .io.atomic import atomic_write

    buf = io.BytesIO()
    a = searched.atoms
    np.savez(buf, xyz=a.xyz, b_iso=a.b_iso, u_aniso=a.u_aniso, has_aniso=a.has_aniso,
             fingerprint=_search_fingerprint(model, args), report=json.dumps(reports["before_rrr"]))
    atomic_write(path, buf.getvalue())


def _load_searched(path: Path, model, args, reports: dict):
    """The model after a saved crossing search (`_save_searched`), checked against this run's inputs."""
    import json
    import zipfile

    try:
        with np.load(path) as st:
            fingerprint, report = str(st["fingerprint"]), json.loads(str(st["report"]))
            arrays = {k: st[k] for k in ("xyz", "b_iso", "u_aniso", "has_aniso")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DrefineError(f"{path}: not a readable saved crossing search ({e}); remove it and run without "
                           "--resume") from None
    if fingerprint != _search_fingerprint(model, args):
        raise DrefineError(f"{path}: the saved crossing search was made for another model, data or options; "
                           "run without --resume after removing it, or with the same inputs")
    out = model.copy()
    a = out.atoms
    a.xyz, a.b_iso, a.u_aniso, a.has_aniso = arrays["xyz"], arrays["b_iso"], arrays["u_aniso"], arrays["has_aniso"]
    reports["before_rrr"] = report
    return out


@contextlib.contextmanager
def _no_client():
    yield None


def _occupancy_report(result) -> list[dict]:
    g = result.occupancy_groups
    if g is None or not g.n_conformers:
        return []
    q = g.conformer_values(result.occupancy)
    return [{"residue": g.labels[k], "sum_to_one": bool(g.sum_to_one[k]),
             "occupancies": [round(float(v), 3) for v in q[g.group_of_conformer == k]]} for k in range(g.n_groups)]


MAP_SUFFIXES = (".mrc", ".map", ".ccp4", ".zarr", ".mrc.gz", ".map.gz", ".ccp4.gz")


def _batch_setup(args, log) -> tuple[dict, Path]:
    """Model, data, restraints and options shared by every member (the task payload)."""
    from .io.models import read_model
    from .restraints.topology import build_restraints

    model = read_model(args.model)
    if len(model.model_atoms(0)) == 0:
        raise DrefineError(f"{args.model}: the model has no atoms")
    mode = args.mode
    if mode == "auto":
        mode = "rsr" if str(args.data).lower().rstrip("/").endswith(MAP_SUFFIXES) else "xray"
    restraints = build_restraints(model, args.monlib, tuple(args.dict), unknown_residues=args.unknown_residues)
    if mode == "rsr":
        from .io.maps import read_map
        from .refine.rsr import RSROptions

        if args.resolution is None:
            raise DrefineError("--resolution (Å) is needed to refine against a map")
        dmap = read_map(args.data)
        inside = dmap.covers(model.atoms.xyz[model.model_atoms(0)])
        if inside < 1.0:
            raise DrefineError(f"the map does not cover the model: {100 * (1 - inside):.1f} % of the atoms lie outside")
        options = RSROptions(resolution=args.resolution, source=args.scattering or "electron")
        data = dmap.load()
    else:
        from .io.reflections import check_cell_compatible, read_reflections
        from .refine.xray import XrayOptions

        data = read_reflections(args.data)
        if args.resolution is not None:
            data = data.select(data.d >= args.resolution).with_bins()
        check_cell_compatible(data, model.cell)
        from .validate.twinning import twinning_note, twinning_report

        twinning = twinning_report(data)
        if twinning_note(twinning):
            log(f"data: {twinning_note(twinning)}")
        # twinned data: every member refines with the twin law the tests found (as xray --twin auto)
        options = XrayOptions(source=args.scattering or "xray", twin_law=_twin_law("auto", data, twinning, log))
    out_dir = Path(args.output or (Path(args.model).name.split(".")[0] + "_" + args.command.replace("-", "_")))
    log(f"drefine {args.command} {args.model} against {args.data} ({mode}): {len(model.model_atoms(0))} atoms "
        f"-> {out_dir}/")
    return {"model": model, "data": data, "restraints": restraints, "options": options, "mode": mode}, out_dir


def _batch_client(args):
    """The batch's cluster, started in the background (the caller reads its inputs meanwhile):
    `with session as client:` (client None for in-process runs), then `session.wait_closed()`."""
    from .parallel.cluster import IN_PROCESS, BackgroundClient, batch_client, task_client

    if args.cluster:
        return BackgroundClient(batch_client(args.cluster, args.jobs, args.job_cores, args.job_memory,
                                             args.job_walltime, args.queue))
    if args.scheduler is not None and args.scheduler.lower() in IN_PROCESS:
        return BackgroundClient(None)
    return BackgroundClient(task_client(None if args.scheduler in (None, "local") else args.scheduler, args.workers))


def _with_batch_cluster(body, args) -> int:
    """body(args, session) with the batch's cluster (`_batch_client`); the cluster closes while
    the body writes its reports, and that close is awaited here."""
    for what, path in (("model", args.model), ("data", args.data)):
        # before the cluster starts: a missing file is reported at once, not after its start and close
        if not Path(path).exists():
            raise DrefineError(f"{what} file not found: {path}")
    session = _batch_client(args)
    try:
        return body(args, session)
    finally:
        session.wait_closed()


def cmd_ensemble(args) -> int:
    return _with_batch_cluster(_ensemble, args)


def _ensemble(args, session) -> int:
    from .io.atomic import atomic_write, write_json
    from .parallel.batch import ensemble_members, ensemble_statistics, member_paths, run_batch
    from .parallel.batch_report import plot_along_chain, write_html, write_multimodel
    from .validate.report import Stopwatch, new_report

    clock = Stopwatch()
    log = _Log()
    seeds = None
    if args.shake_seeds:
        try:
            seeds = [int(s) for s in args.shake_seeds.split(",") if s.strip()]
        except ValueError:
            raise DrefineError("--shake-seeds takes comma-separated integers") from None
        args.n = len(seeds)
    if not args.n or args.n < 1:
        raise DrefineError("give --n (at least 1) or --shake-seeds")
    weight = args.weight
    with session as client:
        payload, out_dir = _batch_setup(args, log)
        if payload["mode"] == "rsr" and weight is None:
            import dataclasses

            from .refine.rsr import run_rsr

            # one weight for the whole ensemble: the scan on the start model (same settings for all);
            # only the provisional cycle and the scan run, not the rest of the protocol. Its tasks
            # also warm the fresh workers (modules, compiled kernels) for the members. (Measured:
            # the scan here while the workers start, with or without a warm-up task on them, made
            # the whole command 0.5-1 s slower: on two cores every process competes for them.)
            scan_only = dataclasses.replace(payload["options"], macro_cycles=1, final_target="atom",
                                            mirror_flips=False, peptide_flips=False)
            weight = run_rsr(payload["model"], payload["data"], payload["restraints"], scan_only, client=client,
                             log=lambda s: None).weight
            log(f"weight {weight:.4g} from the weight scan of the start model, used by every member")
        members = ensemble_members(args.n, args.rmsd, args.seed, weight, seeds, args.regularise)
        result = run_batch(payload, members, out_dir, client=client, resume=args.resume, retries=args.retries, log=log)
    report = new_report("ensemble", {"model": str(args.model), "data": str(args.data), "mode": payload["mode"],
                                     "n": args.n, "rmsd": args.rmsd, "seed": args.seed, "scheduler": args.scheduler})
    report["members"] = result.done
    report["failed"] = result.failed
    report["resumed"] = result.skipped
    images = []
    if result.done:
        stats = ensemble_statistics(payload["model"], payload["restraints"], out_dir, result.done, result.xyz)
        report["final"] = {**stats["summary"], "weight": weight,
                           **{k: float(np.mean([s[k] for s in result.done])) for k in
                              ("bonds_rmsd", "angles_rmsd", "cc_mask", "r_free") if k in result.done[0]}}
        report["details"] = {"per_residue": stats["summary"].pop("per_residue")}
        report["final"].pop("per_residue", None)
        write_multimodel([member_paths(out_dir, s["name"])[0] for s in result.done], out_dir / "ensemble.cif")
        keys = [("rmsf", "RMSF (Å)")] + ([("cc_mean", "CC"), ("cc_spread", "CC spread")]
                                         if "cc_mean" in report["details"]["per_residue"][0] else [])
        plot_along_chain(report["details"]["per_residue"], keys, out_dir / "spread.png",
                         f"ensemble of {len(result.done)}: spread along the chain")
        images.append("spread.png")
        if payload["mode"] == "rsr":
            from .io.maps import write_map
            from .parallel.batch import ensemble_model_map

            write_map(ensemble_model_map(payload, stats["xyz"], stats["atoms"]), out_dir / "ensemble_map.mrc")
            report["outputs_map"] = str(out_dir / "ensemble_map.mrc")
    report["outputs"] = {"folder": str(out_dir), "ensemble": str(out_dir / "ensemble.cif"),
                         "summary": str(out_dir / "summary.json"), "html": str(out_dir / "summary.html")}
    report["timing"] = {"wall_s": clock.seconds(), "batch_s": result.seconds,
                        "members_per_minute": 60 * (len(result.done) - len(result.skipped)) / max(result.seconds, 1e-9)}
    write_json(out_dir / "summary.json", report)
    if args.json:
        write_json(args.json, report)
    table = [{k: s.get(k) for k in ("name", "seed", "cc_mask", "r_free", "bonds_rmsd", "angles_rmsd", "seconds")
              if k in s} for s in result.done]
    write_html(out_dir / "summary.html", f"drefine ensemble: {args.model}", report.get("final", {}), table, images)
    log(f"{len(result.done)} of {args.n} members in {out_dir}/ ({report['timing']['members_per_minute']:.1f} per "
        f"minute); mean RMSF {report.get('final', {}).get('mean_rmsf', float('nan')):.3f} Å")
    atomic_write(out_dir / "ensemble.log", "\n".join(log.lines) + "\n")
    if result.failed:
        raise DrefineError(f"{len(result.failed)} members failed: {', '.join(result.failed)} (run again with --resume)")
    return 0


def cmd_weight_scan(args) -> int:
    return _with_batch_cluster(_weight_scan, args)


def _weight_scan(args, session) -> int:
    from .io.atomic import atomic_write, write_json
    from .parallel.batch import grid_members, run_batch
    from .parallel.batch_report import plot_weight_scan, write_html
    from .validate.report import Stopwatch, new_report

    clock = Stopwatch()
    log = _Log()
    try:
        weights = [float(w) for w in args.weights.split(",") if w.strip()]
        sharpen = [float(b) for b in args.sharpen_b.split(",")] if args.sharpen_b else [None]
    except ValueError:
        raise DrefineError("--weights and --sharpen-b take comma-separated numbers") from None
    if not weights or any(w <= 0 for w in weights):
        raise DrefineError("--weights must be positive numbers")
    with session as client:
        payload, out_dir = _batch_setup(args, log)
        if payload["mode"] == "xray" and args.sharpen_b:
            raise DrefineError("--sharpen-b applies to maps (rsr) only")
        members = grid_members(weights, sharpen)
        result = run_batch(payload, members, out_dir, client=client, resume=args.resume, retries=args.retries, log=log)
    rsr = payload["mode"] == "rsr"
    fit_key = "cc_mask" if rsr else "r_free"
    bond_max, angle_max = (0.01, 1.0) if rsr else (0.015, 1.5)
    ok = [s for s in result.done if s["bonds_rmsd"] <= bond_max and s["angles_rmsd"] <= angle_max]
    best = (max(ok, key=lambda s: s[fit_key]) if rsr else min(ok, key=lambda s: s[fit_key])) if ok else None
    recommended = best["weight"] if best else min(weights)
    log(f"{'run':>14s} {'weight':>8s} {fit_key:>8s} {'bonds Å':>8s} {'angles °':>8s}")
    for s in result.done:
        log(f"{s['name']:>14s} {s['weight']:8.3g} {s[fit_key]:8.4f} {s['bonds_rmsd']:8.4f} {s['angles_rmsd']:8.2f}")
    log(f"recommended weight {recommended:g}" + (f" ({best['name']}: best {fit_key} with bonds ≤ {bond_max} Å and "
                                                 f"angles ≤ {angle_max}°)" if best else
                                                 " (no run kept the geometry within the targets: the smallest)"))
    plot_weight_scan(result.done, fit_key, out_dir / "weight_scan.png", best["name"] if best else None)
    report = new_report("weight-scan", {"model": str(args.model), "data": str(args.data), "mode": payload["mode"],
                                        "weights": weights, "sharpen_b": sharpen})
    report["final"] = {"recommended_weight": recommended, "recommended_run": best["name"] if best else None,
                       "bond_target": bond_max, "angle_target": angle_max}
    report["members"] = result.done
    report["failed"] = result.failed
    report["timing"] = {"wall_s": clock.seconds(), "batch_s": result.seconds}
    write_json(out_dir / "weight_scan.json", report)
    if args.json:
        write_json(args.json, report)
    table = [{k: s.get(k) for k in ("name", "weight", "sharpen_b", fit_key, "bonds_rmsd", "angles_rmsd")}
             for s in result.done]
    write_html(out_dir / "weight_scan.html", f"drefine weight-scan: {args.model}", report["final"], table,
               ["weight_scan.png"])
    atomic_write(out_dir / "weight_scan.log", "\n".join(log.lines) + "\n")
    if result.failed:
        raise DrefineError(f"{len(result.failed)} runs failed: {', '.join(result.failed)} (run again with --resume)")
    return 0


COMMANDS = {"validate": cmd_validate, "shake": cmd_shake, "fmodel": cmd_fmodel, "rsr": cmd_rsr, "xray": cmd_xray,
            "ensemble": cmd_ensemble, "weight-scan": cmd_weight_scan, "untangle": cmd_untangle}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except DrefineError as e:
        print(f"drefine {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"drefine {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"drefine {args.command}: error: out of memory", file=sys.stderr)
        return 1
    except Exception as e:
        if os.environ.get("DREFINE_DEBUG"):
            raise
        print(f"drefine {args.command}: internal error: {type(e).__name__}: {e} "
              "(set DREFINE_DEBUG=1 for a traceback, and please report it)", file=sys.stderr)
        return 3


def console_main() -> None:
    """The `drefine` command: main(), then leave without the interpreter's teardown.

    Every output is written and closed by then (atomically renamed files, the cluster closed), so
    the teardown only frees memory: with numba, scipy, gemmi and distributed loaded it took about
    0.5 s of every run (measured on the ensemble command). Standard streams are flushed first."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    console_main()
