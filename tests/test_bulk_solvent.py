"""Bulk solvent, scaling and R factors against published values and gemmi's independent fit."""
import gemmi
import numpy as np
import pytest
from conftest import need

from drefine.density.bulk_solvent import aniso_basis
from drefine.density.fmodel import compute_fmodel
from drefine.errors import InputError
from drefine.io.models import read_model
from drefine.io.reflections import read_reflections


@pytest.fixture(scope="module")
def untangle(data_dir):
    m = read_model(need(data_dir, "untangle/best.pdb"))
    t = read_reflections(need(data_dir, "untangle/refme.mtz"))
    return m, t, compute_fmodel(m, t)


@pytest.fixture(scope="module")
def orl(data_dir):
    m = read_model(need(data_dir, "xray/5orl/5orl.pdb"))
    t = read_reflections(need(data_dir, "xray/5orl/5orl_phases.mtz"))
    return m, t, compute_fmodel(m, t)


def test_untangle_best_r_factors_match_the_challenge(untangle):
    _, _, fm = untangle
    # The challenge reports R 2.8 %, R-free 3.1 % for best.pdb; the data were made with k_sol 0.42, B_sol 45.
    assert fm.r_work == pytest.approx(0.028, abs=0.005)
    assert fm.r_free == pytest.approx(0.031, abs=0.005)
    assert fm.r_free > fm.r_work
    assert fm.scale.k_sol == pytest.approx(0.42, abs=0.05)


def test_5orl_r_close_to_its_header(orl):
    _, _, fm = orl
    assert abs(fm.r_work - 0.205) < 0.015  # REMARK 3 R VALUE (WORKING SET) 0.205


def _gemmi_fit(table, fm, work):
    h = table.hkl[work].astype(np.int32)
    calc = gemmi.ComplexAsuData(table.cell, table.spacegroup, h, fm.f_calc[work].astype(np.complex64))
    mask = gemmi.ComplexAsuData(table.cell, table.spacegroup, h, fm.f_mask[work].astype(np.complex64))
    obs = gemmi.ValueSigmaAsuData(table.cell, table.spacegroup, h,
                                  np.stack([table.f_obs[work], table.sigma_f[work]], 1).astype(np.float32))
    sc = gemmi.Scaling(table.cell, table.spacegroup)
    sc.use_solvent = True
    sc.prepare_points(calc, obs, mask)
    sc.fit_isotropic_b_approximately()
    sc.fit_parameters()
    return sc


def test_fit_agrees_with_gemmi_scaling(untangle, orl):
    _, t, fm = untangle
    g = _gemmi_fit(t, fm, t.work)
    assert fm.scale.k_sol == pytest.approx(g.k_sol, abs=0.01)
    assert fm.scale.b_sol == pytest.approx(g.b_sol, abs=2.0)
    assert fm.r_work == pytest.approx(g.calculate_r_factor(), abs=1e-3)
    _, t, fm = orl
    g = _gemmi_fit(t, fm, t.work)
    assert fm.r_work <= g.calculate_r_factor() + 1e-3  # ours finds an equal or better minimum


def test_r_per_bin_covers_the_data(orl):
    _, t, fm = orl
    bins = fm.scale.per_bin
    assert sum(b["n_work"] for b in bins) == int(t.work.sum())
    assert bins[0]["d_max"] > bins[-1]["d_min"]


@pytest.mark.parametrize("hm,n", [("P 1", 6), ("P 21 21 21", 3), ("P 61 2 2", 2), ("P 43", 2), ("I 2 3", 1),
                                  ("C 1 2 1", 4)])
def test_anisotropic_scale_obeys_symmetry(hm, n):
    sg = gemmi.SpaceGroup(hm)
    cell = {"P 61 2 2": gemmi.UnitCell(80, 80, 170, 90, 90, 120), "P 43": gemmi.UnitCell(50, 50, 80, 90, 90, 90),
            "I 2 3": gemmi.UnitCell(60, 60, 60, 90, 90, 90),
            "C 1 2 1": gemmi.UnitCell(60, 40, 50, 90, 110, 90)}.get(hm, gemmi.UnitCell(40, 50, 60, 90, 90, 90))
    assert len(aniso_basis(cell, sg)) == n


