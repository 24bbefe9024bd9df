"""Reflection data as arrays: reading MTZ and mmCIF structure factors into a ReflectionTable.

`read_reflections` reads a merged MTZ or an SF-mmCIF file (optionally gzipped), chooses the
observation columns (explicitly through `labin`, else by column type and common names), moves
every reflection to gemmi's reciprocal asymmetric unit, converts intensities to amplitudes by
French & Wilson (1978), decides which free-R flag value is the test set (or makes a test set
when the file has none), drops reflections that cannot be used and records every such decision
in `ReflectionTable.notes`.

Conventions: Miller indices in the ASU of gemmi's `ReciprocalAsu`; d in Å; amplitudes and
intensities on the file's scale; phases in degrees; `free` is True for the test set (the
reflections R-free is computed on); `epsilon` is gemmi's `GroupOps.epsilon_factor` (the number
of symmetry operations, lattice centring included, that leave h unchanged).

Free-flag heuristic (`free_test_value` None):

- more than two flag values (CCP4 FREERFLAG style, integers 0..N-1, e.g. 0..19): the test set
  is flag 0;
- exactly two values (PHENIX/cctbx 0/1 with test = 1, CCP4-style 0/1 with test = 0, SHELX
  -1/1): the test set is the value that flags a minority of the reflections, provided that
  minority is at most 35 % (the test set is always a small fraction); otherwise the file is
  ambiguous and `free_test_value` must be given;
- one value only (e.g. mmCIF `_refln.status` with no 'f'): the file has no test set.

A file without a usable test set gets a new one (`make_free_set`): each reflection is drawn
into it with probability `free_fraction`, by a hash of (h, k, l, seed), so the same seed gives
the same set whatever the order of the reflections or the resolution cut.
"""
from __future__ import annotations

import gzip
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import gemmi
import numpy as np

from ..errors import DrefineError, InputError
from .atomic import atomic_path

#: Column types of the MTZ format that hold what we read.
_AMP, _INT, _SIG = "F", "J", "Q"
_AMP_ANO, _SIG_AMP_ANO, _INT_ANO, _SIG_INT_ANO = "G", "L", "K", "M"

#: Preferred labels, best first (MTZ conventions of CCP4, PHENIX, XDS/ctruncate; mmCIF item names).
AMPLITUDE_NAMES = ("FP", "F", "FMEAN", "FOBS", "F-obs", "F_meas_au", "F_meas", "FO", "F-obs-filtered")
INTENSITY_NAMES = ("IMEAN", "I", "IOBS", "I-obs", "intensity_meas", "F_squared_meas", "IO")
FREE_NAMES = ("FreeR_flag", "FREE", "R-free-flags", "FreeRflag", "FREER", "FreeR", "RFREE", "FREE_FLAG",
              "TEST", "pdbx_r_free_flag", "status")
PHASE_NAMES = ("PHI", "PHIB", "PHIM", "PHIX", "PHI_exp", "PHIDM")
FOM_NAMES = ("FOM", "FOMM", "FOMB", "FOMDM")
#: Model-derived amplitudes, never taken as observations by the automatic choice.
_CALC_NAMES = {"FC", "FC_ALL", "FC_ALL_LS", "FWT", "DELFWT", "2FOFCWT", "FOFCWT", "FCALC", "F-model",
               "FMODEL", "F_calc", "F_calc_au", "pdbx_FWT", "pdbx_DELFWT"}

#: mmCIF _refln items read (CifToMtz spec: item, MTZ label = the item name, MTZ type, dataset).
_CIF_SPEC = (
    "pdbx_r_free_flag pdbx_r_free_flag I 0",
    "status status I 0 o=1,f=0",
    "intensity_meas intensity_meas J 1",
    "intensity_sigma intensity_sigma Q 1",
    "F_squared_meas F_squared_meas J 1",
    "F_squared_sigma F_squared_sigma Q 1",
    "pdbx_I_plus pdbx_I_plus K 1",
    "pdbx_I_plus_sigma pdbx_I_plus_sigma M 1",
    "pdbx_I_minus pdbx_I_minus K 1",
    "pdbx_I_minus_sigma pdbx_I_minus_sigma M 1",
    "F_meas_au F_meas_au F 1",
    "F_meas_sigma_au F_meas_sigma_au Q 1",
    "F_meas F_meas F 1",
    "F_meas_sigma F_meas_sigma Q 1",
    "pdbx_F_plus pdbx_F_plus G 1",
    "pdbx_F_plus_sigma pdbx_F_plus_sigma L 1",
    "pdbx_F_minus pdbx_F_minus G 1",
    "pdbx_F_minus_sigma pdbx_F_minus_sigma L 1",
    "phase_meas phase_meas P 1",
    "fom fom W 1",
)
_CIF_OBS_ITEMS = ("F_meas_au", "F_meas", "intensity_meas", "F_squared_meas", "pdbx_F_plus", "pdbx_I_plus")

#: Largest test-set fraction the two-value heuristic accepts as "the minority is the test set".
_MAX_TEST_FRACTION = 0.35
#: Memory budget of reciprocalspaceship's kernel smoother (n_reflections × 20·bins float64 matrices).
_FW_KERNEL_ELEMENTS = 16_000_000


