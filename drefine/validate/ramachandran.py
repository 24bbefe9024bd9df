"""Ramachandran validation against the Top500 reference tables (Lovell et al., 2003).

The tables are the ``rama500-*.data`` files distributed with Coot/MolProbity. Each holds, per
2° × 2° (φ, ψ) bin, a *percentile-like* value in [0, 1]: the fraction of the Top500 reference data
(B < 30) lying outside the density contour through that bin, i.e. 1 at the peak and 0 far outside.
MolProbity reports 100 × this value as "score %". Bins absent from a file are 0.

Cut-offs (Top500 era, as used by MolProbity 3 / chiropraxis and Coot with these tables):

* favoured: score ≥ 0.02 (inside the 98 % contour) for every category;
* allowed:  score ≥ 0.0005 for ``general`` (99.95 % contour) and ≥ 0.002 for ``gly``, ``pro``
  and ``prepro`` (99.8 % contour); anything lower is an outlier.

Sources: Lovell et al. (2003) Proteins 50:437 (98 % / 99.95 % / 99.8 % contours); constants
``ALL_FAVORED = 0.0200``, ``GENERAL_ALLOWED = 0.0005``, ``OTHER_ALLOWED = 0.0020`` in
``chiropraxis/rotarama/Ramachandran.java`` (rlabduke/javadev, Top500 version). The 0.001 value
for Gly/Pro/pre-Pro found in current ``mmtbx/validation/ramalyze.py`` (cctbx_project) belongs to
the later Top8000 tables (six categories) and is *not* used here; ``ALLOWED_CUTOFF`` can be
overridden per instance if needed.

All angles are in degrees.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_file

__all__ = [
    "ALLOWED_CUTOFF",
    "FAVORED_CUTOFF",
    "GENERAL",
    "GLY",
    "KIND_NAMES",
    "PREPRO",
    "PRO",
    "GridTable",
    "RamachandranTables",
    "dihedral_deg",
    "find_rama_data",
    "rama_kind",
]

GENERAL, GLY, PRO, PREPRO = 0, 1, 2, 3
KIND_NAMES: tuple[str, ...] = ("general", "gly", "pro", "prepro")
_KIND_ALIASES = {
    "general": GENERAL,
    "gly": GLY,
    "glycine": GLY,
    "pro": PRO,
    "proline": PRO,
    "prepro": PREPRO,
    "pre-pro": PREPRO,
    "pre-proline": PREPRO,
}
RAMA_FILES: dict[int, str] = {
    GENERAL: "rama500-general.data",
    GLY: "rama500-gly-sym.data",
    PRO: "rama500-pro.data",
    PREPRO: "rama500-prepro.data",
}
#: Favoured if score >= this (98 % contour), all categories.
FAVORED_CUTOFF = 0.02
#: Allowed if score >= this, per category (99.95 % general, 99.8 % Gly/Pro/pre-Pro); else outlier.
ALLOWED_CUTOFF: dict[int, float] = {GENERAL: 0.0005, GLY: 0.002, PRO: 0.002, PREPRO: 0.002}

_TABLE_MARKERS = ("rama500-*.data", "rota500-*.data")
_SNAP = 1e-9  # fractional-bin tolerance for snapping onto a bin centre (exact values there)


# --------------------------------------------------------------------------- locating the data


def _has_tables(d: Path) -> bool:
    return d.is_dir() and any(next(d.glob(m), None) is not None for m in _TABLE_MARKERS)


def find_rama_data(path: str | os.PathLike | None = None) -> Path | None:
    """Directory holding the ``rama500-*.data`` / ``rota500-*.data`` tables, or None.

    Order: ``path``; env ``DREFINE_RAMA_DATA``; ``$DREFINE_TEST_DATA/validation/rama-data``. When
    ``DREFINE_TEST_DATA`` is unset it defaults to ``../shared/data`` relative to the working directory,
    then relative to the repository root. The first source that is *given* decides (an explicit path
    or variable pointing nowhere gives None rather than silently using other data). None means the
    caller must report Ramachandran/rotamer statistics as "not computed".
    """
    if path is not None:
        p = Path(path).expanduser()
        return p.resolve() if _has_tables(p) else None
    env = os.environ.get("DREFINE_RAMA_DATA")
    if env:
        p = Path(env).expanduser()
        return p.resolve() if _has_tables(p) else None
    env = os.environ.get("DREFINE_TEST_DATA")
    if env:
        roots = [Path(env).expanduser()]
    else:
        import drefine

        roots = [
            Path.cwd() / ".." / "shared" / "data",
            Path(drefine.__file__).resolve().parents[1].parent / "shared" / "data",
        ]
    for root in roots:
        p = root / "validation" / "rama-data"
        if _has_tables(p):
            return p.resolve()
    return None


# --------------------------------------------------------------------------- generic N-D table


_DIMS_RE = re.compile(r"Number of dimensions:\s*(\d+)")
_AXIS_RE = re.compile(r"^#\s*x(\d+):\s*(\S+)\s+(\S+)\s+(\d+)\s+(true|false)\s*$", re.IGNORECASE)
_NAME_RE = re.compile(r'description:\s*"(.*)"')


_TABLE_CACHE: dict[tuple, GridTable] = {}
_CACHE_FORMAT = 1  # bump when GridTable's stored arrays change meaning


def table_cache_dir() -> Path | None:
    """Where parsed validation tables are kept: $DREFINE_CACHE, else $XDG_CACHE_HOME/drefine,
    else ~/.cache/drefine; `DREFINE_CACHE=off` (or none, 0) turns the disk cache off."""
    env = os.environ.get("DREFINE_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "none", "0") else Path(env).expanduser() / "tables"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "drefine" / "tables"


@dataclass(frozen=True)
class GridTable:
    """Regular N-D table (NDFloatTable text format) with periodic multilinear interpolation.

    ``values`` has shape ``nbins``; bin i of dimension d is centred at ``lower + (i + 0.5) * width``.
    Coordinates are in the table's own units (degrees here).
    """

    name: str
    lower: np.ndarray
    upper: np.ndarray
    nbins: np.ndarray
    wrap: np.ndarray
    values: np.ndarray

    @property
    def ndim(self) -> int:
        return int(self.nbins.size)

    @property
    def width(self) -> np.ndarray:
        return (self.upper - self.lower) / self.nbins

    def centres(self, dim: int) -> np.ndarray:
        """Bin centres along one dimension."""
        return self.lower[dim] + (np.arange(self.nbins[dim]) + 0.5) * self.width[dim]

    @classmethod
    def read(cls, path: str | os.PathLike) -> GridTable:
        """Parse a ``.data`` file: ``#`` header (dimensions, bounds, bins, wrapping), then rows
        ``x1 [x2 ...] value`` at bin centres. Missing bins are 0. A file already read (same
        path, size and modification time) is not parsed again: validation and Ramachandran
        restraints read the same tables for every model of a batch (~0.3 s each time)."""
        path = Path(path)
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _TABLE_CACHE:
            _TABLE_CACHE[key] = cls._from_disk_cache(path, key)
        return _TABLE_CACHE[key]

    @classmethod
    def _from_disk_cache(cls, path: Path, key: tuple) -> GridTable:
        """The parsed table from the user's cache (`table_cache_dir`), parsing and storing it when
        absent or stale: the 6 MB of text tables take ~0.25 s to parse, every command run pays
        it otherwise; the binary copy loads in a few ms. The key (path, size, modification
        time, format version) names the file, so an edited table is parsed again. Without a
        writable cache directory the table is parsed each time."""
        directory = table_cache_dir()
        if directory is None:
            return cls._parse(path)
        digest = hashlib.sha256(repr((_CACHE_FORMAT, *key)).encode()).hexdigest()[:20]
        cached = directory / f"{path.stem}-{digest}.npz"
        try:
            with np.load(cached, allow_pickle=False) as z:
                table = cls(str(z["name"]), z["lower"], z["upper"], z["nbins"], z["wrap"], z["values"])
            for a in (table.lower, table.upper, table.nbins, table.wrap, table.values):
                a.flags.writeable = False
            return table
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
            pass  # absent, or unreadable: parse it again
        table = cls._parse(path)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with atomic_file(cached) as fh:
                np.savez(fh, name=np.array(table.name), lower=table.lower, upper=table.upper,
                         nbins=table.nbins, wrap=table.wrap, values=table.values)
        except OSError:
            pass  # a read-only home: the parsed table still serves this process
        return table

    @classmethod
    def _parse(cls, path: Path) -> GridTable:
        ndim, name, axes = None, path.stem, {}
        with open(path) as fh:
            for line in fh:
                if not line.startswith("#"):
                    break
                if m := _NAME_RE.search(line):
                    name = m.group(1)
                elif m := _DIMS_RE.search(line):
                    ndim = int(m.group(1))
                elif m := _AXIS_RE.match(line.strip()):
                    axes[int(m.group(1))] = (
                        float(m.group(2)),
                        float(m.group(3)),
                        int(m.group(4)),
                        m.group(5).lower() == "true",
                    )
        if ndim is None or sorted(axes) != list(range(1, ndim + 1)):
            raise ValueError(f"{path}: malformed table header")
        lower, upper, nbins, wrap = (np.array([axes[d][k] for d in range(1, ndim + 1)]) for k in range(4))
        nbins, wrap = nbins.astype(np.int64), wrap.astype(bool)
        data = np.loadtxt(path, comments="#", ndmin=2)
        if data.shape[1] != ndim + 1:
            raise ValueError(f"{path}: expected {ndim + 1} columns, found {data.shape[1]}")
        width = (upper - lower) / nbins
        u = (data[:, :ndim] - lower) / width - 0.5
        idx = np.rint(u).astype(np.int64)
        if np.any(np.abs(u - idx) > 1e-3) or np.any(idx < 0) or np.any(idx >= nbins):
            raise ValueError(f"{path}: coordinates are not bin centres of the declared grid")
        flat = np.ravel_multi_index(tuple(idx.T), tuple(nbins))
        if np.unique(flat).size != flat.size:
            raise ValueError(f"{path}: duplicate bins")
        values = np.zeros(int(np.prod(nbins)))
        values[flat] = data[:, ndim]
        values = values.reshape(tuple(nbins))
        for a in (lower, upper, nbins, wrap, values):  # one parsed table serves every caller (read's cache)
            a.flags.writeable = False
        return cls(name, lower, upper, nbins, wrap, values)

    def interpolate(self, points: np.ndarray) -> np.ndarray:
        """Multilinear interpolation between bin centres, periodic on wrapped dimensions (clamped
        otherwise, as NDFloatTable does). ``points`` has shape (n, ndim); NaN rows give NaN.
        At a bin centre the stored value is returned exactly."""
        pts = np.atleast_2d(np.asarray(points, dtype=float))
        if pts.shape[-1] != self.ndim:
            raise ValueError(f"expected points with {self.ndim} coordinates, got shape {pts.shape}")
        bad = ~np.all(np.isfinite(pts), axis=1)
        u = (np.where(bad[:, None], self.lower, pts) - self.lower) / self.width - 0.5
        near = np.rint(u)
        u = np.where(np.abs(u - near) < _SNAP, near, u)
        i0 = np.floor(u).astype(np.int64)
        frac = u - i0
        out = np.zeros(len(pts))
        for corner in range(1 << self.ndim):
            weight = np.ones(len(pts))
            index = []
            for d in range(self.ndim):
                hi = (corner >> d) & 1
                weight = weight * (frac[:, d] if hi else 1.0 - frac[:, d])
                i = i0[:, d] + hi
                n = self.nbins[d]
                index.append(np.mod(i, n) if self.wrap[d] else np.clip(i, 0, n - 1))
            out += weight * self.values[tuple(index)]
        out[bad] = np.nan
        return out


# --------------------------------------------------------------------------- geometry helpers


def dihedral_deg(p0, p1, p2, p3) -> np.ndarray:
    """Dihedral angle p0-p1-p2-p3 in degrees, (-180, 180], IUPAC sign convention.

    Vectorised: each argument is (3,) or (n, 3); the result has shape () or (n,). Collinear
    p0-p1-p2 or p1-p2-p3 gives 0 (undefined); coincident p1, p2 or NaN coordinates give NaN.
    """
    p0, p1, p2, p3 = (np.asarray(p, dtype=float) for p in (p0, p1, p2, p3))
    b0 = p0 - p1
    b1 = p2 - p1
    b2 = p3 - p2
    with np.errstate(invalid="ignore", divide="ignore"):
        b1n = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - np.sum(b0 * b1n, axis=-1, keepdims=True) * b1n
    w = b2 - np.sum(b2 * b1n, axis=-1, keepdims=True) * b1n
    x = np.sum(v * w, axis=-1)
    y = np.sum(np.cross(b1n, v) * w, axis=-1)
    return np.degrees(np.arctan2(y, x))


def rama_kind(resname: str, next_resname: str | None = None) -> str:
    """Top500 category of a residue: GLY → 'gly', PRO → 'pro', residue before PRO → 'prepro',
    else 'general'. ``next_resname`` is the peptide-linked following residue (None if none)."""
    r = resname.strip().upper()
    if r == "GLY":
        return "gly"
    if r == "PRO":
        return "pro"
    if next_resname is not None and next_resname.strip().upper() == "PRO":
        return "prepro"
    return "general"


def _kind_codes(kind) -> np.ndarray:
    """Category names or integer codes → integer code array."""
    arr = np.asarray(kind)
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.int64)
    if arr.dtype.kind in "iu":
        codes = arr.astype(np.int64)
    elif arr.dtype.kind in "UO":
        flat = [_KIND_ALIASES.get(str(k).strip().lower(), -1) for k in arr.ravel()]
        codes = np.asarray(flat, dtype=np.int64).reshape(arr.shape)
    else:
        raise TypeError(f"kind must be category names or integer codes, not {arr.dtype}")
    if np.any((codes < 0) | (codes > PREPRO)):
        raise ValueError(f"unknown Ramachandran category in {kind!r}; use {KIND_NAMES}")
    return codes


# --------------------------------------------------------------------------- Ramachandran tables


class RamachandranTables:
    """The four Top500 (φ, ψ) tables and MolProbity's favoured/allowed/outlier classification."""

    def __init__(self, tables: dict[int, GridTable]):
        missing = [KIND_NAMES[k] for k in RAMA_FILES if k not in tables]
        if missing:
            raise ValueError(f"missing Ramachandran tables: {missing}")
        self.tables = tables
        self.favored_cutoff = FAVORED_CUTOFF
        self.allowed_cutoff = dict(ALLOWED_CUTOFF)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RamachandranTables:
        """Read ``rama500-{general,gly-sym,pro,prepro}.data`` from ``directory``."""
        d = Path(directory)
        return cls({k: GridTable.read(d / f) for k, f in RAMA_FILES.items()})

    def score(self, phi_deg, psi_deg, kind="general") -> np.ndarray:
        """Interpolated table value in [0, 1] for each residue (broadcast over φ, ψ, kind).

        ``kind``: a name ('general', 'gly', 'pro', 'prepro'), an integer code, or an array of
        either. Angles in degrees, any range (wrapped). NaN angles give NaN."""
        phi, psi, codes = np.broadcast_arrays(
            np.asarray(phi_deg, float), np.asarray(psi_deg, float), _kind_codes(kind)
        )
        shape = phi.shape
        phi, psi, codes = phi.ravel(), psi.ravel(), codes.ravel()
        out = np.full(phi.size, np.nan)
        for k in np.unique(codes):
            sel = codes == k
            out[sel] = self.tables[int(k)].interpolate(np.stack([phi[sel], psi[sel]], axis=1))
        return out.reshape(shape)

    def classify_scores(self, scores, kind="general") -> np.ndarray | str:
        """'favored' / 'allowed' / 'outlier' for precomputed scores; NaN → 'not computed'.
        Object array, or a plain str for scalar input."""
        s, codes = np.broadcast_arrays(np.asarray(scores, float), _kind_codes(kind))
        allowed = np.asarray([self.allowed_cutoff[k] for k in range(len(KIND_NAMES))])[codes]
        out = np.full(s.shape, "outlier", dtype=object)
        out[s >= allowed] = "allowed"
        out[s >= self.favored_cutoff] = "favored"
        out[np.isnan(s)] = "not computed"
        return str(out[()]) if out.ndim == 0 else out

    def classify(self, phi_deg, psi_deg, kind="general") -> np.ndarray | str:
        """'favored' / 'allowed' / 'outlier' per residue (object array, str for scalar input;
        'not computed' for NaN angles)."""
        codes = _kind_codes(kind)
        return self.classify_scores(self.score(phi_deg, psi_deg, codes), codes)

    @staticmethod
    def kinds(resnames: Sequence[str], next_resnames: Sequence[str | None]) -> np.ndarray:
        """Integer category codes for sequences of residue names (see :func:`rama_kind`)."""
        return _kind_codes([rama_kind(r, n) for r, n in zip(resnames, next_resnames, strict=True)])
