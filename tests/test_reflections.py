"""The reflection table: column choice, free flags, French–Wilson, validation, R factors.

Tests with real data skip when the shared data are absent; the others write their own tiny MTZ
files with gemmi. Values are checked against independent references (the MTZ's own columns,
gemmi per reflection, closed forms computed here), never against the code under test.
"""
from __future__ import annotations

import gzip

import gemmi
import numpy as np
import pytest
from conftest import need

from drefine.errors import DrefineError, InputError
from drefine.io.reflections import (
    ReflectionTable,
    check_cell_compatible,
    default_n_bins,
    make_free_set,
    r_factor,
    r_work_free,
    read_reflections,
    resolution_bins,
    scale_factor,
)

CELL = gemmi.UnitCell(31.0, 42.0, 53.0, 90, 90, 90)
SG = gemmi.SpaceGroup("P 21 21 21")


def write_mtz(path, columns, hkl=None, cell=CELL, sg=SG, d_min=2.5):
    """A merged MTZ with H K L and `columns` [(label, type, values)]; returns (path, hkl)."""
    if hkl is None:
        hkl = gemmi.make_miller_array(cell, sg, d_min)
        hkl = hkl[~sg.operations().systematic_absences(hkl)]
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = sg
    mtz.add_dataset("test")
    mtz.set_cell_for_all(cell)
    arrays = [hkl[:, 0], hkl[:, 1], hkl[:, 2]]
    for label, typ, values in columns(len(hkl)) if callable(columns) else columns:
        mtz.add_column(label, typ)
        arrays.append(values)
    mtz.set_data(np.column_stack(arrays).astype(np.float32))
    mtz.write_to_file(str(path))
    return path, hkl


def amplitudes(n, seed=1):
    rng = np.random.default_rng(seed)
    f = rng.rayleigh(100.0, n) + 1.0
    return f, 0.05 * f + 1.0


def ccp4_flags(n, seed=2):
    return np.random.default_rng(seed).integers(0, 20, n).astype(float)


def tiny_f_mtz(tmp_path, name="tiny.mtz", **kw):
    def cols(n):
        f, s = amplitudes(n)
        return [("FreeR_flag", "I", ccp4_flags(n)), ("FP", "F", f), ("SIGFP", "Q", s)]
    return write_mtz(tmp_path / name, cols, **kw)


def mtz_column(path, label):
    return np.asarray(gemmi.read_mtz_file(str(path)).column_with_label(label).array, dtype=np.float64)


def symmetry_reference(hkl, sg):
    """Centric flags and epsilon from the symmetry matrices (numpy, independent of gemmi's helpers):
    h is centric if some rotation maps it to −h; epsilon counts the rotations that leave h alone,
    times the number of centring vectors."""
    ops = sg.operations()
    rots = np.array([op.rot for op in ops.sym_ops], dtype=np.int64) // ops.sym_ops[0].DEN
    hr = np.einsum("ni,kij->knj", hkl.astype(np.int64), rots)  # h·R for every op
    same = np.all(hr == hkl[None], axis=2)
    minus = np.all(hr == -hkl[None], axis=2)
    return minus.any(axis=0), same.sum(axis=0) * len(ops.cen_ops)


# ---------------------------------------------------------------------------------------------
# small files made here


def test_tiny_mtz_auto_columns_ccp4_flags_and_d(tmp_path):
    path, hkl = tiny_f_mtz(tmp_path)
    flags = mtz_column(path, "FreeR_flag")
    t = read_reflections(path)
    assert t.columns_used == {"F": "FP", "SIGF": "SIGFP", "FREE": "FreeR_flag"}
    assert len(t) == len(hkl)
    np.testing.assert_array_equal(t.hkl, hkl)
    np.testing.assert_array_equal(t.free, flags == 0)
    np.testing.assert_allclose(t.f_obs, mtz_column(path, "FP"))
    h, k, l = hkl.T.astype(float)
    d_ref = 1 / np.sqrt(h**2 / CELL.a**2 + k**2 / CELL.b**2 + l**2 / CELL.c**2)
    np.testing.assert_allclose(t.d, d_ref, rtol=1e-12)
    assert t.d_min == pytest.approx(d_ref.min()) and t.d_max == pytest.approx(d_ref.max())
    assert t.work.sum() + t.test.sum() == len(t) and not (t.work & t.test).any()
    assert any("CCP4" in n for n in t.notes)
    assert t.hkl.dtype == np.int32 and t.d.dtype == np.float64 and t.free.dtype == bool


