"""Reciprocal-space data targets on amplitudes: least squares and maximum likelihood (σA).

Both work on F_model = k_total (F_calc + F_bulk) from `density.fmodel` and return the value and
D(h) = ∂T/∂Re F_calc + i ∂T/∂Im F_calc, which `density.direct.direct_gradient` or
`density.fft.fft_gradient` turn into gradients with respect to coordinates, B and occupancy.
Since |F_model| depends on F_calc only through k_total·F_model/|F_model| (k_total real, > 0):
D(h) = ∂T/∂|F_model| · k_total · F_model/|F_model|. Sums run over the work set only; the test set
is never used for the target (R-free stays honest).

Least squares: T = Σ w (|Fo| − k|Fm|)², w = 1/σ² ("sigma", default) or 1 ("unit"), k the
least-squares scale of the current cycle (optimal, so its own derivative term vanishes). σ is
floored at SIGMA_FLOOR_OF_MEDIAN × the work set's median σ: a σ far below the data's typical one
is a bookkeeping value, not a measurement (1AHO's refme.mtz has F = 0 with σ = 0.0014, 760×
below the median: with w = 1/σ² that one reflection was 86 % of the target, and every local
refinement moved its atoms a few tenths of an Å to cancel it).

Maximum likelihood with measurement error (Read 1986; Pannu & Read 1996; as in REFMAC and
servalcat), per resolution bin D (scale of F_model's contribution) and S (variance of the
model error per ε), with Σ = ε·S + 2σ² (acentric) or ε·S + σ² (centric):
  acentric (Rice):    −ln L = ln Σ + (Fo² + D²Fm²)/Σ − ln I₀(2 Fo D Fm / Σ)
  centric (Woolfson): −ln L = ½ ln Σ + (Fo² + D²Fm²)/(2Σ) − ln cosh(Fo D Fm / Σ)
(constants in Fo dropped). D and S per bin maximise the likelihood of the test set when each bin
has at least MIN_FREE_PER_BIN test reflections (as phenix does, so that the error model is not
fitted to the reflections the model was refined against), else of the work set.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import i0e, i1e

MIN_FREE_PER_BIN = 30
# σ floor of the least-squares weights, as a fraction of the median σ (module docstring): it
# touches no real measurement of 1AHO (its 0.1 % quantile is 0.33 × the median)
SIGMA_FLOOR_OF_MEDIAN = 0.1


@dataclass
class LeastSquaresTarget:
    """Σ_work w (|Fo| − k|Fm|)²."""

    f_obs: np.ndarray
    sigma: np.ndarray
    work: np.ndarray
    weighting: str = "sigma"  # "sigma": w = 1/σ²; "unit": w = 1

    def weights(self) -> np.ndarray:
        if self.weighting == "unit":
            return np.ones_like(self.f_obs)
        s = np.where(self.sigma > 0, self.sigma, np.nan)
        usable = self.work & np.isfinite(s)
        if usable.any():
            s = np.maximum(s, SIGMA_FLOOR_OF_MEDIAN * float(np.median(s[usable])))
        w = 1.0 / s ** 2
        return np.where(np.isfinite(w), w, 0.0)

    def value_and_derivative(self, f_model: np.ndarray, k_total: np.ndarray) -> tuple[float, np.ndarray]:
        """T and D(h) = ∂T/∂F_calc (complex; zero outside the work set)."""
        a = np.abs(f_model)
        w = self.weights() * self.work
        fo = np.where(w > 0, self.f_obs, 0.0)  # a missing F_obs (NaN) outside the work set stays out
        k = float((w * fo * a).sum() / max((w * a * a).sum(), 1e-300))
        r = fo - k * a
        t = float((w * r * r).sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            phase = np.where(a > 0, f_model / a, 0.0)
        d = -2.0 * w * r * k * k_total * phase
        return t, d

    def curvature(self, f_model: np.ndarray, k_total: np.ndarray) -> np.ndarray:
        """∂²T/∂|F_calc|² per reflection along F's phase: 2 w k² k_total² (zero outside the work set)."""
        a = np.abs(f_model)
        w = self.weights() * self.work
        k = float((w * np.where(w > 0, self.f_obs, 0.0) * a).sum() / max((w * a * a).sum(), 1e-300))
        return 2.0 * w * k * k * k_total ** 2

    def statistics(self, f_model: np.ndarray) -> dict:
        return {"target": "least squares", "weighting": self.weighting}


@dataclass
class MLParameters:
    """σA parameters per resolution bin."""

    d: np.ndarray  # (n_bins,)
    s: np.ndarray  # (n_bins,) model-error variance per ε
    from_test_set: bool = True
    per_bin: list[dict] = field(default_factory=list)