@dataclass
class ReflectionTable:
    """Merged reflection data, one row per unique reflection (ASU of gemmi's ReciprocalAsu).

    Units: d in Å; f_obs, sigma_f on the file's amplitude scale; i_obs, sigma_i on its intensity
    scale; phases_deg in degrees; fom in 0..1. Missing values are NaN. `free` is True for the
    test set; `bin` is the resolution bin (0 = lowest resolution), equal-count in 1/d³.
    """

    cell: gemmi.UnitCell
    spacegroup: gemmi.SpaceGroup
    hkl: np.ndarray  # (n, 3) int32
    d: np.ndarray  # (n,) float64, Å
    centric: np.ndarray  # (n,) bool
    epsilon: np.ndarray  # (n,) int32, gemmi epsilon_factor (centring included)
    free: np.ndarray  # (n,) bool, True = test set
    f_obs: np.ndarray  # (n,) float64
    sigma_f: np.ndarray  # (n,) float64
    bin: np.ndarray  # (n,) int32
    i_obs: np.ndarray | None = None  # (n,) float64
    sigma_i: np.ndarray | None = None  # (n,) float64
    phases_deg: np.ndarray | None = None  # (n,) float64, degrees
    fom: np.ndarray | None = None  # (n,) float64
    source: str = ""
    columns_used: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    _ROW_FIELDS = ("hkl", "d", "centric", "epsilon", "free", "f_obs", "sigma_f", "bin", "i_obs", "sigma_i",
                   "phases_deg", "fom")

    def __len__(self) -> int:
        return int(self.hkl.shape[0])

    @property
    def d_min(self) -> float:
        """Highest resolution (smallest d), Å."""
        return float(self.d.min()) if len(self) else float("nan")

    @property
    def d_max(self) -> float:
        """Lowest resolution (largest d), Å."""
        return float(self.d.max()) if len(self) else float("nan")

    @property
    def work(self) -> np.ndarray:
        """Mask of the working set (reflections refined against)."""
        return ~self.free

    @property
    def test(self) -> np.ndarray:
        """Mask of the test set (R-free)."""
        return self.free.copy()

    @property
    def n_bins(self) -> int:
        return int(self.bin.max()) + 1 if len(self) else 0

    def select(self, mask: np.ndarray) -> ReflectionTable:
        """Rows `mask` (boolean mask or integer index) as a new table; bins and notes are kept."""
        rows = {}
        for name in self._ROW_FIELDS:
            v = getattr(self, name)
            rows[name] = None if v is None else v[mask]
        return ReflectionTable(cell=self.cell, spacegroup=self.spacegroup, source=self.source,
                               columns_used=dict(self.columns_used), notes=list(self.notes), **rows)

    def with_bins(self, n_bins: int | None = None) -> ReflectionTable:
        """The same table with `n_bins` equal-count resolution bins (default: `default_n_bins`)."""
        t = self.select(np.arange(len(self)))
        t.bin = resolution_bins(self.d, n_bins if n_bins else default_n_bins(int(self.work.sum())))
        return t

    def bin_limits(self) -> np.ndarray:
        """(n_bins, 2) array of (d_max, d_min) of each bin, Å."""
        n = self.n_bins
        hi = np.full(n, -np.inf)
        lo = np.full(n, np.inf)
        np.maximum.at(hi, self.bin, self.d)
        np.minimum.at(lo, self.bin, self.d)
        return np.column_stack([hi, lo])

    def summary(self) -> dict:
        """Plain-Python description for JSON reports."""
        return {
            "source": self.source, "n_reflections": len(self), "n_test": int(self.free.sum()),
            "d_min": round(self.d_min, 4), "d_max": round(self.d_max, 4),
            "spacegroup": self.spacegroup.hm, "cell": list(self.cell.parameters),
            "columns": dict(self.columns_used), "n_bins": self.n_bins, "notes": list(self.notes),
        }

    def to_mtz(self, path: str | os.PathLike, extra: dict[str, tuple[str, np.ndarray]] | None = None) -> Path:
        """Write the table as MTZ, atomically (temporary file in the same folder, then os.replace).

        Columns: H K L, FreeR_flag (CCP4 convention: 0 = test set; work reflections are spread
        over 1..N-1, N ≈ 1/test fraction, by a hash of hkl), F, SIGF, then I SIGI, PHI, FOM
        when the table has them, then `extra` columns ({label: (MTZ type, values)}, e.g. map
        coefficients). Missing values are written as MTZ missing (NaN). Appends a note
        "written to PATH" to `notes`.
        """
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        mtz = gemmi.Mtz(with_base=True)
        mtz.spacegroup = self.spacegroup
        mtz.add_dataset("drefine")
        mtz.set_cell_for_all(self.cell)
        cols: list[np.ndarray] = [self.hkl[:, 0], self.hkl[:, 1], self.hkl[:, 2]]
        n_test = int(self.free.sum())
        if n_test:
            n_flags = int(np.clip(round(len(self) / n_test), 2, 100))
            work_flag = 1 + np.floor(_hkl_uniform(self.hkl, 0x5EED) * (n_flags - 1))
            mtz.add_column("FreeR_flag", "I")
            cols.append(np.where(self.free, 0.0, work_flag))
        for label, typ, arr in (("F", "F", self.f_obs), ("SIGF", "Q", self.sigma_f), ("I", "J", self.i_obs),
                                ("SIGI", "Q", self.sigma_i), ("PHI", "P", self.phases_deg),
                                ("FOM", "W", self.fom)):
            if arr is not None:
                mtz.add_column(label, typ)
                cols.append(arr)
        for label, (typ, arr) in (extra or {}).items():
            mtz.add_column(label, typ)
            cols.append(arr)
        mtz.set_data(np.ascontiguousarray(np.column_stack(cols), dtype=np.float32))
        mtz.history = ["From drefine: " + n for n in self.notes][:30] or ["From drefine"]
        with atomic_path(p) as tmp:
            mtz.write_to_file(tmp)
        self.notes.append(f"written to {p}" + (" (with the free set, FreeR_flag 0 = test)" if n_test else ""))
        return p


# ----------------------------------------------------------------------------------------------
# reading


