"""Generate drefine's built-in CCP4-format monomer library (20 amino acids and water).

Run ``python -m drefine.restraints.build_builtin_monlib [OUTDIR]`` (default: ``data/monomers`` beside this
file).  It writes, laid out like the CCP4 monomer library so that ``gemmi.read_monomer_lib`` reads it:

* ``a/ALA.cif`` ... ``h/HOH.cif``: one monomer per file (``data_comp_list`` + ``data_comp_XXX``),
* ``list/mon_lib_list.cif``: the peptide links (TRANS, CIS, PTRANS, PCIS), the disulfide link (SS) and
  the modifications they use (DEL-OXT, DEL-HN1, DEL-HNP, CYS-SS) plus the terminal mods NH3 and COO,
* ``ener_lib.cif``: the ``_lib_atom`` rows of every energy type used.

As in the current CCP4 library, a monomer is the free zwitterion (N-terminal NH3+ with H, H2, H3 and a
C-terminal carboxylate with OXT); the peptide links delete H2/H3/OXT and switch the backbone to the
peptide values.  All numbers are authored here from published ideal values (units: Å and degrees):

* Side chains and the peptide backbone: Engh, R. A. & Huber, R. (1991). Acta Cryst. A47, 392-400, with
  the backbone (N-CA, CA-C, C-O, C-N, the backbone angles, CA-CB by residue class, the X-Pro peptide)
  from Engh & Huber (2001), International Tables for Crystallography vol. F, ch. 18.3.
* Zwitterion termini: NH3+-CA 1.491 (Engh & Huber 1991, NH3-CH1E), carboxylate C-O 1.249 (Engh &
  Huber 1991, C-OC) and O-C-O 125.4 as in amino-acid zwitterions (cf. Marsh, R. E. & Donohue, J.
  (1967). Adv. Protein Chem. 22, 235-256).
* X-H nucleus distances: Allen, F. H. & Bruno, I. J. (2010). Acta Cryst. B66, 380-386 (C-H 1.09
  aliphatic / 1.08 aromatic, N-H 1.01, ammonium N-H 1.03, O-H 0.97, S-H 1.34).
* X-H electron-cloud distances (``value_dist``): SHELXL riding-hydrogen defaults (Sheldrick, G. M.
  (2008). Acta Cryst. A64, 112-122: CH 0.98, CH2 0.97, CH3 0.96, aromatic CH 0.93, NH 0.86, NH3+ 0.89)
  with the +0.01 Å SHELXL adds for data collected below room temperature; O-H 0.85 Å, the usual X-ray
  restraint target for hydroxyl and water H (Müller, P. et al. (2006). Crystal Structure Refinement,
  OUP); S-H 1.20.
* Water: H-O-H 107.0 (mean for water in crystalline hydrates by neutron diffraction, Chiari, G. &
  Ferraris, G. (1982). Acta Cryst. B38, 2331-2341); C-S-H 96.5 (methanethiol, microwave; Kojima, T. &
  Nishikawa, T. (1957). J. Phys. Soc. Jpn. 12, 680-686).
* Default rotamers of the ideal coordinates: Lovell, S. C. et al. (2000). Proteins 40, 389-408.

Hydrogens are derived by rules: the X-H distance from the parent's energy type; angles tetrahedral
(one heavy neighbour), all three X-C-H equal (CH, SHELXL's AFIX 13), as close to tetrahedral as the
heavy-atom angle allows (CH2), bisecting the exterior angle or 120 degrees (sp2); their angle values
are read off the placed hydrogens.  Ideal coordinates come from internal coordinates (NeRF placement),
regularised by least squares against the bond, angle and plane restraints; planes are derived by rule
(each trigonal centre with its neighbours, each aromatic ring system with all atoms bonded to it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import gemmi
import numpy as np
from scipy.optimize import least_squares, minimize_scalar

DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "monomers"
TETRAHEDRAL = 109.47
AMINO_ACIDS = ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
               "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL")
MONOMERS = (*AMINO_ACIDS, "HOH")

# energy type -> element
ELEMENT = {
    **dict.fromkeys(["C", "CH1", "CH2", "CH3", "CR5", "CR6", "CR15", "CR16", "CR56"], "C"),
    **dict.fromkeys(["NH0", "NH1", "NH2", "NC1", "NC2", "NT2", "NT3", "NR15"], "N"),
    **dict.fromkeys(["O", "OC", "OH1", "OH2"], "O"),
    **dict.fromkeys(["S2", "SH1"], "S"),
    **dict.fromkeys(["H", "HSH1"], "H"),
}
SP2_TYPES = {"C", "NH0", "NH1", "NH2", "NC1", "NC2"}  # trigonal centres outside aromatic rings
AROMATIC_TYPES = {"CR5", "CR6", "CR15", "CR16", "CR56", "NR15"}

# X-H distances by the parent's energy type: (nucleus, electron cloud); esd 0.02 Å for both.
XH_DIST = {
    "CH1": (1.090, 0.990),
    "CH2": (1.090, 0.980),
    "CH3": (1.090, 0.970),
    "CR15": (1.080, 0.940),
    "CR16": (1.080, 0.940),
    "NH1": (1.010, 0.870),
    "NH2": (1.010, 0.870),
    "NC1": (1.010, 0.870),
    "NC2": (1.010, 0.870),
    "NR15": (1.010, 0.870),
    "NT2": (1.030, 0.900),
    "NT3": (1.030, 0.900),
    "OH1": (0.970, 0.850),
    "OH2": (0.970, 0.850),
    "SH1": (1.340, 1.200),
}
XH_ESD = 0.02
H_ANGLE_ESD = 1.5  # heavy-X-H
HH_ANGLE_ESD = 3.0  # H-X-H
# angle at an sp3 parent with one heavy neighbour, when not tetrahedral
X_H_ANGLE = {"SH1": 96.5}
WATER_HOH = 107.0

# --- the backbone of the free amino acid (zwitterion), Engh & Huber 2001 + 1991 NH3/COO values ---
BACKBONE_ATOMS = "N:NT3:1 CA:CH1 C:C O:O OXT:OC:-1"
BACKBONE_BONDS = "N CA 1.491 .021; CA C 1.525 .021; C O 1.249 .019 DOUBLE; C OXT 1.249 .019"
BACKBONE_ANGLES = "N CA C 111.0 2.7; CA C O 117.3 2.0; CA C OXT 117.3 2.0; O C OXT 125.4 2.0"
BACKBONE_BUILD = "O C CA N 160; OXT C CA N -20"
BACKBONE_HYD = "N(CA,C) H H2 H3; CA HA"
CB_GENERAL = "CA CB 1.530 .020"
CB_ANGLES_GENERAL = "N CA CB 110.6 1.8; C CA CB 110.4 2.0"
CB_ANGLES_BETA_BRANCHED = "N CA CB 111.5 1.7; C CA CB 109.1 2.2"
CB_BUILD = "CB CA N C -122"

# Per residue: side-chain atoms (name:energy[:charge]), bonds (a b value esd [type]), angles (a b c value
# esd), build (z-matrix "d c b a torsion": d bonded to c, angle b-c-d, dihedral a-b-c-d), chis
# ("id a b c d period", value taken from the ideal coordinates), hydrogens ("X(ref1,ref2[@tor]) H...",
# see _add_hydrogens) and chirality ("centre a b c sign").
RESIDUES: dict[str, dict[str, str]] = {
    "ALA": {
        "name": "ALANINE",
        "atoms": "CB:CH3",
        "bonds": "CA CB 1.520 .021",
        "angles": "N CA CB 110.1 1.4; C CA CB 110.1 1.5",
        "hyd": "CB(CA,N) HB1 HB2 HB3",
    },
    "ARG": {
        "name": "ARGININE",
        "atoms": "CB:CH2 CG:CH2 CD:CH2 NE:NC1 CZ:C NH1:NC2 NH2:NC2:1",
        "bonds": "CB CG 1.520 .030; CG CD 1.520 .030; CD NE 1.460 .018; NE CZ 1.329 .014; "
        "CZ NH1 1.326 .018; CZ NH2 1.326 .018 DOUBLE",
        "angles": "CA CB CG 114.1 2.0; CB CG CD 111.3 2.3; CG CD NE 112.0 2.2; CD NE CZ 124.2 1.5; "
        "NE CZ NH1 120.0 1.9; NE CZ NH2 120.0 1.9; NH1 CZ NH2 119.7 1.8",
        "build": "CG CB CA N -65; CD CG CB CA 180; NE CD CG CB 180; CZ NE CD CG 180; "
        "NH1 CZ NE CD 180; NH2 CZ NE CD 0",
        "chis": "chi1 N CA CB CG 3; chi2 CA CB CG CD 3; chi3 CB CG CD NE 3; chi4 CG CD NE CZ 6; "
        "chi5 CD NE CZ NH2 2",
        "hyd": "CB(CA,CG) HB3 HB2; CG(CB,CD) HG3 HG2; CD(CG,NE) HD3 HD2; NE HE; "
        "NH1(CZ,NE) HH12 HH11; NH2(CZ,NE) HH22 HH21",
    },
    "ASN": {
        "name": "ASPARAGINE",
        "atoms": "CB:CH2 CG:C OD1:O ND2:NH2",
        "bonds": "CB CG 1.516 .025; CG OD1 1.231 .020 DOUBLE; CG ND2 1.328 .021",
        "angles": "CA CB CG 112.6 1.0; CB CG OD1 120.8 2.0; CB CG ND2 116.4 1.5; OD1 CG ND2 122.6 1.8",
        "build": "CG CB CA N -65; OD1 CG CB CA -20; ND2 CG CB CA 160",
        "chis": "chi1 N CA CB CG 3; chi2 CA CB CG OD1 6",
        "hyd": "CB(CA,CG) HB3 HB2; ND2(CG,CB) HD21 HD22",
    },
    "ASP": {
        "name": "ASPARTIC ACID",
        "atoms": "CB:CH2 CG:C OD1:O OD2:OC:-1",
        "bonds": "CB CG 1.516 .025; CG OD1 1.249 .019 DOUBLE; CG OD2 1.249 .019",
        "angles": "CA CB CG 112.6 1.0; CB CG OD1 118.4 2.3; CB CG OD2 118.4 2.3; OD1 CG OD2 122.9 2.4",
        "build": "CG CB CA N -65; OD1 CG CB CA -20; OD2 CG CB CA 160",
        "chis": "chi1 N CA CB CG 3; chi2 CA CB CG OD1 6",
        "hyd": "CB(CA,CG) HB3 HB2",
    },
    "CYS": {
        "name": "CYSTEINE",
        "atoms": "CB:CH2 SG:SH1",
        "bonds": "CB SG 1.808 .033",
        "angles": "CA CB SG 114.4 2.3",
        "build": "SG CB CA N -65",
        "chis": "chi1 N CA CB SG 3",
        "hyd": "CB(CA,SG) HB3 HB2; SG(CB,CA) HG",
    },
    "GLN": {
        "name": "GLUTAMINE",
        "atoms": "CB:CH2 CG:CH2 CD:C OE1:O NE2:NH2",
        "bonds": "CB CG 1.520 .030; CG CD 1.516 .025; CD OE1 1.231 .020 DOUBLE; CD NE2 1.328 .021",
        "angles": "CA CB CG 114.1 2.0; CB CG CD 112.6 1.7; CG CD OE1 120.8 2.0; CG CD NE2 116.4 1.5; "
        "OE1 CD NE2 122.6 1.8",
        "build": "CG CB CA N -65; CD CG CB CA 180; OE1 CD CG CB -30; NE2 CD CG CB 150",
        "chis": "chi1 N CA CB CG 3; chi2 CA CB CG CD 3; chi3 CB CG CD OE1 6",
        "hyd": "CB(CA,CG) HB3 HB2; CG(CB,CD) HG3 HG2; NE2(CD,CG) HE21 HE22",
    },
    "GLU": {
        "name": "GLUTAMIC ACID",
        "atoms": "CB:CH2 CG:CH2 CD:C OE1:O OE2:OC:-1",
        "bonds": "CB CG 1.520 .030; CG CD 1.516 .025; CD OE1 1.249 .019 DOUBLE; CD OE2 1.249 .019",
        "angles": "CA CB CG 114.1 2.0; CB CG CD 112.6 1.7; CG CD OE1 118.4 2.3; CG CD OE2 118.4 2.3; "
        "OE1 CD OE2 122.9 2.4",
        "build": "CG CB CA N -65; CD CG CB CA 180; OE1 CD CG CB -10; OE2 CD CG CB 170",
        "chis": "chi1 N CA CB CG 3; chi2 CA CB CG CD 3; chi3 CB CG CD OE1 6",
        "hyd": "CB(CA,CG) HB3 HB2; CG(CB,CD) HG3 HG2",
    },
    "GLY": {
        "name": "GLYCINE",
        "atoms": "",
        "bonds": "CA C 1.516 .018",
        "angles": "N CA C 113.1 2.5",
        "hyd": "CA(N,C) HA3 HA2",
    },
    "HIS": {
        "name": "HISTIDINE",
        "atoms": "CB:CH2 CG:CR5 ND1:NR15:1 CD2:CR15 CE1:CR15 NE2:NR15",
        "bonds": "CB CG 1.497 .014; CG ND1 1.378 .011 AROMATIC; CG CD2 1.354 .011 AROMATIC; "
        "ND1 CE1 1.321 .010 AROMATIC; CD2 NE2 1.374 .011 AROMATIC; CE1 NE2 1.321 .010 AROMATIC",
        "angles": "CA CB CG 113.8 1.0; CB CG ND1 122.7 1.5; CB CG CD2 131.2 1.3; ND1 CG CD2 106.1 1.0; "
        "CG ND1 CE1 109.3 1.7; ND1 CE1 NE2 108.4 1.0; CE1 NE2 CD2 109.0 1.0; NE2 CD2 CG 107.2 1.0",
        "build": "CG CB CA N -65; ND1 CG CB CA -70; CD2 CG CB CA 110; CE1 ND1 CG CB 180; NE2 CD2 CG CB 180",
        "chis": "chi1 N CA CB CG 3; chi2 CA CB CG ND1 6",
        "hyd": "CB(CA,CG) HB3 HB2; ND1 HD1; CD2 HD2; CE1 HE1; NE2 HE2",
    },
    "ILE": {
        "name": "ISOLEUCINE",
        "atoms": "CB:CH1 CG1:CH2 CG2:CH3 CD1:CH3",
        "bonds": "CA CB 1.540 .027; CB CG1 1.530 .020; CB CG2 1.521 .033; CG1 CD1 1.513 .039",
        "angles": "CA CB CG1 110.4 1.7; CA CB CG2 110.5 1.5; CG1 CB CG2 110.7 2.0; CB CG1 CD1 113.8 2.1",
        "build": "CG1 CB CA N -65; CG2 CB CA N 172; CD1 CG1 CB CA 170",
        "chis": "chi1 N CA CB CG1 3; chi2 CA CB CG1 CD1 3",
        "hyd": "CB HB; CG1(CB,CD1) HG12 HG13; CG2(CB,CA) HG21 HG22 HG23; CD1(CG1,CB) HD11 HD12 HD13",
        "chir": "CB CA CG1 CG2 positive",
    },
    "LEU": {
        "name": "LEUCINE",
        "atoms": "CB:CH2 CG:CH1 CD1:CH3 CD2:CH3",
        "bonds": "CB CG 1.530 .020; CG CD1 1.521 .033; CG CD2 1.521 .033",
        "angles": "CA CB CG 116.3 3.5; CB CG CD1 110.7 3.0; CB CG CD2 110.7 3.0; CD1 CG CD2 110.8 2.2",
        "build": "CG CB CA N -65; CD1 CG CB CA 175; CD2 CG CB CA -62",
        "chis": "chi1 N CA CB CG 3; chi2 CA CB CG CD1 3",
        "hyd": "CB(CA,CG) HB3 HB2; CG HG; CD1(CG,CB) HD11 HD12 HD13; CD2(CG,CB) HD21 HD22 HD23",
        "chir": "CG CB CD1 CD2 both",
    },
    "LYS": {
        "name": "LYSINE",
        "atoms": "CB:CH2 CG:CH2 CD:CH2 CE:CH2 NZ:NT3:1",
        "bonds": "CB CG 1.520 .030; CG CD 1.520 .030; CD CE 1.520 .030; CE NZ 1.489 .030",
        "angles": "CA CB CG 114.1 2.0; CB CG CD 111.3 2.3; CG CD CE 111.3 2.3; CD CE NZ 111.9 3.2",
        "build": "CG CB CA N -65; CD CG CB CA 180; CE CD CG CB 180; NZ CE CD CG 180",
        "chis": "chi1 N CA CB CG 3; chi2 CA CB CG CD 3; chi3 CB CG CD CE 3; chi4 CG CD CE NZ 3",
        "hyd": "CB(CA,CG) HB3 HB2; CG(CB,CD) HG3 HG2; CD(CG,CE) HD3 HD2; CE(CD,NZ) HE3 HE2; "
        "NZ(CE,CD) HZ1 HZ2 HZ3",
    },
    "MET": {
        "name": "METHIONINE",
        "atoms": "CB:CH2 CG:CH2 SD:S2 CE:CH3",
        "bonds": "CB CG 1.520 .030; CG SD 1.803 .034; SD CE 1.791 .059",
        "angles": "CA CB CG 114.1 2.0; CB CG SD 112.7 3.0; CG SD CE 100.9 2.2",
        "build": "CG CB CA N -65; SD CG CB CA 180; CE SD CG CB -70",
        "chis": "chi1 N CA CB CG 3; chi2 CA CB CG SD 3; chi3 CB CG SD CE 3",
        "hyd": "CB(CA,CG) HB3 HB2; CG(CB,SD) HG3 HG2; CE(SD,CG) HE1 HE2 HE3",
    },
    "PHE": {
        "name": "PHENYLALANINE",
        "atoms": "CB:CH2 CG:CR6 CD1:CR16 CD2:CR16 CE1:CR16 CE2:CR16 CZ:CR16",
        "bonds": "CB CG 1.502 .023; CG CD1 1.384 .021 AROMATIC; CG CD2 1.384 .021 AROMATIC; "
        "CD1 CE1 1.382 .030 AROMATIC; CD2 CE2 1.382 .030 AROMATIC; CE1 CZ 1.382 .030 AROMATIC; "
        "CE2 CZ 1.382 .030 AROMATIC",
        "angles": "CA CB CG 113.8 1.0; CB CG CD1 120.7 1.7; CB CG CD2 120.7 1.7; CD1 CG CD2 118.6 1.5; "
        "CG CD1 CE1 120.7 1.7; CG CD2 CE2 120.7 1.7; CD1 CE1 CZ 120.0 1.8; CD2 CE2 CZ 120.0 1.8; "
        "CE1 CZ CE2 120.0 1.8",
        "build": "CG CB CA N -65; CD1 CG CB CA 95; CD2 CG CB CA -85; CE1 CD1 CG CB 180; "
        "CE2 CD2 CG CB 180; CZ CE1 CD1 CG 0",
        "chis": "chi1 N CA CB CG 3; chi2 CA CB CG CD1 6",
        "hyd": "CB(CA,CG) HB3 HB2; CD1 HD1; CD2 HD2; CE1 HE1; CE2 HE2; CZ HZ",
    },
    "PRO": {
        "name": "PROLINE",
        "group": "P-peptide",
        "atoms": "CB:CH2 CG:CH2 CD:CH2",
        "bonds": "CB CG 1.492 .050; CG CD 1.503 .034; CD N 1.491 .021",
        "angles": "N CA C 112.1 2.6; N CA CB 103.3 1.2; C CA CB 111.7 2.1; CA CB CG 104.5 1.9; "
        "CB CG CD 106.1 3.2; "
        "CG CD N 103.2 1.5; CA N CD 111.7 1.4",
        "build": "CG CB CA N 30; CD CG CB CA -36",
        "chis": "chi1 N CA CB CG 1 30; chi2 CA CB CG CD 1 30",
        "hyd": "N(CA,CD) H2 H; CB(CA,CG) HB3 HB2; CG(CB,CD) HG3 HG2; CD(N,CG) HD3 HD2",
    },
    "SER": {
        "name": "SERINE",
        "atoms": "CB:CH2 OG:OH1",
        "bonds": "CB OG 1.417 .020",
        "angles": "CA CB OG 111.1 2.0",
        "build": "OG CB CA N 65",
        "chis": "chi1 N CA CB OG 3",
        "hyd": "CB(CA,OG) HB3 HB2; OG(CB,CA) HG",
    },
    "THR": {
        "name": "THREONINE",
        "atoms": "CB:CH1 OG1:OH1 CG2:CH3",
        "bonds": "CA CB 1.540 .027; CB OG1 1.433 .016; CB CG2 1.521 .033",
        "angles": "CA CB OG1 109.6 1.5; CA CB CG2 110.5 1.5; OG1 CB CG2 109.3 2.0",
        "build": "OG1 CB CA N 60; CG2 CB CA N -62",
        "chis": "chi1 N CA CB OG1 3",
        "hyd": "CB HB; OG1(CB,CA) HG1; CG2(CB,CA) HG21 HG22 HG23",
        "chir": "CB CA OG1 CG2 positive",
    },
    "TRP": {
        "name": "TRYPTOPHAN",
        "atoms": "CB:CH2 CG:CR5 CD1:CR15 CD2:CR56 NE1:NR15 CE2:CR56 CE3:CR16 CZ2:CR16 CZ3:CR16 CH2:CR16",
        "bonds": "CB CG 1.498 .031; CG CD1 1.365 .025 AROMATIC; CG CD2 1.433 .018 AROMATIC; "
        "CD1 NE1 1.374 .021 AROMATIC; NE1 CE2 1.370 .011 AROMATIC; CD2 CE2 1.409 .012 AROMATIC; "
        "CD2 CE3 1.398 .016 AROMATIC; CE2 CZ2 1.394 .021 AROMATIC; CE3 CZ3 1.382 .022 AROMATIC; "
        "CZ2 CH2 1.368 .019 AROMATIC; CZ3 CH2 1.400 .025 AROMATIC",
        "angles": "CA CB CG 113.6 1.9; CB CG CD1 126.9 1.5; CB CG CD2 126.8 1.4; CD1 CG CD2 106.3 0.8; "
        "CG CD1 NE1 110.2 1.3; CD1 NE1 CE2 108.9 1.8; NE1 CE2 CD2 107.4 1.3; CG CD2 CE2 107.2 1.2; "
        "NE1 CE2 CZ2 130.1 1.5; CD2 CE2 CZ2 122.4 1.0; CE2 CD2 CE3 118.8 1.0; CG CD2 CE3 133.9 0.9; "
        "CD2 CE3 CZ3 118.6 1.2; CE3 CZ3 CH2 121.1 1.3; CZ3 CH2 CZ2 121.5 1.3; CE2 CZ2 CH2 117.5 1.1",
        "build": "CG CB CA N -65; CD1 CG CB CA 95; CD2 CG CB CA -85; NE1 CD1 CG CB 180; "
        "CE2 CD2 CG CB 180; CE3 CD2 CG CB 0; CZ2 CE2 CD2 CG 180; CZ3 CE3 CD2 CG 180; "
        "CH2 CZ2 CE2 CD2 0",
        "chis": "chi1 N CA CB CG 3; chi2 CA CB CG CD1 6",
        "hyd": "CB(CA,CG) HB3 HB2; CD1 HD1; NE1 HE1; CE3 HE3; CZ2 HZ2; CZ3 HZ3; CH2 HH2",
    },
    "TYR": {
        "name": "TYROSINE",
        "atoms": "CB:CH2 CG:CR6 CD1:CR16 CD2:CR16 CE1:CR16 CE2:CR16 CZ:CR6 OH:OH1",
        "bonds": "CB CG 1.512 .015; CG CD1 1.389 .015 AROMATIC; CG CD2 1.389 .015 AROMATIC; "
        "CD1 CE1 1.382 .030 AROMATIC; CD2 CE2 1.382 .030 AROMATIC; CE1 CZ 1.378 .013 AROMATIC; "
        "CE2 CZ 1.378 .013 AROMATIC; CZ OH 1.376 .021",
        "angles": "CA CB CG 113.9 1.8; CB CG CD1 120.8 1.5; CB CG CD2 120.8 1.5; CD1 CG CD2 118.4 1.5; "
        "CG CD1 CE1 121.2 1.5; CG CD2 CE2 121.2 1.5; CD1 CE1 CZ 119.6 1.8; CD2 CE2 CZ 119.6 1.8; "
        "CE1 CZ CE2 120.0 1.8; CE1 CZ OH 120.0 2.0; CE2 CZ OH 120.0 2.0",
        "build": "CG CB CA N -65; CD1 CG CB CA 95; CD2 CG CB CA -85; CE1 CD1 CG CB 180; "
        "CE2 CD2 CG CB 180; CZ CE1 CD1 CG 0; OH CZ CE1 CD1 180",
        "chis": "chi1 N CA CB CG 3; chi2 CA CB CG CD1 6",
        "hyd": "CB(CA,CG) HB3 HB2; CD1 HD1; CD2 HD2; CE1 HE1; CE2 HE2; OH(CZ,CE1@0) HH",
    },
    "VAL": {
        "name": "VALINE",
        "atoms": "CB:CH1 CG1:CH3 CG2:CH3",
        "bonds": "CA CB 1.540 .027; CB CG1 1.521 .033; CB CG2 1.521 .033",
        "angles": "CA CB CG1 110.5 1.5; CA CB CG2 110.5 1.5; CG1 CB CG2 110.8 2.2",
        "build": "CG1 CB CA N 175; CG2 CB CA N -62",
        "chis": "chi1 N CA CB CG1 3",
        "hyd": "CB HB; CG1(CB,CA) HG11 HG12 HG13; CG2(CB,CA) HG21 HG22 HG23",
        "chir": "CB CA CG1 CG2 both",
    },
}
BETA_BRANCHED = {"ILE", "THR", "VAL"}

# --- links and modifications (Engh & Huber 2001 peptide values; C-N-H bisects the exterior angle) ---
# c_n, ca_c_n, o_c_n, c_n_ca(, c_n_cd): the link; n_ca(, n_cd): DEL-HN1 / DEL-HNP; ca_c, c_o, ca_c_o: DEL-OXT
PEPTIDE = {"c_n": (1.336, 0.023), "ca_c_n": (117.2, 2.2), "o_c_n": (122.7, 1.6), "c_n_ca": (121.7, 1.8),
           "n_ca": (1.459, 0.020), "ca_c": (1.525, 0.026), "c_o": (1.229, 0.019), "ca_c_o": (120.1, 2.1)}
PRO_PEPTIDE = {"c_n": (1.341, 0.016), "ca_c_n": (117.1, 2.8), "o_c_n": (121.1, 1.9), "c_n_ca": (119.3, 1.5),
               "c_n_cd": (128.4, 2.1), "n_ca": (1.468, 0.017), "n_cd": (1.474, 0.014)}
DISULFIDE = {"ss": (2.030, 0.020), "cb_sg_sg": (104.0, 2.0), "chi_ss": (90.0, 10.0, 2)}


@dataclass
class Monomer:
    """A monomer: atoms, restraints and ideal coordinates (Å)."""

    code: str
    name: str
    group: str
    atoms: list[tuple[str, str, int]] = field(default_factory=list)  # name, energy type, charge
    bonds: list[tuple[str, str, str, bool, float, float, float, float]] = field(default_factory=list)
    angles: list[tuple[str, str, str, float, float]] = field(default_factory=list)
    torsions: list[tuple[str, str, str, str, str, float, float, int]] = field(default_factory=list)
    chirals: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    planes: list[tuple[str, list[str]]] = field(default_factory=list)
    xyz: dict[str, np.ndarray] = field(default_factory=dict)

    def energy(self, atom: str) -> str:
        return next(t for a, t, _ in self.atoms if a == atom)

    def neighbours(self, atom: str) -> list[str]:
        out = [b[1] for b in self.bonds if b[0] == atom] + [b[0] for b in self.bonds if b[1] == atom]
        return sorted(out, key=[a[0] for a in self.atoms].index)


# ---------------------------------------------------------------- geometry (Å, degrees)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def nerf(a: np.ndarray, b: np.ndarray, c: np.ndarray,
         bond: float, angle: float, torsion: float) -> np.ndarray:
    """Position of d with |cd| = bond, angle b-c-d and dihedral a-b-c-d (degrees)."""
    ang, tor = np.radians(angle), np.radians(torsion)
    bc = _unit(c - b)
    n = _unit(np.cross(b - a, bc))
    m = np.cross(n, bc)
    return c + bond * (-np.cos(ang) * bc + np.sin(ang) * np.cos(tor) * m + np.sin(ang) * np.sin(tor) * n)


def angle_deg(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Angle a-b-c in degrees (vectorised over leading axes)."""
    u, v = _unit(a - b), _unit(c - b)
    return np.degrees(np.arccos(np.clip(np.sum(u * v, axis=-1), -1.0, 1.0)))


