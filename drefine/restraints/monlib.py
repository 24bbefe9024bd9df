"""Finding and loading a CCP4-format monomer library, with the built-in dictionary as fallback.

Order of precedence: `--monlib DIR`, then $DREFINE_MONLIB, then $CLIBD_MON, then the built-in
dictionary shipped with drefine (20 standard amino acids and water, hydrogens included).
Residues missing from a configured library are taken from the built-in one when it has them;
extra CIF dictionaries (`--dict FILE`, for ligands) are read on top.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gemmi

from ..errors import InputError, UnknownResidueError

BUILTIN_MONLIB = Path(__file__).with_name("data") / "monomers"


def find_monlib(explicit: str | os.PathLike | None = None) -> Path | None:
    """The monomer library directory the user configured, or None for the built-in dictionary."""
    for source, value in (("--monlib", explicit), ("$DREFINE_MONLIB", os.environ.get("DREFINE_MONLIB")),
                          ("$CLIBD_MON", os.environ.get("CLIBD_MON"))):
        if value:
            p = Path(value)
            if not (p / "list" / "mon_lib_list.cif").is_file():
                raise InputError(f"{source}={p} is not a CCP4 monomer library (no list/mon_lib_list.cif)")
            return p
    return None


def _monomer_path(root: Path, resname: str) -> Path:
    return root / resname[0].lower() / f"{resname}.cif"


@dataclass
class LoadedMonlib:
    """A gemmi.MonLib plus where each monomer came from (reported in the JSON)."""

    monlib: gemmi.MonLib
    source: str
    origin: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def load_monlib(resnames, monlib_dir: str | os.PathLike | None = None,
                extra_dicts=(), allow_missing: bool = False) -> LoadedMonlib:
    """Load restraint dictionaries for `resnames`.

    Raises UnknownResidueError naming every residue no dictionary describes, unless
    `allow_missing` (then they are listed in `.missing`).
    """
    names = sorted(set(resnames))
    root = find_monlib(monlib_dir)
    base = root if root is not None else BUILTIN_MONLIB
    try:
        ml = gemmi.read_monomer_lib(str(base), [], ignore_missing=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise InputError(f"cannot read the monomer library at {base}: {e}") from None
    loaded = LoadedMonlib(ml, str(root) if root else "built-in")
    for path in extra_dicts:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"restraint dictionary not found: {p}")
        try:
            ml.read_monomer_cif(str(p))
        except (RuntimeError, ValueError, OSError) as e:
            raise InputError(f"cannot read restraint dictionary {p}: {e}") from None
    for name in names:
        if name in ml.monomers:
            loaded.origin[name] = "dict"
            continue
        for label, lib in (("library", root), ("built-in", BUILTIN_MONLIB)):
            if lib is not None and _monomer_path(lib, name).is_file():
                ml.read_monomer_cif(str(_monomer_path(lib, name)))
                loaded.origin[name] = label
                break
        else:
            loaded.missing.append(name)
    if loaded.missing and not allow_missing:
        where = f"the monomer library {root}" if root else "the built-in dictionary"
        raise UnknownResidueError(
            f"no restraint dictionary for residue(s) {', '.join(loaded.missing)} in {where}: "
            "give a CCP4 monomer library with --monlib DIR (or $DREFINE_MONLIB / $CLIBD_MON), "
            "a CIF dictionary with --dict FILE, or leave them unrestrained with --unknown-residues skip")
    return loaded