def test_cell_mismatch_is_refused(data_dir):
    m = read_model(need(data_dir, "untangle/best.pdb"))
    t = read_reflections(need(data_dir, "xray/5orl/5orl_phases.mtz"))
    with pytest.raises(InputError, match="cell"):
        compute_fmodel(m, t)


def test_scale_model_jacobian_matches_finite_differences():
    """The analytic Jacobian of the scale and solvent fit (ln k, B_aniso coefficients, k_sol, B_sol)."""
    from drefine.density.bulk_solvent import _ScaleModel

    rng = np.random.default_rng(0)
    cell = gemmi.UnitCell(40, 50, 60, 90, 100, 90)
    hkl = rng.integers(-8, 9, (400, 3))
    hkl = hkl[np.abs(hkl).sum(1) > 0]
    s_vec = hkl @ np.array(cell.frac.mat.tolist())
    f_calc = rng.normal(size=len(hkl)) + 1j * rng.normal(size=len(hkl))
    f_mask = rng.normal(size=len(hkl)) + 1j * rng.normal(size=len(hkl))
    basis = aniso_basis(cell, gemmi.SpaceGroup("P 1 21 1"))
    model = _ScaleModel(s_vec, (s_vec ** 2).sum(1), f_calc, f_mask, np.abs(f_calc) + 0.1, basis, True)
    x = np.concatenate([[0.2], rng.normal(size=len(basis)) * 3, [0.35, 45.0]])
    jac = model.jacobian(x)
    h = 1e-6
    numeric = np.array([(model.residuals(x + e) - model.residuals(x - e)) / (2 * h)
                        for e in np.eye(len(x)) * h]).T
    assert np.abs(jac - numeric).max() < 1e-6 * np.abs(jac).max()


def test_loglinear_scale_is_the_least_squares_line():
    """The closed-form (k, B) of ln Fo − ln|Fm| against s²/4 equals numpy's least squares, with
    unused reflections (zero Fo, excluded) left out."""
    from drefine.density.bulk_solvent import _loglinear_scale

    rng = np.random.default_rng(0)
    s2 = rng.uniform(0.001, 0.4, 5000)
    fm = rng.uniform(1, 100, 5000)
    fo = fm * 1.7 * np.exp(-12 * s2 / 4) * np.exp(rng.normal(0, 0.2, 5000))
    fo[:50] = 0.0
    use = rng.random(5000) < 0.9
    ok = (fo > 0) & use
    design = np.stack([np.ones(ok.sum()), -s2[ok] / 4], axis=1)
    (lnk, b), *_ = np.linalg.lstsq(design, np.log(fo[ok] / fm[ok]), rcond=None)
    k_got, b_got = _loglinear_scale(fo, fm, s2, use)
    assert k_got == pytest.approx(np.exp(lnk), rel=1e-12) and b_got == pytest.approx(b, rel=1e-12)
    assert abs(b_got - 12) < 0.5


@pytest.mark.parametrize("cell, hm, d_min", [
    ((45.57, 40.49, 49.62, 90, 90, 90), "P 1", 2.0),
    ((60.0, 60.0, 70.0, 90, 90, 120), "P 65", 1.8),   # oblique axes, 6 operators
    ((52.0, 48.0, 56.0, 90, 90, 90), "P 21 21 21", 1.5),
    ((50.0, 47.0, 55.0, 90, 104.5, 90), "C 1 2 1", 2.5),  # monoclinic, centred
])
def test_solvent_mask_equals_gemmis(example_model_path, tmp_path, cell, hm, d_min):
    """Our shrink on gemmi's unshrunk mask gives gemmi's whole SolventMasker mask point for point,
    in one thread or two; the shrink itself changes many points (so the comparison can fail)."""
    from drefine.density.bulk_solvent import mask_grid_shape, solvent_mask

    st = gemmi.read_structure(str(example_model_path))
    st.remove_hydrogens()
    st.cell = gemmi.UnitCell(*cell)
    st.spacegroup_hm = hm
    st.setup_cell_images()
    path = tmp_path / "m.cif"
    st.make_mmcif_document().write_file(str(path))
    model = read_model(path)
    shape = mask_grid_shape(model, d_min)

    masker = gemmi.SolventMasker(gemmi.AtomicRadiiSet.Cctbx)
    masker.rprobe, masker.rshrink = 1.1, 0.9
    grid = gemmi.FloatGrid(*shape)
    grid.set_unit_cell(st.cell)
    grid.spacegroup = st.find_spacegroup()
    masker.put_mask_on_float_grid(grid, st[0])
    reference = np.array(grid, copy=True)

    ours = solvent_mask(model, shape)
    np.testing.assert_array_equal(ours, reference)
    np.testing.assert_array_equal(solvent_mask(model, shape, threads=1), reference)
    unshrunk = solvent_mask(model, shape, r_shrink=0.0)
    assert (unshrunk != reference).sum() > 0.01 * reference.size
    assert np.all(ours >= unshrunk)  # the shrink only gives points back to the solvent


