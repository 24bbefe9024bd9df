"""Small example models built from drefine's built-in dictionary.

``build_helix_turn_helix()`` makes a ~40-residue helix-turn-helix: two alpha helices (phi -57, psi -47
degrees) joined by a four-residue turn.  The backbone N, CA, C trace is built from phi/psi/omega with the
built-in (Engh & Huber 2001) bond lengths and angles; each residue's ideal coordinates from the built-in
dictionary are superposed on its N-CA-C frame with the side chain in the common rotamer (Lovell et al.
2000, Proteins 40, 389) that clashes least.  Distances are in Å, angles in degrees, B-factors in Å^2.
"""

from __future__ import annotations

import gemmi
import numpy as np

from .restraints.build_builtin_monlib import DEFAULT_OUT as BUILTIN_MONLIB
from .restraints.build_builtin_monlib import PEPTIDE, PRO_PEPTIDE, XH_DIST, nerf

# A helix-turn-helix sequence with all 20 amino acids (modelled on the HTH motifs of phage repressors):
# a two-residue N-terminal tail and helix 1 (17 residues together), the G-N-D-P turn, helix 2 (19).
HELIX1 = "MSPEELIKRAWELCYKA"
TURN = "GNDP"
HELIX2 = "THVQRLAEEFGVSQSTVSR"
HELIX_PHI_PSI = (-57.0, -47.0)
# the two N-terminal residues (M, S) are extended so that helix 1 starts at its proline (N1 position)
TAIL_PHI_PSI = (-70.0, 145.0)
N_TAIL = 2
# turn (phi, psi): G left-handed, N bridge, D extended (as a residue before proline must be) and P
# starting helix 2; chosen from a scan of common turn conformations for no close contacts and
# helices crossing at ~130 degrees
TURN_PHI_PSI = ((60.0, 40.0), (-90.0, -40.0), (-110.0, 120.0), (-60.0, -40.0))
MIN_RESIDUES = 20
PADDING = 8.0  # Å between the model and the cell faces (P 1)
B_CORE, B_TERMINAL_EXTRA = 20.0, 10.0  # Å^2; the extra B decays over three residues from each end

# common rotamers (chi1, chi2, ...) in order of preference, Lovell et al. (2000)
ROTAMERS: dict[str, list[tuple[float, ...]]] = {
    "SER": [(62,), (-65,), (180,)],
    "CYS": [(-65,), (180,), (62,)],
    "THR": [(62,), (-60,), (180,)],
    "VAL": [(175,), (-60,), (63,)],
    "ILE": [(-65, 170), (-57, -60), (62, 170), (-177, 66), (-177, 169)],
    "LEU": [(-65, 175), (-177, 65), (-172, 145), (-85, 65)],
    "MET": [(-68, 180, -75), (-65, -65, -70), (-177, 180, 75)],
    "PHE": [(-65, 95), (180, 80), (62, 90)],
    "TYR": [(-65, 95), (180, 80), (62, 90)],
    "TRP": [(-65, 95), (-65, -5), (-65, -90), (180, -105), (180, 90), (62, -90)],
    "HIS": [(-65, -70), (-65, 80), (180, 60), (62, -75)],
    "ASN": [(-65, -20), (-65, 120), (180, -20), (62, 30)],
    "ASP": [(-70, -15), (180, 0), (62, 10)],
    "GLN": [(-65, 180, -25), (-65, -65, -40), (180, 180, 0)],
    "GLU": [(-65, 180, -10), (-65, -65, -40), (180, 180, 0)],
    "LYS": [(-65, 180, 180, 180), (180, 180, 180, 180), (-65, -65, 180, 180)],
    "ARG": [(-65, 180, 180, 180), (-65, 180, 65, 85), (180, 180, 180, 180)],
}
# contact distances (Å) below which a rotamer is penalised: heavy-heavy, heavy-H, H-H
CLASH = {2: 3.0, 1: 2.4, 0: 2.0}
REACH = 14.0  # Å from CA beyond which no atom can touch the residue's side chain
ROTAMER_PASSES = 3  # choose every side chain once, then twice more against all the others
# offsets (degrees) of chi1 (and chi2) tried within each rotamer well
_OFFSETS = (0.0, -20.0, 20.0)
CHI_WIGGLE = {False: [(d,) for d in _OFFSETS], True: [(d1, d2) for d1 in _OFFSETS for d2 in _OFFSETS]}