def read_reflections(
    path: str | os.PathLike,
    labin: str | None = None,
    free_test_value: int | None = None,
    d_min: float | None = None,
    d_max: float | None = None,
    seed: int = 0,
    free_fraction: float = 0.05,
    n_bins: int | None = None,
    free_shells: bool = False,
) -> ReflectionTable:
    """Read merged reflections from MTZ or SF-mmCIF (optionally .gz) into a ReflectionTable.

    `labin`: column labels, either positional "F,SIGF[,FREE]", "I,SIGI[,FREE]",
    "F(+),SIGF(+),F(-),SIGF(-)[,FREE]", or by role "F=FP,SIGF=SIGFP,FREE=FreeR_flag" (roles F,
    SIGF, I, SIGI, F(+), SIGF(+), F(-), SIGF(-), I(+), SIGI(+), I(-), SIGI(-), FREE, PHI, FOM).
    Without it columns are chosen by type and name, amplitudes before intensities.
    `free_test_value`: the flag value of the test set (default: the heuristic of the module
    docstring). `d_min`, `d_max`: resolution limits in Å. `seed`, `free_fraction`,
    `free_shells`: how a test set is made when the file has none (see `make_free_set`).
    `n_bins`: resolution bins (default `default_n_bins`).

    Raises InputError (one line) for a missing or unreadable file, a named column that does
    not exist, no amplitude or intensity column, no usable reflection, or limits beyond the data.
    """
    if not 0.0 < free_fraction <= 0.5:
        raise DrefineError(f"free_fraction must be in (0, 0.5], got {free_fraction}")
    if d_min is not None and d_min <= 0:
        raise DrefineError(f"d_min must be positive, got {d_min}")
    if d_min is not None and d_max is not None and d_min >= d_max:
        raise DrefineError(f"d_min ({d_min} Å) must be smaller than d_max ({d_max} Å)")
    if n_bins is not None and n_bins < 1:
        raise DrefineError(f"n_bins must be at least 1, got {n_bins}")
    p = Path(path)
    notes: list[str] = []
    mtz = _load(p, notes)
    roles = _choose_columns(mtz, p, labin, notes)
    labels = mtz.column_labels()
    data = np.asarray(mtz.array)

    def col(role: str) -> np.ndarray | None:
        lab = roles.get(role)
        return None if lab is None else data[:, labels.index(lab)].astype(np.float64)

    hkl = np.asarray(mtz.make_miller_array(), dtype=np.int32)
    ops = mtz.spacegroup.operations()
    centric = np.asarray(ops.centric_flag_array(hkl), dtype=bool)
    intensities = "F" not in roles and "F(+)" not in roles
    if "F" in roles:
        obs, sig = col("F"), col("SIGF")
    elif "I" in roles:
        obs, sig = col("I"), col("SIGI")
    else:
        tag = "I" if intensities else "F"
        obs, sig = _friedel_mean(col(f"{tag}(+)"), col(f"SIG{tag}(+)"), col(f"{tag}(-)"), col(f"SIG{tag}(-)"),
                                 centric)
        pair = f"{roles[f'{tag}(+)']}, {roles[f'{tag}(-)']}"
        notes.append(f"anomalous {tag}(+)/{tag}(-) ({pair}) merged to their "
                     "mean (σ combined as ½√(σ₊²+σ₋²); centric: the mean of the two, σ not reduced)")
    obs_roles = ("I", "SIGI") if intensities else ("F", "SIGF")
    obs_name = "/".join(roles[r] for r in obs_roles if r in roles) or "the Friedel means"
    if sig is None:
        sig = np.ones_like(obs)
        notes.append(f"no sigma column for {obs_name}: unit weights (sigmas set to 1)")

    # Reflections that cannot be used.
    keep = np.ones(len(obs), dtype=bool)
    origin = np.all(hkl == 0, axis=1)
    if origin.any():
        keep &= ~origin
        notes.append("reflection 0 0 0 dropped")
    missing = np.isnan(obs) | np.isnan(sig)
    infinite = np.isinf(obs) | np.isinf(sig)
    n_missing = int((missing & keep).sum())
    n_inf = int((infinite & keep).sum())
    keep &= ~(missing | infinite)
    if n_missing:
        notes.append(f"{n_missing} reflections with no value (NaN) in {obs_name} dropped")
    if n_inf:
        notes.append(f"{n_inf} reflections with infinite values in {obs_name} dropped")
    if not keep.any():
        raise InputError(f"{p}: no reflection has a finite value in {obs_name}")
    absent = np.asarray(ops.systematic_absences(hkl), dtype=bool) & keep
    if absent.any():
        keep &= ~absent
        notes.append(f"{int(absent.sum())} systematically absent reflections ({mtz.spacegroup.hm}) dropped")
    bad_sig = (sig <= 0) & keep
    if bad_sig.sum() == keep.sum():
        sig = np.ones_like(sig)
        notes.append(f"all sigmas of {obs_name} are zero or negative: unit weights (sigmas set to 1)"
                     + ("; French–Wilson impossible, F = sqrt(max(I, 0))" if intensities else ""))
        sigmas_usable = False
    else:
        sigmas_usable = True
        if bad_sig.any():
            keep &= ~bad_sig
            notes.append(f"{int(bad_sig.sum())} reflections with sigma ≤ 0 in {obs_name} dropped")
    if not keep.any():
        raise InputError(f"{p}: no usable reflection left in {obs_name}")

    # Resolution limits.
    d_all = mtz.cell.calculate_d_array(hkl)
    data_dmin, data_dmax = float(d_all[keep].min()), float(d_all[keep].max())
    if d_min is not None and d_min < data_dmin * (1 - 1e-6):
        raise InputError(f"{p}: d_min {d_min:g} Å is beyond the data (highest resolution {data_dmin:.3f} Å)")
    if d_min is not None:
        keep &= d_all >= d_min
    if d_max is not None:
        keep &= d_all <= d_max
    if not keep.any():
        raise InputError(f"{p}: no reflection between d_max {d_max or np.inf:g} Å and d_min {d_min or 0:g} Å "
                         f"(the data span {data_dmax:.3f}–{data_dmin:.3f} Å)")
    if d_min is not None or d_max is not None:
        notes.append(f"resolution cut to {d_max or data_dmax:.3f}–{d_min or data_dmin:.3f} Å "
                     f"({int(keep.sum())} reflections kept)")

    idx = np.flatnonzero(keep)
    hkl, d, centric = hkl[idx], d_all[idx], centric[idx]
    obs, sig = obs[idx], sig[idx]
    epsilon = np.asarray(ops.epsilon_factor_array(hkl), dtype=np.int32)
    i_obs = sigma_i = None
    if intensities:
        i_obs, sigma_i = obs, sig
        if sigmas_usable:
            f_obs, sigma_f, how = french_wilson(hkl, i_obs, sigma_i, mtz.cell, mtz.spacegroup,
                                                centric=centric, d=d)
            notes.append(f"intensities {obs_name} converted to amplitudes by French–Wilson ({how})")
        else:
            f_obs, sigma_f = np.sqrt(np.maximum(i_obs, 0.0)), np.ones_like(i_obs)
    else:
        f_obs, sigma_f = obs, sig
        if "I" in roles:  # amplitudes chosen, the file's mean intensities carried along
            i_obs, sigma_i = col("I")[idx], col("SIGI")[idx]
        n_neg = int((f_obs < 0).sum())
        if n_neg:
            notes.append(f"{n_neg} amplitudes are negative (kept as given; e.g. simulated data with noise)")
    phases = col("PHI")[idx] if "PHI" in roles else None
    fom = col("FOM")[idx] if "FOM" in roles else None

    free = _free_set_from_file(col("FREE"), idx, roles.get("FREE"), free_test_value, p, notes)
    if free is None:
        free = make_free_set(hkl, d, free_fraction, seed, thin_shells=free_shells)
        how = "in thin resolution shells" if free_shells else "random by hkl"
        notes.append(f"free set made with seed {seed} ({100 * free_fraction:g} %, {int(free.sum())} of "
                     f"{len(free)} reflections, {how}); keep it with to_mtz()")
    bins = resolution_bins(d, n_bins or default_n_bins(int((~free).sum())))
    return ReflectionTable(
        cell=gemmi.UnitCell(*mtz.cell.parameters), spacegroup=mtz.spacegroup, hkl=hkl, d=d,
        centric=centric, epsilon=epsilon, free=free,
        f_obs=np.asarray(f_obs, dtype=np.float64), sigma_f=np.asarray(sigma_f, dtype=np.float64), bin=bins,
        i_obs=i_obs, sigma_i=sigma_i, phases_deg=phases, fom=fom, source=str(p), columns_used=dict(roles),
        notes=notes,
    )