def test_solvent_grid_search_equals_the_per_point_fits():
    """The compiled (k_sol, B_sol) grid search gives, at every grid point, the line fit and R of
    `_loglinear_scale` and a plain R sum."""
    from drefine.density.bulk_solvent import B_SOL_GRID, K_SOL_GRID, _loglinear_scale, _solvent_grid_search

    rng = np.random.default_rng(3)
    n = 3000
    s2 = rng.uniform(0.002, 0.35, n)
    f_calc = rng.normal(size=n) + 1j * rng.normal(size=n)
    f_mask = (rng.normal(size=n) + 1j * rng.normal(size=n)) * 3.0 * np.exp(-40 * s2)
    truth = 1.7 * np.exp(-8 * s2 / 4) * np.abs(f_calc + 0.35 * np.exp(-45 * s2 / 4) * f_mask)
    fo = truth * (1 + 0.05 * rng.normal(size=n))
    fo[:5] = 0.0  # non-positive amplitudes stay out of the line fit, not out of R
    r, k_all, b_all = _solvent_grid_search(fo, f_calc, f_mask, s2, threads=2)
    for part, one in zip((r, k_all, b_all), _solvent_grid_search(fo, f_calc, f_mask, s2, threads=1)):
        np.testing.assert_array_equal(part, one)  # the columns do not depend on the split
    everything = np.ones(n, dtype=bool)
    for jk, jb in [(0, 0), (7, 7), (16, 18), (3, 12)]:
        fm = f_calc + K_SOL_GRID[jk] * np.exp(-B_SOL_GRID[jb] * s2 / 4) * f_mask
        k, b = _loglinear_scale(fo, np.abs(fm), s2, everything)
        assert k_all[jk, jb] == pytest.approx(k, rel=1e-9) and b_all[jk, jb] == pytest.approx(b, rel=1e-9, abs=1e-9)
        r_direct = np.abs(fo - k * np.exp(-b * s2 / 4) * np.abs(fm)).sum() / fo.sum()
        assert r[jk, jb] == pytest.approx(r_direct, rel=1e-9)
    jk, jb = np.unravel_index(np.argmin(r), r.shape)
    assert abs(K_SOL_GRID[jk] - 0.35) <= 0.1 and abs(B_SOL_GRID[jb] - 45) <= 15