def hth_sequence(n_residues: int = 40) -> str:
    """One-letter sequence: helix 1, the turn, helix 2 (40 residues give HELIX1 + TURN + HELIX2).

    Longer helices repeat the helical part of each sequence (without the N-capping proline)."""
    if n_residues < MIN_RESIDUES:
        raise ValueError(f"a helix-turn-helix needs at least {MIN_RESIDUES} residues (two 7-residue helices)")
    h1 = (n_residues - len(TURN)) // 2 - 1
    h2 = n_residues - len(TURN) - h1
    body1 = (HELIX1 + HELIX1[N_TAIL + 1:] * (h1 // len(HELIX1)))[:h1]
    body2 = (HELIX2 * (h2 // len(HELIX2) + 1))[:h2]
    return body1 + TURN + body2


def _frame(n: np.ndarray, ca: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Orthonormal rows (bisector of N-CA-C, in-plane normal, plane normal) of a residue."""
    u, v = n - ca, c - ca
    e1 = u / np.linalg.norm(u) + v / np.linalg.norm(v)
    e1 /= np.linalg.norm(e1)
    e3 = np.cross(u, v)
    e3 /= np.linalg.norm(e3)
    return np.array([e1, np.cross(e3, e1), e3])


def _rotate(points: np.ndarray, origin: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotate points (n, 3) about the axis through ``origin`` by ``angle`` degrees."""
    kx, ky, kz = axis / np.linalg.norm(axis)
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    k = np.array([[0.0, -kz, ky], [kz, 0.0, -kx], [-ky, kx, 0.0]])
    rot = c * np.eye(3) + s * k + (1 - c) * np.outer((kx, ky, kz), (kx, ky, kz))
    return (points - origin) @ rot.T + origin


def _dihedral(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> float:
    """Dihedral a-b-c-d in degrees for single points (cheaper than the vectorised version)."""
    b0, b1, b2 = a - b, c - b, d - c
    b1 = b1 / np.sqrt(b1 @ b1)
    v, w = b0 - (b0 @ b1) * b1, b2 - (b2 @ b1) * b1
    cross = np.array([b1[1] * v[2] - b1[2] * v[1], b1[2] * v[0] - b1[0] * v[2], b1[0] * v[1] - b1[1] * v[0]])
    return float(np.degrees(np.arctan2(cross @ w, v @ w)))


class _Ideal:
    """Ideal coordinates (Å), bonds, angles and chi definitions of one built-in monomer."""

    def __init__(self, cc: gemmi.ChemComp) -> None:
        self.names = [a.id for a in cc.atoms]
        self.element = {a.id: a.el.name for a in cc.atoms}
        self.xyz = np.array([[a.xyz.x, a.xyz.y, a.xyz.z] for a in cc.atoms])
        self.index = {n: i for i, n in enumerate(self.names)}
        self.graph: dict[str, set[str]] = {n: set() for n in self.names}
        self.bond: dict[frozenset, float] = {}
        for b in cc.rt.bonds:
            self.graph[b.id1.atom].add(b.id2.atom)
            self.graph[b.id2.atom].add(b.id1.atom)
            self.bond[frozenset((b.id1.atom, b.id2.atom))] = b.value
        self.angle = {(a.id1.atom, a.id2.atom, a.id3.atom): a.value for a in cc.rt.angles}
        self.angle.update({(k[2], k[1], k[0]): v for k, v in self.angle.items()})
        chis = sorted((t.label, (t.id1.atom, t.id2.atom, t.id3.atom, t.id4.atom)) for t in cc.rt.torsions
                      if t.label.startswith("chi"))
        self.chis = [atoms for _, atoms in chis]
        self.moving = [self.downstream(b, c) for _, b, c, _ in self.chis]
        self.ca = self.xyz[self.index["CA"]]
        self.frame = _frame(*(self.xyz[self.index[a]] for a in ("N", "CA", "C")))

    def downstream(self, b: str, c: str) -> list[int]:
        """Indices of the atoms on c's side of the bond b-c."""
        seen, todo = {b, c}, [c]
        while todo:
            for nb in self.graph[todo.pop()] - seen:
                seen.add(nb)
                todo.append(nb)
        return [self.index[n] for n in seen - {b}]

    def with_chis(self, chis: tuple[float, ...]) -> np.ndarray:
        """Ideal coordinates with the side-chain dihedrals set to ``chis`` (degrees)."""
        xyz = self.xyz.copy()
        for target, (a, b, c, d), moving in zip(chis, self.chis, self.moving):
            ia, ib, ic, id_ = (self.index[n] for n in (a, b, c, d))
            now = _dihedral(xyz[ia], xyz[ib], xyz[ic], xyz[id_])
            xyz[moving] = _rotate(xyz[moving], xyz[ib], xyz[ic] - xyz[ib], target - now)
        return xyz


def _backbone(names: list[str], ideal: dict[str, _Ideal], phi: np.ndarray, psi: np.ndarray,
              omega: np.ndarray) -> np.ndarray:
    """N, CA, C coordinates (n, 3, 3) from dihedrals, with the built-in peptide geometry."""
    n = len(names)
    out = np.zeros((n, 3, 3))
    first = ideal[names[0]]
    n_ca0 = first.bond[frozenset(("N", "CA"))]
    ca_c0 = first.bond[frozenset(("CA", "C"))] if n == 1 else PEPTIDE["ca_c"][0]
    theta = np.radians(first.angle[("N", "CA", "C")])
    out[0, 1] = (n_ca0, 0.0, 0.0)
    out[0, 2] = out[0, 1] + ca_c0 * np.array([-np.cos(theta), np.sin(theta), 0.0])
    for i in range(1, n):
        pro = names[i] == "PRO"
        link = PRO_PEPTIDE if pro else PEPTIDE
        res = ideal[names[i]]
        n_ca = link["n_ca"][0]
        ca_c = res.bond[frozenset(("CA", "C"))] if i == n - 1 else PEPTIDE["ca_c"][0]
        p_n, p_ca, p_c = out[i - 1]
        out[i, 0] = nerf(p_n, p_ca, p_c, link["c_n"][0], link["ca_c_n"][0], psi[i - 1])
        out[i, 1] = nerf(p_ca, p_c, out[i, 0], n_ca, link["c_n_ca"][0], omega[i - 1])
        out[i, 2] = nerf(p_c, out[i, 0], out[i, 1], ca_c, res.angle[("N", "CA", "C")], phi[i])
    return out


def _carbonyl_oxygens(names: list[str], ideal: dict[str, _Ideal], bb: np.ndarray,
                      psi: np.ndarray) -> dict[tuple[int, str], np.ndarray]:
    """O of every residue in its peptide plane; O and OXT of the C-terminal carboxylate."""
    out = {}
    for i in range(len(names)):
        n, ca, c = bb[i]
        if i < len(names) - 1:
            out[(i, "O")] = nerf(n, ca, c, PEPTIDE["c_o"][0], PEPTIDE["ca_c_o"][0], psi[i] + 180.0)
        else:
            res = ideal[names[i]]
            for name, tor in (("O", psi[i] + 180.0), ("OXT", psi[i])):
                bond, angle = res.bond[frozenset(("C", name))], res.angle[("CA", "C", name)]
                out[(i, name)] = nerf(n, ca, c, bond, angle, tor)
    return out


def _clash_score(xyz: np.ndarray, heavy: np.ndarray, others: np.ndarray, others_heavy: np.ndarray) -> float:
    """Sum of squared overlaps (Å^2) below the CLASH contact distances."""
    d = np.linalg.norm(xyz[:, None, :] - others[None, :, :], axis=-1)
    kind = heavy[:, None].astype(int) + others_heavy[None, :].astype(int)
    limit = np.choose(kind, [CLASH[0], CLASH[1], CLASH[2]])
    return float(np.sum(np.clip(limit - d, 0.0, None) ** 2))


def build_helix_turn_helix(n_residues: int = 40, with_hydrogens: bool = True) -> gemmi.Structure:
    """A helix-turn-helix protein (chain A) in an orthorhombic P 1 cell with 8 Å padding.

    Occupancies are 1, B-factors 20 Å^2 (up to 30 Å^2 at the termini); with ``with_hydrogens`` all
    hydrogens of the built-in dictionary are included (riding positions, electron-cloud X-H distances).
    """
    seq = hth_sequence(n_residues)
    names = [gemmi.expand_one_letter(x, gemmi.ResidueKind.AA) for x in seq]
    monlib = gemmi.read_monomer_lib(str(BUILTIN_MONLIB), sorted(set(names)))
    ideal = {code: _Ideal(monlib.monomers[code]) for code in set(names)}

    n = len(names)
    h1 = (n - len(TURN)) // 2 - 1
    phi = np.full(n, HELIX_PHI_PSI[0])
    psi = np.full(n, HELIX_PHI_PSI[1])
    phi[:N_TAIL], psi[:N_TAIL] = TAIL_PHI_PSI
    for k, (ph, ps) in enumerate(TURN_PHI_PSI):
        phi[h1 + k], psi[h1 + k] = ph, ps
    omega = np.full(n, 180.0)
    bb = _backbone(names, ideal, phi, psi, omega)
    oxygens = _carbonyl_oxygens(names, ideal, bb, psi)

    # each ideal residue superposed on its N-CA-C frame; the side chain turned to a rotamer
    residues = [_place_residue(ideal[code], bb, i, ()) for i, code in enumerate(names)]
    for _ in range(ROTAMER_PASSES):
        for i, code in enumerate(names):
            candidates = ROTAMERS.get(code)
            if not candidates:
                continue
            res = ideal[code]
            moving = [res.names[k] for k in res.downstream("CA", "CB") if res.names[k] != "CB"]
            heavy = np.array([res.element[a] != "H" for a in moving])
            env = [(a, x, names[j]) for j, r in enumerate(residues) if j != i for a, x in r.items()]
            carbonyl = [x for (j, _), x in oxygens.items() if j != i]
            env_xyz = np.concatenate([bb.reshape(-1, 3), carbonyl, [x for _, x, _ in env]])
            env_heavy = np.concatenate([np.ones(3 * n + len(carbonyl), bool),
                                        [ideal[nm].element[a] != "H" for a, _, nm in env]])
            near = np.linalg.norm(env_xyz - bb[i, 1], axis=1) < REACH
            env_xyz, env_heavy = env_xyz[near], env_heavy[near]
            trials = [(tuple(c + d for c, d in zip(chis, delta + (0.0,) * 4)),
                       0.01 * rank + 1e-3 * sum(map(abs, delta)))
                      for rank, chis in enumerate(candidates) for delta in CHI_WIGGLE[len(chis) > 1]]
            scores = []
            for chis, penalty in trials:
                trial = _place_residue(res, bb, i, chis)
                xyz = np.array([trial[a] for a in moving])
                scores.append(_clash_score(xyz, heavy, env_xyz, env_heavy) + penalty)
            residues[i] = _place_residue(res, bb, i, trials[int(np.argmin(scores))][0])

    for i, code in enumerate(names):
        atoms = residues[i]
        atoms.update(N=bb[i, 0], CA=bb[i, 1], C=bb[i, 2], O=oxygens[(i, "O")])
        if i == n - 1:
            atoms["OXT"] = oxygens[(i, "OXT")]
        if i > 0:
            for h in ("H2", "H3"):
                atoms.pop(h, None)
            if code != "PRO":  # amide H bisecting the exterior C(i-1)-N-CA angle
                u = bb[i - 1, 2] - bb[i, 0]
                v = bb[i, 1] - bb[i, 0]
                d = -(u / np.linalg.norm(u) + v / np.linalg.norm(v))
                atoms["H"] = bb[i, 0] + XH_DIST["NH1"][1] * d / np.linalg.norm(d)
        residues[i] = {a: atoms[a] for a in ideal[code].names if a in atoms}
    return _make_structure(names, residues, ideal, with_hydrogens)


def _place_residue(res: _Ideal, bb: np.ndarray, i: int, chis: tuple[float, ...]) -> dict[str, np.ndarray]:
    """Ideal residue with side-chain dihedrals ``chis`` superposed on backbone frame ``bb[i]``; the
    backbone heavy atoms and OXT are left out (they come from the backbone trace)."""
    xyz = (res.with_chis(chis) - res.ca) @ res.frame.T @ _frame(*bb[i]) + bb[i, 1]
    skip = {"N", "CA", "C", "O", "OXT"} | ({"H"} if i > 0 else set())
    return {a: xyz[k] for k, a in enumerate(res.names) if a not in skip}


def _make_structure(names: list[str], residues: list[dict[str, np.ndarray]], ideal: dict[str, _Ideal],
                    with_hydrogens: bool) -> gemmi.Structure:
    """Assemble chain A in a P 1 box with PADDING Å around the atoms."""
    keep = [{a: x for a, x in r.items() if with_hydrogens or ideal[names[i]].element[a] != "H"}
            for i, r in enumerate(residues)]
    allxyz = np.concatenate([np.array(list(r.values())) for r in keep])
    lo, hi = allxyz.min(axis=0), allxyz.max(axis=0)
    shift = PADDING - lo
    cell = np.ceil((hi - lo + 2 * PADDING) * 100) / 100

    st = gemmi.Structure()
    st.name = f"HTH{len(names)}"
    st.cell = gemmi.UnitCell(*cell, 90.0, 90.0, 90.0)
    st.spacegroup_hm = "P 1"
    model = gemmi.Model(1)
    chain = gemmi.Chain("A")
    n = len(names)
    serial = 0
    for i, (code, atoms) in enumerate(zip(names, keep)):
        res = gemmi.Residue()
        res.name = code
        res.seqid = gemmi.SeqId(i + 1, " ")
        res.entity_type = gemmi.EntityType.Polymer
        res.entity_id = "1"
        res.subchain = "A"
        res.het_flag = "A"
        end = min(i, n - 1 - i)
        b_iso = B_CORE + B_TERMINAL_EXTRA * max(0.0, 1.0 - end / 3.0)
        for name, xyz in atoms.items():
            serial += 1
            atom = gemmi.Atom()
            atom.name = name
            atom.element = gemmi.Element(ideal[code].element[name])
            atom.pos = gemmi.Position(*np.round(xyz + shift, 3))
            atom.occ = 1.0
            atom.b_iso = round(b_iso, 2)
            atom.serial = serial
            res.add_atom(atom)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    entity = gemmi.Entity("1")
    entity.entity_type = gemmi.EntityType.Polymer
    entity.polymer_type = gemmi.PolymerType.PeptideL
    entity.subchains = ["A"]
    entity.full_sequence = list(names)
    st.entities.append(entity)
    st.assign_label_seq_id()
    st.setup_cell_images()
    return st