@pytest.mark.parametrize("symbol", ["P 21 21 21", "P 43", "P 65 2 2", "C 1 2 1", "P -1", "I 41"])
def test_centric_and_epsilon_match_symmetry_matrices(tmp_path, symbol):
    sg = gemmi.SpaceGroup(symbol)
    cell = {"P 43": gemmi.UnitCell(40, 40, 50, 90, 90, 90),
            "P 65 2 2": gemmi.UnitCell(40, 40, 60, 90, 90, 120),
            "C 1 2 1": gemmi.UnitCell(50, 30, 40, 90, 105, 90),
            "P -1": gemmi.UnitCell(20, 25, 30, 80, 85, 95),
            "I 41": gemmi.UnitCell(40, 40, 50, 90, 90, 90)}.get(symbol, CELL)

    def cols(n):
        f, s = amplitudes(n)
        return [("F", "F", f), ("SIGF", "Q", s)]
    path, hkl = write_mtz(tmp_path / "s.mtz", cols, cell=cell, sg=sg, d_min=3.0)
    t = read_reflections(path)
    assert len(t) == len(hkl) > 50
    centric, eps = symmetry_reference(t.hkl, sg)
    np.testing.assert_array_equal(t.centric, centric)
    np.testing.assert_array_equal(t.epsilon, eps)
    if symbol == "P -1":
        assert t.centric.all()


def test_to_mtz_round_trip_and_atomic(tmp_path):
    path, _ = tiny_f_mtz(tmp_path)
    t = read_reflections(path)
    out = tmp_path / "sub" / "out.mtz"
    t.to_mtz(out)
    assert [p.name for p in out.parent.iterdir()] == ["out.mtz"]  # no temporary left behind
    r = read_reflections(out)
    np.testing.assert_array_equal(r.hkl, t.hkl)
    np.testing.assert_allclose(r.f_obs, t.f_obs, rtol=1e-6)
    np.testing.assert_allclose(r.sigma_f, t.sigma_f, rtol=1e-6)
    np.testing.assert_array_equal(r.free, t.free)
    assert mtz_column(out, "FreeR_flag")[t.free].max() == 0
    assert mtz_column(out, "FreeR_flag")[~t.free].min() >= 1
    assert t.notes[-1].startswith("written to")


def test_phenix_and_ccp4_two_value_flags(tmp_path):
    rng = np.random.default_rng(5)

    def cols(test_value):
        def make(n):
            f, s = amplitudes(n)
            test = rng.random(n) < 0.08
            flags = np.where(test, test_value, 1 - test_value).astype(float)
            return [("F", "F", f), ("SIGF", "Q", s), ("R-free-flags", "I", flags)]
        return make
    phenix, _ = write_mtz(tmp_path / "phenix.mtz", cols(1))
    t = read_reflections(phenix)
    np.testing.assert_array_equal(t.free, mtz_column(phenix, "R-free-flags") == 1)
    assert 0.04 < t.free.mean() < 0.12
    ccp4, _ = write_mtz(tmp_path / "ccp4.mtz", cols(0))
    t = read_reflections(ccp4)
    np.testing.assert_array_equal(t.free, mtz_column(ccp4, "R-free-flags") == 0)
    # an explicit value overrides the heuristic
    t = read_reflections(ccp4, free_test_value=1)
    np.testing.assert_array_equal(t.free, mtz_column(ccp4, "R-free-flags") == 1)
    with pytest.raises(InputError, match="no reflection has R-free-flags = 7; values present: 0, 1"):
        read_reflections(ccp4, free_test_value=7)


def test_ambiguous_flags_need_free_test_value(tmp_path):
    def cols(n):
        f, s = amplitudes(n)
        return [("F", "F", f), ("SIGF", "Q", s), ("FREE", "I", (np.arange(n) % 2).astype(float))]
    path, _ = write_mtz(tmp_path / "half.mtz", cols)
    with pytest.raises(InputError, match="give free_test_value"):
        read_reflections(path)
    assert read_reflections(path, free_test_value=1).free.sum() == mtz_column(path, "FREE").sum()