def test_isotropic_scale_bins_take_up_a_falloff_the_smooth_scale_cannot():
    """Data falling off near the resolution limit faster than e^{−Bs²/4}: the per-bin
    k_isotropic recovers the shape, is applied by k_total (linear between bin centres), and
    lowers R; a small data set gets no bins."""
    from drefine.density.bulk_solvent import BulkSolventScale, _isotropic_bins
    from drefine.io.reflections import resolution_bins

    rng = np.random.default_rng(5)
    n = 30000
    s2 = rng.uniform(0.001, 0.4, n)
    fm = np.abs(rng.normal(size=n) + 1j * rng.normal(size=n)) * 100
    shape = 1.0 - 0.5 * (s2 / 0.4) ** 3  # not an exponential in s²
    fo = fm * shape * (1 + 0.02 * rng.normal(size=n))
    work = rng.random(n) > 0.05
    centres, k = _isotropic_bins(fo, fm, s2, work)
    assert len(k) == 20 and np.all(np.diff(centres) > 0)  # the tables' default: 20 for this many
    given = resolution_bins(1 / np.sqrt(s2), 8)
    c8, k8 = _isotropic_bins(fo, fm, s2, work, given)  # the table's own bins when given
    assert len(k8) == 8
    sel = work & (given == 3)
    assert k8[3] == pytest.approx((fo[sel] * fm[sel]).sum() / (fm[sel] ** 2).sum())
    assert c8[3] == pytest.approx(s2[sel].mean())
    np.testing.assert_allclose(k, 1.0 - 0.5 * (centres / 0.4) ** 3, atol=0.02)
    sc = BulkSolventScale(k_overall=1.0, b_aniso=np.zeros((3, 3)), k_sol=0.0, b_sol=0.0, k_iso_s2=centres, k_iso=k)
    np.testing.assert_allclose(sc.k_isotropic(centres), k)
    s_vec = np.column_stack([np.sqrt(s2), np.zeros(n), np.zeros(n)])
    kt = sc.k_total(s_vec)
    r_binned = np.abs(fo - kt * fm)[~work].sum() / fo[~work].sum()
    r_flat = np.abs(fo - fm * (fo @ fm) / (fm @ fm))[~work].sum() / fo[~work].sum()
    assert r_binned < 0.5 * r_flat
    assert sc.as_dict()["k_isotropic"][0]["k"] == pytest.approx(k[0])
    one_bin = np.zeros(n, dtype=np.int32)
    assert len(_isotropic_bins(fo, fm, s2, work, one_bin)[1]) == 0  # one bin: nothing beyond k_overall


def _twin_pairs(n, rng):
    """A random pairing of n reflections (one left without a mate, −1, when n is odd)."""
    perm = rng.permutation(n)
    m = n - n % 2
    mate = np.full(n, -1, dtype=np.int64)
    mate[perm[0:m:2]], mate[perm[1:m:2]] = perm[1:m:2], perm[0:m:2]
    return mate


def test_twinned_scale_model_jacobian_and_grid_search():
    """With twin mates the scale model's residuals use √((1 − α)|F(h)|² + α|F(Th)|²): its
    Jacobian against finite differences, the grid kernel against the same amplitudes, and α = 0
    equal to the untwinned code."""
    from drefine.density.bulk_solvent import (
        B_SOL_GRID,
        K_SOL_GRID,
        _loglinear_scale,
        _ScaleModel,
        _solvent_grid_search,
        twinned_amplitudes,
    )

    rng = np.random.default_rng(1)
    cell = gemmi.UnitCell(50, 50, 60, 90, 90, 90)
    hkl = rng.integers(-8, 9, (400, 3))
    hkl = hkl[np.abs(hkl).sum(1) > 0]
    n = len(hkl) - len(hkl) % 2
    hkl = hkl[:n]
    s_vec = hkl @ np.array(cell.frac.mat.tolist())
    s2 = (s_vec ** 2).sum(1)
    f_calc = rng.normal(size=n) + 1j * rng.normal(size=n)
    f_mask = rng.normal(size=n) + 1j * rng.normal(size=n)
    mate = _twin_pairs(n, rng)
    s2 = np.minimum(s2, s2[mate])  # twin mates share |s|
    basis = aniso_basis(cell, gemmi.SpaceGroup("P 43"))
    alpha = 0.3
    model = _ScaleModel(s_vec, s2, f_calc, f_mask, np.abs(f_calc) + 0.1, basis, True,
                        twin=(f_calc[mate], f_mask[mate], alpha))
    x = np.concatenate([[0.2], rng.normal(size=len(basis)) * 3, [0.35, 45.0]])
    jac = model.jacobian(x)
    h = 1e-6
    numeric = np.array([(model.residuals(x + e) - model.residuals(x - e)) / (2 * h) for e in np.eye(len(x)) * h]).T
    assert np.abs(jac - numeric).max() < 1e-6 * np.abs(jac).max()
    plain = _ScaleModel(s_vec, s2, f_calc, f_mask, np.abs(f_calc) + 0.1, basis, True)
    untwinned = _ScaleModel(s_vec, s2, f_calc, f_mask, np.abs(f_calc) + 0.1, basis, True,
                            twin=(f_calc[mate], f_mask[mate], 0.0))
    np.testing.assert_allclose(untwinned.residuals(x), plain.residuals(x), rtol=1e-12)
    np.testing.assert_allclose(untwinned.jacobian(x), plain.jacobian(x), rtol=1e-12, atol=1e-14)
    fo = np.abs(f_calc) * 2.0
    r, k_all, b_all = _solvent_grid_search(fo, f_calc, f_mask, s2, twin=(f_calc[mate], f_mask[mate], alpha))
    jk, jb = 5, 9
    amp = twinned_amplitudes(f_calc + K_SOL_GRID[jk] * np.exp(-B_SOL_GRID[jb] * s2 / 4) * f_mask, (mate, alpha))
    k, b = _loglinear_scale(fo, amp, s2, np.ones(n, dtype=bool))
    assert k_all[jk, jb] == pytest.approx(k, rel=1e-9) and b_all[jk, jb] == pytest.approx(b, rel=1e-9, abs=1e-9)
    assert r[jk, jb] == pytest.approx(np.abs(fo - k * np.exp(-b * s2 / 4) * amp).sum() / fo.sum(), rel=1e-9)


