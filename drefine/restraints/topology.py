"""Geometry restraints as flat index/parameter arrays, built once from gemmi's topology.

gemmi.prepare_topology applies the monomer library (residue restraints, peptide/nucleotide
links, terminal modifications, disulfides) and handles alternate conformers. We turn its
objects into contiguous arrays once, so the numba kernels evaluate every term without
Python loops.

Links are decided here, not by gemmi's strict distance test (C–N < 2.01 Å), which drops the
peptide bonds a shaken or badly fitted start has stretched: consecutive polymer residues are
linked when C–N < 3.5 Å (O3'–P < 3.5 Å for nucleic acids; whatever the numbering, as deposited
models link across numbering jumps), or when their sequence numbers are adjacent and
CA–CA < 5.0 Å; cysteines whose SG atoms are within 3.0 Å are disulfide-bonded. Consecutive
residues that are not linked are reported as chain breaks. Cis peptides come from the file's
CISPEP records when it has any (a shaken start's ω says little), else from geometry (gemmi:
ω within 30° of 0).
"""
from __future__ import annotations

import io
import itertools
import math
from dataclasses import dataclass, field, replace

import gemmi
import numpy as np

from ..errors import DrefineError
from ..model.arrays import Model
from .monlib import LoadedMonlib, load_monlib

PEPTIDE_LINK_CN_MAX = 3.5  # Å
PEPTIDE_LINK_CACA_MAX = 5.0  # Å, gemmi's are_connected2 criterion
NUCLEOTIDE_LINK_MAX = 3.5  # Å, O3'–P
DISULFIDE_SG_MAX = 3.0  # Å
CHIRAL_SIGMA = 0.2  # Å³, REFMAC's default esd of a chiral volume
#: Link torsions left out of the target: φ/ψ are weak, multi-modal terms that REFMAC and
#: servalcat also leave out by default; ω and side-chain torsions stay in.
SKIPPED_TORSION_LABELS = ("phi", "psi")


@dataclass
class ChainBreak:
    """Two consecutive polymer residues that are not linked, with the distance that says why."""

    before: str
    after: str
    distance: float  # Å, C–N (or O3'–P) distance; nan when an atom is missing

    def as_dict(self):
        return {"before": self.before, "after": self.after,
                "distance": None if math.isnan(self.distance) else round(self.distance, 3)}


