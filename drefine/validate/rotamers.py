"""Side-chain rotamer validation against the Top500 tables (Lovell et al., 2000).

The ``rota500-<res>.data`` files (distributed with Coot/MolProbity; B < 40 data) are 1–3
dimensional χ tables on 0–360° axes (0–180° for the symmetric last χ of ASP, GLU, PHE/TYR),
holding a percentile-like value in [0, 1] (1 at the most common conformation, 0 where never seen).
PHE and TYR share ``rota500-phetyr.data``; MSE uses the MET table (as MolProbity does); PRO is
scored on χ1 only. The Top500 set has **no ARG or LYS tables** (and ALA/GLY have no χ): such
residues are reported as "not computed" (score NaN), never guessed.

Outlier cut-off: score < 0.01 (1 %), the Top500-era MolProbity definition — ``Rotalyze.java``
(``if(eval >= 0.01) rotname = identify(...)`` else ``"OUTLIER"``) and ``Rotamer.identify`` in
``chiropraxis/rotarama`` (rlabduke/javadev); Lovell et al. (2000) Proteins 40:389. (The 0.3 %
threshold of current ``mmtbx/validation/rotalyze.py`` applies to the later Top8000 tables.)

All angles are in degrees.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from drefine.validate.ramachandran import GridTable

__all__ = [
    "CHI_ATOMS",
    "CHI_RANGES",
    "ROTAMER_OUTLIER_CUTOFF",
    "TABLE_FILES",
    "RotamerTables",
]

#: Rotamer outlier if score < this (1 %), Top500 MolProbity.
ROTAMER_OUTLIER_CUTOFF = 0.01

_CHI1 = ("N", "CA", "CB", "CG")
#: Standard χ definitions (IUPAC-IUB 1970): atom-name quadruples per χ, in order.
CHI_ATOMS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "ARG": (_CHI1, ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "NE"), ("CG", "CD", "NE", "CZ")),
    "ASN": (_CHI1, ("CA", "CB", "CG", "OD1")),
    "ASP": (_CHI1, ("CA", "CB", "CG", "OD1")),
    "CYS": (("N", "CA", "CB", "SG"),),
    "GLN": (_CHI1, ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "OE1")),
    "GLU": (_CHI1, ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "OE1")),
    "HIS": (_CHI1, ("CA", "CB", "CG", "ND1")),
    "ILE": (("N", "CA", "CB", "CG1"), ("CA", "CB", "CG1", "CD1")),
    "LEU": (_CHI1, ("CA", "CB", "CG", "CD1")),
    "LYS": (_CHI1, ("CA", "CB", "CG", "CD"), ("CB", "CG", "CD", "CE"), ("CG", "CD", "CE", "NZ")),
    "MET": (_CHI1, ("CA", "CB", "CG", "SD"), ("CB", "CG", "SD", "CE")),
    "MSE": (_CHI1, ("CA", "CB", "CG", "SE"), ("CB", "CG", "SE", "CE")),
    "PHE": (_CHI1, ("CA", "CB", "CG", "CD1")),
    "PRO": (_CHI1, ("CA", "CB", "CG", "CD")),
    "SER": (("N", "CA", "CB", "OG"),),
    "THR": (("N", "CA", "CB", "OG1"),),
    "TRP": (_CHI1, ("CA", "CB", "CG", "CD1")),
    "TYR": (_CHI1, ("CA", "CB", "CG", "CD1")),
    "VAL": (("N", "CA", "CB", "CG1"),),
}

#: Range each χ is wrapped into before lookup: [0, 360), except the last χ of the residues whose
#: terminal group is symmetric under 180° flips (ASP OD1/OD2, GLU OE1/OE2, PHE/TYR ring), which is
#: taken modulo 180 into [0, 180) as MolProbity does.
CHI_RANGES: dict[str, tuple[tuple[float, float], ...]] = {
    res: tuple(
        (0.0, 180.0) if (res in ("ASP", "GLU", "PHE", "TYR") and i == len(chis) - 1) else (0.0, 360.0)
        for i in range(len(chis))
    )
    for res, chis in CHI_ATOMS.items()
}

#: Residue name → table file stem (``rota500-<stem>.data``). ARG and LYS have no Top500 table.
TABLE_FILES: dict[str, str] = {
    "ASN": "asn",
    "ASP": "asp",
    "CYS": "cys",
    "GLN": "gln",
    "GLU": "glu",
    "HIS": "his",
    "ILE": "ile",
    "LEU": "leu",
    "MET": "met",
    "MSE": "met",
    "PHE": "phetyr",
    "TYR": "phetyr",
    "PRO": "pro",
    "SER": "ser",
    "THR": "thr",
    "TRP": "trp",
    "VAL": "val",
    "ARG": "arg",
    "LYS": "lys",
}


class RotamerTables:
    """Top500 rotamer tables keyed by residue name, with periodic multilinear interpolation."""

    def __init__(self, tables: dict[str, GridTable]):
        self.tables = {k.upper(): t for k, t in tables.items()}
        self.outlier_cutoff = ROTAMER_OUTLIER_CUTOFF
        for res, t in self.tables.items():
            ranges = CHI_RANGES[res][: t.ndim]
            if len(ranges) < t.ndim or any(
                (t.lower[d], t.upper[d]) != ranges[d] or not t.wrap[d] for d in range(t.ndim)
            ):
                raise ValueError(f"{res} rotamer table axes do not match CHI_RANGES {CHI_RANGES[res]}")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RotamerTables:
        """Read every ``rota500-<stem>.data`` present in ``directory``; absent ones (ARG, LYS in
        the Top500 set) are simply not available (see :attr:`missing`)."""
        d = Path(directory)
        cache: dict[str, GridTable] = {}
        tables = {}
        for res, stem in TABLE_FILES.items():
            f = d / f"rota500-{stem}.data"
            if stem not in cache and f.is_file():
                cache[stem] = GridTable.read(f)
            if stem in cache:
                tables[res] = cache[stem]
        return cls(tables)

    @property
    def available(self) -> tuple[str, ...]:
        """Residue names that can be scored."""
        return tuple(sorted(self.tables))

    @property
    def missing(self) -> tuple[str, ...]:
        """Residues with side-chain χ but no table (reported as 'not computed')."""
        return tuple(sorted(set(CHI_ATOMS) - set(self.tables)))

    def has_table(self, resname: str) -> bool:
        return resname.strip().upper() in self.tables

    def n_chi(self, resname: str) -> int:
        """Number of χ the table uses (0 if no table)."""
        t = self.tables.get(resname.strip().upper())
        return 0 if t is None else t.ndim

    def wrap_chis(self, resname: str, chis_deg) -> np.ndarray:
        """χ wrapped into the table ranges (0–360, or 0–180 for the symmetric last χ)."""
        res = resname.strip().upper()
        chis = np.asarray(chis_deg, dtype=float)
        period = np.array([hi - lo for lo, hi in CHI_RANGES[res]])[: chis.shape[-1]]
        lower = np.array([lo for lo, _ in CHI_RANGES[res]])[: chis.shape[-1]]
        return lower + np.mod(chis - lower, period)

    def score(self, resname: str, chis_deg):
        """Table value in [0, 1] for one residue (``chis_deg`` shape (k,)) → float, or for many
        residues of the same type (shape (n, k)) → array (n,). Extra χ beyond the table's
        dimensionality are ignored (e.g. PRO uses χ1 only); NaN χ or no table → NaN."""
        res = resname.strip().upper()
        chis = np.asarray(chis_deg, dtype=float)
        single = chis.ndim <= 1
        chis = np.atleast_2d(chis)
        t = self.tables.get(res)
        if t is None:
            out = np.full(len(chis), np.nan)
        else:
            if chis.shape[1] < t.ndim:
                raise ValueError(f"{res} needs {t.ndim} chi angles, got {chis.shape[1]}")
            out = t.interpolate(self.wrap_chis(res, chis[:, : t.ndim]))
        return float(out[0]) if single else out

    def is_outlier(self, score):
        """Score < 0.01 (1 %); NaN ('not computed') is never an outlier."""
        s = np.asarray(score, dtype=float)
        out = np.nan_to_num(s, nan=np.inf) < self.outlier_cutoff
        return bool(out) if out.ndim == 0 else out

    def classify(self, score) -> str | np.ndarray:
        """'outlier' / 'ok' / 'not computed' for score(s)."""
        s = np.asarray(score, dtype=float)
        out = np.where(np.isnan(s), "not computed", np.where(s < self.outlier_cutoff, "outlier", "ok"))
        return str(out) if out.ndim == 0 else out.astype(object)