def _load(p: Path, notes: list[str]) -> gemmi.Mtz:
    """The file (MTZ or SF-mmCIF) as a merged gemmi.Mtz with every reflection in the reciprocal ASU."""
    if not p.exists():
        raise InputError(f"reflection file not found: {p}")
    if p.is_dir():
        raise InputError(f"reflection path is a directory, not a file: {p}")
    try:
        with open(p, "rb") as fh:
            head = fh.read(4096)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(p, "rb") as fh:
                head = fh.read(4096)
    except (OSError, EOFError) as e:
        raise InputError(f"cannot read reflection file {p}: {e}") from None
    if head[:4] == b"MTZ ":
        try:
            mtz = gemmi.read_mtz_file(str(p))
        except (RuntimeError, ValueError, OSError) as e:
            raise InputError(f"{p} is not a readable MTZ file: {_first_line(e)}") from None
    elif b"\0" not in head and (b"data_" in head or b"_refln" in head):
        mtz = _cif_to_mtz(p, notes)
    else:
        raise InputError(f"{p} is neither an MTZ file nor an mmCIF structure-factor file")
    if mtz.spacegroup is None:
        raise InputError(f"{p} has no space group")
    if not mtz.cell.is_crystal() or min(mtz.cell.a, mtz.cell.b, mtz.cell.c) <= 0:
        raise InputError(f"{p} has no unit cell")
    if len(mtz.batches) or any(c.label in ("M/ISYM", "BATCH") for c in mtz.columns):
        raise InputError(f"{p} holds unmerged data (batches); merge it first (e.g. with aimless)")
    if mtz.nreflections == 0:
        raise InputError(f"{p} contains no reflections")
    mtz.ensure_asu()
    key = hkl_keys(mtz.make_miller_array())
    n_dup = len(key) - len(np.unique(key))
    if n_dup:
        raise InputError(f"{p}: {n_dup} reflections occur more than once in the asymmetric unit "
                         "(unmerged data?); merge them first")
    return mtz


def _cif_to_mtz(p: Path, notes: list[str]) -> gemmi.Mtz:
    try:
        doc = gemmi.cif.read(str(p))
        blocks = gemmi.as_refln_blocks(doc)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"{p} is not a readable mmCIF file: {_first_line(e)}") from None
    usable = [rb for rb in blocks
              if rb and rb.is_merged() and any(t in rb.column_labels() for t in _CIF_OBS_ITEMS)]
    if not usable:
        if any(rb and rb.is_unmerged() for rb in blocks):
            raise InputError(f"{p} holds unmerged data (_diffrn_refln); merge it first")
        raise InputError(f"{p} has no merged structure factors "
                         "(_refln loop with F_meas_au, intensity_meas, ...)")
    rb = usable[0]
    if len(usable) > 1:
        notes.append(f"{p.name} has {len(usable)} reflection blocks; the first ({rb.block.name}) was read")
    if rb.spacegroup is None:
        raise InputError(f"{p} has no space group (_symmetry.space_group_name_H-M)")
    conv = gemmi.CifToMtz()
    present = set(rb.column_labels())
    conv.spec_lines = [s for s in _CIF_SPEC if s.split()[0] in present]
    try:
        mtz = conv.convert_block_to_mtz(rb)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"{p}: cannot convert the reflections: {_first_line(e)}") from None
    if "status" in present and "pdbx_r_free_flag" not in present:
        status = {v.strip("'\"") for v in rb.block.find_values("_refln.status")}
        if "f" not in status:
            mtz.remove_column(mtz.column_labels().index("status"))
            notes.append("no free set in the file (_refln.status has no 'f')")
    return mtz