def test_missing_free_flags_made_with_seed(tmp_path):
    def cols(n):
        f, s = amplitudes(n)
        return [("F", "F", f), ("SIGF", "Q", s)]
    path, _ = write_mtz(tmp_path / "nofree.mtz", cols, d_min=1.8)
    a, b, c = (read_reflections(path, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.free, b.free)
    assert (a.free != c.free).any()
    assert abs(a.free.mean() - 0.05) < 0.02
    assert any("free set made with seed 0 (5 %" in n for n in a.notes)
    # the set depends on hkl only: a resolution cut keeps the same test reflections
    cut = read_reflections(path, d_min=2.5)
    sel = a.d >= 2.5
    np.testing.assert_array_equal(cut.free, a.free[sel])
    # order independence of make_free_set
    perm = np.random.default_rng(0).permutation(len(a))
    np.testing.assert_array_equal(make_free_set(a.hkl[perm], a.d[perm], 0.05, 0), a.free[perm])
    shells = make_free_set(a.hkl, a.d, 0.1, seed=3, thin_shells=True)
    assert 0.02 < shells.mean() < 0.25
    # whole shells: test reflections come in runs along 1/d³
    order = np.argsort(a.d)
    assert np.count_nonzero(np.diff(shells[order].astype(int))) < 0.5 * shells.sum()


def test_intensities_labin_and_french_wilson_small(tmp_path):
    rng = np.random.default_rng(3)

    def cols(n):
        f, s = amplitudes(n)
        i_true = rng.exponential(1000.0, n)
        sig_i = np.sqrt(i_true + 100.0)
        i_obs = i_true + rng.normal(0, 1, n) * sig_i
        return [("F", "F", f), ("SIGF", "Q", s), ("IMEAN", "J", i_obs), ("SIGIMEAN", "Q", sig_i),
                ("FreeR_flag", "I", ccp4_flags(n))]
    path, hkl = write_mtz(tmp_path / "both.mtz", cols, d_min=2.0)
    auto = read_reflections(path)
    assert auto.columns_used["F"] == "F" and auto.columns_used["I"] == "IMEAN"  # amplitudes preferred
    np.testing.assert_allclose(auto.i_obs, mtz_column(path, "IMEAN"))
    t = read_reflections(path, labin="IMEAN,SIGIMEAN,FreeR_flag")
    assert t.columns_used == {"I": "IMEAN", "SIGI": "SIGIMEAN", "FREE": "FreeR_flag"}
    i_obs = mtz_column(path, "IMEAN")
    assert (i_obs < 0).any()
    assert len(t) == len(hkl) and np.all(np.isfinite(t.f_obs)) and np.all(t.f_obs > 0)
    assert np.all(np.isfinite(t.sigma_f)) and np.all(t.sigma_f > 0)
    assert any("French–Wilson" in n for n in t.notes)
    strong = i_obs / mtz_column(path, "SIGIMEAN") > 20
    np.testing.assert_allclose(t.f_obs[strong], np.sqrt(i_obs[strong]), rtol=0.01)
    by_role = read_reflections(path, labin="I=IMEAN,SIGI=SIGIMEAN")
    np.testing.assert_allclose(by_role.f_obs, t.f_obs)


def test_anomalous_only_merged_to_mean(tmp_path):
    rng = np.random.default_rng(4)

    def cols(n):
        fp, sp = amplitudes(n, 7)
        fm = fp * (1 + 0.03 * rng.normal(size=n))
        fm[::10] = np.nan  # F(-) unmeasured: F(+) alone is used
        return [("F(+)", "G", fp), ("SIGF(+)", "L", sp), ("F(-)", "G", fm), ("SIGF(-)", "L", sp.copy())]
    path, _ = write_mtz(tmp_path / "ano.mtz", cols)
    fp, fm = mtz_column(path, "F(+)"), mtz_column(path, "F(-)")
    sp = mtz_column(path, "SIGF(+)")
    t = read_reflections(path)
    assert t.columns_used["F(+)"] == "F(+)" and t.columns_used["SIGF(-)"] == "SIGF(-)"
    expect = np.where(np.isnan(fm), fp, 0.5 * (fp + fm))
    np.testing.assert_allclose(t.f_obs, expect, rtol=1e-6)
    acentric_both = ~t.centric & ~np.isnan(fm)
    np.testing.assert_allclose(t.sigma_f[acentric_both], sp[acentric_both] / np.sqrt(2), rtol=1e-6)
    assert any("merged to their mean" in n for n in t.notes)


def test_reflections_moved_to_asu_and_duplicates_refused(tmp_path):
    hkl = gemmi.make_miller_array(CELL, SG, 3.0)
    hkl = hkl[~SG.operations().systematic_absences(hkl)]
    flipped = hkl * np.array([-1, 1, -1], dtype=np.int32)  # symmetry mates (2-fold about b)

    def cols(n):
        f, s = amplitudes(n)
        return [("F", "F", f), ("SIGF", "Q", s)]
    path, _ = write_mtz(tmp_path / "mates.mtz", cols, hkl=flipped)
    t = read_reflections(path)
    np.testing.assert_array_equal(t.hkl, hkl)
    dup, _ = write_mtz(tmp_path / "dup.mtz", cols, hkl=np.vstack([hkl, flipped[:5]]))
    with pytest.raises(InputError, match="5 reflections occur more than once"):
        read_reflections(dup)


def test_systematic_absences_and_origin_dropped(tmp_path):
    hkl = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [1, 2, 3], [0, 0, 3], [2, 3, 4]], dtype=np.int32)

    def cols(n):
        return [("F", "F", np.full(n, 10.0)), ("SIGF", "Q", np.ones(n))]
    path, _ = write_mtz(tmp_path / "abs.mtz", cols, hkl=hkl)
    t = read_reflections(path)
    np.testing.assert_array_equal(t.hkl, [[2, 0, 0], [1, 2, 3], [2, 3, 4]])
    assert any("2 systematically absent" in n for n in t.notes)
    assert any("0 0 0" in n for n in t.notes)


