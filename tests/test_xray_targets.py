"""Reciprocal-space targets: derivatives against finite differences, σA parameters recovered from
simulated data, and the whole chain to atomic coordinates. No shared data needed."""
import gemmi
import numpy as np
import pytest

from drefine.density.direct import direct_gradient, direct_structure_factors, scatterers_of_model
from drefine.io.models import read_model
from drefine.targets.xray_targets import LeastSquaresTarget, MaximumLikelihoodTarget, estimate_ml_parameters


def _simulated(n=4000, d_true=0.8, s_true=40.0, seed=0, centric_fraction=0.2):
    """F_obs drawn from the σA model around a random F_model (complex Gaussian error)."""
    rng = np.random.default_rng(seed)
    fm = rng.normal(size=n) * 10 + 1j * rng.normal(size=n) * 10
    centric = rng.random(n) < centric_fraction
    fm = np.where(centric, fm.real + 0j, fm)
    eps = np.ones(n)
    err = rng.normal(size=n) * np.sqrt(s_true / 2) + 1j * rng.normal(size=n) * np.sqrt(s_true / 2)
    err = np.where(centric, rng.normal(size=n) * np.sqrt(s_true) + 0j, err)
    fo = np.abs(d_true * fm + err)
    return fo, np.full(n, 1e-3), fm, eps, centric


def test_ml_recovers_d_and_s():
    fo, sg, fm, eps, centric = _simulated()
    n = len(fo)
    test = np.zeros(n, bool)
    test[::10] = True
    p = estimate_ml_parameters(fo, sg, np.abs(fm), eps, centric, np.zeros(n, int), ~test, test)
    assert p.from_test_set
    # test set: 400 reflections; the estimates are within a few standard errors
    assert p.d[0] == pytest.approx(0.8, rel=0.08)
    assert p.s[0] == pytest.approx(40.0, rel=0.2)
    q = estimate_ml_parameters(fo, sg, np.abs(fm), eps, centric, np.zeros(n, int), np.ones(n, bool), np.zeros(n, bool))
    assert not q.from_test_set and q.d[0] == pytest.approx(0.8, rel=0.03) and q.s[0] == pytest.approx(40.0, rel=0.06)


def _target(kind: str, seed: int):
    """A target on 300 simulated reflections (every 7th in the test set), k_total 1.3: (target,
    F_model/k_total, k_total, work)."""
    fo, sg, fm, eps, centric = _simulated(n=300, seed=seed)
    sg = np.full(len(fo), 0.5)
    work = np.ones(len(fo), bool)
    work[::7] = False
    k_total = np.full(len(fo), 1.3)
    if kind == "ls":
        t = LeastSquaresTarget(fo, sg, work)
    else:
        t = MaximumLikelihoodTarget(fo, sg, eps, centric, np.zeros(len(fo), int), work, ~work)
        t.update(k_total * fm)
    return t, fm, k_total, work


def test_least_squares_weights_floor_a_bookkeeping_sigma():
    """A σ far below the data's typical one (1AHO's refme.mtz: F = 0 with σ = 0.0014, the median
    1.07) is floored at a tenth of the median σ, so that one reflection cannot carry the target;
    every measured σ keeps w = 1/σ², and σ ≤ 0 or missing still gives w = 0."""
    rng = np.random.default_rng(3)
    sg = rng.uniform(0.4, 3.0, 500)
    fo = rng.uniform(5, 100, 500)
    fo[7], sg[7] = 0.0, 0.0014
    sg[8] = 0.0
    sg[9] = np.nan
    work = np.ones(500, bool)
    t = LeastSquaresTarget(fo, sg, work)
    w = t.weights()
    floor = 0.1 * np.median(sg[np.isfinite(sg) & (sg > 0)])
    assert w[7] == pytest.approx(1 / floor ** 2)
    assert w[8] == 0 and w[9] == 0
    real = np.ones(500, bool)
    real[7:10] = False
    np.testing.assert_allclose(w[real], 1 / sg[real] ** 2)
    # the one reflection no longer dominates the target at a model 5 % off
    fm = fo * (1 + 0.05 * rng.normal(size=500)) + 1.0
    value, _ = t.value_and_derivative(fm.astype(complex), np.ones(500))
    assert w[7] * fm[7] ** 2 < 0.05 * value


