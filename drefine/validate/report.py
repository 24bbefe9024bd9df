"""Whole-model validation and the JSON report every drefine subcommand shares.

Report shape (stable; documented in the README):
    program, version, command, inputs, final (headline numbers), details (per-section
    dictionaries), timing.wall_s; refinement subcommands add `cycles`.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from .. import __version__
from ..model.arrays import Model
from ..restraints.nonbonded import find_nonbonded_pairs
from ..restraints.topology import Restraints, build_restraints
from .adp import b_factor_statistics, occupancy_statistics
from .backbone import backbone_statistics
from .geometry import geometry_statistics

#: keys every report's `final` block carries (None when not computed)
FINAL_KEYS = ("bonds_rmsd", "angles_rmsd", "bonds_rmsz", "angles_rmsz", "clashscore", "rama_outliers",
              "rama_favored", "rotamer_outliers")


def new_report(program: str, inputs: dict) -> dict:
    return {"program": f"drefine {program}", "version": __version__, "command": " ".join(sys.argv),
            "inputs": inputs, "final": {}, "details": {}, "timing": {}}


def validate_structure(model: Model, restraints: Restraints | None = None, xyz: np.ndarray | None = None,
                       rama_dir=None, model_index: int = 0, **restraint_options) -> dict:
    """Validation of one model: `final` headline numbers and `details` sections."""
    r = restraints or build_restraints(model, model_index=model_index, **restraint_options)
    xyz = model.atoms.xyz if xyz is None else xyz
    pairs = find_nonbonded_pairs(model, r, xyz)
    geo = geometry_statistics(model, r, xyz, pairs)
    rama, rota = backbone_statistics(model, r, xyz, rama_dir)
    final = {k: geo.get(k) for k in ("bonds_rmsd", "angles_rmsd", "bonds_rmsz", "angles_rmsz", "clashscore")}
    final["rama_outliers"] = rama.get("outliers_percent") if rama["computed"] else None
    final["rama_favored"] = rama.get("favored_percent") if rama["computed"] else None
    final["rotamer_outliers"] = rota.get("outliers_percent") if rota["computed"] else None
    final["n_atoms"] = len(r.atom_indices)
    details = {
        "geometry": geo, "ramachandran": rama, "rotamers": rota,
        "b_factors": b_factor_statistics(model, r), "occupancies": occupancy_statistics(model, r),
        "topology": {**r.counts(), "links": r.links, "chain_breaks": [b.as_dict() for b in r.chain_breaks],
                     "unrestrained_residues": r.unrestrained_residues,
                     "warnings": r.topology_warnings,
                     "dictionary": r.dictionary},
    }
    return {"final": final, "details": details}


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def format_text(result: dict, title: str = "") -> str:
    """Human-readable summary of one validation result."""
    f, d = result["final"], result["details"]
    geo, rama, rota = d["geometry"], d["ramachandran"], d["rotamers"]
    lines = [title] if title else []
    lines.append(f"atoms {f['n_atoms']}  bonds {geo['n_bonds']}  angles {geo['n_angles']} (without H)  "
                 f"chirals {geo['n_chirals']}  planes {geo['n_planes']}")
    lines.append(f"bond  RMSD {_fmt(f['bonds_rmsd'], '.4f')} Å  RMSZ {_fmt(f['bonds_rmsz'], '.3f')}  "
                 f"outliers(>4σ) {geo['n_bond_outliers']}")
    lines.append(f"angle RMSD {_fmt(f['angles_rmsd'], '.3f')}°  RMSZ {_fmt(f['angles_rmsz'], '.3f')}  "
                 f"outliers(>4σ) {geo['n_angle_outliers']}")
    wh = geo["with_hydrogens"]
    if wh["n_bonds"] > geo["n_bonds"]:
        lines.append(f"with H: bond RMSD {_fmt(wh['bonds_rmsd'], '.4f')} Å (outliers {wh['n_bond_outliers']}), "
                     f"angle RMSD {_fmt(wh['angles_rmsd'], '.3f')}° (outliers {wh['n_angle_outliers']})")
    lines.append(f"chirality violations {len(geo['chirality_violations'])}  "
                 f"planarity violations {len(geo['planarity_violations'])}")
    hnote = "" if geo["clashscore_with_hydrogens"] else " (no hydrogens in the model: underestimates)"
    lines.append(f"clashscore {f['clashscore']:.2f}  clashes {geo['n_clashes']}{hnote}")
    if rama["computed"]:
        lines.append(f"Ramachandran favoured {_fmt(rama['favored_percent'], '.2f')}%  "
                     f"outliers {_fmt(rama['outliers_percent'], '.2f')}%"
                     f" ({rama['n_outlier']} of {rama['n_residues']})")
    else:
        lines.append(f"Ramachandran not computed: {rama['reason']}")
    if rota["computed"]:
        pct = _fmt(rota["outliers_percent"], ".2f")
        lines.append(f"rotamer outliers {pct}% ({rota['n_outliers']} of {rota['n_scored']}; "
                     f"not computed for {', '.join(rota['not_computed_residue_types']) or 'none'})")
    else:
        lines.append(f"rotamers not computed: {rota['reason']}")
    b = d["b_factors"]["overall"]
    lines.append(f"B mean {b['mean']:.1f} Å² (min {b['min']:.1f}, max {b['max']:.1f})  "
                 f"jumps along chain {len(d['b_factors']['jumps_along_chain'])}")
    occ = d["occupancies"]
    if occ["n_residues_with_altlocs"]:
        lines.append(f"residues with altlocs {occ['n_residues_with_altlocs']}: occupancy sums > 1: "
                     f"{occ['n_sums_above_one']}, < 1 (partly occupied): {occ['n_partial']}")
    topo = d["topology"]
    lines.append(f"links {topo['links']}  chain breaks {len(topo['chain_breaks'])}"
                 + (f"  unrestrained residues {len(topo['unrestrained_residues'])}"
                    if topo["unrestrained_residues"] else ""))
    if topo["warnings"]:
        lines.append(f"restraint setup warnings ({len(topo['warnings'])}): " + "; ".join(topo["warnings"][:3])
                     + (" …" if len(topo["warnings"]) > 3 else ""))
    if geo["worst_bonds"]:
        lines.append("worst bonds:")
        lines += [f"  {' - '.join(w['atoms'])}  {w['value']:.3f} Å (ideal {w['ideal']:.3f}, z {w['z']:+.1f})"
                  for w in geo["worst_bonds"][:5]]
    if geo["worst_angles"]:
        lines.append("worst angles:")
        lines += [f"  {' - '.join(w['atoms'])}  {w['value']:.1f}° (ideal {w['ideal']:.1f}, z {w['z']:+.1f})"
                  for w in geo["worst_angles"][:5]]
    if geo["worst_clashes"]:
        lines.append("worst clashes:")
        lines += [f"  {' : '.join(w['atoms'])}  {w['distance']:.2f} Å overlap {w['overlap']:.2f}"
                  + (" (symmetry)" if w["symmetry"] else "") for w in geo["worst_clashes"][:5]]
    if rama.get("outliers"):
        lines.append("Ramachandran outliers: " + ", ".join(o["residue"] for o in rama["outliers"][:10]))
    if rota.get("outliers"):
        lines.append("rotamer outliers: " + ", ".join(o["residue"] for o in rota["outliers"][:10]))
    return "\n".join(lines)


class Stopwatch:
    def __init__(self):
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 3)