def test_bins_equal_count_in_inverse_d_cubed():
    d = np.random.default_rng(0).uniform(1.5, 20.0, 1003)
    b = resolution_bins(d, 10)
    counts = np.bincount(b)
    assert len(counts) == 10 and counts.max() - counts.min() <= 1
    # bins are ordered: every d of bin i is ≥ every d of bin i+1
    hi = np.array([d[b == i].max() for i in range(10)])
    lo = np.array([d[b == i].min() for i in range(10)])
    assert np.all(lo[:-1] >= hi[1:])
    assert default_n_bins(100) == 5 and default_n_bins(5000) == 10 and default_n_bins(10**6) == 20


def test_bin_limits_and_select(tmp_path):
    path, _ = tiny_f_mtz(tmp_path)
    t = read_reflections(path, n_bins=7)
    assert t.n_bins == 7
    lim = t.bin_limits()
    assert lim.shape == (7, 2)
    assert lim[0, 0] == pytest.approx(t.d_max) and lim[-1, 1] == pytest.approx(t.d_min)
    s = t.select(t.work)
    assert len(s) == t.work.sum() and not s.free.any()
    np.testing.assert_array_equal(s.hkl, t.hkl[t.work])
    assert t.with_bins(3).n_bins == 3


# ---------------------------------------------------------------------------------------------
# R factors


def test_r_factor_closed_forms():
    fo = np.array([10.0, 20.0, 30.0, 40.0])
    fc = np.array([5.0, 10.0, 15.0, 20.0])
    assert scale_factor(fo, fc) == pytest.approx(2.0)
    assert r_factor(fo, fc) == pytest.approx(0.0)
    assert r_factor(fo, fc, scale=False) == pytest.approx(0.5)
    fc2 = np.array([10.0, 20.0, 30.0, 50.0])
    assert r_factor(fo, fc2, scale=False) == pytest.approx(10.0 / 100.0)
    assert r_factor(fo, fc2, mask=np.array([1, 1, 1, 0], bool), scale=False) == 0.0
    k = np.dot(fo, fc2) / np.dot(fc2, fc2)
    assert r_factor(fo, -fc2) == pytest.approx(np.abs(fo - k * fc2).sum() / fo.sum())


def test_r_work_free_uses_work_scale(tmp_path):
    path, _ = tiny_f_mtz(tmp_path)
    t = read_reflections(path)
    fc = t.f_obs / 3.0
    fc[t.free] *= 1.1  # test set off by 10 %: R-free = 1/11 with k = 3 from the work set
    rw, rf = r_work_free(t, fc)
    assert rw == pytest.approx(0.0, abs=1e-12)
    assert rf == pytest.approx(0.1, rel=1e-9)
    with pytest.raises(DrefineError):
        r_work_free(t, fc[:-1])


# ---------------------------------------------------------------------------------------------
# bad input


def test_missing_file_and_not_reflections(tmp_path, example_model_path):
    with pytest.raises(InputError, match="reflection file not found"):
        read_reflections(tmp_path / "nope.mtz")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello\nthis is not reflection data\n")
    with pytest.raises(InputError, match="neither an MTZ file nor an mmCIF"):
        read_reflections(txt)
    gz = tmp_path / "junk.mtz.gz"
    with gzip.open(gz, "wb") as fh:
        fh.write(b"\x00\x01 binary junk" * 50)
    with pytest.raises(InputError, match="neither an MTZ"):
        read_reflections(gz)
    with pytest.raises(InputError, match="no merged structure factors"):
        read_reflections(example_model_path)  # a model mmCIF, not structure factors
    with pytest.raises(InputError, match="directory"):
        read_reflections(tmp_path)
    trunc = tmp_path / "trunc.mtz"
    src, _ = tiny_f_mtz(tmp_path)
    trunc.write_bytes(src.read_bytes()[:200])
    with pytest.raises(InputError, match="not a readable MTZ"):
        read_reflections(trunc)


def test_labin_errors(tmp_path):
    path, _ = tiny_f_mtz(tmp_path)
    with pytest.raises(InputError, match=r"column 'FOBS' \(from labin\) not found; columns: FreeR_flag\(I\), "
                                         r"FP\(F\), SIGFP\(Q\)"):
        read_reflections(path, labin="FOBS,SIGFOBS")
    with pytest.raises(InputError, match="type I"):
        read_reflections(path, labin="FreeR_flag,SIGFP")
    with pytest.raises(DrefineError, match="comma-separated"):
        read_reflections(path, labin="FP,,SIGFP")


def test_no_observation_column(tmp_path):
    def cols(n):
        return [("FC", "F", np.ones(n)), ("PHIC", "P", np.zeros(n))]
    path, _ = write_mtz(tmp_path / "calc.mtz", cols)
    msg = r"no amplitude \(type F\) or intensity \(type J\) column.*FC\(F\), PHIC\(P\)"
    with pytest.raises(InputError, match=msg):
        read_reflections(path)


