"""Density maps: CCP4/MRC and zarr input/output, geometry, resampling, blurring and masks.

A `DensityMap` is a 3-D array of values on a regular grid of the unit cell (for cryo-EM: the
box) plus the numbers that place the grid in space:

* ``data[u, v, w]`` is indexed along the cell axes a, b, c (gemmi's grid order), whatever the
  axis order of the file it came from (MAPC/MAPR/MAPS are undone on reading);
* ``sampling`` (MX, MY, MZ) is the number of grid intervals along a full cell edge, so grid
  index i along a lies at fractional coordinate i / MX;
* ``start`` is the grid index of ``data[0, 0, 0]`` (NCSTART/NRSTART/NSSTART taken into a, b, c
  order), so ``data[i, j, k]`` lies at fractional ((start + (i, j, k)) / sampling);
* ``origin`` (Å, MRC2014 ORIGIN, header words 50–52) is a Cartesian shift added to every grid
  position: ``xyz = O · frac + origin`` with O the orthogonalisation matrix of ``cell``.

Files that set both a non-zero start and a non-zero ORIGIN are rare and programs disagree on
them (ChimeraX uses ORIGIN alone); drefine adds the two, which is exact whenever either is zero
(X-ray maps: ORIGIN 0; EMDB maps: start 0 or ORIGIN 0).

"index" in this module always means a position in ``data`` (``data[0, 0, 0]`` is index 0); the
absolute grid index is ``index + start``.
"""
from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import gemmi
import numpy as np
from numba import njit

from ..errors import InputError
from .atomic import atomic_dir, atomic_file, atomic_path

#: CCP4/MRC modes drefine reads: mode → numpy dtype (byte order added per file).
MRC_MODES = {0: "i1", 1: "i2", 2: "f4", 6: "u2", 12: "f2"}
HEADER_BYTES = 1024
ZARR_SUFFIXES = (".zarr",)
_ZARR_TAG = "drefine_density_map"


def _p1() -> gemmi.SpaceGroup:
    return gemmi.SpaceGroup("P 1")