def _ml_terms(fo, sig, fm, eps, centric, d, s):
    """−ln L per reflection and ∂/∂|Fm| (vectorised), with d, s per reflection."""
    sig2 = np.where(centric, sig * sig, 2.0 * sig * sig)
    var = eps * s + sig2
    x = np.where(centric, fo * d * fm / var, 2.0 * fo * d * fm / var)
    # ln I0(x) = ln i0e(x) + x ; ln cosh(x) = x + ln(1 + e^{−2x}) − ln 2 (stable for large x)
    i0 = i0e(x)
    ln_i0 = np.log(i0) + x
    ln_cosh = x + np.log1p(np.exp(-2.0 * x)) - np.log(2.0)
    nll = np.where(centric, 0.5 * np.log(var) + (fo * fo + d * d * fm * fm) / (2.0 * var) - ln_cosh,
                   np.log(var) + (fo * fo + d * d * fm * fm) / var - ln_i0)
    ratio = i1e(x) / i0  # I1/I0
    dfm = np.where(centric, d * d * fm / var - (fo * d / var) * np.tanh(x),
                   2.0 * d * d * fm / var - (2.0 * fo * d / var) * ratio)
    return nll, dfm


def _ml_parameter_terms(fo, sig, fm, eps, centric, d, s):
    """−ln L per reflection and its derivatives with respect to D and ln S (d, s per reflection):
    with c = 2 (acentric) or 1 (centric) and r = I₁/I₀(X) or tanh(X),
    ∂/∂D = c(DFm² − r FoFm)/Σ,  ∂/∂Σ = ½c(1/Σ − (Fo² + D²Fm²)/Σ²) + rX/Σ,  ∂Σ/∂ln S = εS."""
    nll, _ = _ml_terms(fo, sig, fm, eps, centric, d, s)
    sig2 = np.where(centric, sig * sig, 2.0 * sig * sig)
    var = eps * s + sig2
    c = np.where(centric, 1.0, 2.0)
    x = c * fo * d * fm / var
    r = np.where(centric, np.tanh(x), i1e(x) / i0e(x))
    d_d = c * (d * fm * fm - r * fo * fm) / var
    d_var = 0.5 * c * (1.0 / var - (fo * fo + d * d * fm * fm) / var ** 2) + r * x / var
    return nll, d_d, d_var * eps * s


def _ml_bin_nll(fo, sig, fm, eps, centric, d, s) -> tuple[float, np.ndarray]:
    """Σ −ln L over one bin's reflections (scalar d, s) and its gradient in (D, ln S)."""
    nll, d_d, d_lns = _ml_parameter_terms(fo, sig, fm, eps, centric, d, s)
    return float(nll.sum()), np.array([float(d_d.sum()), float(d_lns.sum())])


