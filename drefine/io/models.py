"""Reading and writing atomic models (PDB, mmCIF) through gemmi, with clear errors for bad files."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import gemmi
import numpy as np

from ..errors import InputError
from ..model.arrays import Model, arrays_from_structure
from .atomic import atomic_write

MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")


def _read_text_head(path: Path, nbytes: int = 4096) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        return fh.read(nbytes).decode("latin-1")


def _check_pdb_not_truncated(path: Path) -> None:
    """gemmi reads a PDB cut mid-record without complaint; catch the cut coordinate record here."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        if path.suffix != ".gz":
            size = os.path.getsize(path)
            fh.seek(max(0, size - 2048))
        tail = fh.read().decode("latin-1")
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    if not lines:
        return
    last = lines[-1]
    if last.startswith(("ATOM", "HETATM")) and len(last.rstrip()) < 54:
        raise InputError(f"{path}: the file ends inside a coordinate record (truncated PDB?): {last!r}")


def read_model(path: str | os.PathLike) -> Model:
    """Read a PDB or mmCIF model (optionally gzipped) into a Model.

    Raises InputError with one line naming the problem for a missing, unreadable, truncated
    or atom-less file.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"model file not found: {p}")
    if p.is_dir():
        raise InputError(f"model path is a directory, not a file: {p}")
    try:
        head = _read_text_head(p)
    except OSError as e:
        raise InputError(f"cannot read model file {p}: {e}") from None
    if "\0" in head:
        raise InputError(f"{p} is a binary file, not a PDB or mmCIF model")
    is_cif = head.lstrip().startswith(("data_", "#")) or p.name.lower().endswith((".cif", ".cif.gz", ".mmcif"))
    if not is_cif:
        _check_pdb_not_truncated(p)
    try:
        st = gemmi.read_structure(str(p), merge_chain_parts=False)
    except (RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{p} is not a readable PDB/mmCIF model: {msg}") from None
    if len(st) == 0 or sum(m.count_atom_sites() for m in st) == 0:
        raise InputError(f"{p} contains no atoms (is it a PDB or mmCIF model?)")
    st.setup_entities()
    atoms, residues = arrays_from_structure(st)
    return Model(structure=st, atoms=atoms, residues=residues, source=str(p))


def pdb_fits(model: Model) -> tuple[bool, str]:
    """Whether the model can be written as PDB without losing information, and why not."""
    a, r = model.atoms, model.residues
    if len(a) > 99999:
        return False, f"{len(a)} atoms exceed the PDB limit of 99,999"
    if len(r) and max(len(x) for x in set(r.name.tolist())) > 3:
        return False, "residue names longer than 3 characters"
    if len(r) and max(len(x) for x in set(r.chain.tolist())) > 2:
        return False, "chain names longer than 2 characters"
    if len(r) and (r.seqnum.min() < -999 or r.seqnum.max() > 9999):
        return False, "residue numbers outside -999..9999"
    if len(a) and (a.xyz.min() <= -1000 or a.xyz.max() >= 10000):
        return False, "coordinates outside the PDB field width"
    return True, ""


def write_model(model: Model, path: str | os.PathLike, fmt: str | None = None,
                esd: np.ndarray | None = None) -> Path:
    """Write the model (arrays taken over into the structure) as mmCIF or PDB, atomically.

    The format is `fmt` ('cif' or 'pdb') or follows the file suffix (mmCIF unless .pdb/.ent).
    `esd`: per-atom standard uncertainties of x, y, z (Å; N×3, NaN for none), written to mmCIF
    as _atom_site.Cartn_x_esd etc. (PDB has no place for them).
    """
    p = Path(path)
    if fmt is None:
        fmt = "pdb" if p.name.lower().endswith((".pdb", ".ent")) else "cif"
    st = model.to_structure()
    if fmt == "pdb":
        ok, why = pdb_fits(model)
        if not ok:
            raise InputError(f"cannot write {p} as PDB: {why}; write mmCIF instead")
        text = st.make_pdb_string(gemmi.PdbWriteOptions())
    else:
        st.setup_entities()
        doc = st.make_mmcif_document()
        if esd is not None:
            _add_coordinate_esds(doc.sole_block(), esd)
        text = doc.as_string()
    atomic_write(p, text)
    return p


def _add_coordinate_esds(block: gemmi.cif.Block, esd: np.ndarray) -> None:
    """_atom_site.Cartn_{x,y,z}_esd columns; rows are in the order of the model's atom arrays."""
    loop = block.find_loop("_atom_site.id").get_loop()
    if loop.length() != len(esd):
        raise RuntimeError(f"atom_site has {loop.length()} rows, esds {len(esd)}")
    tags = [f"_atom_site.Cartn_{c}_esd" for c in "xyz"]
    loop.add_columns(tags, "?")
    for k, tag in enumerate(tags):
        col = block.find_values(tag)
        for i, v in enumerate(esd[:, k].tolist()):
            if np.isfinite(v):
                col[i] = f"{v:.4f}"


def write_model_outputs(model: Model, prefix: str | os.PathLike, esd: np.ndarray | None = None) -> list[Path]:
    """Write PREFIX.cif and, when the model fits the format, PREFIX.pdb; return the paths written."""
    prefix = str(prefix)
    out = [write_model(model, prefix + ".cif", "cif", esd=esd)]
    if pdb_fits(model)[0]:
        out.append(write_model(model, prefix + ".pdb", "pdb"))
    return out