@dataclass
class DensityMap:
    """Map values on a grid of a unit cell (or cryo-EM box), with the geometry placing it in space.

    Units: ``cell`` lengths in Å, angles in degrees; ``origin`` in Å; ``data`` in the file's units
    (e/Å³, σ or arbitrary for cryo-EM). See the module docstring for the index conventions.
    """

    data: np.ndarray  # (nu, nv, nw) along a, b, c; numpy, or a dask array for chunked maps
    cell: gemmi.UnitCell  # the cell the grid samples (cryo-EM: the box)
    sampling: np.ndarray  # (3,) int, grid intervals along a full cell edge (MX, MY, MZ)
    start: np.ndarray  # (3,) int, absolute grid index of data[0, 0, 0] (a, b, c order)
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))  # (3,) float, Å
    spacegroup: gemmi.SpaceGroup | None = field(default_factory=_p1)
    source: str = ""

    def __post_init__(self):
        if getattr(self.data, "ndim", None) != 3:
            raise ValueError(f"map data must be 3-D, got shape {getattr(self.data, 'shape', None)}")
        self.sampling = np.asarray(self.sampling, dtype=np.int64).reshape(3)
        self.start = np.asarray(self.start, dtype=np.int64).reshape(3)
        self.origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        if (self.sampling <= 0).any():
            raise ValueError(f"map sampling must be positive, got {self.sampling.tolist()}")

    # ---- shape and kind -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)

    @property
    def is_chunked(self) -> bool:
        """True when ``data`` is a dask array (values are read chunk by chunk on demand)."""
        return not isinstance(self.data, np.ndarray)

    @property
    def is_full_cell(self) -> bool:
        """The data cover exactly one full cell (shape == sampling): values are periodic."""
        return tuple(self.shape) == tuple(int(s) for s in self.sampling)

    # ---- geometry -------------------------------------------------------------------------
    @property
    def frac_matrix(self) -> np.ndarray:
        """F (3×3): fractional = F · Cartesian (Å⁻¹)."""
        return np.array(self.cell.frac.mat.tolist(), dtype=np.float64)

    @property
    def orth_matrix(self) -> np.ndarray:
        """O (3×3): Cartesian (Å) = O · fractional."""
        return np.array(self.cell.orth.mat.tolist(), dtype=np.float64)

    @property
    def index_matrix(self) -> np.ndarray:
        """M = diag(sampling) · F (3×3, grid intervals per Å): index = M · (xyz − origin) − start."""
        return self.sampling[:, None] * self.frac_matrix

    @property
    def voxel_size(self) -> np.ndarray:
        """Grid step along a, b, c in Å (cell edge / sampling)."""
        return np.array([self.cell.a, self.cell.b, self.cell.c]) / self.sampling

    def frac_of_index(self, index) -> np.ndarray:
        """Fractional coordinates (N, 3) of data indices (N, 3), integer or not."""
        idx = np.asarray(index, dtype=np.float64).reshape(-1, 3)
        return (idx + self.start) / self.sampling

    def xyz_of_index(self, index) -> np.ndarray:
        """Cartesian positions (N, 3) in Å of data indices (N, 3), ORIGIN included."""
        return self.frac_of_index(index) @ self.orth_matrix.T + self.origin

    def index_of_xyz(self, xyz) -> np.ndarray:
        """Fractional grid coordinates (N, 3) float, in data index units, of Cartesian xyz (Å).

        (0, 0, 0) is data[0, 0, 0]; an integer result is a grid point. Not wrapped into the cell.
        """
        p = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
        return (p - self.origin) @ self.index_matrix.T - self.start

    def covers(self, xyz, periodic: bool = False) -> float:
        """Fraction of the positions xyz (N, 3, Å) inside the map's box, for messages and reports.

        Inside means within the grid points' hull, [0, n−1] in every index (give or take 1e-6
        of round-off), whether or not the map is a full cell: for a cryo-EM map this is the
        question that matters. periodic=True asks instead what interpolation sees: a full cell
        then covers every position (atoms wrap).
        """
        p = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
        if len(p) == 0:
            return 1.0
        if periodic and self.is_full_cell:
            return 1.0
        g = self.index_of_xyz(p)
        hi = np.asarray(self.shape, dtype=np.float64) - 1.0
        inside = ((g >= -1e-6) & (g <= hi + 1e-6)).all(axis=1)  # round-off on the faces is inside
        return float(inside.mean())

    # ---- conversions ----------------------------------------------------------------------
    def load(self) -> DensityMap:
        """This map with ``data`` as an in-memory numpy array (computing a dask array)."""
        if not self.is_chunked:
            return self
        return replace(self, data=np.asarray(self.data.compute()))

    def with_data(self, data) -> DensityMap:
        """A map with the same geometry and new values (same shape)."""
        if tuple(data.shape) != self.shape:
            raise ValueError(f"new data shape {tuple(data.shape)} differs from the map's {self.shape}")
        return replace(self, data=data)

    def copy(self) -> DensityMap:
        data = self.data.copy() if not self.is_chunked else self.data
        return DensityMap(data, gemmi.UnitCell(*self.cell.parameters), self.sampling.copy(), self.start.copy(),
                          self.origin.copy(), self.spacegroup, self.source)


