"""Atoms as a structure of arrays: the form every numeric kernel of drefine works on.

A `Model` keeps the gemmi.Structure it was read from (the carrier of everything a refinement
program must give back unchanged: entities, headers, connections, sequences) next to flat
numpy arrays of the per-atom values that refinement changes or reads (coordinates, B, U,
occupancy, scattering type, residue and conformer indices). Arrays follow gemmi's iteration
order (model → chain → residue → atom), so writing back is a single aligned pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import gemmi
import numpy as np

#: U_aniso column order, as in mmCIF _atom_site_anisotrop and gemmi.SMat33: U11 U22 U33 U12 U13 U23.
U_ORDER = ("u11", "u22", "u33", "u12", "u13", "u23")


@dataclass
class AtomArrays:
    """Per-atom arrays, one row per atom site (all models of the file, in file order).

    Units: xyz in Å (orthogonal, the file's frame), b_iso in Å², u_aniso in Å² (zeros where the
    atom is isotropic, see `has_aniso`), occupancy as a fraction.
    """

    xyz: np.ndarray  # (N, 3) float64, Å
    b_iso: np.ndarray  # (N,) float64, Å²
    u_aniso: np.ndarray  # (N, 6) float64, Å², U_ORDER
    has_aniso: np.ndarray  # (N,) bool
    occupancy: np.ndarray  # (N,) float64
    element: np.ndarray  # (N,) str, element symbol ("C", "Se", "H")
    atomic_number: np.ndarray  # (N,) int16
    charge: np.ndarray  # (N,) int8, formal charge
    name: np.ndarray  # (N,) str, atom name ("CA")
    altloc: np.ndarray  # (N,) str, "" when the atom has no alternate location
    conformer: np.ndarray  # (N,) int16: 0 shared by all conformers, k ≥ 1 the k-th altloc of its model
    residue_index: np.ndarray  # (N,) int32, row in ResidueTable
    model_index: np.ndarray  # (N,) int16, which model (NMR ensembles) the atom belongs to

    def __len__(self) -> int:
        return int(self.xyz.shape[0])

    @property
    def is_hydrogen(self) -> np.ndarray:
        return np.isin(self.element, ("H", "D"))

    def copy(self) -> AtomArrays:
        return AtomArrays(**{f.name: getattr(self, f.name).copy() for f in fields(self)})

    def take(self, index: np.ndarray) -> AtomArrays:
        """Rows `index` (an integer array or boolean mask) as a new AtomArrays."""
        return AtomArrays(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def chunked_xyz(self, chunk_atoms: int = 4096):
        """Coordinates as a dask array chunked over atoms (the layout of the parallel kernels)."""
        import dask.array as da

        return da.from_array(self.xyz, chunks=(chunk_atoms, 3))


@dataclass
class ResidueTable:
    """Per-residue arrays (one row per residue of every model)."""

    name: np.ndarray  # (R,) str, residue name ("ALA")
    seqnum: np.ndarray  # (R,) int32, author residue number
    icode: np.ndarray  # (R,) str, insertion code, "" when none
    chain: np.ndarray  # (R,) str, author chain name
    chain_index: np.ndarray  # (R,) int32, running chain index within the file
    model_index: np.ndarray  # (R,) int16
    het_flag: np.ndarray  # (R,) str, "A" (ATOM), "H" (HETATM) or ""
    entity_type: np.ndarray  # (R,) str: polymer, non-polymer, water, branched, unknown

    def __len__(self) -> int:
        return int(self.name.shape[0])

    def label(self, i: int) -> str:
        """Human-readable residue label such as 'A/ALA 39' or 'B/SER 40A'."""
        return f"{self.chain[i]}/{self.name[i]} {self.seqnum[i]}{self.icode[i]}".strip()


@dataclass
class Model:
    """An atomic model: the gemmi.Structure it came from plus its atoms as arrays."""

    structure: gemmi.Structure
    atoms: AtomArrays
    residues: ResidueTable
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def cell(self) -> gemmi.UnitCell:
        return self.structure.cell

    @property
    def spacegroup(self) -> gemmi.SpaceGroup | None:
        return self.structure.find_spacegroup()

    @property
    def has_crystal_cell(self) -> bool:
        """False for the placeholder 1×1×1 Å cell of cryo-EM and NMR files (no lattice to honour)."""
        c = self.structure.cell
        return c.is_crystal() and min(c.a, c.b, c.c) > 2.0

    @property
    def n_models(self) -> int:
        return len(self.structure)

    def model_atoms(self, model: int = 0) -> np.ndarray:
        """Indices of the atoms of one model (refinement works on model 0 unless told otherwise)."""
        return np.flatnonzero(self.atoms.model_index == model)

    def atom_label(self, i: int) -> str:
        """'A/ALA 39/CA.B' style label of atom i."""
        r = int(self.atoms.residue_index[i])
        alt = f".{self.atoms.altloc[i]}" if self.atoms.altloc[i] else ""
        return f"{self.residues.label(r)}/{self.atoms.name[i]}{alt}"

    def copy(self) -> Model:
        return Model(self.structure.clone(), self.atoms.copy(), self.residues, self.source, list(self.notes))

    def to_structure(self) -> gemmi.Structure:
        """A clone of the carried structure with every per-atom value taken from the arrays."""
        st = self.structure.clone()
        a = self.atoms
        xyz, b, u, occ = a.xyz.tolist(), a.b_iso.tolist(), a.u_aniso.tolist(), a.occupancy.tolist()
        has_u = a.has_aniso.tolist()
        i = 0
        # Writing back is I/O, done once per output file; gemmi has no bulk setter for atom fields.
        for gm in st:
            for ch in gm:
                for res in ch:
                    for atom in res:
                        atom.pos = gemmi.Position(*xyz[i])
                        atom.b_iso = b[i]
                        atom.occ = occ[i]
                        atom.aniso = gemmi.SMat33f(*u[i]) if has_u[i] else gemmi.SMat33f(0, 0, 0, 0, 0, 0)
                        i += 1
        if i != len(a):
            raise RuntimeError(f"atom arrays ({len(a)}) and structure ({i}) are out of step")
        return st


def arrays_from_structure(st: gemmi.Structure) -> tuple[AtomArrays, ResidueTable]:
    """Flatten a gemmi.Structure (all models) into AtomArrays and a ResidueTable."""
    xyz, b, u, has_u, occ, el, z, q, nm, alt, conf, ri, mi = ([] for _ in range(13))
    rn, rs, ric, rch, rci, rmi, rhet, rent = ([] for _ in range(8))
    chain_counter = 0
    for m_i, gm in enumerate(st):
        altlocs = sorted({a.altloc for res in gm.all() for a in [res.atom] if a.altloc != "\0"})
        alt_id = {c: k + 1 for k, c in enumerate(altlocs)}
        for ch in gm:
            for res in ch:
                r_i = len(rn)
                rn.append(res.name)
                rs.append(res.seqid.num)
                ric.append(res.seqid.icode.strip())
                rch.append(ch.name)
                rci.append(chain_counter)
                rmi.append(m_i)
                rhet.append(res.het_flag.strip())
                rent.append(str(res.entity_type).split(".")[-1].lower())
                for atom in res:
                    p = atom.pos
                    xyz.append((p.x, p.y, p.z))
                    b.append(atom.b_iso)
                    an = atom.aniso
                    nz = an.nonzero()
                    has_u.append(nz)
                    u.append((an.u11, an.u22, an.u33, an.u12, an.u13, an.u23) if nz else (0.0,) * 6)
                    occ.append(atom.occ)
                    el.append(atom.element.name)
                    z.append(atom.element.atomic_number)
                    q.append(atom.charge)
                    nm.append(atom.name)
                    a_c = "" if atom.altloc == "\0" else atom.altloc
                    alt.append(a_c)
                    conf.append(alt_id.get(a_c, 0))
                    ri.append(r_i)
                    mi.append(m_i)
            chain_counter += 1
    n = len(xyz)
    atoms = AtomArrays(
        xyz=np.asarray(xyz, dtype=np.float64).reshape(n, 3),
        b_iso=np.asarray(b, dtype=np.float64),
        u_aniso=np.asarray(u, dtype=np.float64).reshape(n, 6),
        has_aniso=np.asarray(has_u, dtype=bool),
        occupancy=np.asarray(occ, dtype=np.float64),
        element=np.asarray(el, dtype="<U2"),
        atomic_number=np.asarray(z, dtype=np.int16),
        charge=np.asarray(q, dtype=np.int8),
        name=np.asarray(nm, dtype="<U4"),
        altloc=np.asarray(alt, dtype="<U1"),
        conformer=np.asarray(conf, dtype=np.int16),
        residue_index=np.asarray(ri, dtype=np.int32),
        model_index=np.asarray(mi, dtype=np.int16),
    )
    residues = ResidueTable(
        name=np.asarray(rn, dtype="<U8"),
        seqnum=np.asarray(rs, dtype=np.int32),
        icode=np.asarray(ric, dtype="<U1"),
        chain=np.asarray(rch, dtype="<U8"),
        chain_index=np.asarray(rci, dtype=np.int32),
        model_index=np.asarray(rmi, dtype=np.int16),
        het_flag=np.asarray(rhet, dtype="<U1"),
        entity_type=np.asarray(rent, dtype="<U16"),
    )
    return atoms, residues