def _check_derivative(t, fc, k_total, rows, h=1e-6):
    """D(h) of target `t` at F_calc = `fc` against central differences of T in Re and Im of the
    given rows' F_calc; returns D."""
    _, d = t.value_and_derivative(k_total * fc, k_total)
    for i in rows:
        for step in (h, 1j * h):
            p, q = fc.copy(), fc.copy()
            p[i] += step
            q[i] -= step
            fd = (t.value_and_derivative(k_total * p, k_total)[0] - t.value_and_derivative(k_total * q, k_total)[0]) / (2 * h)
            analytic = d[i].real if step == h else d[i].imag
            assert fd == pytest.approx(analytic, rel=1e-4, abs=1e-6)
    return d


@pytest.mark.parametrize("kind", ["ls", "ml"])
def test_derivative_matches_finite_differences(kind):
    t, fm, k_total, work = _target(kind, 3)
    d = _check_derivative(t, fm.copy(), k_total, (0, 5, 17, 42))
    assert np.all(d[~work] == 0)  # the test set never enters the target


@pytest.mark.parametrize("kind", ["ls", "ml"])
def test_curvature_matches_finite_differences_along_the_phase(kind):
    """The per-reflection curvature the Fisher step uses is ∂²T/∂|F_calc|² (k_total folded in):
    the second difference of T when F_calc moves along its own phase."""
    t, fm, k_total, work = _target(kind, 4)
    c = t.curvature(k_total * fm, k_total)
    # (least squares re-solves its scale k at every call; one reflection of 300 hardly moves it)
    h = 1e-3
    unit = fm / np.abs(fm)
    t0 = t.value_and_derivative(k_total * fm, k_total)[0]
    for i in (1, 5, 17, 42):
        p, q = fm.copy(), fm.copy()
        p[i] += h * unit[i]
        q[i] -= h * unit[i]
        fd = (t.value_and_derivative(k_total * p, k_total)[0] - 2 * t0
              + t.value_and_derivative(k_total * q, k_total)[0]) / h ** 2
        assert fd == pytest.approx(c[i], rel=2e-2, abs=1e-6)
    assert np.all(c[~work] == 0)
    if kind == "ml":
        assert np.any(c[work] < 0)  # observed, not expected, information: negative for some reflections


def test_ml_bin_gradient_matches_finite_differences():
    from drefine.targets.xray_targets import _ml_bin_nll

    fo, _, fm, eps, centric = _simulated(n=200, seed=5)
    sig = np.full(len(fo), 0.7)
    eps = np.where(np.arange(len(fo)) % 5 == 0, 2.0, 1.0)
    d, ln_s, h = 0.7, np.log(35.0), 1e-6
    _, g = _ml_bin_nll(fo, sig, np.abs(fm), eps, centric, d, np.exp(ln_s))
    fd_d = (_ml_bin_nll(fo, sig, np.abs(fm), eps, centric, d + h, np.exp(ln_s))[0]
            - _ml_bin_nll(fo, sig, np.abs(fm), eps, centric, d - h, np.exp(ln_s))[0]) / (2 * h)
    fd_s = (_ml_bin_nll(fo, sig, np.abs(fm), eps, centric, d, np.exp(ln_s + h))[0]
            - _ml_bin_nll(fo, sig, np.abs(fm), eps, centric, d, np.exp(ln_s - h))[0]) / (2 * h)
    assert g == pytest.approx([fd_d, fd_s], rel=1e-5)


