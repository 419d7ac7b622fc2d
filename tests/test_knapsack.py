"""The weight-memory knapsack (``allocate/knapsack.py``) against brute force and the DP.

Only the weight memory is finite in these problems; Eq. 10 and per-option objectives, act
groups of several layers, pins and excluded pairs; budgets at and just below the optimum's
memory.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from test_allocate import brute_force, fits, random_problem, with_exclusions
from test_allocate_values import brute, with_values

from ompq_plugin.allocate import AllocationProblem, solve, usage
from ompq_plugin.allocate import knapsack as knapsack_module
from ompq_plugin.allocate.knapsack import memory_only, solve_memory_knapsack
from ompq_plugin.allocate.problem import prepare
from ompq_plugin.budgets import Budgets
from ompq_plugin.errors import InfeasibleBudgetError


def memory_problem(seed: int) -> AllocationProblem:
    rng = random.Random(4000 + seed)
    problem = random_problem(rng, scale=1 + 999 * (seed % 5 == 0))
    if seed % 3 == 1:
        problem = with_values(rng, problem, "random" if seed % 2 else "error")
    if seed % 4 == 2:
        problem = with_exclusions(rng, problem)
    if seed % 6 == 3:
        first = problem.layers[0]
        problem = replace(problem, pins={first.name: (first.weight_choices[-1], None)})
    budget = problem.budgets.weight_memory_bits
    if budget == float("inf"):  # random_problem sometimes leaves memory free: pick one
        total = sum(lay.params * max(lay.weight_choices) for lay in problem.layers)
        budget = rng.uniform(0.3, 1.0) * total
    return replace(problem, budgets=Budgets(weight_memory_bits=budget))


@pytest.fixture
def no_size_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The knapsack on every draw (its size limits only choose the faster solver)."""
    monkeypatch.setattr(knapsack_module, "_MAX_OPTIONS", 1 << 20)
    monkeypatch.setattr(knapsack_module, "_MAX_WORK", 1 << 40)


def best_of(problem: AllocationProblem):
    return brute(problem) if problem.weight_value is not None else brute_force(problem)


def knapsack_answer(problem: AllocationProblem):
    """The knapsack's answer, checked against brute force: within the budget, the optimum; None
    (after checking the refusal) where brute force finds no configuration."""
    best = best_of(problem)
    if best is None:
        with pytest.raises(InfeasibleBudgetError):
            solve(problem)
        return None
    got = solve(problem)
    assert got.solver == "knapsack"
    assert fits(problem, got.weight_bits, got.act_bits)
    assert got.objective == pytest.approx(best[0], rel=1e-9, abs=1e-12)
    return got


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.usefixtures("no_size_limits")
def test_knapsack_matches_brute_force_and_the_dp(seed: int) -> None:
    problem = memory_problem(seed)
    assert memory_only(problem)
    got = knapsack_answer(problem)
    if got is None:
        return
    dp = solve(problem, solver="dp")
    assert got.objective == pytest.approx(dp.objective, rel=1e-9, abs=1e-12)
    for lay in problem.layers:
        assert (got.weight_bits[lay.name], got.act_bits[lay.name]) not in lay.excluded_pairs
    for name, (w, _) in problem.pins.items():
        assert got.weight_bits[name] == w


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.usefixtures("no_size_limits")
def test_at_and_just_below_the_optimums_memory(seed: int) -> None:
    """A budget equal to the optimum's memory keeps that optimum; one bit less forces another
    configuration (or none), as brute force says."""
    problem = memory_problem(seed)
    best = best_of(problem)
    if best is None:  # an infeasible draw: the budget at the cheapest configuration instead
        low = sum(lay.params * min(lay.weight_choices) for lay in problem.layers)
        problem = replace(problem, budgets=Budgets(weight_memory_bits=low))
        best = best_of(problem)
    assert best is not None
    used = usage(problem, best[1], best[2])[0]
    for budget in (used, used - 1):
        got = knapsack_answer(replace(problem, budgets=Budgets(weight_memory_bits=budget)))
        assert got is None or got.weight_memory_bits <= budget


def test_other_budgets_or_a_large_table_leave_it_to_the_dp(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = memory_problem(1)
    with_bops = replace(
        problem, budgets=Budgets(weight_memory_bits=problem.budgets.weight_memory_bits, bops=1e18)
    )
    assert solve_memory_knapsack(with_bops, prepare(with_bops)) is None
    assert solve(with_bops).solver == "dp"
    for limit in ("_MAX_CELLS", "_MAX_WORK", "_MAX_OPTIONS"):
        with monkeypatch.context() as patch:
            patch.setattr(knapsack_module, limit, 1)
            assert solve_memory_knapsack(problem, prepare(problem)) is None
            if best_of(problem) is not None:
                assert solve(problem).solver == "dp"
