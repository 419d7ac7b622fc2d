"""Which exact method solves a problem: the DP for Eq. 10, HiGHS for per-option objectives.

Measured on 90 ResNet-50 instances (``bench/results/solvers.json``): with the linear Eq. 10
objective the DP was the fastest exact method on 56 of 60 instances (the other 4 within 0.1 s)
and HiGHS left some unproven at 10 s; with error-shaped per-option values HiGHS proved all 30
and the DP timed out on 4. So "auto" runs the DP on Eq. 10 problems (HiGHS when the DP's
states outgrow its limit) and HiGHS on per-option problems -- except in a sweep
(``dp_first``), where the DP's reused tables and incumbents make it the faster on per-option
problems too (``bench/results/sweep_time.json``).
"""

from __future__ import annotations

import time

from ompq_plugin.allocate import dp
from ompq_plugin.allocate.dp import DpCache, TooHard, solve_dp
from ompq_plugin.allocate.feasibility import check_feasible
from ompq_plugin.allocate.highs import solve_highs
from ompq_plugin.allocate.problem import (
    Allocation,
    AllocationProblem,
    Prepared,
    checked_allocation,
    timeout_error,
)
from ompq_plugin.errors import OmpqError

SOLVERS = ("auto", "dp", "highs")


def solve_prepared(
    problem: AllocationProblem,
    prep: Prepared,
    start: float,
    time_limit_s: float,
    solver: str = "auto",
    *,
    incumbent: Allocation | None = None,
    cache: DpCache | None = None,
    dp_first: bool = False,
) -> Allocation:
    """:func:`solve` on a validated problem; ``incumbent`` (a configuration known to meet these
    budgets) and ``cache`` let a sweep reuse work between nearby budgets. ``dp_first``: "auto"
    tries the DP on per-option problems too (a sweep: with its cache and incumbent it is the
    faster, see ``bench/results/sweep_time.json``), HiGHS taking over when the DP's states
    outgrow its limit or after half the time limit."""
    if solver not in SOLVERS:
        raise OmpqError(f"unknown solver {solver!r}; use one of {SOLVERS}")
    check_feasible(problem, prep)
    if not problem.layers:
        return Allocation({}, {}, 0.0, 0, 0, 0, time.perf_counter() - start, "optimal")
    warm = None
    if incumbent is not None:
        warm = [
            (incumbent.weight_bits[lay.name], incumbent.act_bits[lay.name])
            for lay in problem.layers
        ]
    per_option = problem.weight_value is not None or problem.act_value is not None
    if solver == "dp" or (solver == "auto" and (dp_first or not per_option)):
        handover = solver == "auto" and per_option
        try:
            chosen = solve_dp(
                problem,
                prep,
                start + time_limit_s * (0.5 if handover else 1.0),
                incumbent=(incumbent.objective, warm) if incumbent and warm else None,
                cache=cache,
            )
        except TimeoutError:
            if not handover:
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