def _ml_curvature(fo, sig, fm, eps, centric, d, s):
    """∂²(−ln L)/∂|Fm|² per reflection (observed; negative where the data pull two ways):
    acentric 2D²/Σ − (2FoD/Σ)² m′(X) with m = I₁/I₀, m′ = 1 − m/X − m²; centric
    D²/Σ − (FoD/Σ)² (1 − tanh² X)."""
    sig2 = np.where(centric, sig * sig, 2.0 * sig * sig)
    var = eps * s + sig2
    x = np.where(centric, fo * d * fm / var, 2.0 * fo * d * fm / var)
    m = i1e(x) / i0e(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        m_over_x = np.where(x > 1e-8, m / x, 0.5)
    acentric = 2.0 * d * d / var - (2.0 * fo * d / var) ** 2 * (1.0 - m_over_x - m * m)
    centric_c = d * d / var - (fo * d / var) ** 2 * (1.0 - np.tanh(x) ** 2)
    return np.where(centric, centric_c, acentric)


def estimate_ml_parameters(f_obs, sigma, f_model_abs, epsilon, centric, bins, work, test,
                           start: MLParameters | None = None) -> MLParameters:
    """D and S per bin by maximum likelihood (test set when large enough, else work set).

    The bins are independent, so their 2 × n_bins parameters are found in one L-BFGS-B run on the
    summed −ln L (the sums per bin by bincount): one pass over the reflections per step instead of
    a minimiser per bin (~30 ms → a few ms each macro-cycle). `start`: the previous cycle's
    estimate to start from (the bounds stay those of this cycle's least-squares D)."""
    n_bins = int(bins.max()) + 1
    use_test = all(int((test & (bins == b)).sum()) >= MIN_FREE_PER_BIN for b in range(n_bins))
    sel = (test if use_test else work) & np.isfinite(f_obs)
    fo, sg, fm, ep, ce, bb = f_obs[sel], sigma[sel], f_model_abs[sel], epsilon[sel], centric[sel], bins[sel]
    counts = np.bincount(bb, minlength=n_bins)
    fmfm = np.bincount(bb, fm * fm, minlength=n_bins)
    d_ls = np.bincount(bb, fo * fm, minlength=n_bins) / np.maximum(fmfm, 1e-300)
    s_ls = np.bincount(bb, (fo - d_ls[bb] * fm) ** 2 / ep, minlength=n_bins) / np.maximum(counts, 1)
    s_ls = np.maximum(s_ls, 1e-6)
    d_hi = 10 * np.maximum(d_ls, 1e-3)
    if start is not None and len(start.d) == n_bins:
        d0, s0 = np.clip(start.d, 1e-4, d_hi), np.maximum(start.s, 1e-12)
    else:
        d0, s0 = np.clip(d_ls, 1e-4, d_hi), s_ls

    def nll(p):
        terms, d_d, d_lns = _ml_parameter_terms(fo, sg, fm, ep, ce, p[:n_bins][bb], np.exp(p[n_bins:])[bb])
        return float(terms.sum()), np.concatenate([np.bincount(bb, d_d, minlength=n_bins),
                                                   np.bincount(bb, d_lns, minlength=n_bins)])

    res = minimize(nll, np.concatenate([d0, np.log(s0)]), jac=True, method="L-BFGS-B",
                   bounds=[(1e-4, h) for h in d_hi] + [(None, None)] * n_bins)
    d_out, s_out = res.x[:n_bins].copy(), np.exp(res.x[n_bins:])
    rows = [{"bin": b, "n": int(counts[b]), "D": float(d_out[b]), "S": float(s_out[b])} for b in range(n_bins)]
    return MLParameters(d_out, s_out, use_test, rows)


@dataclass
class MaximumLikelihoodTarget:
    """−ln L of |Fo| given |F_model| summed over the work set (σA parameters held per cycle)."""

    f_obs: np.ndarray
    sigma: np.ndarray
    epsilon: np.ndarray
    centric: np.ndarray
    bins: np.ndarray
    work: np.ndarray
    test: np.ndarray
    params: MLParameters | None = None

    def update(self, f_model: np.ndarray) -> None:
        """Re-estimate D and S per bin for the current model (once per macro-cycle)."""
        self.params = estimate_ml_parameters(self.f_obs, self.sigma, np.abs(f_model), self.epsilon, self.centric,
                                             self.bins, self.work, self.test, start=self.params)

    def value_and_derivative(self, f_model: np.ndarray, k_total: np.ndarray) -> tuple[float, np.ndarray]:
        if self.params is None:
            self.update(f_model)
        a = np.abs(f_model)
        d = self.params.d[self.bins]
        s = self.params.s[self.bins]
        w = self.work & np.isfinite(self.f_obs)
        fo = np.where(w, self.f_obs, 0.0)
        nll, dfm = _ml_terms(fo, self.sigma, a, self.epsilon, self.centric, d, s)
        with np.errstate(invalid="ignore", divide="ignore"):
            phase = np.where(a > 0, f_model / a, 0.0)
        return float(nll[w].sum()), np.where(w, dfm, 0.0) * k_total * phase

    def curvature(self, f_model: np.ndarray, k_total: np.ndarray) -> np.ndarray:
        """∂²(−ln L)/∂|F_calc|² per reflection along F's phase (observed, see `_ml_curvature`),
        times k_total²; zero outside the work set."""
        if self.params is None:
            self.update(f_model)
        w = self.work & np.isfinite(self.f_obs)
        fo = np.where(w, self.f_obs, 0.0)
        c = _ml_curvature(fo, self.sigma, np.abs(f_model), self.epsilon, self.centric,
                          self.params.d[self.bins], self.params.s[self.bins])
        return np.where(w, c, 0.0) * k_total ** 2

    def statistics(self, f_model: np.ndarray) -> dict:
        p = self.params
        return {"target": "maximum likelihood", "sigmaa_from_test_set": p.from_test_set if p else None,
                "per_bin": p.per_bin if p else []}


@dataclass
class TwinnedTarget:
    """An amplitude target (`LeastSquaresTarget` or `MaximumLikelihoodTarget`) on data twinned by
    one twin law: the model amplitude it sees is F_twin(h) = √((1 − α)|Fm(h)|² + α|Fm(Th)|²),
    `mate[h]` the row of Th (−1 when the twin mate is not measured: such reflections leave the
    target, whose `work` must exclude them). With least squares this is phenix.refine's
    twin_lsq_f; with the likelihood, the Rice/Woolfson function of F_twin with σA estimated
    against F_twin (an approximation: a twinned intensity is a sum of two, not one, noncentral
    χ² variables; it keeps the likelihood's down-weighting of poorly modelled resolution).
    The twin fraction α is refitted each macro-cycle (`update`). With u(h) = ∂T/∂F_twin / F_twin
    the gradient is ∂T/∂Fm(j) = Fm(j) [(1 − α) u(j) + α Σ_{h: mate[h] = j} u(h)] (complex, as
    for the other targets): each F_calc hears from its own reflection and from the one it is
    twinned into."""

    inner: LeastSquaresTarget | MaximumLikelihoodTarget
    mate: np.ndarray  # (n,) int64, row of the twin mate or −1
    fraction: float = 0.0  # α

    @property
    def work(self) -> np.ndarray:
        return self.inner.work

    @property
    def usable(self) -> np.ndarray:
        """Reflections with Fo and a measured twin mate."""
        return (self.mate >= 0) & np.isfinite(self.inner.f_obs)

    def twinned_amplitudes(self, f_model: np.ndarray, fraction: float | None = None) -> np.ndarray:
        """F_twin per reflection (0 where the mate is missing): the bulk-solvent fit's function."""
        from ..density.bulk_solvent import twinned_amplitudes

        return twinned_amplitudes(f_model, (self.mate, self.fraction if fraction is None else fraction))

    def _gather(self, u: np.ndarray, fraction: float) -> np.ndarray:
        """(1 − α) u(j) + α Σ_{h: mate[h] = j} u(h)."""
        ok = self.mate >= 0
        back = np.bincount(self.mate[ok], u[ok], minlength=len(u))
        return (1.0 - fraction) * u + fraction * back

    def value_and_derivative(self, f_model: np.ndarray, k_total: np.ndarray) -> tuple[float, np.ndarray]:
        """T and D(h) = ∂T/∂F_calc (complex)."""
        ft = self.twinned_amplitudes(f_model)
        ones = np.ones(len(ft))
        t, d_ft = self.inner.value_and_derivative(ft.astype(np.complex128), ones)  # real: ∂T/∂F_twin
        with np.errstate(invalid="ignore", divide="ignore"):
            u = np.where(ft > 0, d_ft.real / ft, 0.0)
        return t, f_model * self._gather(u, self.fraction) * k_total

    def curvature(self, f_model: np.ndarray, k_total: np.ndarray) -> np.ndarray:
        """∂²T/∂|F_calc(j)|² along F's phase, Gauss–Newton through F_twin: Σ over the reflections
        j feeds of c(h) (∂F_twin(h)/∂|Fm(j)|)², c = the inner target's curvature in F_twin."""
        ft = self.twinned_amplitudes(f_model)
        c = self.inner.curvature(ft.astype(np.complex128), np.ones(len(ft)))
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.where(ft > 0, c / (ft * ft), 0.0)
        ok = self.mate >= 0
        back = np.bincount(self.mate[ok], v[ok], minlength=len(v))
        a = np.abs(f_model)
        return a * a * ((1.0 - self.fraction) ** 2 * v + self.fraction ** 2 * back) * k_total ** 2

    def update(self, f_model: np.ndarray) -> None:
        """Refit α in [0, ½] to the work set for the current F_model, then (likelihood) σA
        against the new F_twin (once per macro-cycle)."""
        from scipy.optimize import minimize_scalar

        ml = isinstance(self.inner, MaximumLikelihoodTarget)
        if ml and self.inner.params is None:
            self.inner.update(self.twinned_amplitudes(f_model))
        ones = np.ones(len(f_model))

        def value(alpha):
            ft = self.twinned_amplitudes(f_model, alpha).astype(np.complex128)
            return self.inner.value_and_derivative(ft, ones)[0]

        self.fraction = float(minimize_scalar(value, bounds=(0.0, 0.5), method="bounded",
                                              options={"xatol": 1e-4}).x)
        if ml:
            self.inner.update(self.twinned_amplitudes(f_model))

    def detwinned(self, f_model: np.ndarray) -> np.ndarray:
        """Fo with the other domain's share taken out in the model's proportion,
        Fo·|Fm(h)|/F_twin(h) (NaN where Fo or the mate is missing): for maps and σA."""
        ft = self.twinned_amplitudes(f_model)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.usable & (ft > 0), self.inner.f_obs * np.abs(f_model) / ft, np.nan)

    def statistics(self, f_model: np.ndarray) -> dict:
        return {**self.inner.statistics(self.twinned_amplitudes(f_model)), "twin_fraction": self.fraction}
