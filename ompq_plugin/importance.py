"""Layer importance from the ORM matrix (OMPQ Sec. 3.3).

gamma_i = sum_j K_ij - 1 measures how much layer i's features overlap with the other layers';
importance theta_i = f(gamma_i) for a monotonically decreasing f. The paper's default is
f(x) = exp(-beta x); it compares -log x, -x, -x^3 and -e^x as alternatives.

Normalisation: the solver only needs theta up to a positive factor, so theta is scaled to a
maximum of 1, computed in log space for the exponential (exp(-beta gamma) itself underflows at
the betas the authors use, e.g. 100 for ResNet-18). The alternatives can be negative, so they
are mapped affinely onto [THETA_FLOOR, 1] (order preserved). Any theta below THETA_FLOOR is
raised to it, so the integer program never sees coefficients near CBC's tolerances.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

THETA_FLOOR = 1e-6

DECREASING: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "neglog": lambda g: -np.log(np.maximum(g, 1e-12)),
    "neg": lambda g: -g,
    "negcube": lambda g: -(g**3),
    "negexp": lambda g: -np.exp(g),
}
IMPORTANCE_FUNCTIONS: tuple[str, ...] = ("exp", *DECREASING)


def gamma_from_orm(k: np.ndarray) -> np.ndarray:
    """gamma_i = sum_j K_ij - K_ii (= row sum - 1 for a unit diagonal)."""
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"ORM matrix must be square, got shape {k.shape}")
    return k.sum(axis=1) - np.diag(k)


def importance(gamma: np.ndarray, beta: float = 1.0, function: str = "exp") -> np.ndarray:
    """theta = f(gamma), normalised to max 1 and floored at THETA_FLOOR (order preserved)."""
    g = np.asarray(gamma, dtype=np.float64)
    if function == "exp":
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        theta = np.exp(-beta * (g - g.min()))  # = exp(-beta g) / max_i exp(-beta g_i)
    elif function in DECREASING:
        f = DECREASING[function](g)
        span = f.max() - f.min()
        unit = (f - f.min()) / span if span > 0 else np.ones_like(f)
        theta = THETA_FLOOR + (1 - THETA_FLOOR) * unit
    else:
        raise ValueError(f"unknown importance function {function!r}; one of {IMPORTANCE_FUNCTIONS}")
    return np.maximum(theta, THETA_FLOOR)