# ============================================================================================
# CCP4 / MRC header
# ============================================================================================
@dataclass
class _MrcHeader:
    """What drefine takes from a CCP4/MRC header (1-based word numbers in comments)."""

    path: Path
    byteorder: str  # "<" or ">"
    nxyz_file: np.ndarray  # words 1-3: NC, NR, NS (file order: columns, rows, sections)
    mode: int  # word 4
    start_file: np.ndarray  # words 5-7: NCSTART, NRSTART, NSSTART
    sampling: np.ndarray  # words 8-10: MX, MY, MZ (x, y, z order)
    cell: tuple  # words 11-16
    axes: np.ndarray  # words 17-19 minus 1: the cell axis (0=a/x) of columns, rows, sections
    ispg: int  # word 23
    nsymbt: int  # word 24, bytes of extended header
    origin: np.ndarray  # words 50-52, Å

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.byteorder + MRC_MODES[self.mode])

    @property
    def data_offset(self) -> int:
        return HEADER_BYTES + self.nsymbt

    @property
    def n_values(self) -> int:
        return int(np.prod(self.nxyz_file))

    @property
    def perm(self) -> np.ndarray:
        """Axes of the file-order array [c, r, s] to take for a, b, c: data = file.transpose(perm)."""
        return np.argsort(self.axes)

    @property
    def shape_abc(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.nxyz_file[self.perm])

    @property
    def start_abc(self) -> np.ndarray:
        return self.start_file[self.perm]

    def spacegroup(self) -> gemmi.SpaceGroup:
        sg = gemmi.find_spacegroup_by_number(self.ispg) if 1 <= self.ispg <= 230 else None
        return sg or _p1()


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_mrc_header(path: Path, check_size: bool = True) -> _MrcHeader:
    """Parse and check the 1024-byte header; one-line InputError for anything that is not a map."""
    try:
        with _open_bytes(path) as fh:
            raw = fh.read(HEADER_BYTES)
    except (OSError, EOFError) as e:
        raise InputError(f"cannot read map file {path}: {e}") from None
    if len(raw) < HEADER_BYTES:
        raise InputError(f"{path} is not a CCP4/MRC map: {len(raw)} bytes, shorter than the 1024-byte header")
    if raw[208:212] != b"MAP ":
        raise InputError(f"{path} is not a CCP4/MRC map: no 'MAP ' stamp at header word 53")
    stamp = raw[212]
    order = ">" if stamp == 0x11 else "<"
    words = np.frombuffer(raw, dtype=order + "i4")
    if stamp not in (0x11, 0x44, 0x41) and not (0 <= words[3] <= 16 and 1 <= words[16] <= 3):
        # No usable machine stamp (old files): take the byte order whose mode and MAPC make sense.
        order = ">" if order == "<" else "<"
        words = np.frombuffer(raw, dtype=order + "i4")
    floats = np.frombuffer(raw, dtype=order + "f4")
    nxyz = words[0:3].astype(np.int64)
    mode = int(words[3])
    if (nxyz <= 0).any():
        raise InputError(f"{path} is a zero-size map (NC×NR×NS = {nxyz[0]}×{nxyz[1]}×{nxyz[2]} in the header)")
    if mode not in MRC_MODES:
        raise InputError(f"{path}: unsupported CCP4/MRC data mode {mode} (readable modes: "
                         f"{', '.join(str(m) for m in MRC_MODES)})")
    axes = words[16:19].astype(np.int64) - 1
    if sorted(axes.tolist()) != [0, 1, 2]:
        raise InputError(f"{path}: MAPC/MAPR/MAPS = {(axes + 1).tolist()} is not a permutation of 1, 2, 3")
    nsymbt = int(words[23])
    if nsymbt < 0:
        raise InputError(f"{path}: negative extended-header size NSYMBT = {nsymbt}")
    sampling = words[7:10].astype(np.int64)
    if (sampling <= 0).any():  # some writers leave MX/MY/MZ at 0: the box is the cell
        sampling = nxyz[np.argsort(axes)]
    cell = tuple(float(x) for x in floats[10:16])
    if min(cell[:3]) <= 0 or not all(math.isfinite(x) for x in cell):
        raise InputError(f"{path}: the header's cell {cell[:3]} has non-positive or non-finite edges")
    if min(cell[3:]) <= 0:
        cell = cell[:3] + (90.0, 90.0, 90.0)
    origin = floats[49:52].astype(np.float64)
    if not np.isfinite(origin).all():
        raise InputError(f"{path}: non-finite ORIGIN {origin.tolist()} in the header")
    h = _MrcHeader(path=path, byteorder=order, nxyz_file=nxyz, mode=mode, start_file=words[4:7].astype(np.int64),
                   sampling=sampling, cell=cell, axes=axes, ispg=int(words[22]), nsymbt=nsymbt, origin=origin)
    if check_size and path.suffix != ".gz":
        expected = h.data_offset + h.n_values * h.dtype.itemsize
        size = os.path.getsize(path)
        if size != expected:
            what = "truncated" if size < expected else "longer than its header says"
            raise InputError(f"{path} is not a valid CCP4/MRC map ({what}): {size} bytes, but the header "
                             f"describes {nxyz[0]}×{nxyz[1]}×{nxyz[2]} values of mode {mode} = {expected} bytes")
    return h


def _check_finite(path, data, what: str = "map") -> None:
    n_nan = int(np.count_nonzero(np.isnan(data)))
    if n_nan:
        raise InputError(f"{path}: the {what} contains {n_nan} NaN value{'s' if n_nan > 1 else ''}")


def _check_path(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"map file not found: {p}")
    return p