def test_all_zero_sigmas_fall_back_to_unit_weights(tmp_path):
    def cols(n):
        f, _ = amplitudes(n)
        return [("F", "F", f), ("SIGF", "Q", np.zeros(n))]
    path, hkl = write_mtz(tmp_path / "zero.mtz", cols)
    t = read_reflections(path)
    assert len(t) == len(hkl)
    np.testing.assert_array_equal(t.sigma_f, 1.0)
    assert any("unit weights" in n and "zero or negative" in n for n in t.notes)


def test_some_bad_sigmas_dropped(tmp_path):
    def cols(n):
        f, s = amplitudes(n)
        s[:7] = 0.0
        return [("F", "F", f), ("SIGF", "Q", s)]
    path, hkl = write_mtz(tmp_path / "some.mtz", cols)
    t = read_reflections(path)
    assert len(t) == len(hkl) - 7
    assert any("7 reflections with sigma ≤ 0" in n for n in t.notes)


def test_nan_and_inf_amplitudes(tmp_path):
    def cols(n):
        f, s = amplitudes(n)
        f[:11] = np.nan
        f[11:14] = np.inf
        return [("F", "F", f), ("SIGF", "Q", s)]
    path, hkl = write_mtz(tmp_path / "nan.mtz", cols)
    t = read_reflections(path)
    assert len(t) == len(hkl) - 14 and np.all(np.isfinite(t.f_obs))
    assert any(n.startswith("11 reflections with no value (NaN)") for n in t.notes)
    assert any(n.startswith("3 reflections with infinite values") for n in t.notes)

    def all_nan(n):
        return [("F", "F", np.full(n, np.nan)), ("SIGF", "Q", np.ones(n))]
    empty, _ = write_mtz(tmp_path / "allnan.mtz", all_nan)
    with pytest.raises(InputError, match="no reflection has a finite value in F/SIGF"):
        read_reflections(empty)


def test_resolution_limits(tmp_path):
    path, _ = tiny_f_mtz(tmp_path)
    t = read_reflections(path)
    msg = rf"d_min 1.5 Å is beyond the data \(highest resolution {t.d_min:.3f} Å\)"
    with pytest.raises(InputError, match=msg):
        read_reflections(path, d_min=1.5)
    with pytest.raises(InputError, match="no reflection between"):
        read_reflections(path, d_max=2.0)
    with pytest.raises(DrefineError):
        read_reflections(path, d_min=5.0, d_max=4.0)
    cut = read_reflections(path, d_min=4.0, d_max=10.0)
    assert cut.d_min >= 4.0 and cut.d_max <= 10.0
    assert len(cut) == np.count_nonzero((t.d >= 4.0) & (t.d <= 10.0))


def test_cell_compatibility():
    t = ReflectionTable(cell=CELL, spacegroup=SG, hkl=np.zeros((0, 3), np.int32), d=np.zeros(0),
                        centric=np.zeros(0, bool), epsilon=np.zeros(0, np.int32), free=np.zeros(0, bool),
                        f_obs=np.zeros(0), sigma_f=np.zeros(0), bin=np.zeros(0, np.int32))
    check_cell_compatible(t, gemmi.UnitCell(31.5, 42.0, 52.5, 90.5, 90, 90))  # within 2 % and 1°
    msg = r"model cell \(32.000 .*\) differs from the data cell \(31.000 .*a by 3.2 %"
    with pytest.raises(InputError, match=msg):
        check_cell_compatible(t, gemmi.UnitCell(32.0, 42.0, 53.0, 90, 90, 90))
    with pytest.raises(InputError, match="beta by 2.0°"):
        check_cell_compatible(t, gemmi.UnitCell(31.0, 42.0, 53.0, 90, 92, 90))
    check_cell_compatible(t, gemmi.UnitCell(32.0, 42.0, 53.0, 90, 90, 90), tolerance=0.05)


# ---------------------------------------------------------------------------------------------
# shared reference data


@pytest.fixture(scope="module")
def refme(data_dir):
    path = need(data_dir, "untangle/refme.mtz")
    return path, read_reflections(path)


def test_refme_columns_free_set_and_symmetry(refme):
    path, t = refme
    mtz = gemmi.read_mtz_file(str(path))
    assert t.columns_used == {"F": "F", "SIGF": "SIGF", "FREE": "FreeR_flag", "PHI": "PHI", "FOM": "FOM"}
    assert len(t) == mtz.nreflections == 31001
    assert t.spacegroup.hm == "P 21 21 21"
    flags = mtz.column_with_label("FreeR_flag").array
    np.testing.assert_array_equal(t.free, flags == 0)
    assert 0.045 < t.free.mean() < 0.055
    np.testing.assert_allclose(t.phases_deg, mtz.column_with_label("PHI").array, atol=1e-4)
    ops = t.spacegroup.operations()
    hkl = t.hkl.tolist()
    assert t.centric.tolist() == [ops.is_reflection_centric(h) for h in hkl]
    assert t.epsilon.tolist() == [ops.epsilon_factor(h) for h in hkl]
    np.testing.assert_allclose(t.d, [t.cell.calculate_d(h) for h in hkl], rtol=1e-12)
    centric, eps = symmetry_reference(t.hkl, t.spacegroup)
    np.testing.assert_array_equal(t.centric, centric)
    np.testing.assert_array_equal(t.epsilon, eps)
    assert t.d_min == pytest.approx(0.9647, abs=1e-3) and t.d_max == pytest.approx(15.825, abs=1e-3)