def _first_line(e: Exception) -> str:
    s = str(e)
    return s.splitlines()[0] if s else type(e).__name__


# ----------------------------------------------------------------------------------------------
# column choice

_ROLE_TYPES = {
    "F": (_AMP,), "SIGF": (_SIG,), "I": (_INT,), "SIGI": (_SIG,),
    "F(+)": (_AMP_ANO,), "SIGF(+)": (_SIG_AMP_ANO,), "F(-)": (_AMP_ANO,), "SIGF(-)": (_SIG_AMP_ANO,),
    "I(+)": (_INT_ANO,), "SIGI(+)": (_SIG_INT_ANO,), "I(-)": (_INT_ANO,), "SIGI(-)": (_SIG_INT_ANO,),
    "FREE": ("I",), "PHI": ("P",), "FOM": ("W",),
}
_TYPE_WORDS = {"F": "amplitude", "J": "intensity", "Q": "sigma", "G": "anomalous amplitude",
               "L": "anomalous sigma", "K": "anomalous intensity", "M": "anomalous sigma", "I": "integer",
               "P": "phase", "W": "weight", "A": "HL coefficient", "H": "index", "D": "anomalous difference"}


def _columns_text(mtz: gemmi.Mtz) -> str:
    return ", ".join(f"{c.label}({c.type})" for c in mtz.columns if c.type != "H")


def _choose_columns(mtz: gemmi.Mtz, p: Path, labin: str | None, notes: list[str]) -> dict[str, str]:
    """Role → column label. Explicit roles come from `labin`; the rest are found by type and name."""
    types = {c.label: c.type for c in mtz.columns}
    order = [c.label for c in mtz.columns]
    roles: dict[str, str] = {}
    if labin is not None:
        roles = _parse_labin(labin, types, p, mtz)
    if not any(r in roles for r in ("F", "I", "F(+)", "I(+)")):
        found = _auto_observations(types, order)
        if found is None:
            raise InputError(f"{p}: no amplitude (type F) or intensity (type J) column with a sigma column; "
                             f"columns: {_columns_text(mtz)}")
        roles.update(found)
        obs_role = next(r for r in ("F", "I", "F(+)", "I(+)") if r in found)
        carried = ""
        if obs_role == "F":
            # carry the file's mean intensities along with the amplitudes (i_obs, sigma_i)
            for lab in _by_preference([lab for lab in order if types[lab] == _INT], INTENSITY_NAMES):
                s = _sigma_for(lab, types, order)
                if s is not None:
                    roles["I"], roles["SIGI"] = lab, s
                    carried = f"; intensities {lab}/{s} kept alongside as i_obs/sigma_i"
                    break
        others = [lab for lab in order if types[lab] in (_AMP, _INT) and lab not in roles.values()
                  and lab not in _CALC_NAMES and _sigma_for(lab, types, order) is not None]
        notes.append(f"columns chosen automatically: {'/'.join(found.values())}" + carried
                     + (f" (other observations in the file, not used: {', '.join(others)})" if others else "")
                     + ("" if obs_role.startswith("F") else "; no amplitude column"))
    if "FREE" not in roles and (labin is None or "FREE" not in _labin_roles(labin)):
        ints = [lab for lab in order if types[lab] == "I"]
        known = {n.lower() for n in FREE_NAMES}
        free = _by_preference([lab for lab in ints if lab.lower() in known], FREE_NAMES)
        free = free or [lab for lab in ints if "free" in lab.lower()]
        if free:
            roles["FREE"] = free[0]
    if "PHI" not in roles:
        phis = _by_preference([lab for lab in order if types[lab] == "P" and lab in PHASE_NAMES], PHASE_NAMES)
        if phis:
            roles["PHI"] = phis[0]
    if "PHI" in roles and "FOM" not in roles:
        foms = _by_preference([lab for lab in order if types[lab] == "W" and lab in FOM_NAMES], FOM_NAMES)
        if foms:
            roles["FOM"] = foms[0]
    return roles


def _labin_roles(labin: str) -> set[str]:
    return {part.split("=", 1)[0].strip().upper() for part in labin.split(",") if "=" in part}


def _parse_labin(labin: str, types: dict[str, str], p: Path, mtz: gemmi.Mtz) -> dict[str, str]:
    parts = [s.strip() for s in labin.split(",")]
    if not parts or any(not s for s in parts):
        raise DrefineError(f"labin {labin!r}: give comma-separated column labels, e.g. 'F,SIGF,FREE'")
    for part in parts:
        lab = part.split("=", 1)[1].strip() if "=" in part else part
        if lab not in types:
            raise InputError(f"{p}: column {lab!r} (from labin) not found; columns: {_columns_text(mtz)}")
    roles: dict[str, str] = {}
    if any("=" in s for s in parts):
        for part in parts:
            if "=" not in part:
                raise DrefineError(f"labin {labin!r}: mix of ROLE=LABEL and plain labels")
            role, lab = (x.strip() for x in part.split("=", 1))
            aliases = {"FP": "F", "SIGFP": "SIGF", "IMEAN": "I", "SIGIMEAN": "SIGI"}
            role = aliases.get(role.upper(), role.upper())
            if role not in _ROLE_TYPES:
                raise DrefineError(f"labin: unknown role {role!r}; roles: {', '.join(_ROLE_TYPES)}")
            roles[role] = lab
    else:
        first = types[parts[0]]
        if first in (_AMP, _INT):
            tag = "F" if first == _AMP else "I"
            names = [tag, f"SIG{tag}", "FREE"]
        elif first in (_AMP_ANO, _INT_ANO):
            tag = "F" if first == _AMP_ANO else "I"
            names = [f"{tag}(+)", f"SIG{tag}(+)", f"{tag}(-)", f"SIG{tag}(-)", "FREE"]
        else:
            raise InputError(f"{p}: labin column {parts[0]!r} is of type {first} "
                             f"({_TYPE_WORDS.get(first, '?')}), not an amplitude (F) or intensity (J)")
        if len(parts) > len(names):
            raise DrefineError(f"labin {labin!r}: at most {len(names)} labels ({','.join(names)})")
        roles = dict(zip(names, parts))
    for role, lab in roles.items():
        ok = _ROLE_TYPES[role]
        any_sigma = role.startswith("SIG") and types[lab] in (_SIG, _SIG_AMP_ANO, _SIG_INT_ANO)
        if types[lab] not in ok and not any_sigma:
            raise InputError(f"{p}: labin column {lab!r} for {role} is of type {types[lab]} "
                             f"({_TYPE_WORDS.get(types[lab], '?')}), expected {'/'.join(ok)}")
    for tag in ("F", "I"):
        plus, minus = f"{tag}(+)" in roles, f"{tag}(-)" in roles
        if plus != minus:
            raise DrefineError(f"labin: {tag}(+) and {tag}(-) must be given together")
    if "F" in roles and "I" in roles and not any(r.startswith("SIGI") for r in roles):
        raise DrefineError("labin: give either F or I as the observations, not both without SIGI")
    return roles