@dataclass
class Restraints:
    """Every geometry restraint of one model as arrays of atom indices (into Model.atoms) and ideals.

    Angles and torsions are in radians internally; ideal chiral volumes in Å³ (signed; rows of
    `chiral_both` accept either sign). Planes are a flattened ragged array: plane p owns atoms
    plane_atoms[plane_start[p]:plane_start[p+1]].
    """

    n_atoms: int
    bond_atoms: np.ndarray
    bond_ideal: np.ndarray
    bond_sigma: np.ndarray
    angle_atoms: np.ndarray
    angle_ideal: np.ndarray
    angle_sigma: np.ndarray
    torsion_atoms: np.ndarray
    torsion_ideal: np.ndarray
    torsion_sigma: np.ndarray
    torsion_period: np.ndarray
    chiral_atoms: np.ndarray
    chiral_ideal: np.ndarray
    chiral_sigma: np.ndarray
    chiral_both: np.ndarray
    plane_atoms: np.ndarray
    plane_start: np.ndarray
    plane_sigma: np.ndarray  # per plane, Å
    atom_indices: np.ndarray  # the atoms of the model the topology covers
    energy_type: np.ndarray  # per atom of Model.atoms ("" outside the topology)
    #: per atom: van der Waals radius (Å) of its energy type, NaN when unknown, and H-bond type
    #: (D, A, B, H, N; "" when unknown), from the energy library, kept as arrays so that
    #: Restraints pickle (gemmi's MonLib does not) and travel to dask workers
    type_vdw_radius: np.ndarray = field(default_factory=lambda: np.zeros(0))
    type_hb: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<U1"))
    dictionary: str = ""  # where the restraint dictionaries came from
    monlib: LoadedMonlib | None = None
    #: Covalent bonds inferred from distances for unrestrained residues: they carry no
    #: restraint, they only keep bonded atoms from repelling each other.
    inferred_bonds: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    chain_breaks: list[ChainBreak] = field(default_factory=list)
    #: per residue of Model.residues: the residue it is polymer-linked to before it, or −1
    linked_prev: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    links: dict[str, int] = field(default_factory=dict)
    unrestrained_residues: list[str] = field(default_factory=list)
    topology_warnings: list[str] = field(default_factory=list)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["monlib"] = None  # gemmi.MonLib cannot be pickled; everything needed is in arrays
        state.pop("_bond_graph", None)  # a cache of nonbonded.find_nonbonded_pairs, made again where needed
        return state

    def touching(self, atoms: np.ndarray, every: bool = False) -> Restraints:
        """The restraints that involve at least one of `atoms` (for refining a part of a model:
        the others stay fixed, so restraints among them only add a constant); with `every`,
        only those all of whose atoms are in `atoms`."""
        sel = np.zeros(self.n_atoms, dtype=bool)
        sel[np.asarray(atoms)] = True

        def rows(a):
            if not len(a):
                return np.zeros(0, dtype=bool)
            return sel[a].all(axis=1) if every else sel[a].any(axis=1)

        b, an, t, c = rows(self.bond_atoms), rows(self.angle_atoms), rows(self.torsion_atoms), rows(self.chiral_atoms)
        sizes = np.diff(self.plane_start)
        plane_of = np.repeat(np.arange(len(sizes)), sizes)
        keep_plane = np.zeros(len(sizes), dtype=bool)
        np.logical_or.at(keep_plane, plane_of, sel[self.plane_atoms])
        if every:
            np.logical_and.at(keep_plane, plane_of, sel[self.plane_atoms])
        keep_atoms = keep_plane[plane_of]
        start = np.zeros(int(keep_plane.sum()) + 1, dtype=np.int64)
        start[1:] = np.cumsum(sizes[keep_plane])
        return replace(
            self, bond_atoms=self.bond_atoms[b], bond_ideal=self.bond_ideal[b], bond_sigma=self.bond_sigma[b],
            angle_atoms=self.angle_atoms[an], angle_ideal=self.angle_ideal[an], angle_sigma=self.angle_sigma[an],
            torsion_atoms=self.torsion_atoms[t], torsion_ideal=self.torsion_ideal[t],
            torsion_sigma=self.torsion_sigma[t], torsion_period=self.torsion_period[t],
            chiral_atoms=self.chiral_atoms[c], chiral_ideal=self.chiral_ideal[c], chiral_sigma=self.chiral_sigma[c],
            chiral_both=self.chiral_both[c], plane_atoms=self.plane_atoms[keep_atoms], plane_start=start,
            plane_sigma=self.plane_sigma[keep_plane])

    def counts(self) -> dict[str, int]:
        return {"bonds": len(self.bond_ideal), "angles": len(self.angle_ideal),
                "torsions": len(self.torsion_ideal), "chirals": len(self.chiral_ideal),
                "planes": len(self.plane_sigma)}


def _residue_atom(res: gemmi.Residue, name: str):
    """All altloc copies of atom `name` in a residue."""
    return [a for a in res if a.name == name]


def _min_distance(atoms1, atoms2) -> tuple[float, gemmi.Atom | None, gemmi.Atom | None]:
    best = (math.inf, None, None)
    for a in atoms1:
        for b in atoms2:
            if a.altloc != b.altloc and a.altloc != "\0" and b.altloc != "\0":
                continue
            d = a.pos.dist(b.pos)
            if d < best[0]:
                best = (d, a, b)
    return best


def _seq_adjacent(r1: gemmi.Residue, r2: gemmi.Residue) -> bool:
    gap = r2.seqid.num - r1.seqid.num
    return gap == 1 or (gap == 0 and r1.seqid.icode != r2.seqid.icode)