def test_refme_r_f_vs_f0(refme):
    path, t = refme
    f0 = gemmi.read_mtz_file(str(path)).column_with_label("F0").array.astype(np.float64)
    r_all = r_factor(t.f_obs, f0, scale=False)
    assert r_all == pytest.approx(0.027, abs=0.001)
    shell = (t.d >= 0.96) & (t.d <= 1.01)
    assert shell.sum() > 1000
    assert r_factor(t.f_obs, f0, mask=shell, scale=False) == pytest.approx(0.13, abs=0.01)
    assert r_factor(t.f_obs, f0) == pytest.approx(r_all, abs=0.001)  # F and F0 share a scale
    rw, rf = r_work_free(t, f0)
    assert rw == pytest.approx(0.027, abs=0.002) and rf == pytest.approx(0.027, abs=0.004)


def test_refme_cell_against_its_models(refme, data_dir):
    _, t = refme
    model = gemmi.read_structure(str(need(data_dir, "untangle/best.pdb")))
    check_cell_compatible(t, model.cell)
    with pytest.raises(InputError, match="differs from the data cell"):
        check_cell_compatible(t, gemmi.UnitCell(model.cell.a * 1.05, model.cell.b, model.cell.c, 90, 90, 90))


def _fw_reference(i_obs, sig, sigma_wilson, centric):
    """Posterior mean of F = √J under French & Wilson's Wilson prior, integrated here on a grid in F:
    acentric p(J) ∝ exp(−J/Σ), centric p(J) ∝ J^(−½) exp(−J/2Σ), likelihood N(I | J, σ)."""
    top = np.sqrt(np.maximum(i_obs, 0) + 12 * sig)
    f = top[:, None] * np.linspace(0, 1, 4001)[None, :]
    j = f**2
    log_like = -0.5 * ((j - i_obs[:, None]) / sig[:, None]) ** 2
    # dJ = 2F dF; the centric J^(-1/2) cancels the 2F up to a constant
    jac = np.where(centric[:, None], 1.0, 2 * f)
    prior = np.where(centric[:, None], -j / (2 * sigma_wilson[:, None]), -j / sigma_wilson[:, None])
    w = jac * np.exp(log_like + prior - (log_like + prior).max(axis=1, keepdims=True))
    return np.trapezoid(w * f, f, axis=1) / np.trapezoid(w, f, axis=1)


def test_1l2h_french_wilson(data_dir):
    path = need(data_dir, "xray/1l2h/1l2h.mtz.gz")
    t = read_reflections(path)
    mtz = gemmi.read_mtz_file(str(path))
    assert t.columns_used == {"I": "IMEAN", "SIGI": "SIGIMEAN", "FREE": "FreeR_flag"}
    assert len(t) == mtz.nreflections == 31781
    assert np.all(np.isfinite(t.f_obs)) and np.all(t.f_obs > 0)
    assert np.all(np.isfinite(t.sigma_f)) and np.all(t.sigma_f > 0)
    i_obs, sig = t.i_obs, t.sigma_i
    np.testing.assert_allclose(i_obs, mtz.column_with_label("IMEAN").array, rtol=1e-6)
    assert (i_obs < 0).sum() == 448  # negative intensities become positive amplitudes
    z = i_obs / sig
    # Strong reflections: F ≈ √I. The Wilson prior pulls F below √I by about σ²/(2Σ√I), a few
    # per cent for I/σ ≈ 5 in the weak outer shells, so the 1 % bound holds for all at I/σ > 20
    # and for the typical (median) reflection at I/σ > 5.
    ratio = t.f_obs / np.sqrt(np.where(i_obs > 0, i_obs, np.nan))
    assert np.all(np.abs(ratio[z > 20] - 1) < 0.01)
    assert np.median(np.abs(ratio[z > 5] - 1)) < 0.01
    # Independent reference: the French–Wilson posterior mean integrated here, with the Wilson
    # mean intensity Σ = ε·<I/ε> in the table's 20 resolution bins.
    sigma_bin = np.bincount(t.bin, weights=i_obs / t.epsilon) / np.bincount(t.bin)
    sigma_w = sigma_bin[t.bin] * t.epsilon
    rng = np.random.default_rng(1)
    for centric in (False, True):
        pool = np.flatnonzero(t.centric == centric)
        sel = rng.choice(pool, min(1500, len(pool)), replace=False)
        ref = _fw_reference(i_obs[sel], sig[sel], sigma_w[sel], t.centric[sel])
        dev = np.abs(t.f_obs[sel] / ref - 1)
        assert np.max(dev) < 0.03 and np.median(dev) < 0.005
        assert np.max(dev[z[sel] > 5]) < 0.01
    assert 0.04 < t.free.mean() < 0.06
    np.testing.assert_array_equal(t.free, mtz.column_with_label("FreeR_flag").array == 0)