def _by_preference(labels: list[str], preferred: tuple[str, ...]) -> list[str]:
    rank = {n.lower(): i for i, n in enumerate(preferred)}
    return sorted(labels, key=lambda lab: rank.get(lab.lower(), len(rank)))


def _sigma_for(label: str, types: dict[str, str], order: list[str]) -> str | None:
    """The sigma column of an observation column, by name (SIGF for F, F_meas_sigma_au for
    F_meas_au, ...) or, failing that, the column right after it when that one is a sigma."""
    sig_types = {_AMP: (_SIG,), _INT: (_SIG,), _AMP_ANO: (_SIG_AMP_ANO, _SIG), _INT_ANO: (_SIG_INT_ANO, _SIG)}
    ok = sig_types.get(types[label], (_SIG,))
    candidates = [f"SIG{label}", f"SIG_{label}", f"{label}_sigma", label.replace("_au", "_sigma_au"),
                  label.replace("_meas", "_sigma"), label.replace("F", "SIGF", 1),
                  label.replace("I", "SIGI", 1)]
    for c in candidates:
        if c != label and types.get(c) in ok:
            return c
    i = order.index(label)
    if i + 1 < len(order) and types[order[i + 1]] in ok:
        return order[i + 1]
    return None


def _auto_observations(types: dict[str, str], order: list[str]) -> dict[str, str] | None:
    for typ, tag, names in ((_AMP, "F", AMPLITUDE_NAMES), (_INT, "I", INTENSITY_NAMES)):
        cands = _by_preference([lab for lab in order if types[lab] == typ and lab not in _CALC_NAMES], names)
        for lab in cands:
            s = _sigma_for(lab, types, order)
            if s is not None:
                return {tag: lab, f"SIG{tag}": s}
    for typ, tag in ((_AMP_ANO, "F"), (_INT_ANO, "I")):
        labs = [lab for lab in order if types[lab] == typ]
        plus = [lab for lab in labs if "(+)" in lab or "plus" in lab.lower() or lab.endswith("+")]
        minus = [lab for lab in labs if "(-)" in lab or "minus" in lab.lower() or lab.endswith("-")]
        if not (plus and minus) and len(labs) == 2:
            plus, minus = [labs[0]], [labs[1]]
        if plus and minus:
            sp, sm = _sigma_for(plus[0], types, order), _sigma_for(minus[0], types, order)
            if sp is not None and sm is not None:
                return {f"{tag}(+)": plus[0], f"SIG{tag}(+)": sp, f"{tag}(-)": minus[0], f"SIG{tag}(-)": sm}
    return None


def _friedel_mean(vp, sp, vm, sm, centric) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the Friedel mates where both are measured, else the one that is.

    Acentric: σ = ½√(σ₊² + σ₋²) (two independent measurements). Centric: the two columns hold
    the same measurement, so σ is their mean, not reduced.
    """
    hp, hm = np.isfinite(vp), np.isfinite(vm)
    both = hp & hm
    with np.errstate(invalid="ignore"):
        v = np.where(both, 0.5 * (vp + vm), np.where(hp, vp, vm))
        s_both = np.where(centric, 0.5 * (sp + sm), 0.5 * np.sqrt(sp**2 + sm**2))
        s = np.where(both, s_both, np.where(hp, sp, sm))
    return v, s


# ----------------------------------------------------------------------------------------------
# free set


def _free_set_from_file(flags: np.ndarray | None, idx: np.ndarray, label: str | None,
                        free_test_value: int | None, p: Path, notes: list[str]) -> np.ndarray | None:
    """Boolean test-set mask from the file's flag column (rows `idx`), or None when there is none."""
    if flags is None:
        if free_test_value is not None:
            raise InputError(f"{p}: free_test_value {free_test_value} given but the file has no "
                             "free-flag column")
        if not any(n.startswith("no free set in the file") for n in notes):
            notes.append("no free-flag column in the file")
        return None
    f = flags[idx]
    finite = np.isfinite(f)
    if not finite.any():
        notes.append(f"free-flag column {label} has no values for the reflections read")
        return None
    values, counts = np.unique(f[finite].astype(np.int64), return_counts=True)
    if (~finite).any():
        notes.append(f"{int((~finite).sum())} reflections without a free flag ({label} missing) "
                     "put in the work set")
    n = int(finite.sum())
    if free_test_value is not None:
        if free_test_value not in values:
            raise InputError(f"{p}: no reflection has {label} = {free_test_value}; values present: "
                             f"{_values_text(values)}")
        test_value, why = int(free_test_value), "as given"
    elif len(values) == 1:
        notes.append(f"free-flag column {label} has one value ({values[0]}) for every reflection: "
                     "no test set in it")
        return None
    elif len(values) == 2:
        k = int(np.argmin(counts))
        if counts[k] / n > _MAX_TEST_FRACTION:
            raise InputError(f"{p}: cannot tell the test set of {label}: values {values[0]} ({counts[0]}) "
                             f"and {values[1]} ({counts[1]}) are equally common; give free_test_value")
        test_value, why = int(values[k]), "the minority of two values"
    else:
        if 0 not in values:
            raise InputError(f"{p}: {label} has values {_values_text(values)} but no 0 (the CCP4 test set); "
                             "give free_test_value")
        test_value, why = 0, f"CCP4 convention, flags {_values_text(values)}"
    test = np.zeros(len(f), dtype=bool)
    test[finite] = f[finite].astype(np.int64) == test_value
    notes.append(f"free set = {label} {test_value} ({why}): {int(test.sum())} of {len(f)} reflections "
                 f"({100 * test.sum() / len(f):.1f} %)")
    return test