def test_chain_to_coordinates(example_model_path):
    """dT/dxyz through the structure factors equals finite differences of T(xyz)."""
    m = read_model(example_model_path)
    sc = scatterers_of_model(m, hydrogens=False)
    hkl = np.array(gemmi.make_miller_array(m.cell, gemmi.SpaceGroup("P 1"), 3.0, 0, True))
    f0 = direct_structure_factors(sc, hkl)
    rng = np.random.default_rng(1)
    fo = np.abs(f0) * (1 + 0.05 * rng.normal(size=len(f0)))
    work = rng.random(len(f0)) > 0.05
    target = LeastSquaresTarget(fo, np.ones(len(fo)), work, weighting="unit")
    k_total = np.ones(len(fo))
    sc.frac[3] += np.array([0.002, -0.001, 0.0015])  # off the optimum

    def value(s):
        return target.value_and_derivative(direct_structure_factors(s, hkl), k_total)[0]

    _, d = target.value_and_derivative(direct_structure_factors(sc, hkl), k_total)
    g = direct_gradient(sc, hkl, d)
    import copy
    h = 1e-5
    for c in range(3):
        p, q = copy.deepcopy(sc), copy.deepcopy(sc)
        p.frac[3] += sc.frac_matrix[:, c] * h
        q.frac[3] -= sc.frac_matrix[:, c] * h
        assert (value(p) - value(q)) / (2 * h) == pytest.approx(g.xyz[3, c], rel=1e-4)


def test_ml_parameters_of_all_bins_at_once_equal_bin_by_bin_fits():
    """The joint fit over bins finds each bin's own maximum (a separate L-BFGS-B per bin on
    `_ml_bin_nll` is the reference), from a cold start or from another estimate."""
    from scipy.optimize import minimize

    from drefine.targets.xray_targets import MLParameters, _ml_bin_nll

    parts = [_simulated(n=600, d_true=d, s_true=s, seed=k) for k, (d, s) in
             enumerate([(0.95, 5.0), (0.8, 40.0), (0.6, 120.0), (0.4, 300.0)])]
    fo, sg, fm, eps, centric = (np.concatenate(x) for x in zip(*parts))
    fm = np.abs(fm)
    bins = np.repeat(np.arange(4), 600)
    work = np.ones(len(fo), bool)
    joint = estimate_ml_parameters(fo, sg, fm, eps, centric, bins, work, ~work)
    for b in range(4):
        sel = bins == b
        d0 = (fo[sel] * fm[sel]).sum() / (fm[sel] ** 2).sum()
        res = minimize(lambda p, sel=sel: _ml_bin_nll(fo[sel], sg[sel], fm[sel], eps[sel], centric[sel], p[0],
                                                      np.exp(p[1])),
                       [d0, np.log(np.mean((fo[sel] - d0 * fm[sel]) ** 2))], jac=True, method="L-BFGS-B",
                       bounds=[(1e-4, 10 * d0), (None, None)], options={"ftol": 1e-14, "gtol": 1e-10})
        assert joint.d[b] == pytest.approx(res.x[0], rel=5e-4)
        assert joint.s[b] == pytest.approx(np.exp(res.x[1]), rel=5e-4)
    assert joint.d[0] > joint.d[1] > joint.d[2] > joint.d[3]
    warm = estimate_ml_parameters(fo, sg, fm, eps, centric, bins, work, ~work,
                                  start=MLParameters(np.full(4, 0.5), np.full(4, 50.0)))
    np.testing.assert_allclose(warm.d, joint.d, rtol=5e-4)
    np.testing.assert_allclose(warm.s, joint.s, rtol=5e-4)


def _twinned_target(kind: str, alpha: float, seed: int = 4, n: int = 400):
    """A TwinnedTarget on simulated data: F_obs from F_twin of a random F_model (α given, a
    random pairing of reflections as the twin law, 20 without a mate), 5 % noise."""
    from drefine.targets.xray_targets import TwinnedTarget

    rng = np.random.default_rng(seed)
    fm = (rng.normal(size=n) + 1j * rng.normal(size=n)) * 10
    perm = rng.permutation(n - 20)
    mate = np.full(n, -1)
    mate[perm[0::2]], mate[perm[1::2]] = perm[1::2], perm[0::2]
    a2 = np.abs(fm) ** 2
    ft = np.sqrt((1 - alpha) * a2 + alpha * a2[np.maximum(mate, 0)])
    fo = np.where(mate >= 0, ft * (1 + 0.05 * rng.normal(size=n)), np.nan)
    sig = 0.05 * np.nan_to_num(fo) + 0.1
    test = np.zeros(n, bool)
    test[::7] = True
    work = ~test & (mate >= 0)
    if kind == "ls":
        inner = LeastSquaresTarget(fo, sig, work)
    else:
        inner = MaximumLikelihoodTarget(fo, sig, np.ones(n), np.zeros(n, bool), np.zeros(n, int), work,
                                        test & (mate >= 0))
    return TwinnedTarget(inner, mate, fraction=alpha), fm, work


