"""A Pareto sweep: one problem (one ORM measurement), many budgets, each proven optimal.

The problem is validated once and every point goes to the DP first, per-option objectives
included (HiGHS takes a point over when the DP's states outgrow its limit or after half the
time limit). From one budget to the next the DP keeps its steps, its Lagrange multipliers, its
memory-knapsack tables (:mod:`.dp_memory`, built to cover a slightly larger memory cap) and
the previous gap between bound and optimum (its first target); the previous point's
configuration (when it meets the next budgets, checked exactly) is its incumbent (HiGHS gets
no MIP start: one made it return a worse configuration as optimal). On the ResNet-50 line of
``bench/solvers.py --sweep-time`` this takes 100 points from about 70 s (HiGHS one by one) to
a few seconds. Budgets that only grow give a front whose objective never falls: a point whose
solver answer scores below an incumbent that fits (float ties) keeps the incumbent, which is
then optimal too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ompq_plugin.allocate.dp import DpCache
from ompq_plugin.allocate.problem import (
    Allocation,
    AllocationProblem,
    budget_limits,
    prepare,
    violations,
)
from ompq_plugin.allocate.solver import solve_prepared
from ompq_plugin.budgets import Budgets
from ompq_plugin.errors import OmpqError


@dataclass(frozen=True)
class ParetoPoint:
    budgets: Budgets
    allocation: Allocation


def budget_line(low: Budgets, high: Budgets, points: int) -> list[Budgets]:
    """``points`` budgets from ``low`` to ``high``, each field evenly spaced (inf stays inf)."""
    if points < 2:
        raise OmpqError(f"a sweep needs at least 2 points, got {points}")
    lo, hi = budget_limits(low), budget_limits(high)
    for k, name in enumerate(("weight memory", "BOPs", "activation buffer")):
        if math.isinf(lo[k]) != math.isinf(hi[k]) or hi[k] < lo[k]:
            raise OmpqError(
                f"{name} sweep from {lo[k]:g} to {hi[k]:g}: give both ends, the first smaller"
            )
    out = []
    for j in range(points):
        t = j / (points - 1)
        vals = [a if math.isinf(a) else a + (b - a) * t for a, b in zip(lo, hi, strict=True)]
        out.append(Budgets(*vals))
    return out


def sweep(
    problem: AllocationProblem, budgets: Sequence[Budgets], time_limit_s: float = 60.0
) -> list[ParetoPoint]:
    """The proven optimum of ``problem`` under each of ``budgets`` (its own budgets ignored).

    ``time_limit_s`` bounds each point. Raises InfeasibleBudgetError for the first infeasible
    point (naming the budget and its smallest achievable value).
    """
    prep = prepare(problem)
    cache = DpCache()
    previous: Allocation | None = None
    out: list[ParetoPoint] = []
    for b in budgets:
        start = time.perf_counter()
        p = replace(problem, budgets=b)
        incumbent = previous
        if incumbent is not None and violations(p, _used(incumbent)):
            incumbent = None
        allocation = solve_prepared(p, prep, start, time_limit_s, incumbent=incumbent, cache=cache)
        if incumbent is not None and incumbent.objective > allocation.objective:
            allocation = replace(incumbent, solve_s=time.perf_counter() - start)
        out.append(ParetoPoint(b, allocation))
        previous = allocation
    return out


def _used(allocation: Allocation) -> tuple[int, int, int]:
    return (allocation.weight_memory_bits, allocation.bops, allocation.max_act_buffer_bits)