def _values_text(values: np.ndarray) -> str:
    v = values.tolist()
    if len(v) > 4 and v == list(range(v[0], v[0] + len(v))):
        return f"{v[0]}..{v[-1]}"
    return ", ".join(str(x) for x in v)


def hkl_keys(hkl) -> np.ndarray:
    """One int64 per Miller index (|h|, |k|, |l| < 1024), for sorting, lookup and hashing."""
    h = np.asarray(hkl, dtype=np.int64) + 1024
    return (h[:, 0] << 42) | (h[:, 1] << 21) | h[:, 2]


def _hkl_uniform(hkl: np.ndarray, seed: int) -> np.ndarray:
    """A reproducible uniform [0, 1) number per Miller index (splitmix64 of (h, k, l, seed))."""
    key = hkl_keys(hkl).astype(np.uint64)
    s = np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    golden = np.uint64(0x9E3779B97F4A7C15)
    z = key * golden + s * np.uint64(0xD1B54A32D192ED03) + golden
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def make_free_set(hkl: np.ndarray, d: np.ndarray, fraction: float = 0.05, seed: int = 0,
                  thin_shells: bool = False) -> np.ndarray:
    """A test-set mask: each reflection (or, with `thin_shells`, each thin resolution shell) is in
    the test set with probability `fraction`, decided by a hash of its hkl (shell index) and `seed`.

    Thin shells (equal width in 1/d³, about 20/fraction shells) keep test reflections away from
    work reflections related to them by non-crystallographic symmetry.
    """
    if thin_shells:
        s3 = np.asarray(d, dtype=np.float64) ** -3.0
        n_shells = max(1, min(len(s3), round(20 / fraction)))
        lo, hi = s3.min(), s3.max()
        shell = np.minimum(((s3 - lo) / max(hi - lo, 1e-300) * n_shells).astype(np.int64), n_shells - 1)
        u_shell = _hkl_uniform(np.column_stack([shell, np.zeros_like(shell), np.zeros_like(shell)]), seed)
        return u_shell < fraction
    return _hkl_uniform(hkl, seed) < fraction


# ----------------------------------------------------------------------------------------------
# resolution bins


def default_n_bins(n_work: int) -> int:
    """min(20, max(5, n_work / 500)) resolution bins."""
    return int(min(20, max(5, round(n_work / 500))))