def test_twinned_fit_recovers_scale_and_solvent(untangle):
    """Data made twinned (random twin pairing, α 0.35) from best.pdb's F_calc and F_mask with
    known k_sol, B_sol: the twin-aware fit recovers them and reaches a far lower R than the
    untwinned fit of the same data."""
    from drefine.density.bulk_solvent import fit_bulk_solvent, twinned_amplitudes

    _, t, fm = untangle
    rng = np.random.default_rng(2)
    # pairs of neighbours in resolution (twin mates share |s|)
    order = np.argsort(t.d)
    m = len(t) - len(t) % 2
    mate = np.full(len(t), -1, dtype=np.int64)
    mate[order[0:m:2]], mate[order[1:m:2]] = order[1:m:2], order[0:m:2]
    s2 = 1.0 / t.d ** 2
    truth = 1.3 * np.exp(-10 * s2 / 4) * (fm.f_calc + 0.4 * np.exp(-50 * s2 / 4) * fm.f_mask)
    fo = twinned_amplitudes(truth, (mate, 0.35)) * (1 + 0.02 * rng.normal(size=len(t)))
    twin = fit_bulk_solvent(t.hkl, fo, fm.f_calc, fm.f_mask, t.cell, t.spacegroup, t.work, t.test,
                            twin=(mate, 0.35))
    plain = fit_bulk_solvent(t.hkl, fo, fm.f_calc, fm.f_mask, t.cell, t.spacegroup, t.work, t.test)
    assert twin.k_sol == pytest.approx(0.4, abs=0.03) and twin.b_sol == pytest.approx(50, abs=8)
    assert twin.r_work < 0.03 and plain.r_work > 0.1


def test_r_per_bin_equals_the_sums_bin_by_bin():
    from drefine.density.bulk_solvent import _r_per_bin

    rng = np.random.default_rng(0)
    n = 5000
    fo = np.abs(rng.normal(size=n)) * 10
    fm = fo * (1 + 0.2 * rng.normal(size=n))
    s2 = rng.uniform(0.01, 0.3, n)
    bins = rng.integers(0, 7, n)
    bins[bins == 4] = 5  # an empty bin is left out
    work = rng.random(n) > 0.05
    free = ~work
    fo[3], work[3], free[3] = np.nan, False, False
    rows = _r_per_bin(fo, np.abs(fm), s2, bins, work, free)
    assert [r["bin"] for r in rows] == [0, 1, 2, 3, 5, 6]
    for r in rows:
        sel = bins == r["bin"]

        def r_of(m):
            return np.abs(fo[m] - np.abs(fm[m])).sum() / fo[m].sum()

        assert r["r_work"] == pytest.approx(r_of(sel & work), rel=1e-12)
        assert r["r_free"] == pytest.approx(r_of(sel & free), rel=1e-12)
        d = 1 / np.sqrt(s2[sel])
        assert r["d_max"] == d.max() and r["d_min"] == d.min() and r["n_work"] == (sel & work).sum()