def dihedral_deg(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Dihedral a-b-c-d in degrees (vectorised over leading axes)."""
    b1 = _unit(c - b)
    v = (a - b) - np.sum((a - b) * b1, axis=-1, keepdims=True) * b1
    w = (d - c) - np.sum((d - c) * b1, axis=-1, keepdims=True) * b1
    x = np.sum(v * w, axis=-1)
    y = np.sum(np.cross(b1, v) * w, axis=-1)
    return np.degrees(np.arctan2(y, x))


def chiral_volume(c: np.ndarray, a1: np.ndarray, a2: np.ndarray, a3: np.ndarray) -> float:
    """CCP4 chiral volume (a1-c) . ((a2-c) x (a3-c)) in Å^3."""
    return float(np.dot(a1 - c, np.cross(a2 - c, a3 - c)))


def regularize(xyz: np.ndarray, bonds: list, angles: list, planes: list, keep: list) -> np.ndarray:
    """Least-squares idealisation of coordinates (n, 3) against bond (i, j, d), angle (i, j, k, deg)
    and plane (index list) targets; ``keep`` holds dihedrals (i, j, k, l, deg) held weakly in place."""
    bi = np.array([b[:2] for b in bonds], dtype=int).reshape(-1, 2)
    bd = np.array([b[2] for b in bonds], dtype=float)
    ai = np.array([a[:3] for a in angles], dtype=int).reshape(-1, 3)
    av = np.array([a[3] for a in angles], dtype=float)
    ti = np.array([t[:4] for t in keep], dtype=int).reshape(-1, 4)
    tv = np.array([t[4] for t in keep], dtype=float)

    def residuals(flat: np.ndarray) -> np.ndarray:
        x = flat.reshape(-1, 3)
        res = [(np.linalg.norm(x[bi[:, 0]] - x[bi[:, 1]], axis=1) - bd) / 0.005]
        res.append((angle_deg(x[ai[:, 0]], x[ai[:, 1]], x[ai[:, 2]]) - av) / 0.5)
        for idx in planes:
            p = x[idx] - x[idx].mean(axis=0)
            normal = np.linalg.svd(p)[2][-1]
            res.append(p @ normal / 0.005)
        dt = dihedral_deg(x[ti[:, 0]], x[ti[:, 1]], x[ti[:, 2]], x[ti[:, 3]]) - tv
        res.append(((dt + 180.0) % 360.0 - 180.0) / 20.0)
        return np.concatenate(res)

    return least_squares(residuals, xyz.ravel(), xtol=1e-12, ftol=1e-12).x.reshape(-1, 3)


def torsion_value(deg: float) -> float:
    """A dihedral rounded to 0.1 degree in (-180, 180]."""
    v = round(float(deg), 1)
    return 180.0 if v <= -180.0 else v + 0.0


def ch2_half_angle(theta: float) -> float:
    """Half of the H-X-H angle (degrees) of an X-H2 group whose heavy-atom angle is ``theta``,
    chosen so that the five angles at X are as close to tetrahedral as possible."""
    c = np.cos(np.radians(theta / 2))

    def cost(alpha: float) -> float:
        xh = np.degrees(np.arccos(-np.cos(np.radians(alpha)) * c))
        return (2 * alpha - TETRAHEDRAL) ** 2 + 4 * (xh - TETRAHEDRAL) ** 2

    return float(minimize_scalar(cost, bounds=(40.0, 70.0), method="bounded", options={"xatol": 1e-10}).x)


# ---------------------------------------------------------------- parsing of the compact tables


def _items(text: str) -> list[list[str]]:
    return [s.split() for s in text.split(";") if s.strip()]


def _bond(row: list[str]) -> tuple:
    order = row[4].upper() if len(row) > 4 else "SINGLE"
    d = float(row[2])
    return (row[0], row[1], order, order == "AROMATIC", d, float(row[3]), d, float(row[3]))


def _angle(row: list[str]) -> tuple:
    return (row[0], row[1], row[2], float(row[3]), float(row[4]))


def _merge(base: list[list[str]], own: list[list[str]], nkey: int) -> list[list[str]]:
    """Rows of ``base`` not redefined in ``own`` (same atoms, either direction), then ``own``."""
    keys = {tuple(r[:nkey]) for r in own} | {tuple(r[:nkey][::-1]) for r in own}
    return [r for r in base if tuple(r[:nkey]) not in keys] + own


# ---------------------------------------------------------------- monomer assembly


def _amino_acid(code: str) -> Monomer:
    spec = RESIDUES[code]
    mon = Monomer(code, spec["name"], spec.get("group", "peptide"))
    atoms = BACKBONE_ATOMS.split() + spec["atoms"].split()
    for tok in atoms:
        name, energy, *charge = tok.split(":")
        mon.atoms.append((name, energy, int(charge[0]) if charge else 0))
    if code == "GLY":
        mon.atoms[1] = ("CA", "CH2", 0)
    if code == "PRO":
        mon.atoms[0] = ("N", "NT2", 1)
    bonds = _merge(_items(BACKBONE_BONDS) + ([] if code == "GLY" else [CB_GENERAL.split()]),
                   _items(spec.get("bonds", "")), 2)
    cb_angles = CB_ANGLES_BETA_BRANCHED if code in BETA_BRANCHED else CB_ANGLES_GENERAL
    if code == "GLY":
        cb_angles = ""
    angles = _merge(_items(BACKBONE_ANGLES) + _items(cb_angles), _items(spec.get("angles", "")), 3)
    build = _items(BACKBONE_BUILD) + ([] if code == "GLY" else [CB_BUILD.split()])
    build += _items(spec.get("build", ""))
    mon.bonds = [_bond(r) for r in bonds]
    mon.angles = [_angle(r) for r in angles]
    _check_angles_complete(mon)
    _build_heavy(mon, build)
    own = _items(spec.get("hyd", ""))
    parents = {r[0].split("(")[0] for r in own}
    hyd = [r for r in _items(BACKBONE_HYD) if r[0].split("(")[0] not in parents] + own
    _add_hydrogens(mon, "; ".join(" ".join(r) for r in hyd))
    _add_planes(mon)
    _add_torsions(mon, spec.get("chis", ""))
    chir = [] if code == "GLY" else ["CA N C CB positive"]
    for row in _items("; ".join(chir + [spec.get("chir", "")])):
        mon.chirals.append(tuple(row))
    _check_chirality(mon)
    _order_atoms(mon)
    return mon


def _check_angles_complete(mon: Monomer) -> None:
    """Every pair of heavy-atom bonds sharing an atom must have an authored angle."""
    have = {(a[0], a[1], a[2]) for a in mon.angles} | {(a[2], a[1], a[0]) for a in mon.angles}
    for centre, *_ in mon.atoms:
        nb = mon.neighbours(centre)
        for i, a in enumerate(nb):
            for b in nb[i + 1:]:
                if (a, centre, b) not in have:
                    raise ValueError(f"{mon.code}: no angle {a}-{centre}-{b}")


def _build_heavy(mon: Monomer, build: list[list[str]]) -> None:
    """Place heavy atoms from internal coordinates, then regularise."""
    bond_len = {frozenset(b[:2]): b[4] for b in mon.bonds}
    ang = {(a[0], a[1], a[2]): a[3] for a in mon.angles} | {(a[2], a[1], a[0]): a[3] for a in mon.angles}
    x = {"N": np.zeros(3), "CA": np.array([bond_len[frozenset(("N", "CA"))], 0.0, 0.0])}
    t = np.radians(ang[("N", "CA", "C")])
    x["C"] = x["CA"] + bond_len[frozenset(("CA", "C"))] * np.array([-np.cos(t), np.sin(t), 0.0])
    for d, c, b, a, tor in build:
        x[d] = nerf(x[a], x[b], x[c], bond_len[frozenset((c, d))], ang[(b, c, d)], float(tor))
    names = [a for a, *_ in mon.atoms]
    missing = set(names) - set(x)
    if missing:
        raise ValueError(f"{mon.code}: no build rule for {sorted(missing)}")
    idx = {n: i for i, n in enumerate(names)}
    xyz = np.array([x[n] for n in names])
    bonds = [(idx[b[0]], idx[b[1]], b[4]) for b in mon.bonds]
    angles = [(idx[a[0]], idx[a[1]], idx[a[2]], a[3]) for a in mon.angles]
    planes = [[idx[a] for a in p] for p in _plane_sets(mon) if all(a in idx for a in p)]
    keep = [(idx[a], idx[b], idx[c], idx[d], float(dihedral_deg(x[a], x[b], x[c], x[d])))
            for d, c, b, a, _ in build]
    xyz = regularize(xyz, bonds, angles, planes, keep)
    mon.xyz = {n: xyz[i] for n, i in idx.items()}


def _plane_sets(mon: Monomer) -> list[list[str]]:
    """Planes by rule: each trigonal centre with its neighbours; each aromatic ring system with all
    atoms bonded to it.  The backbone carboxylate comes first (plan-1)."""
    names = [a for a, *_ in mon.atoms]
    arom = [a for a, t, _ in mon.atoms if t in AROMATIC_TYPES]
    planes: list[list[str]] = []
    for a, t, _ in mon.atoms:
        if t in SP2_TYPES:
            planes.append([a, *mon.neighbours(a)])
    if arom:
        ring = set(arom)
        members = set(ring)
        for a in ring:
            members.update(mon.neighbours(a))
        planes.append(sorted(members, key=names.index))
    return planes


def _add_hydrogens(mon: Monomer, text: str) -> None:
    """Add hydrogens, their bonds (nucleus and electron-cloud distances) and angles by rule.

    ``X H`` places a tertiary CH with equal X-C-H angles, or an sp2 H bisecting the exterior angle.
    ``X(r1,r2) Ha Hb`` with two heavy neighbours r1, r2 places an sp3 pair, as close to tetrahedral as
    the heavy-atom angle allows, with chiral volume (X; r1, r2, Ha) > 0.  ``X(r1,r2[@tor]) H...`` with
    one heavy neighbour r1 places sp3 hydrogens staggered (first H at dihedral r2-r1-X-H = tor, default
    180) or, for sp2 X, the first H cis and the second trans to r2."""
    for row in _items(text):
        head, hs = row[0], row[1:]
        parent, refs, tor = head, [], None
        if "(" in head:
            parent, inner = head[:-1].split("(")
            refs = inner.split(",")
            if "@" in refs[-1]:
                refs[-1], t = refs[-1].split("@")
                tor = float(t)
        ptype = mon.energy(parent)
        heavy = mon.neighbours(parent)
        nuc, elec = XH_DIST[ptype]
        x = mon.xyz[parent]
        u = [_unit(mon.xyz[n] - x) for n in heavy]
        if len(heavy) == 3:  # tertiary CH: the three X-C-H angles equal (SHELXL AFIX 13)
            d = np.linalg.solve(np.array(u), np.ones(3))
            pos = [x + elec * _unit(-d if np.dot(d, sum(u)) > 0 else d)]
        elif len(heavy) == 2 and len(hs) == 1:  # sp2: bisects the exterior angle
            pos = [x + elec * _unit(-sum(u))]
        elif len(heavy) == 2:  # two hydrogens on an sp3 atom
            u1, u2 = _unit(mon.xyz[refs[0]] - x), _unit(mon.xyz[refs[1]] - x)
            alpha = np.radians(ch2_half_angle(float(angle_deg(u1, np.zeros(3), u2))))
            bis, nrm = _unit(u1 + u2), _unit(np.cross(u1, u2))
            pos = [x + elec * (-np.cos(alpha) * bis + s * np.sin(alpha) * nrm) for s in (1.0, -1.0)]
            if chiral_volume(x, mon.xyz[refs[0]], mon.xyz[refs[1]], pos[0]) < 0:
                pos.reverse()
        elif ptype in SP2_TYPES:  # NH2 of amides and guanidinium: first H cis to refs[1]
            a, b = mon.xyz[refs[1]], mon.xyz[refs[0]]
            pos = [nerf(a, b, x, elec, 120.0, t) for t in (0.0, 180.0)]
        else:  # sp3 with one heavy neighbour: methyl, NH3+, OH, SH
            a, b = mon.xyz[refs[1]], mon.xyz[refs[0]]
            ang = X_H_ANGLE.get(ptype, TETRAHEDRAL)
            t0 = 180.0 if tor is None else tor
            pos = [nerf(a, b, x, elec, ang, t0 + 120.0 * k) for k in range(len(hs))]
        for h, p in zip(hs, pos):
            mon.atoms.append((h, "HSH1" if ptype == "SH1" else "H", 0))
            mon.xyz[h] = p
            mon.bonds.append((parent, h, "SINGLE", False, nuc, XH_ESD, elec, XH_ESD))
        for n in heavy:
            for h in hs:
                mon.angles.append((n, parent, h, round(float(angle_deg(mon.xyz[n], x, mon.xyz[h])), 2),
                                   H_ANGLE_ESD))
        for i, h1 in enumerate(hs):
            for h2 in hs[i + 1:]:
                mon.angles.append((h1, parent, h2, round(float(angle_deg(mon.xyz[h1], x, mon.xyz[h2])), 2),
                                   HH_ANGLE_ESD))
        if len(heavy) == 1 and (len(hs) > 1 or ptype not in SP2_TYPES):
            conjugated = ptype in SP2_TYPES or mon.energy(refs[0]) in AROMATIC_TYPES
            period = 2 if conjugated else 3
            h = hs[-1] if ptype in SP2_TYPES else hs[0]
            n_hh = sum(t[0].startswith("hh") and t[0] != "hhn" for t in mon.torsions)
            label = "hhn" if parent == "N" else f"hh{n_hh + 1}"
            val = float(dihedral_deg(mon.xyz[refs[1]], mon.xyz[refs[0]], x, mon.xyz[h]))
            mon.torsions.append((label, refs[1], refs[0], parent, h, torsion_value(val), 10.0, period))


def _add_planes(mon: Monomer) -> None:
    for i, atoms in enumerate(_plane_sets(mon), start=1):
        mon.planes.append((f"plan-{i}", atoms))


def _add_torsions(mon: Monomer, text: str) -> None:
    """Chi torsions (value from the ideal coordinates; esd 10 degrees, or the given esd)."""
    rows = _items(text)
    for row in rows:
        label, a, b, c, d, period = row[:6]
        esd = float(row[6]) if len(row) > 6 else 10.0
        val = float(dihedral_deg(*(mon.xyz[n] for n in (a, b, c, d))))
        mon.torsions.append((label, a, b, c, d, torsion_value(val), esd, int(period)))
    # hydrogen torsions last, chi torsions first (as in the CCP4 files)
    mon.torsions.sort(key=lambda t: (not t[0].startswith("chi"), t[0]))


def _check_chirality(mon: Monomer) -> None:
    for centre, a1, a2, a3, sign in mon.chirals:
        v = chiral_volume(*(mon.xyz[n] for n in (centre, a1, a2, a3)))
        want = {"positive": 1, "negative": -1}.get(sign)
        # prochiral centres ('both') follow the IUPAC naming: negative volume for VAL CB and LEU CG
        want = want if want is not None else -1
        if np.sign(v) != want:
            raise ValueError(f"{mon.code}: chiral volume of {centre} is {v:.2f}, expected {sign}")


def _order_atoms(mon: Monomer) -> None:
    """Heavy atoms first, then each hydrogen in the order of its parent."""
    heavy = [a for a in mon.atoms if a[1] not in ("H", "HSH1")]
    hyd = [a for a in mon.atoms if a[1] in ("H", "HSH1")]
    mon.atoms = heavy + hyd


def _water() -> Monomer:
    mon = Monomer("HOH", "WATER", "non-polymer")
    nuc, elec = XH_DIST["OH2"]
    mon.atoms = [("O", "OH2", 0), ("H1", "H", 0), ("H2", "H", 0)]
    t = np.radians(WATER_HOH)
    mon.xyz = {"O": np.zeros(3), "H1": np.array([elec, 0.0, 0.0]),
               "H2": elec * np.array([np.cos(t), np.sin(t), 0.0])}
    mon.bonds = [("O", h, "SINGLE", False, nuc, XH_ESD, elec, XH_ESD) for h in ("H1", "H2")]
    mon.angles = [("H1", "O", "H2", WATER_HOH, HH_ANGLE_ESD)]
    return mon


def build_monomers() -> dict[str, Monomer]:
    """All 21 built-in monomers."""
    mons = {code: _amino_acid(code) for code in AMINO_ACIDS}
    mons["HOH"] = _water()
    return mons


# ---------------------------------------------------------------- CIF output


def _f(x: float, nd: int) -> str:
    s = f"{x:.{nd}f}"
    return "0." + "0" * nd if s == "-0." + "0" * nd else s


def _q(value: object) -> str:
    """A CIF value, quoted only where the syntax needs it ('.' and '?' stay null markers)."""
    s = str(value)
    reserved = s.lower().startswith(("data_", "save_", "loop_", "global_", "stop_"))
    if s and not reserved and s[0] not in "_#$'\"[];" and not any(c.isspace() for c in s):
        return s
    return gemmi.cif.quote(s)


def _loop(block: gemmi.cif.Block, prefix: str, tags: list[str], rows: list[list]) -> None:
    loop = block.init_loop(prefix, tags)
    for row in rows:
        loop.add_row([_q(v) for v in row])


def _comp_list_rows(mons: list[Monomer]) -> list[list]:
    rows = []
    for m in mons:
        n_h = sum(ELEMENT[t] == "H" for _, t, _ in m.atoms)
        rows.append([m.code, m.code, m.name, m.group, len(m.atoms), len(m.atoms) - n_h, "."])
    return rows


COMP_TAGS = ["id", "three_letter_code", "name", "group", "number_atoms_all", "number_atoms_nh", "desc_level"]


def monomer_document(mon: Monomer) -> gemmi.cif.Document:
    """The CIF document of one monomer file."""
    doc = gemmi.cif.Document()
    _loop(doc.add_new_block("comp_list"), "_chem_comp.", COMP_TAGS, _comp_list_rows([mon]))
    b = doc.add_new_block(f"comp_{mon.code}")
    c = mon.code
    _loop(b, "_chem_comp_atom.",
          ["comp_id", "atom_id", "type_symbol", "type_energy", "charge", "x", "y", "z"],
          [[c, a, ELEMENT[t], t, q, *(_f(v, 3) for v in mon.xyz[a])] for a, t, q in mon.atoms])
    _loop(b, "_chem_comp_bond.",
          ["comp_id", "atom_id_1", "atom_id_2", "type", "aromatic",
           "value_dist_nucleus", "value_dist_nucleus_esd", "value_dist", "value_dist_esd"],
          [[c, a1, a2, t, "y" if ar else "n", _f(dn, 3), _f(en, 3), _f(d, 3), _f(e, 3)]
           for a1, a2, t, ar, dn, en, d, e in mon.bonds])
    _loop(b, "_chem_comp_angle.", ["comp_id", "atom_id_1", "atom_id_2", "atom_id_3", "value_angle",
                                   "value_angle_esd"],
          [[c, a1, a2, a3, _f(v, 2), _f(e, 2)] for a1, a2, a3, v, e in mon.angles])
    if mon.torsions:
        _loop(b, "_chem_comp_tor.", ["comp_id", "id", "atom_id_1", "atom_id_2", "atom_id_3", "atom_id_4",
                                     "value_angle", "value_angle_esd", "period"],
              [[c, i, a1, a2, a3, a4, _f(v, 1), _f(e, 1), p] for i, a1, a2, a3, a4, v, e, p in mon.torsions])
    if mon.chirals:
        _loop(b, "_chem_comp_chir.",
              ["comp_id", "id", "atom_id_centre", "atom_id_1", "atom_id_2", "atom_id_3", "volume_sign"],
              [[c, f"chir_{i}", *ch] for i, ch in enumerate(mon.chirals, start=1)])
    if mon.planes:
        _loop(b, "_chem_comp_plane_atom.", ["comp_id", "plane_id", "atom_id", "dist_esd"],
              [[c, pid, a, "0.020"] for pid, atoms in mon.planes for a in atoms])
    return doc


# --- mon_lib_list.cif: links and modifications


def _link_block(doc: gemmi.cif.Document, link_id: str, bonds: list, angles: list, tors: list,
                planes: list) -> None:
    b = doc.add_new_block(f"link_{link_id}")
    _loop(b, "_chem_link_bond.", ["link_id", "atom_1_comp_id", "atom_id_1", "atom_2_comp_id", "atom_id_2",
                                  "type", "value_dist", "value_dist_esd"],
          [[link_id, *r[:4], "SINGLE", _f(r[4], 3), _f(r[5], 3)] for r in bonds])
    _loop(b, "_chem_link_angle.", ["link_id", "atom_1_comp_id", "atom_id_1", "atom_2_comp_id", "atom_id_2",
                                   "atom_3_comp_id", "atom_id_3", "value_angle", "value_angle_esd"],
          [[link_id, *r[:6], _f(r[6], 2), _f(r[7], 2)] for r in angles])
    _loop(b, "_chem_link_tor.",
          ["link_id", "id", "atom_1_comp_id", "atom_id_1", "atom_2_comp_id", "atom_id_2",
           "atom_3_comp_id", "atom_id_3", "atom_4_comp_id", "atom_id_4", "value_angle",
           "value_angle_esd", "period"],
          [[link_id, *r[:9], _f(r[9], 1), _f(r[10], 1), r[11]] for r in tors])
    if planes:
        _loop(b, "_chem_link_plane.", ["link_id", "plane_id", "atom_comp_id", "atom_id", "dist_esd"],
              [[link_id, pid, comp, a, "0.020"] for pid, atoms in planes for comp, a in atoms])


def _peptide_link(doc: gemmi.cif.Document, link_id: str, cis: bool, pro: bool) -> None:
    p = PRO_PEPTIDE if pro else PEPTIDE
    angles = [(1, "CA", 1, "C", 2, "N", *p["ca_c_n"]), (1, "O", 1, "C", 2, "N", *p["o_c_n"]),
              (1, "C", 2, "N", 2, "CA", *p["c_n_ca"])]
    if pro:
        angles.append((1, "C", 2, "N", 2, "CD", *p["c_n_cd"]))
        plane2 = [(1, "C"), (2, "N"), (2, "CA"), (2, "CD")]
    else:
        angles.append((1, "C", 2, "N", 2, "H", round((360.0 - p["c_n_ca"][0]) / 2, 2), 2.0))
        plane2 = [(1, "C"), (2, "N"), (2, "CA"), (2, "H")]
    tors = [("psi", 1, "N", 1, "CA", 1, "C", 2, "N", 120.0, 30.0, 2),
            ("omega", 1, "CA", 1, "C", 2, "N", 2, "CA", 0.0 if cis else 180.0, 5.0, 0),
            ("phi", 1, "C", 2, "N", 2, "CA", 2, "C", -60.0, 20.0, 3)]
    planes = [("plan-1", [(1, "CA"), (1, "C"), (1, "O"), (2, "N")]), ("plan-2", plane2)]
    _link_block(doc, link_id, [(1, "C", 2, "N", *p["c_n"])], angles, tors, planes)


def _mod_block(doc: gemmi.cif.Document, mod_id: str, atoms: list, bonds: list = (), angles: list = (),
               tors: list = (), planes: list = ()) -> None:
    b = doc.add_new_block(f"mod_{mod_id}")
    _loop(b, "_chem_mod_atom.", ["mod_id", "function", "atom_id", "new_atom_id", "new_type_symbol",
                                 "new_type_energy", "new_charge"], [[mod_id, *r] for r in atoms])
    if bonds:
        _loop(b, "_chem_mod_bond.", ["mod_id", "function", "atom_id_1", "atom_id_2", "new_type",
                                     "new_value_dist", "new_value_dist_esd", "new_value_dist_nucleus",
                                     "new_value_dist_nucleus_esd"], [[mod_id, *r] for r in bonds])
    if angles:
        _loop(b, "_chem_mod_angle.", ["mod_id", "function", "atom_id_1", "atom_id_2", "atom_id_3",
                                      "new_value_angle", "new_value_angle_esd"],
              [[mod_id, *r] for r in angles])
    if tors:
        _loop(b, "_chem_mod_tor.", ["mod_id", "function", "id", "atom_id_1", "atom_id_2", "atom_id_3",
                                    "atom_id_4", "new_value_angle", "new_value_angle_esd", "new_period"],
              [[mod_id, *r] for r in tors])
    if planes:
        _loop(b, "_chem_mod_plane_atom.", ["mod_id", "function", "plane_id", "atom_id", "new_dist_esd"],
              [[mod_id, *r] for r in planes])


def _bond_row(func: str, a1: str, a2: str, btype: str, nuc: float, elec: float, esd: float) -> list:
    return [func, a1, a2, btype, _f(elec, 3), _f(esd, 3), _f(nuc, 3), _f(esd, 3)]


def _heavy_bond_row(func: str, a1: str, a2: str, btype: str, value_esd: tuple[float, float]) -> list:
    """A bond between heavy atoms: the nucleus and electron-cloud distances are equal."""
    return _bond_row(func, a1, a2, btype, value_esd[0], value_esd[0], value_esd[1])


def mon_lib_list_document(mons: dict[str, Monomer]) -> gemmi.cif.Document:
    """links + mods + comp_list: what gemmi needs to build protein topologies."""
    doc = gemmi.cif.Document()
    lib = doc.add_new_block("lib")
    lib.set_pair("_lib.name", "drefine_builtin")
    lib.set_pair("_lib.version", "1.0")
    lib.set_pair("_lib.update", gemmi.cif.quote("generated by drefine.restraints.build_builtin_monlib"))
    _loop(doc.add_new_block("comp_list"), "_chem_comp.", COMP_TAGS, _comp_list_rows(list(mons.values())))
    _loop(doc.add_new_block("link_list"), "_chem_link.",
          ["id", "comp_id_1", "mod_id_1", "group_comp_1", "comp_id_2", "mod_id_2", "group_comp_2", "name"],
          [["TRANS", ".", "DEL-OXT", "peptide", ".", "DEL-HN1", "peptide", "TRANS"],
           ["CIS", ".", "DEL-OXT", "peptide", ".", "DEL-HN1", "peptide", "CIS"],
           ["PTRANS", ".", "DEL-OXT", "peptide", ".", "DEL-HNP", "P-peptide", "PTRANS"],
           ["PCIS", ".", "DEL-OXT", "peptide", ".", "DEL-HNP", "P-peptide", "PCIS"],
           ["SS", ".", "CYS-SS", "peptide", ".", "CYS-SS", "peptide", "SS-bridge"]])
    _loop(doc.add_new_block("mod_list"), "_chem_mod.", ["id", "name", "comp_id", "group_id"],
          [["NH3", "NH3-terminus", ".", "peptide"],
           ["COO", "COO-terminus", ".", "peptide"],
           ["DEL-OXT", "delete_OXT_from_peptide", ".", "peptide"],
           ["DEL-HN1", "delete_H2_H3_from_peptide", ".", "peptide"],
           ["DEL-HNP", "delete_H_H2_from_proline", ".", "peptide"],
           ["CYS-SS", "delete_HG_from_CYS", "CYS", "peptide"]])
    _peptide_link(doc, "TRANS", cis=False, pro=False)
    _peptide_link(doc, "CIS", cis=True, pro=False)
    _peptide_link(doc, "PTRANS", cis=False, pro=True)
    _peptide_link(doc, "PCIS", cis=True, pro=True)
    ss, ang, chi = DISULFIDE["ss"], DISULFIDE["cb_sg_sg"], DISULFIDE["chi_ss"]
    _link_block(doc, "SS", [(1, "SG", 2, "SG", *ss)],
                [(1, "CB", 1, "SG", 2, "SG", *ang), (1, "SG", 2, "SG", 2, "CB", *ang)],
                [("ss", 1, "CB", 1, "SG", 2, "SG", 2, "CB", *chi)], [])

    ala = mons["ALA"]
    bond = {frozenset(b[:2]): b for b in ala.bonds}
    angle = {(a[0], a[1], a[2]): a for a in ala.angles}
    nh_nuc, nh_el = XH_DIST["NH1"]
    nt_nuc, nt_el = XH_DIST["NT3"]
    pep = PEPTIDE
    c_n_ca = pep["c_n_ca"][0]
    # N-terminus: NH3+ (the monomers already carry H, H2, H3: this mod restores them after DEL-HN1)
    _mod_block(doc, "NH3",
               [["change", "N", ".", "N", "NT3", "1"], ["add", ".", "H2", "H", "H", "0"],
                ["add", ".", "H3", "H", "H", "0"]],
               bonds=[_bond_row("change", "N", "CA", "SINGLE", 1.491, 1.491, 0.021),
                      _bond_row("change", "N", "H", "SINGLE", nt_nuc, nt_el, XH_ESD),
                      _bond_row("add", "N", "H2", "SINGLE", nt_nuc, nt_el, XH_ESD),
                      _bond_row("add", "N", "H3", "SINGLE", nt_nuc, nt_el, XH_ESD)],
               angles=[["change", "CA", "N", "H", _f(TETRAHEDRAL, 2), "1.50"],
                       ["add", "CA", "N", "H2", _f(TETRAHEDRAL, 2), "1.50"],
                       ["add", "CA", "N", "H3", _f(TETRAHEDRAL, 2), "1.50"],
                       ["add", "H", "N", "H2", _f(TETRAHEDRAL, 2), "3.00"],
                       ["add", "H", "N", "H3", _f(TETRAHEDRAL, 2), "3.00"],
                       ["add", "H2", "N", "H3", _f(TETRAHEDRAL, 2), "3.00"]],
               tors=[["add", "hhn", "C", "CA", "N", "H", "180.0", "10.0", "3"]])
    # C-terminus: carboxylate (the monomers already carry OXT: this mod restores it after DEL-OXT)
    co = bond[frozenset(("C", "O"))]
    _mod_block(doc, "COO",
               [["change", "O", ".", "O", "O", "0"], ["add", ".", "OXT", "O", "OC", "-1"]],
               bonds=[_bond_row("change", "C", "O", "DOUBLE", co[4], co[6], co[5]),
                      _bond_row("add", "C", "OXT", "SINGLE", co[4], co[6], co[5])],
               angles=[["change", "CA", "C", "O", _f(angle[("CA", "C", "O")][3], 2), "2.00"],
                       ["add", "CA", "C", "OXT", _f(angle[("CA", "C", "OXT")][3], 2), "2.00"],
                       ["add", "O", "C", "OXT", _f(angle[("O", "C", "OXT")][3], 2), "2.00"]],
               planes=[["add", "plan-1", a, "0.020"] for a in ("C", "CA", "O", "OXT")])
    # peptide C side: the carboxylate becomes a carbonyl (Engh & Huber 2001)
    _mod_block(doc, "DEL-OXT", [["delete", "OXT", ".", "O", "OC", "-1"]],
               bonds=[["delete", "C", "OXT", ".", ".", ".", ".", "."],
                      _heavy_bond_row("change", "CA", "C", "SINGLE", pep["ca_c"]),
                      _heavy_bond_row("change", "C", "O", "DOUBLE", pep["c_o"])],
               angles=[["delete", "CA", "C", "OXT", ".", "."], ["delete", "O", "C", "OXT", ".", "."],
                       ["change", "CA", "C", "O", *(_f(v, 2) for v in pep["ca_c_o"])]],
               planes=[["delete", "plan-1", a, "0.020"] for a in ("C", "CA", "O", "OXT")])
    # peptide N side: NH3+ becomes the amide NH (H bisects the exterior C-N-CA angle)
    _mod_block(doc, "DEL-HN1",
               [["delete", "H2", ".", "H", "H", "0"], ["delete", "H3", ".", "H", "H", "0"],
                ["change", "N", ".", "N", "NH1", "0"]],
               bonds=[["delete", "N", "H2", ".", ".", ".", ".", "."],
                      ["delete", "N", "H3", ".", ".", ".", ".", "."],
                      _heavy_bond_row("change", "CA", "N", "SINGLE", pep["n_ca"]),
                      _bond_row("change", "N", "H", "SINGLE", nh_nuc, nh_el, XH_ESD)],
               angles=[["delete", "CA", "N", "H2", ".", "."], ["delete", "CA", "N", "H3", ".", "."],
                       ["delete", "H", "N", "H2", ".", "."], ["delete", "H", "N", "H3", ".", "."],
                       ["delete", "H2", "N", "H3", ".", "."],
                       ["change", "CA", "N", "H", _f((360.0 - c_n_ca) / 2, 2), "2.00"]],
               tors=[["delete", "hhn", "C", "CA", "N", "H", ".", ".", "."]])
    # peptide N side of proline: NH2+ becomes the tertiary amide N
    p = PRO_PEPTIDE
    _mod_block(doc, "DEL-HNP",
               [["delete", "H", ".", "H", "H", "0"], ["delete", "H2", ".", "H", "H", "0"],
                ["change", "N", ".", "N", "NH0", "0"]],
               bonds=[_heavy_bond_row("change", "N", "CA", "SINGLE", p["n_ca"]),
                      _heavy_bond_row("change", "N", "CD", "SINGLE", p["n_cd"])],
               angles=[["change", "CA", "N", "CD", _f(360.0 - p["c_n_ca"][0] - p["c_n_cd"][0], 2), "1.40"]])
    _mod_block(doc, "CYS-SS", [["delete", "HG", ".", "H", "H", "0"]])
    return doc


# --- ener_lib.cif: _lib_atom rows
# vdw radii: Bondi (1964) J. Phys. Chem. 68, 441; vdwh: united-atom radius of the group (the Bondi radius
# + 0.25 Å per sp3 C-H group, + 0.10 Å for aromatic CH, + 0.05 Å for polar N-H/O-H/S-H); ion radii:
# Shannon (1976) Acta Cryst. A32, 751 (N3- CN4, O2- CN2, S2- CN6).
ENERGY_TYPES = {
    # type: (hb_type, vdwh, valency, sp)
    "C": ("N", None, 4, 2), "CH1": ("N", 1.95, 4, 3), "CH2": ("N", 1.95, 4, 3), "CH3": ("N", 1.95, 4, 3),
    "CR5": ("N", None, 4, 2), "CR6": ("N", None, 4, 2), "CR15": ("N", 1.80, 4, 2),
    "CR16": ("N", 1.80, 4, 2), "CR56": ("N", None, 4, 2),
    "NH0": ("N", None, 3, 2), "NH1": ("D", 1.60, 3, 2), "NH2": ("D", 1.60, 3, 2), "NC1": ("D", 1.60, 3, 2),
    "NC2": ("D", 1.60, 3, 2), "NR15": ("D", 1.60, 3, 2), "NT2": ("D", 1.60, 4, 3), "NT3": ("D", 1.60, 4, 3),
    "O": ("A", None, 2, 2), "OC": ("A", None, 1, 2), "OH1": ("B", 1.57, 2, 3), "OH2": ("B", 1.57, 2, 3),
    "S2": ("A", None, 2, 3), "SH1": ("B", 1.85, 2, 3),
    "H": ("H", None, 1, 0), "HSH1": ("H", None, 1, 0),
}
ELEMENT_DATA = {  # weight (IUPAC), Bondi vdw radius, Shannon ionic radius
    "C": (12.011, 1.70, None), "N": (14.007, 1.55, 1.46), "O": (15.999, 1.52, 1.35),
    "S": (32.06, 1.80, 1.84), "H": (1.008, 1.20, None),
}


def ener_lib_document() -> gemmi.cif.Document:
    """A compact energy library with the _lib_atom rows of the built-in monomers' types."""
    doc = gemmi.cif.Document()
    b = doc.add_new_block("energy")
    rows = []
    for t, (hb, vdwh, valency, sp) in ENERGY_TYPES.items():
        el = ELEMENT[t]
        w, vdw, ion = ELEMENT_DATA[el]
        rows.append([t, _f(w, 3), hb, _f(vdw, 2), _f(vdwh if vdwh else vdw, 2),
                     _f(ion, 2) if ion else ".", el, valency, sp if sp else "."])
    _loop(b, "_lib_atom.", ["type", "weight", "hb_type", "vdw_radius", "vdwh_radius", "ion_radius", "element",
                            "valency", "sp"], rows)
    return doc


def write_library(out: Path = DEFAULT_OUT) -> list[Path]:
    """Write all files of the built-in library under ``out``; returns the paths written."""
    mons = build_monomers()
    style = gemmi.cif.Style.Aligned
    paths = []
    for code, mon in mons.items():
        path = out / code[0].lower() / f"{code}.cif"
        path.parent.mkdir(parents=True, exist_ok=True)
        monomer_document(mon).write_file(str(path), style)
        paths.append(path)
    (out / "list").mkdir(parents=True, exist_ok=True)
    mon_lib_list_document(mons).write_file(str(out / "list" / "mon_lib_list.cif"), style)
    ener_lib_document().write_file(str(out / "ener_lib.cif"), style)
    paths += [out / "list" / "mon_lib_list.cif", out / "ener_lib.cif"]
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else DEFAULT_OUT
    for path in write_library(out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