def _decide_links(st: gemmi.Structure, model: Model, linked_prev: np.ndarray) -> list[ChainBreak]:
    """Make gemmi link what we decided to link (see the module docstring), on a throwaway clone.

    Only the N (or P) atoms of a stretched link are slid along the C→N (O3'→P) line to the
    ideal distance; torsions such as ω and every restraint value are unchanged by that move.
    Fills `linked_prev` (residue index of the linked predecessor, by the atom row indices
    carried in b_iso) and returns the chain breaks.
    """
    breaks = []
    gm = st[0]
    for ch in gm:
        residues = [r for r in ch if r.entity_type == gemmi.EntityType.Polymer]
        for r1, r2 in itertools.pairwise(residues):
            c_name, n_name, ideal, dmax = "C", "N", 1.33, PEPTIDE_LINK_CN_MAX
            if _residue_atom(r2, "P") and _residue_atom(r1, "O3'"):
                c_name, n_name, ideal, dmax = "O3'", "P", 1.60, NUCLEOTIDE_LINK_MAX
            d, a_c, _ = _min_distance(_residue_atom(r1, c_name), _residue_atom(r2, n_name))
            linked = a_c is not None and d < dmax
            if not linked and c_name == "C" and _seq_adjacent(r1, r2):
                ca1, ca2 = r1.get_ca(), r2.get_ca()
                linked = a_c is not None and ca1 is not None and ca2 is not None \
                    and ca1.pos.dist(ca2.pos) < PEPTIDE_LINK_CACA_MAX
            if not linked:
                lab = f"{ch.name}/{r1.name} {r1.seqid.num}{r1.seqid.icode.strip()}"
                lab2 = f"{ch.name}/{r2.name} {r2.seqid.num}{r2.seqid.icode.strip()}"
                breaks.append(ChainBreak(lab, lab2, d if math.isfinite(d) else math.nan))
                continue
            if len(r1) and len(r2):
                res_of = model.atoms.residue_index
                linked_prev[res_of[int(r2[0].b_iso)]] = res_of[int(r1[0].b_iso)]
            for a_n in _residue_atom(r2, n_name):
                cands = [a for a in _residue_atom(r1, c_name)
                         if a.altloc == a_n.altloc or "\0" in (a.altloc, a_n.altloc)]
                for a_c in cands[:1]:
                    v = a_n.pos - a_c.pos
                    length = v.length()
                    if length > 1.9 and length > 0:
                        a_n.pos = a_c.pos + v * (ideal / length)
    # Disulfides: residue pairs the file declares plus SG–SG pairs within DISULFIDE_SG_MAX, made
    # again as one connection per compatible altloc pair (a PDB SSBOND has no altloc, so gemmi
    # would tie them all to the first conformer).
    def res_key(chain_name, seqid):
        return (chain_name, seqid.num, seqid.icode)

    declared = set()
    keep = []
    for c in st.connections:
        if c.type == gemmi.ConnectionType.Disulf:
            k1 = res_key(c.partner1.chain_name, c.partner1.res_id.seqid)
            k2 = res_key(c.partner2.chain_name, c.partner2.res_id.seqid)
            declared.add(frozenset((k1, k2)))
        else:
            keep.append(c)
    sg = [(ch, r, a) for ch in gm for r in ch if r.name == "CYS" for a in r if a.name == "SG"]
    pairs = []
    if len(sg) > 1:
        pos = np.array([[a.pos.x, a.pos.y, a.pos.z] for _, _, a in sg])
        dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        for i in range(len(sg)):
            for j in range(i + 1, len(sg)):
                (c1, r1, a1), (c2, r2, a2) = sg[i], sg[j]
                if r1 is r2 or (a1.altloc != a2.altloc and "\0" not in (a1.altloc, a2.altloc)):
                    continue
                key = frozenset((res_key(c1.name, r1.seqid), res_key(c2.name, r2.seqid)))
                if dist[i, j] < DISULFIDE_SG_MAX or (key in declared and dist[i, j] < 2 * DISULFIDE_SG_MAX):
                    pairs.append((c1, r1, a1, c2, r2, a2))
    st.connections = gemmi.ConnectionList(keep) if hasattr(gemmi, "ConnectionList") else keep
    for n_ss, (c1, r1, a1, c2, r2, a2) in enumerate(pairs, start=1):
        con = gemmi.Connection()
        con.name = f"disulf{n_ss}"
        con.type = gemmi.ConnectionType.Disulf
        con.asu = gemmi.Asu.Same
        con.partner1 = gemmi.make_address(c1, r1, a1)
        con.partner2 = gemmi.make_address(c2, r2, a2)
        st.connections.append(con)
    return breaks


def _energy_types(model: Model, ml: gemmi.MonLib, idx: np.ndarray) -> np.ndarray:
    """Energy type (CCP4 `type_energy`) of each atom, looked up per unique (residue, atom name)."""
    a, r = model.atoms, model.residues
    keys = np.char.add(np.char.add(r.name[a.residue_index[idx]], ":"), a.name[idx])
    uniq, inv = np.unique(keys, return_inverse=True)
    table = {}
    for rn in {k.split(":")[0] for k in uniq}:
        if rn not in ml.monomers:  # gemmi's ChemCompMap has no .get
            continue
        for at in ml.monomers[rn].atoms:
            table[f"{rn}:{at.id}"] = at.chem_type
    # Atoms added by modifications (OXT, H1–H3) are not in the monomer: type them by analogy.
    analog = {"OXT": "OC", "H1": "HNH3", "H2": "HNH3", "H3": "HNH3"}
    out = np.array([table.get(k, analog.get(k.split(":")[1], "")) for k in uniq], dtype="<U8")
    types = np.full(len(model.atoms), "", dtype="<U8")
    types[idx] = out[inv]
    return types