def read_map(path: str | os.PathLike) -> DensityMap:
    """Read a CCP4/MRC map (optionally .gz) or a zarr store written by `write_zarr`.

    CCP4/MRC: axis order (MAPC/MAPR/MAPS), start (NC/NR/NSSTART) and ORIGIN (words 50–52) are
    honoured; ``data`` is a float32 numpy array indexed [u, v, w] along a, b, c. A zarr store
    gives a chunked map (``data`` a dask array). Raises InputError with one line for a missing
    file, a file that is not a map, a zero-size map or NaN values.
    """
    p = _check_path(path)
    if p.is_dir() or p.name.lower().endswith(ZARR_SUFFIXES):
        return read_zarr(p)
    h = _read_mrc_header(p)
    try:
        ccp4 = gemmi.read_ccp4_map(str(p), setup=False)
    except (RuntimeError, ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{p} is not a readable CCP4/MRC map: {msg}") from None
    grid = ccp4.grid
    file_arr = np.asarray(grid.array)  # [c, r, s] in file order (gemmi reads without reordering)
    if tuple(file_arr.shape) != tuple(int(n) for n in h.nxyz_file):
        raise InputError(f"{p}: gemmi read a {file_arr.shape} grid but the header says {h.nxyz_file.tolist()}")
    data = np.ascontiguousarray(file_arr.transpose(h.perm), dtype=np.float32)
    _check_finite(p, data)
    return DensityMap(data=data, cell=gemmi.UnitCell(*h.cell), sampling=h.sampling, start=h.start_abc,
                      origin=h.origin, spacegroup=h.spacegroup(), source=str(p))


# ============================================================================================
# Writing
# ============================================================================================
def _slab_size(plane_values: int, target_values: int = 1 << 24) -> int:
    return max(1, target_values // max(1, plane_values))


def _map_stats(data) -> tuple[float, float, float, float]:
    """min, max, mean, rms deviation of the data (one pass over a dask array)."""
    if isinstance(data, np.ndarray):
        d = data.astype(np.float64, copy=False)
        return float(d.min()), float(d.max()), float(d.mean()), float(d.std())
    import dask

    mn, mx, me, sd = dask.compute(data.min(), data.max(), data.mean(dtype=np.float64), data.std(dtype=np.float64))
    return float(mn), float(mx), float(me), float(sd)


def _mrc_header_bytes(m: DensityMap, label: str) -> bytes:
    i32 = np.zeros(256, dtype="<i4")
    f32 = i32.view("<f4")
    i32[0:3] = m.shape  # NC, NR, NS with MAPC/MAPR/MAPS = 1, 2, 3
    i32[3] = 2  # float32
    i32[4:7] = m.start
    i32[7:10] = m.sampling
    f32[10:16] = m.cell.parameters
    i32[16:19] = (1, 2, 3)
    dmin, dmax, dmean, rms = _map_stats(m.data)
    f32[19:22] = (dmin, dmax, dmean)
    i32[22] = m.spacegroup.number if m.spacegroup is not None else 1
    i32[23] = 0  # no extended header
    i32[27] = 20140  # NVERSION: MRC2014
    f32[49:52] = m.origin
    raw = bytearray(i32.tobytes())
    raw[208:212] = b"MAP "
    raw[212:216] = bytes((0x44, 0x44, 0, 0))  # little-endian machine stamp
    raw[216:220] = np.float32(rms).tobytes()
    raw[220:224] = np.int32(1).tobytes()  # NLABL
    raw[224:304] = label.encode("ascii", "replace")[:80].ljust(80)
    return bytes(raw)


def write_map(dmap: DensityMap, path: str | os.PathLike, label: str = "drefine") -> Path:
    """Write a CCP4/MRC (MRC2014, mode 2 float32, MAPC/MAPR/MAPS = 1 2 3) map atomically.

    NSTART, MX/MY/MZ, the cell and ORIGIN are written so that `read_map` gives back the same
    data, start, sampling, origin and cell (cell and origin are float32 in the header; data are
    written as float32). Dask data are written slab by slab without loading the whole map.
    """
    p = Path(path)
    m = dmap
    nu, nv, nw = m.shape
    if min(m.shape) <= 0:
        raise ValueError(f"cannot write a zero-size map {m.shape}")
    header = _mrc_header_bytes(m, label)
    step = _slab_size(nu * nv)
    with atomic_file(p) as fh:
        fh.write(header)
        for w0 in range(0, nw, step):
            slab = m.data[:, :, w0:w0 + step]
            if not isinstance(slab, np.ndarray):
                slab = slab.compute()
            # file order: columns (u) fastest, then rows (v), then sections (w)
            fh.write(np.ascontiguousarray(np.asarray(slab).transpose(2, 1, 0), dtype="<f4").tobytes())
    return p


# ============================================================================================
# zarr
# ============================================================================================
def _zarr_attributes(m: DensityMap) -> dict:
    return {
        _ZARR_TAG: 1,
        "axis_order": "data[u, v, w] along cell axes a, b, c",
        "cell": [float(x) for x in m.cell.parameters],
        "sampling": [int(x) for x in m.sampling],
        "start": [int(x) for x in m.start],
        "origin": [float(x) for x in m.origin],
        "spacegroup": m.spacegroup.hm if m.spacegroup is not None else "P 1",
        "units": {"cell": "Å, degrees", "origin": "Å"},
        "source": m.source,
    }


def _create_zarr_array(path: Path, shape, chunks, dtype, attributes):
    import zarr

    chunks = tuple(int(min(max(1, c), n)) for c, n in zip(chunks, shape))
    return zarr.create_array(store=str(path), shape=tuple(int(n) for n in shape), chunks=chunks,
                             dtype=dtype, attributes=attributes, overwrite=True)


def write_zarr(dmap: DensityMap, path: str | os.PathLike, chunks=(64, 64, 64)) -> Path:
    """Write the map as a zarr store chunked in 3-D, geometry in the store's attributes (atomic).

    The data keep their dtype; a dask array is written chunk by chunk (rechunked to `chunks`).
    """
    p = Path(path)
    m = dmap
    with atomic_dir(p) as tmp:
        arr = _create_zarr_array(tmp, m.shape, chunks, np.dtype(m.data.dtype), _zarr_attributes(m))
        if m.is_chunked:
            m.data.rechunk(arr.chunks).store(arr, lock=False)
        else:
            arr[...] = m.data
    return p


def read_zarr(path: str | os.PathLike) -> DensityMap:
    """Open a zarr store written by `write_zarr`/`to_zarr`: ``data`` is a dask array chunked as stored.

    Nothing is read but the attributes; each chunk is read when a task needs it.
    """
    import dask.array as da
    import zarr

    p = _check_path(path)
    try:
        arr = zarr.open_array(str(p), mode="r")
    except (ValueError, OSError, KeyError, TypeError) as e:  # zarr's errors derive from ValueError
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{p} is not a zarr map store: {msg}") from None
    at = dict(arr.attrs)
    if at.get(_ZARR_TAG) != 1:
        raise InputError(f"{p} is a zarr array without drefine map geometry (write it with write_zarr or to_zarr)")
    if arr.ndim != 3 or min(arr.shape) <= 0:
        raise InputError(f"{p} is a zero-size or non-3-D map store (shape {arr.shape})")
    sg = gemmi.find_spacegroup_by_name(at.get("spacegroup", "P 1")) or _p1()
    return DensityMap(data=da.from_zarr(arr), cell=gemmi.UnitCell(*at["cell"]), sampling=at["sampling"],
                      start=at["start"], origin=at["origin"], spacegroup=sg, source=str(p))


def to_zarr(map_path: str | os.PathLike, zarr_path: str | os.PathLike, chunks=(64, 64, 64)) -> Path:
    """Convert a CCP4/MRC file to a zarr store chunk-wise, never holding the whole map in memory.

    The file's data are memory-mapped and copied one slab of sections at a time (slab thickness
    = the zarr chunk along the sections' axis, so every zarr chunk is written once); axis order
    is undone per slab. Same checks as `read_map`, NaN included. Not for .gz files.
    """
    src = _check_path(map_path)
    if src.suffix == ".gz":
        raise InputError(f"{src}: to_zarr needs an uncompressed map (memory-mapped reading); gunzip it first")
    h = _read_mrc_header(src)
    ncol, nrow, nsec = (int(n) for n in h.nxyz_file)
    mm = np.memmap(src, dtype=h.dtype, mode="r", offset=h.data_offset, shape=(nsec, nrow, ncol))
    geom = DensityMap(data=np.broadcast_to(np.float32(0), h.shape_abc),
                      cell=gemmi.UnitCell(*h.cell), sampling=h.sampling, start=h.start_abc, origin=h.origin,
                      spacegroup=h.spacegroup(), source=str(src))
    attrs = _zarr_attributes(geom)
    shape = h.shape_abc
    sec_axis = int(h.axes[2])  # the cell axis the sections run along
    out = Path(zarr_path)
    with atomic_dir(out) as tmp:
        arr = _create_zarr_array(tmp, shape, chunks, np.float32, attrs)
        step = int(arr.chunks[sec_axis])
        for s0 in range(0, nsec, step):
            slab = np.asarray(mm[s0:s0 + step], dtype=np.float32)  # [s, r, c]
            _check_finite(src, slab)
            block = slab.transpose(2, 1, 0).transpose(h.perm)  # [c, r, s] → [u, v, w]
            region = [slice(None)] * 3
            region[sec_axis] = slice(s0, s0 + slab.shape[0])
            arr[tuple(region)] = block
    del mm
    return out


# ============================================================================================
# Resampling, blurring, masks, correlation
# ============================================================================================
def _target_geometry(dmap: DensityMap, box, spacing, origin) -> DensityMap:
    """An empty-data map describing the grid `resample` fills (data is a placeholder)."""
    if isinstance(box, DensityMap):
        return box
    if box is None:
        cell = dmap.cell
        step = float(spacing) if spacing is not None else float(dmap.voxel_size.mean())
        lengths = np.array([cell.a, cell.b, cell.c])
        sampling = np.maximum(1, np.rint(lengths / step)).astype(np.int64)
        if dmap.is_full_cell:
            start = np.zeros(3, np.int64)
            shape = sampling
        else:  # the same region of space: new grid points inside the old box
            ratio = sampling / dmap.sampling
            lo = np.ceil(dmap.start * ratio - 1e-9).astype(np.int64)
            hi = np.floor((dmap.start + np.asarray(dmap.shape) - 1) * ratio + 1e-9).astype(np.int64)
            start, shape = lo, np.maximum(1, hi - lo + 1)
        org = dmap.origin if origin is None else origin
        return DensityMap(np.broadcast_to(np.float32(0), tuple(shape)), gemmi.UnitCell(*cell.parameters),
                          sampling, start, org, dmap.spacegroup, dmap.source)
    if isinstance(box, gemmi.UnitCell):
        cell = gemmi.UnitCell(*box.parameters)
    else:
        b = [float(x) for x in box]
        cell = gemmi.UnitCell(*(b + [90.0, 90.0, 90.0] if len(b) == 3 else b))
    step = float(spacing) if spacing is not None else float(dmap.voxel_size.mean())
    lengths = np.array([cell.a, cell.b, cell.c])
    sampling = np.maximum(1, np.rint(lengths / step)).astype(np.int64)
    org = dmap.origin if origin is None else origin
    return DensityMap(np.broadcast_to(np.float32(0), tuple(sampling)), cell, sampling, np.zeros(3, np.int64),
                      org, _p1(), dmap.source)


def resample(dmap: DensityMap, box=None, spacing: float | None = None, *, origin=None, order: int = 3,
             fill_value: float = 0.0, periodic: bool | None = None) -> DensityMap:
    """Values of `dmap` on another grid: a P1 box, another voxel size, or a template map's grid.

    box: None (same cell, new `spacing`; a full cell stays a full cell, a sub-box keeps its region
    of space), a gemmi.UnitCell or (a, b, c[, α, β, γ]) in Å/degrees (a P1 box sampled at
    `spacing` Å, start 0, corner at `origin` Å, default the source's origin), or a DensityMap
    whose grid (cell, sampling, start, shape, origin) is taken as is. spacing: target grid step
    in Å (default: the source's mean voxel size). order: 3 (Catmull–Rom tricubic, as
    `drefine.density.interpolate`) or 1 (trilinear). Points outside a non-periodic source get
    `fill_value`. No anti-aliasing filter: when coarsening, blur first (`blur_sharpen`).
    A chunked source is loaded into memory. Returns float64 data.
    """
    from ..density.interpolate import interpolate, trilinear

    if order not in (1, 3):
        raise ValueError("order must be 1 (trilinear) or 3 (tricubic)")
    src = dmap.load()
    tgt = _target_geometry(src, box, spacing, origin)
    nu, nv, nw = tgt.shape
    out = np.empty((nu, nv, nw), dtype=np.float64)
    iu, iv = np.meshgrid(np.arange(nu, dtype=np.float64), np.arange(nv, dtype=np.float64), indexing="ij")
    step = _slab_size(nu * nv, 1 << 21)
    for w0 in range(0, nw, step):  # slabs of target points bound the memory of the coordinate arrays
        w1 = min(nw, w0 + step)
        k = w1 - w0
        idx = np.empty((nu, nv, k, 3))
        idx[..., 0] = iu[..., None]
        idx[..., 1] = iv[..., None]
        idx[..., 2] = np.arange(w0, w1, dtype=np.float64)
        xyz = tgt.xyz_of_index(idx.reshape(-1, 3))
        if order == 3:
            vals = interpolate(src, xyz, periodic=periodic, gradient=False).values
        else:
            vals = trilinear(src, xyz, periodic=periodic)
        vals = np.where(np.isnan(vals), fill_value, vals)
        out[:, :, w0:w1] = vals.reshape(nu, nv, k)
    return DensityMap(out, gemmi.UnitCell(*tgt.cell.parameters), tgt.sampling.copy(), tgt.start.copy(),
                      tgt.origin.copy(), tgt.spacegroup, src.source)


def _s_squared(dmap: DensityMap, rshape) -> np.ndarray:
    """|s|² (Å⁻²) of every rfftn coefficient of the data block, shape `rshape`.

    s = Fᵀq with q_i = fftfreq(n_i)·M_i (cycles per cell edge), so s² = qᵀ G q with G = F Fᵀ the
    reciprocal metric. The Nyquist frequency of an even axis is both +M/2 and −M/2; averaging
    s² over the two signs drops its cross terms, which keeps the factor Hermitian-symmetric so
    blurring and sharpening by the same B are exact inverses in oblique cells too.
    """
    n = dmap.shape
    freqs = [np.fft.fftfreq(n[0]), np.fft.fftfreq(n[1]), np.fft.rfftfreq(n[2])]
    q = [f * m for f, m in zip(freqs, dmap.sampling)]
    mixed = [(np.abs(f) != 0.5).astype(np.float64) for f in freqs]  # 0 at a Nyquist frequency
    shape3 = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
    q = [x.reshape(sh) for x, sh in zip(q, shape3)]
    mixed = [x.reshape(sh) for x, sh in zip(mixed, shape3)]
    F = dmap.frac_matrix
    G = F @ F.T
    s2 = np.zeros(rshape)
    for i in range(3):
        s2 += G[i, i] * q[i] * q[i]
        for j in range(i + 1, 3):
            s2 += 2.0 * G[i, j] * (q[i] * mixed[i]) * (q[j] * mixed[j])
    return s2


def blur_sharpen(dmap: DensityMap, b_factor: float) -> DensityMap:
    """Multiply the map's Fourier coefficients by exp(−B s²/4): B > 0 (Å²) blurs, B < 0 sharpens.

    rfftn of the whole data block (loaded into memory), computed in float64; s is the
    Cartesian reciprocal vector (Å⁻¹), |s| = 1/d. The block is treated as periodic, which is
    exact for a full cell; for a sub-box, values near its faces feel the opposite face.
    Sharpening amplifies by up to exp(|B| s²max/4) at the grid's corner frequency, round-off
    included, so blurring and sharpening by the same B restores the map only while that factor
    times 1e-16 stays small. Returns float64 data on the same grid.
    """
    from scipy import fft

    m = dmap.load()
    data = np.asarray(m.data, dtype=np.float64)
    coef = fft.rfftn(data, workers=-1)
    coef *= np.exp(-float(b_factor) * _s_squared(m, coef.shape) / 4.0)
    out = fft.irfftn(coef, s=data.shape, workers=-1)
    return m.with_data(out)


@njit(cache=True, nogil=True)
def _sphere_kernel(mask, label, d2_min, g, reach, step_cart, r2, periodic, track):
    """Set mask points within √r2 Å of each atom; with `track`, also keep at each point the index
    of the nearest atom (`label`) and its squared distance (`d2_min`). Loops over each atom's
    local index box."""
    nu, nv, nw = mask.shape
    for p in range(g.shape[0]):
        x, y, z = g[p, 0], g[p, 1], g[p, 2]
        if not (np.isfinite(x) and np.isfinite(y) and np.isfinite(z)):
            continue
        i0, i1 = math.ceil(x - reach[0]), math.floor(x + reach[0])
        j0, j1 = math.ceil(y - reach[1]), math.floor(y + reach[1])
        k0, k1 = math.ceil(z - reach[2]), math.floor(z + reach[2])
        if not periodic:
            i0, j0, k0 = max(i0, 0), max(j0, 0), max(k0, 0)
            i1, j1, k1 = min(i1, nu - 1), min(j1, nv - 1), min(k1, nw - 1)
        for i in range(i0, i1 + 1):
            dx = i - x
            ii = i % nu
            for j in range(j0, j1 + 1):
                dy = j - y
                jj = j % nv
                cx = step_cart[0, 0] * dx + step_cart[0, 1] * dy
                cy = step_cart[1, 0] * dx + step_cart[1, 1] * dy
                cz = step_cart[2, 0] * dx + step_cart[2, 1] * dy
                for k in range(k0, k1 + 1):
                    dz = k - z
                    ex = cx + step_cart[0, 2] * dz
                    ey = cy + step_cart[1, 2] * dz
                    ez = cz + step_cart[2, 2] * dz
                    d2 = ex * ex + ey * ey + ez * ez
                    if d2 <= r2:
                        kk = k % nw
                        mask[ii, jj, kk] = True
                        if track and d2 < d2_min[ii, jj, kk]:
                            d2_min[ii, jj, kk] = d2
                            label[ii, jj, kk] = p


def _sphere_setup(m: DensityMap, xyz, radius: float, periodic: bool | None):
    p = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    g = np.ascontiguousarray(m.index_of_xyz(p)) if len(p) else np.zeros((0, 3))
    # half-width of a sphere in grid units along axis i: r·|row i of F| (r / interplanar spacing) · M_i
    reach = float(radius) * np.linalg.norm(m.frac_matrix, axis=1) * m.sampling
    step_cart = np.ascontiguousarray(m.orth_matrix / m.sampling[None, :])  # Å of a unit step in index i, j, k
    return g, reach, step_cart, float(radius) ** 2, m.is_full_cell if periodic is None else bool(periodic)


def mask_around_atoms(map_geometry: DensityMap, xyz, radius: float, periodic: bool | None = None) -> np.ndarray:
    """Boolean mask (shape of the map) of grid points within `radius` Å of any atom xyz (N, 3, Å).

    Only the geometry of `map_geometry` is used. A periodic map (default: a full cell) wraps
    atoms into the cell; otherwise points outside the box are skipped.
    """
    mask = np.zeros(map_geometry.shape, dtype=np.bool_)
    g, reach, step_cart, r2, per = _sphere_setup(map_geometry, xyz, radius, periodic)
    dummy_label, dummy_d2 = np.zeros((1, 1, 1), dtype=np.int32), np.zeros((1, 1, 1))
    _sphere_kernel(mask, dummy_label, dummy_d2, g, reach, step_cart, r2, per, False)
    return mask


def nearest_atom_labels(map_geometry: DensityMap, xyz, radius: float, periodic: bool | None = None) -> np.ndarray:
    """Per grid point (shape of the map): the index into xyz (N, 3, Å) of the nearest atom within
    `radius` Å, −1 where none is (images of a periodic map included, as in `mask_around_atoms`)."""
    mask = np.zeros(map_geometry.shape, dtype=np.bool_)
    label = np.full(map_geometry.shape, -1, dtype=np.int32)
    d2 = np.full(map_geometry.shape, np.inf)
    g, reach, step_cart, r2, per = _sphere_setup(map_geometry, xyz, radius, periodic)
    _sphere_kernel(mask, label, d2, g, reach, step_cart, r2, per, True)
    return label


def correlation(a, b, mask=None) -> float:
    """Pearson correlation of two maps (DensityMap or arrays of the same shape), optionally masked."""
    x = np.asarray(a.load().data if isinstance(a, DensityMap) else a, dtype=np.float64)
    y = np.asarray(b.load().data if isinstance(b, DensityMap) else b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"maps of different shapes {x.shape} and {y.shape}")
    if mask is not None:
        mk = np.asarray(mask, dtype=bool)
        x, y = x[mk], y[mk]
    x = x.ravel() - x.mean()
    y = y.ravel() - y.mean()
    den = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / den if den > 0 else float("nan")


def coefficient_grid(cell: gemmi.UnitCell, spacegroup: gemmi.SpaceGroup, hkl: np.ndarray, amplitude: np.ndarray,
                     phase_deg: np.ndarray, sample_rate: float = 3.0, normalise: bool = True) -> gemmi.FloatGrid:
    """The unit-cell map of Fourier coefficients (amplitude, phase in degrees): gemmi expands them
    by symmetry and transforms them (spacing about d_min/3 with `sample_rate` 3, what Coot uses);
    with `normalise` the map is in units of its own RMS (σ)."""
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = spacegroup
    mtz.set_cell_for_all(cell)
    mtz.add_dataset("drefine")
    mtz.add_column("F", "F")
    mtz.add_column("PHI", "P")
    ok = np.isfinite(amplitude) & np.isfinite(phase_deg)
    mtz.set_data(np.ascontiguousarray(np.column_stack([hkl[ok], amplitude[ok], phase_deg[ok]]), dtype=np.float32))
    grid = mtz.transform_f_phi_to_map("F", "PHI", sample_rate=sample_rate)
    if normalise:
        grid.normalize()
    return grid


def write_coefficient_map(path: str | os.PathLike, cell: gemmi.UnitCell, spacegroup: gemmi.SpaceGroup,
                          hkl: np.ndarray, amplitude: np.ndarray, phase_deg: np.ndarray,
                          sample_rate: float = 3.0, normalise: bool = True) -> Path:
    """`coefficient_grid` written as a CCP4 map, atomically."""
    ccp4 = gemmi.Ccp4Map()
    ccp4.grid = coefficient_grid(cell, spacegroup, hkl, amplitude, phase_deg, sample_rate, normalise)
    ccp4.update_ccp4_header(2, True)
    p = Path(path)
    with atomic_path(p) as tmp:
        ccp4.write_ccp4_map(tmp)
    return p
