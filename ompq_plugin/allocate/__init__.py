"""Bit-width allocation: OMPQ's integer program (paper Eq. 10), solved exactly.

* :mod:`.problem`: the problem, its objective (Eq. 10 or per-option values), exact integer
  bookkeeping and validation; :mod:`.feasibility`: each budget's exact minimum and the messages.
* :mod:`.dp` (with :mod:`.dp_bounds`): an exact dynamic program over the act groups.
* :mod:`.highs`: the same problem as a 0-1 integer program in HiGHS.
* :mod:`.unbounded` (no finite budget) and :mod:`.knapsack` (weight memory the only finite
  budget): exact shortcuts for those two common cases.
* :mod:`.solver`: which of them runs; :mod:`.pareto`: many budgets, one problem.

:func:`solve` never returns a configuration that breaks a budget (checked exactly, in
integers) and only returns proven optima.
"""

from __future__ import annotations

import time

from ompq_plugin.allocate.pareto import ParetoPoint, budget_line, sweep
from ompq_plugin.allocate.problem import (
    LAYER_KINDS,
    Allocation,
    AllocationLayer,
    AllocationProblem,
    Pin,
    eq10_coefficients,
    objective_value,
    prepare,
    usage,
)
from ompq_plugin.allocate.solver import SOLVERS, solve_prepared

__all__ = [
    "LAYER_KINDS",
    "SOLVERS",
    "Allocation",
    "AllocationLayer",
    "AllocationProblem",
    "ParetoPoint",
    "Pin",
    "budget_line",
    "eq10_coefficients",
    "objective_value",
    "solve",
    "sweep",
    "usage",
]


def solve(
    problem: AllocationProblem, time_limit_s: float = 60.0, *, solver: str = "auto"
) -> Allocation:
    """Maximise the objective under the budgets; exact, proven optimal, never over budget.

    ``solver``: "auto" runs the DP, HiGHS taking over on instances too large for it and, for
    per-option objectives, after half the time limit (see :mod:`.solver`); without a finite
    budget it takes each act group's best choice directly, and with weight memory the only
    finite budget it solves the knapsack over memory units (when small enough); "dp" or "highs"
    force one (for cross-checks; "dp" then fails on too-large instances).
    Raises InfeasibleBudgetError (naming the budget and its smallest achievable value) when no
    configuration meets the budgets, and OmpqError on bad input or when optimality is not
    proven within ``time_limit_s``.
    """
    start = time.perf_counter()
    return solve_prepared(problem, prepare(problem), start, time_limit_s, solver)