def test_6mw0_sf_cif_makes_free_set_and_round_trips(data_dir, tmp_path):
    path = need(data_dir, "xray/6mw0/6mw0-sf.cif.gz")
    t = read_reflections(path)
    assert t.columns_used["F"] == "F_meas_au" and t.columns_used["SIGF"] == "F_meas_sigma_au"
    assert "FREE" not in t.columns_used
    block = gemmi.cif.read(str(path))[0]
    f_cif = np.array([float(x) if x not in "?." else np.nan for x in block.find_values("_refln.F_meas_au")])
    assert len(t) == np.isfinite(f_cif).sum() == 4832
    assert t.spacegroup.hm == "P 21 21 21" and t.cell.a == pytest.approx(8.291)
    assert t.d_min == pytest.approx(0.78, abs=0.01)
    assert any("free set made with seed 0" in n for n in t.notes)
    assert 0.03 < t.free.mean() < 0.07
    again = read_reflections(path, seed=0)
    other = read_reflections(path, seed=1)
    np.testing.assert_array_equal(t.free, again.free)
    assert (t.free != other.free).sum() > 100
    out = tmp_path / "6mw0_free.mtz"
    t.to_mtz(out)
    assert t.notes[-1].startswith(f"written to {out}")
    r = read_reflections(out)
    np.testing.assert_array_equal(r.hkl, t.hkl)
    np.testing.assert_allclose(r.f_obs, t.f_obs, rtol=1e-6)
    np.testing.assert_allclose(r.sigma_f, t.sigma_f, rtol=1e-6)
    np.testing.assert_array_equal(r.free, t.free)
    np.testing.assert_allclose(r.i_obs, t.i_obs, rtol=1e-6)
    assert not any("free set made" in n for n in r.notes)


@pytest.mark.parametrize("rel, f, sigf, free, n, d_min, d_max", [
    ("xray/5orl/5orl_phases.mtz", "FP", "SIGFP", "FREE", 39480, 1.690, 65.55),
    ("xray/4hg7/4hg7.mtz", "FP", "SIGFP", "FREE", 21397 - 262, 1.600, 30.94),
    ("xray/5e5z/5e5z.mtz.gz", "FP", "SIGFP", "FREE", 441 - 38, 1.664, 18.67),
])
def test_amplitude_files(data_dir, rel, f, sigf, free, n, d_min, d_max):
    path = need(data_dir, rel)
    t = read_reflections(path)
    assert (t.columns_used["F"], t.columns_used["SIGF"], t.columns_used["FREE"]) == (f, sigf, free)
    assert "PHI" not in t.columns_used  # model phases (PHIC, PHWT) are not taken as observations
    assert len(t) == n
    assert t.d_min == pytest.approx(d_min, abs=2e-3) and t.d_max == pytest.approx(d_max, abs=0.01)
    mtz = gemmi.read_mtz_file(str(path))
    fp = mtz.column_with_label(f).array
    np.testing.assert_allclose(t.f_obs, fp[np.isfinite(fp)], rtol=1e-6)
    flags = mtz.column_with_label(free).array[np.isfinite(fp)]
    np.testing.assert_array_equal(t.free, flags == 0)
    assert 0.03 < t.free.mean() < 0.06
    print(rel, t.columns_used, len(t), f"{t.d_max:.2f}-{t.d_min:.3f} Å", t.notes)


def test_5e5z_keeps_intensities_and_labin_picks_them(data_dir):
    path = need(data_dir, "xray/5e5z/5e5z.mtz.gz")
    t = read_reflections(path)
    assert t.columns_used["I"] == "I" and t.columns_used["SIGI"] == "SIGI"
    mtz = gemmi.read_mtz_file(str(path))
    ok = np.isfinite(mtz.column_with_label("FP").array)
    np.testing.assert_allclose(t.i_obs, mtz.column_with_label("I").array[ok], rtol=1e-6)
    ti = read_reflections(path, labin="I,SIGI,FREE")
    assert ti.columns_used == {"I": "I", "SIGI": "SIGI", "FREE": "FREE"}
    assert len(ti) == len(t) and np.all(ti.f_obs > 0)
    # French–Wilson F from I against the file's own FP (made from the same I upstream, on a scale
    # 10× larger): one common ratio, within 2 % for every reflection
    ratio = ti.f_obs / t.f_obs
    assert np.median(ratio) == pytest.approx(0.1, rel=0.01)
    assert np.max(np.abs(ratio / np.median(ratio) - 1)) < 0.02