def _energy_type_properties(ml: gemmi.MonLib, energy_type: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per atom: vdW radius (Å, NaN if unknown) and H-bond type ("" if unknown) of its energy type."""
    ener = ml.ener_lib.atoms
    types, inv = np.unique(energy_type, return_inverse=True)
    t_rad = np.full(len(types), np.nan)
    t_hb = np.full(len(types), "", dtype="<U1")
    for k, t in enumerate(types):
        if t and t in ener:
            t_rad[k] = ener[t].vdw_radius
            t_hb[k] = ener[t].hb_type
    return t_rad[inv], t_hb[inv]


def _inferred_bonds(model: Model, idx: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    """Bonds of atoms idx[unknown] to any atom closer than 1.2 × the covalent radii sum."""
    if not unknown.any():
        return np.zeros((0, 2), dtype=np.int64)
    from scipy.spatial import cKDTree

    a = model.atoms
    radius = np.array([gemmi.Element(e).covalent_r for e in np.unique(a.element[idx])])
    r_of = dict(zip(np.unique(a.element[idx]).tolist(), radius.tolist()))
    rc = np.array([r_of[e] for e in a.element[idx]])
    tree = cKDTree(a.xyz[idx])
    pairs = tree.query_pairs(2.4 * float(rc.max()), output_type="ndarray")
    pairs = pairs[unknown[pairs[:, 0]] | unknown[pairs[:, 1]]]
    d = np.linalg.norm(a.xyz[idx][pairs[:, 0]] - a.xyz[idx][pairs[:, 1]], axis=1)
    bonded = d < 1.2 * (rc[pairs[:, 0]] + rc[pairs[:, 1]])
    return idx[pairs[bonded]].astype(np.int64)


def build_restraints(model: Model, monlib_dir=None, extra_dicts=(), model_index: int = 0,
                     unknown_residues: str = "error", monlib: LoadedMonlib | None = None) -> Restraints:
    """Build the restraint arrays of one model of `model` (model 0 by default).

    unknown_residues: 'error' (default) stops with a message naming residues without a
    dictionary; 'skip' leaves them without geometric restraints (they still repel others).
    """
    idx = model.model_atoms(model_index)
    if idx.size == 0:
        raise DrefineError(f"model {model_index} has no atoms")
    resnames = np.unique(model.residues.name[model.atoms.residue_index[idx]]).tolist()
    if monlib is None:
        monlib = load_monlib(resnames, monlib_dir, extra_dicts, allow_missing=unknown_residues == "skip")
    ml = monlib.monlib

    st = gemmi.Structure()
    st.cell = model.structure.cell
    st.spacegroup_hm = model.structure.spacegroup_hm
    st.add_model(model.structure[model_index])
    st.entities = model.structure.entities
    st.connections = model.structure.connections
    st.cispeps = model.structure.cispeps
    # Carry each atom's row index through gemmi in b_iso of this throwaway clone (exact in
    # float32 up to 2**24 atoms); gemmi renumbers serial numbers during topology setup.
    if idx.size >= 2 ** 24:
        raise DrefineError(f"{idx.size} atoms in one model exceed what restraint setup handles (16.7 M)")
    for i, cra in zip(idx.tolist(), st[0].all()):
        cra.atom.b_iso = float(i)
    unrestrained = []
    if monlib.missing:
        for ch in st[0]:
            for k in range(len(ch) - 1, -1, -1):
                if ch[k].name in monlib.missing:
                    unrestrained.append(f"{ch.name}/{ch[k].name} {ch[k].seqid.num}{ch[k].seqid.icode.strip()}")
                    del ch[k]
        unrestrained.reverse()
    linked_prev = np.full(len(model.residues), -1, dtype=np.int64)
    breaks = _decide_links(st, model, linked_prev)
    warnings = io.StringIO()
    try:
        topo = gemmi.prepare_topology(st, ml, model_index=0, h_change=gemmi.HydrogenChange.NoChange,
                                      warnings=warnings, ignore_unknown_links=True,
                                      use_cispeps=len(st.cispeps) > 0)
    except (RuntimeError, ValueError) as e:
        raise DrefineError(f"restraint setup failed: {str(e).splitlines()[0]}") from None
    topology_warnings = [ln.removeprefix("Warning: ").strip() for ln in warnings.getvalue().splitlines()
                         if ln.strip()]

    def atoms_of(items, n):
        if not len(items):
            return np.zeros((0, n), dtype=np.int64)
        return np.array([[int(a.b_iso) for a in t.atoms] for t in items], dtype=np.int64)

    bonds = topo.bonds
    bond_atoms = atoms_of(bonds, 2)
    bond_par = np.array([(t.restr.value, t.restr.esd) for t in bonds], dtype=np.float64).reshape(-1, 2)
    angles = topo.angles
    angle_atoms = atoms_of(angles, 3)
    angle_par = np.radians(np.array([(t.restr.value, t.restr.esd) for t in angles], dtype=np.float64)
                           .reshape(-1, 2))
    torsions = [t for t in topo.torsions if t.restr.esd > 0 and t.restr.label not in SKIPPED_TORSION_LABELS]
    torsion_atoms = atoms_of(torsions, 4)
    tor_par = np.array([(t.restr.value, t.restr.esd, t.restr.period) for t in torsions],
                       dtype=np.float64).reshape(-1, 3)
    chirs = [c for c in topo.chirs]
    chiral_atoms = atoms_of(chirs, 4)
    ch_abs = np.array([topo.ideal_chiral_abs_volume(c) for c in chirs], dtype=np.float64)
    sign = np.array([c.restr.sign == gemmi.ChiralityType.Negative for c in chirs], dtype=bool)
    both = np.array([c.restr.sign == gemmi.ChiralityType.Both for c in chirs], dtype=bool)
    planes = topo.planes
    plane_lists = [[int(a.b_iso) for a in p.atoms] for p in planes]
    plane_start = np.zeros(len(planes) + 1, dtype=np.int64)
    plane_start[1:] = np.cumsum([len(p) for p in plane_lists])
    plane_atoms = np.array([i for p in plane_lists for i in p], dtype=np.int64)
    plane_sigma = np.array([p.restr.esd for p in planes], dtype=np.float64)

    link_counts: dict[str, int] = {}
    for ci in topo.chain_infos:
        for ri in ci.res_infos:
            for p in ri.prev:
                if p.link_id:
                    link_counts[p.link_id] = link_counts.get(p.link_id, 0) + 1
    for ex in topo.extras:
        link_counts[ex.link_id] = link_counts.get(ex.link_id, 0) + 1

    # Atoms that no bond restraint covers (unknown residues, atoms the dictionary does not name,
    # such as PDB-style H1 on an N-terminus when the library calls it H) get bonds inferred from
    # distances, so that they do not repel their covalent neighbours.
    covered = np.zeros(len(model.atoms), dtype=bool)
    covered[bond_atoms.ravel()] = True
    inferred = _inferred_bonds(model, idx, ~covered[idx])
    energy_type = _energy_types(model, ml, idx)
    vdw, hb = _energy_type_properties(ml, energy_type)
    return Restraints(
        n_atoms=len(model.atoms), inferred_bonds=inferred,
        bond_atoms=bond_atoms, bond_ideal=bond_par[:, 0].copy(), bond_sigma=bond_par[:, 1].copy(),
        angle_atoms=angle_atoms, angle_ideal=angle_par[:, 0].copy(), angle_sigma=angle_par[:, 1].copy(),
        torsion_atoms=torsion_atoms, torsion_ideal=np.radians(tor_par[:, 0]),
        torsion_sigma=np.radians(tor_par[:, 1]), torsion_period=np.maximum(tor_par[:, 2], 1).astype(np.int64),
        chiral_atoms=chiral_atoms, chiral_ideal=np.where(sign, -ch_abs, ch_abs),
        chiral_sigma=np.full(len(chirs), CHIRAL_SIGMA), chiral_both=both,
        plane_atoms=plane_atoms, plane_start=plane_start, plane_sigma=plane_sigma,
        atom_indices=idx, energy_type=energy_type, type_vdw_radius=vdw, type_hb=hb, dictionary=monlib.source,
        monlib=monlib,
        chain_breaks=breaks, linked_prev=linked_prev, links=link_counts, unrestrained_residues=unrestrained,
        topology_warnings=topology_warnings,
    )
