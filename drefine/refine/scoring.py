"""Fisher-scoring steps: the data term replaced by its quadratic model, the restraints kept exact.

One step from x₀ minimises

    m(x) = w · (g₀·δ + ½ λ δᵀHδ) + R(x),   δ = x − x₀,

by L-BFGS-B, where g₀ is the exact gradient of the data term at x₀, H its Fisher (Gauss-Newton)
curvature — diagonal, optionally plus a sparse coupling between neighbouring atoms — and R the
restraints, exact and cheap. The data term is then evaluated once at the result: the step is
accepted if the true objective w·T + R fell, else solved again with a stiffer model. λ follows
the ratio of actual to predicted decrease (Levenberg-Marquardt, Nielsen's update), so that a
good step is not followed by an overshoot. This is how REFMAC and servalcat refine (with the
restraints in the normal matrix instead); here the restraints' own minimisation is L-BFGS on
their exact value, which costs ~1 ms an evaluation against tens of ms for a structure-factor or
model-map evaluation. Used by `refine.xray` (reciprocal space) and `refine.realspace` (the
final map-model cycle).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

INNER_MEMORY = 10  # L-BFGS corrections on the model (20 gave the same steps, slower)
ATTEMPTS = 4  # solves of one step before it is given up (each with λ × 4)


@dataclass
class Damping:
    """λ, the factor on the data curvature. Its floor is 1: the Fisher curvature underestimates
    the true one (~10 % from neighbours' overlap, more far from convergence)."""

    value: float = 1.0
    minimum: float = 1.0
    maximum: float = 1e6

    def accepted(self, ratio: float) -> None:
        self.value = float(np.clip(self.value * max(1 / 3, 1 - (2 * min(ratio, 1.0) - 1) ** 3),
                                   self.minimum, self.maximum))

    def rejected(self) -> None:
        self.value = min(self.value * 4.0, self.maximum)


@dataclass
class Step:
    x: np.ndarray
    data: float  # T at x
    restraints: float  # R at x
    extra: Any  # what `data_value` returned alongside T (e.g. F_calc), None when not accepted
    accepted: bool


def scoring_step(x0: np.ndarray, t0: float, g0: np.ndarray, curvature: np.ndarray,
                 restraints: Callable[[np.ndarray], tuple[float, np.ndarray]],
                 data_value: Callable[[np.ndarray], tuple[float, Any]], weight: float, damping: Damping,
                 bounds=None, iterations: int = 30, coupling=None) -> Step:
    """One step from `x0` (module docstring). `t0`, `g0`: the data term and its gradient at x0;
    `curvature`: H's diagonal; `coupling`: its off-diagonal part (a sparse matrix) or None;
    `restraints(x)` → (R, ∇R); `data_value(x)` → (T, extra). The callables may keep state of their
    own (the last x they saw); on return it is that of the returned point."""
    r0, _ = restraints(x0)
    f0 = weight * t0 + r0
    for _ in range(ATTEMPTS):
        lam = damping.value

        def model(x, lam=lam):
            dx = x - x0
            r, g_r = restraints(x)
            h_dx = curvature * dx if coupling is None else curvature * dx + coupling @ dx
            return weight * float(g0 @ dx + 0.5 * lam * (dx @ h_dx)) + r, weight * (g0 + lam * h_dx) + g_r

        res = minimize(model, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": iterations, "maxcor": INNER_MEMORY, "ftol": 1e-12, "gtol": 1e-8})
        predicted = r0 - float(res.fun)
        t1, extra = data_value(res.x)
        r1, _ = restraints(res.x)
        actual = f0 - (weight * t1 + r1)
        if actual > 0:
            damping.accepted(actual / max(predicted, 1e-300))
            return Step(res.x, t1, r1, extra, True)
        damping.rejected()
    restraints(x0)
    return Step(x0, t0, r0, None, False)