@pytest.mark.parametrize("kind", ["ls", "ml"])
def test_twinned_target_derivative_matches_finite_differences(kind):
    t, fm, work = _twinned_target(kind, 0.3)
    k_total = np.full(len(fm), 1.3)
    d = _check_derivative(t, fm / 1.3 * 1.02, k_total, (0, 5, 17, 42, 101))  # off the optimum
    # a reflection outside the work set still hears from its twin mate in it
    j = int(np.flatnonzero(~work & (t.mate >= 0) & work[np.maximum(t.mate, 0)])[0])
    assert d[j] != 0


@pytest.mark.parametrize("kind", ["ls", "ml"])
def test_twinned_target_recovers_the_twin_fraction(kind):
    for alpha in (0.1, 0.35):
        t, fm, _ = _twinned_target(kind, alpha, seed=5, n=3000)
        t.fraction = 0.0
        t.update(fm)
        assert t.fraction == pytest.approx(alpha, abs=0.03)
    # detwinning with the true model gives back |Fm| (on F_obs's scale) up to the noise
    t, fm, _ = _twinned_target("ls", 0.35, seed=5, n=3000)
    det = t.detwinned(fm)
    ok = np.isfinite(det)
    assert np.median(np.abs(det[ok] / np.abs(fm[ok]) - 1)) < 0.05


@pytest.mark.parametrize("kind", ["ls", "ml"])
def test_twinned_target_curvature_is_the_gauss_newton_chain(kind):
    """The curvature per F_calc is Σ_h c(h) (∂F_twin(h)/∂|Fm(j)|)² k_total², c the inner target's
    curvature in F_twin: checked with the Jacobian of F_twin taken by finite differences."""
    t, fm, _ = _twinned_target(kind, 0.3)
    k_total = np.full(len(fm), 1.2)
    f_model = k_total * fm
    ft = t.twinned_amplitudes(f_model)
    c_inner = t.inner.curvature(ft.astype(np.complex128), np.ones(len(ft)))
    c = t.curvature(f_model, k_total)
    h = 1e-6
    unit = fm / np.abs(fm)
    for j in (3, 11, 40, 77):
        p, q = f_model.copy(), f_model.copy()
        p[j] += h * unit[j]
        q[j] -= h * unit[j]
        jac = (t.twinned_amplitudes(p) - t.twinned_amplitudes(q)) / (2 * h)  # ∂F_twin/∂|Fm(j)|
        assert np.count_nonzero(np.abs(jac) > 1e-9) == (2 if t.mate[j] >= 0 else 0)  # own row and the mate's
        assert c[j] == pytest.approx((c_inner * jac ** 2).sum() * k_total[j] ** 2, rel=1e-5, abs=1e-12)


def test_twinned_target_at_zero_fraction_is_the_plain_one():
    """For least squares at α = 0 the twinned target is the plain one: same value, derivative and
    curvature."""
    t, fm, work = _twinned_target("ls", 0.0)
    t.fraction = 0.0
    k_total = np.full(len(fm), 1.1)
    plain = LeastSquaresTarget(t.inner.f_obs, t.inner.sigma, work)
    v1, d1 = t.value_and_derivative(fm, k_total)
    v2, d2 = plain.value_and_derivative(fm, k_total)
    assert v1 == pytest.approx(v2, rel=1e-12) and np.allclose(d1, d2)
    assert np.allclose(t.curvature(fm, k_total), plain.curvature(fm, k_total))
