"""Which exact method solves a problem: the DP first, HiGHS when the DP cannot finish.

Without a finite budget, "auto" takes each act group's best choice directly (:mod:`.unbounded`);
with weight memory the only finite one, it solves the knapsack over memory units
(:mod:`.knapsack`) when that is small enough.

Measured on 90 ResNet-50 instances, 10 s limit (``bench/results/solvers.json``, 2026-12-07,
idle machine, each solver in turn, the fastest of three solves per instance): every solver proved
all 90; the DP was the fastest on all 90 (median 0.015-0.025 s per family against HiGHS's
0.079-0.163 s; narrowest margin 18.9 ms against 20.1 ms). So "auto" runs the DP; HiGHS takes
over when the DP's states outgrow its limit and, on per-option problems (where the DP has no
closed-form bound on its work), after half the time limit.
"""

from __future__ import annotations

import time

from ompq_plugin.allocate import dp
from ompq_plugin.allocate.dp import DpCache, TooHard, solve_dp
from ompq_plugin.allocate.feasibility import check_feasible
from ompq_plugin.allocate.highs import solve_highs
from ompq_plugin.allocate.knapsack import solve_memory_knapsack
from ompq_plugin.allocate.problem import (
    Allocation,
    AllocationProblem,
    Prepared,
    checked_allocation,
    timeout_error,
)
from ompq_plugin.allocate.unbounded import solve_unbounded, unbounded
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
) -> Allocation:
    """:func:`solve` on a validated problem; ``incumbent`` (a configuration known to meet these
    budgets) and ``cache`` let a sweep reuse work between nearby budgets."""
    if solver not in SOLVERS:
        raise OmpqError(f"unknown solver {solver!r}; use one of {SOLVERS}")
    check_feasible(problem, prep)
    if not problem.layers:
        return Allocation({}, {}, 0.0, 0, 0, 0, time.perf_counter() - start, "optimal")
    if solver == "auto" and unbounded(problem):
        return _exact(problem, solve_unbounded(prep, len(problem.layers)), start, "unbounded")
    if solver == "auto" and incumbent is None:
        chosen = solve_memory_knapsack(problem, prep)
        if chosen is not None:
            return _exact(problem, chosen, start, "knapsack")
    warm = None
    if incumbent is not None:
        warm = [
            (incumbent.weight_bits[lay.name], incumbent.act_bits[lay.name])
            for lay in problem.layers
        ]
    per_option = problem.weight_value is not None or problem.act_value is not None
    if solver in ("dp", "auto"):
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
            return _exact(problem, chosen, start, "dp")
    return solve_highs(problem, prep, start, time_limit_s)


def _exact(
    problem: AllocationProblem, chosen: list[tuple[int, int]], start: float, solver: str
) -> Allocation:
    """The Allocation of an exact method's answer, re-checked in integers (it cannot break a
    budget; if it does, that is a bug to report)."""
    allocation, broken = checked_allocation(problem, chosen, start, solver)
    if broken:
        raise OmpqError(
            f"internal error: the {solver} solver returned a configuration over budget; "
            "please report this with the model and budgets"
        )
    return allocation
