"""Bit-width allocation: OMPQ's integer program (paper Eq. 10), solved exactly.

* :mod:`.problem`: the problem, its objective (Eq. 10 or per-option values), exact integer
  bookkeeping and validation; :mod:`.feasibility`: each budget's exact minimum and the messages.
* :mod:`.dp` (with :mod:`.dp_bounds`): an exact dynamic program over the act groups.
* :mod:`.highs`: the same problem as a 0-1 integer program in HiGHS.

:func:`solve` never returns a configuration that breaks a budget (checked exactly, in
integers) and only returns proven optima.
"""

from __future__ import annotations

import time

from ompq_plugin.allocate import dp
from ompq_plugin.allocate.dp import TooHard, solve_dp
from ompq_plugin.allocate.feasibility import check_feasible
from ompq_plugin.allocate.highs import solve_highs
from ompq_plugin.allocate.problem import (
    LAYER_KINDS,
    Allocation,
    AllocationLayer,
    AllocationProblem,
    Pin,
    checked_allocation,
    eq10_coefficients,
    objective_value,
    prepare,
    timeout_error,
    usage,
)
from ompq_plugin.errors import OmpqError

__all__ = [
    "LAYER_KINDS",
    "SOLVERS",
    "Allocation",
    "AllocationLayer",
    "AllocationProblem",
    "Pin",
    "eq10_coefficients",
    "objective_value",
    "solve",
    "usage",
]

SOLVERS = ("auto", "dp", "highs")


def solve(
    problem: AllocationProblem, time_limit_s: float = 60.0, *, solver: str = "auto"
) -> Allocation:
    """Maximise the objective under the budgets; exact, proven optimal, never over budget.

    ``solver``: "auto" runs the DP and hands instances too large for it to HiGHS; "dp" or
    "highs" force one (for cross-checks; "dp" then fails on too-large instances).
    Raises InfeasibleBudgetError (naming the budget and its smallest achievable value) when no
    configuration meets the budgets, and OmpqError on bad input or when optimality is not
    proven within ``time_limit_s``.
    """
    if solver not in SOLVERS:
        raise OmpqError(f"unknown solver {solver!r}; use one of {SOLVERS}")
    start = time.perf_counter()
    prep = prepare(problem)
    check_feasible(problem, prep)
    if not problem.layers:
        return Allocation({}, {}, 0.0, 0, 0, 0, time.perf_counter() - start, "optimal")
    if solver != "highs":
        try:
            chosen = solve_dp(problem, prep, start + time_limit_s)
        except TimeoutError:
            raise timeout_error(time_limit_s) from None
        except TooHard:
            if solver == "dp":
                raise OmpqError(
                    f"the DP needed more than {dp._MAX_STATES} states per step; use solver='auto'"
                ) from None
        else:
            allocation, broken = checked_allocation(problem, chosen, start, "dp")
            if broken:  # cannot happen: the DP is exact in integers
                raise OmpqError(
                    "internal error: the DP returned a configuration over budget; "
                    "please report this with the model and budgets"
                )
            return allocation
    return solve_highs(problem, prep, start, time_limit_s)