def resolution_bins(d: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each reflection: `n_bins` equal-count bins in 1/d³, 0 = lowest resolution."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    n_bins = max(1, min(int(n_bins), n))
    order = np.argsort(-d, kind="stable")  # 1/d³ ascending
    bins = np.empty(n, dtype=np.int32)
    bins[order] = (np.arange(n, dtype=np.int64) * n_bins // n).astype(np.int32)
    return bins


# ----------------------------------------------------------------------------------------------
# French–Wilson


def french_wilson(hkl: np.ndarray, i_obs: np.ndarray, sigma_i: np.ndarray, cell: gemmi.UnitCell,
                  spacegroup: gemmi.SpaceGroup, centric: np.ndarray | None = None,
                  d: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Amplitudes and their sigmas from merged intensities by French & Wilson (1978).

    Uses reciprocalspaceship's `scale_merged_intensities` (isotropic): the posterior mean of
    F = √J under a Wilson prior on the true intensity J (acentric: exponential, centric: χ² with
    one degree of freedom) with mean ε·Σ(1/d²), Σ a Gaussian-kernel smooth of I/ε over 1/d²
    (bandwidth 1/100 of the 1/d² range, rs's default bins=100), times a normal likelihood
    N(I | J, σ_I²); the posterior moments are integrated numerically. σ_I must be positive.

    rs's smoother holds n × 2000 matrices; above `_FW_KERNEL_ELEMENTS` the data are processed in
    resolution slabs, each with a margin of 6 bandwidths and the same absolute bandwidth, which
    gives the single-call result to within rounding at bounded memory.
    Returns (F, σF, description); rows are in the order given.
    """
    try:
        import reciprocalspaceship as rs
    except ImportError:
        raise DrefineError("converting intensities needs reciprocalspaceship: "
                           "pip install reciprocalspaceship") from None

    n = len(i_obs)
    hkl = np.asarray(hkl, dtype=np.int32)
    i_obs = np.asarray(i_obs, dtype=np.float64)
    sigma_i = np.asarray(sigma_i, dtype=np.float64)
    d = cell.calculate_d_array(hkl) if d is None else np.asarray(d, dtype=np.float64)
    if centric is None:
        centric = spacegroup.operations().centric_flag_array(hkl)
    centric = np.asarray(centric, dtype=bool)

    def run(rows: np.ndarray, bins: float) -> tuple[np.ndarray, np.ndarray]:
        ds = rs.DataSet({"H": hkl[rows, 0], "K": hkl[rows, 1], "L": hkl[rows, 2]},
                        cell=cell, spacegroup=spacegroup)
        ds = ds.set_index(["H", "K", "L"])
        ds["I"] = rs.DataSeries(i_obs[rows], index=ds.index, dtype="Intensity")
        ds["SIGI"] = rs.DataSeries(sigma_i[rows], index=ds.index, dtype="Stddev")
        ds["dHKL"] = d[rows]
        ds["CENTRIC"] = centric[rows]
        out = rs.algorithms.scale_merged_intensities(
            ds, "I", "SIGI", output_columns=("FW-I", "FW-SIGI", "FW-F", "FW-SIGF"), dropna=False,
            inplace=True, mean_intensity_method="isotropic", bins=bins)
        return out["FW-F"].to_numpy(dtype=np.float64), out["FW-SIGF"].to_numpy(dtype=np.float64)

    bins = 100
    x = d**-2.0
    n_slabs = int(np.ceil(n * 20 * bins / _FW_KERNEL_ELEMENTS))
    if n_slabs <= 1 or n < 2:
        f, sf = run(np.arange(n), bins)
        how = ""
    else:
        f, sf = np.empty(n), np.empty(n)
        bw = (x.max() - x.min()) / bins
        edges = np.quantile(x, np.linspace(0, 1, n_slabs + 1))
        edges[-1] = np.inf
        for lo, hi in itertools.pairwise(edges):
            core = (x >= lo) & (x < hi)
            if not core.any():
                continue
            ext = np.flatnonzero((x >= lo - 6 * bw) & (x < hi + 6 * bw))
            xs = x[ext]
            fs, sfs = run(ext, max((xs.max() - xs.min()) / bw, 1.0))
            keep = core[ext]
            f[ext[keep]], sf[ext[keep]] = fs[keep], sfs[keep]
        how = f", {n_slabs} resolution slabs"
    # σF = sqrt(<J> - <F>²) can lose all digits for very strong reflections: use σI / 2F there.
    bad = ~np.isfinite(sf) | (sf <= 0)
    if bad.any():
        sf = np.where(bad, sigma_i / (2.0 * np.maximum(f, 1e-12)), sf)
    how = (f"reciprocalspaceship {rs.__version__} scale_merged_intensities, isotropic Wilson prior, "
           f"bins={bins}{how}")
    return f, sf, how


# ----------------------------------------------------------------------------------------------
# cells and R factors


def check_cell_compatible(table: ReflectionTable | gemmi.UnitCell, cell, tolerance: float = 0.02) -> None:
    """Raise InputError when `cell` (a gemmi.UnitCell or anything with `.cell`, e.g. a Model)
    differs from the data's by more than `tolerance` (relative) in a length or 1° in an angle."""
    data_cell = table.cell if isinstance(table, ReflectionTable) else table
    model_cell = cell if isinstance(cell, gemmi.UnitCell) else cell.cell
    a = np.array(data_cell.parameters, dtype=np.float64)
    b = np.array(model_cell.parameters, dtype=np.float64)
    rel = np.abs(b[:3] - a[:3]) / a[:3]
    dang = np.abs(b[3:] - a[3:])
    names = ("a", "b", "c", "alpha", "beta", "gamma")
    bad = [f"{names[i]} by {100 * rel[i]:.1f} %" for i in range(3) if rel[i] > tolerance]
    bad += [f"{names[3 + i]} by {dang[i]:.1f}°" for i in range(3) if dang[i] > 1.0]
    if bad:
        raise InputError(f"model cell ({_cell_text(model_cell)}) differs from the data cell "
                         f"({_cell_text(data_cell)}): {', '.join(bad)} "
                         f"(tolerance {100 * tolerance:g} % and 1°)")


def _cell_text(c: gemmi.UnitCell) -> str:
    return f"{c.a:.3f} {c.b:.3f} {c.c:.3f} {c.alpha:.2f} {c.beta:.2f} {c.gamma:.2f}"


def scale_factor(f_obs: np.ndarray, f_calc_abs: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Least-squares k minimising Σ(Fo − k|Fc|)² over `mask`: k = ΣFo|Fc| / Σ|Fc|²."""
    fo, fc = _masked_pair(f_obs, f_calc_abs, mask)
    den = float(np.dot(fc, fc))
    return float(np.dot(fo, fc) / den) if den > 0 else float("nan")


def r_factor(f_obs: np.ndarray, f_calc_abs: np.ndarray, mask: np.ndarray | None = None,
             scale: bool = True) -> float:
    """R = Σ|Fo − k|Fc|| / Σ|Fo| over `mask` (and finite pairs), k the least-squares scale
    (`scale=True`) or 1. NaN when no reflection is selected."""
    fo, fc = _masked_pair(f_obs, f_calc_abs, mask)
    return _r(fo, fc, scale_factor(fo, fc) if scale else 1.0)


def r_work_free(table: ReflectionTable, f_calc_abs: np.ndarray) -> tuple[float, float]:
    """(R-work, R-free): k fitted on the work set, applied to both. R-free is NaN without a test set."""
    fc = np.abs(np.asarray(f_calc_abs))
    if fc.shape != table.f_obs.shape:
        raise DrefineError(f"f_calc has {fc.shape[0]} values for {len(table)} reflections")
    k = scale_factor(table.f_obs, fc, table.work)
    fo_w, fc_w = _masked_pair(table.f_obs, fc, table.work)
    fo_t, fc_t = _masked_pair(table.f_obs, fc, table.test)
    return _r(fo_w, fc_w, k), _r(fo_t, fc_t, k)


def _masked_pair(f_obs, f_calc_abs, mask) -> tuple[np.ndarray, np.ndarray]:
    fo = np.asarray(f_obs, dtype=np.float64)
    fc = np.abs(np.asarray(f_calc_abs)).astype(np.float64)
    sel = np.isfinite(fo) & np.isfinite(fc)
    if mask is not None:
        sel &= np.asarray(mask, dtype=bool)
    return fo[sel], fc[sel]


def _r(fo: np.ndarray, fc: np.ndarray, k: float) -> float:
    den = float(np.abs(fo).sum())
    return float(np.abs(fo - k * fc).sum() / den) if den > 0 else float("nan")