def test_french_wilson_slabs_match_single_call(monkeypatch):
    import drefine.io.reflections as refl

    rng = np.random.default_rng(11)
    hkl = gemmi.make_miller_array(CELL, SG, 1.6)
    hkl = hkl[~SG.operations().systematic_absences(hkl)]
    d = CELL.calculate_d_array(hkl)
    i_true = rng.exponential(1.0, len(hkl)) * 1e4 * np.exp(-10.0 / (4 * d**2))
    sig = np.sqrt(i_true + 20.0)
    i_obs = i_true + rng.normal(size=len(hkl)) * sig
    monkeypatch.setattr(refl, "_FW_KERNEL_ELEMENTS", len(hkl) * 20 * 100 + 1)
    f1, s1, how1 = refl.french_wilson(hkl, i_obs, sig, CELL, SG)
    monkeypatch.setattr(refl, "_FW_KERNEL_ELEMENTS", len(hkl) * 20 * 100 // 4)
    f4, s4, how4 = refl.french_wilson(hkl, i_obs, sig, CELL, SG)
    assert "slabs" in how4 and "slabs" not in how1
    np.testing.assert_allclose(f4, f1, rtol=1e-5)
    np.testing.assert_allclose(s4, s1, rtol=1e-5)
    assert np.all(f1 > 0) and np.all(np.isfinite(s1))


def test_intensities_with_unusable_sigmas(tmp_path):
    def cols(n):
        i = np.linspace(-5.0, 400.0, n)
        return [("I", "J", i), ("SIGI", "Q", np.zeros(n))]
    path, _ = write_mtz(tmp_path / "isig0.mtz", cols)
    t = read_reflections(path)
    np.testing.assert_allclose(t.f_obs, np.sqrt(np.maximum(mtz_column(path, "I"), 0)), rtol=1e-6)
    np.testing.assert_array_equal(t.sigma_f, 1.0)
    assert any("unit weights" in n and "French–Wilson impossible" in n for n in t.notes)


def test_missing_free_flags_go_to_work_set(tmp_path):
    def cols(n):
        f, s = amplitudes(n)
        flags = ccp4_flags(n)
        flags[:9] = np.nan
        return [("F", "F", f), ("SIGF", "Q", s), ("FreeR_flag", "I", flags)]
    path, _ = write_mtz(tmp_path / "nanflag.mtz", cols)
    t = read_reflections(path)
    assert not t.free[:9].any()
    assert any(n.startswith("9 reflections without a free flag") for n in t.notes)


def test_labin_anomalous_positional(tmp_path):
    def cols(n):
        fp, sp = amplitudes(n, 3)
        return [("FreeR_flag", "I", ccp4_flags(n)), ("FPLUS", "G", fp), ("SIGFPLUS", "L", sp),
                ("FMINUS", "G", fp + 2.0), ("SIGFMINUS", "L", sp)]
    path, _ = write_mtz(tmp_path / "ano2.mtz", cols)
    t = read_reflections(path, labin="FPLUS,SIGFPLUS,FMINUS,SIGFMINUS,FreeR_flag")
    np.testing.assert_allclose(t.f_obs, mtz_column(path, "FPLUS") + 1.0, rtol=1e-6)
    assert t.columns_used["FREE"] == "FreeR_flag"
    np.testing.assert_array_equal(t.free, mtz_column(path, "FreeR_flag") == 0)


SF_CIF = """data_r9xyzsf
_cell.length_a 31.0
_cell.length_b 42.0
_cell.length_c 53.0
_cell.angle_alpha 90
_cell.angle_beta 90
_cell.angle_gamma 90
_symmetry.space_group_name_H-M 'P 21 21 21'
loop_
_refln.index_h
_refln.index_k
_refln.index_l
_refln.status
_refln.F_meas_au
_refln.F_meas_sigma_au
{rows}
"""


def test_sf_cif_status_free_flags(tmp_path):
    hkl = gemmi.make_miller_array(CELL, SG, 4.0)
    hkl = hkl[~SG.operations().systematic_absences(hkl)]
    f, s = amplitudes(len(hkl))
    status = np.where(np.arange(len(hkl)) % 10 == 3, "f", "o")
    status[5] = "x"  # unobserved
    rows = "\n".join(f"{h} {k} {l} {st} {'?' if st == 'x' else f'{a:.2f}'} {b:.2f}"
                     for (h, k, l), st, a, b in zip(hkl.tolist(), status, f, s))
    path = tmp_path / "r9xyzsf.cif.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(SF_CIF.format(rows=rows))
    t = read_reflections(path)
    assert t.columns_used == {"F": "F_meas_au", "SIGF": "F_meas_sigma_au", "FREE": "status"}
    assert len(t) == len(hkl) - 1
    np.testing.assert_array_equal(t.free, (status == "f")[status != "x"])
    np.testing.assert_allclose(t.f_obs, np.round(f, 2)[status != "x"], rtol=1e-6)
    assert t.spacegroup.hm == "P 21 21 21" and t.cell.b == pytest.approx(42.0)
