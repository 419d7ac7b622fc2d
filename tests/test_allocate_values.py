"""Per-option objective values (``weight_value`` / ``act_value``) against brute force.

The reference objective here is computed from the value tables directly (not with the module's
``objective_value``), over every configuration ``configs`` enumerates.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from test_allocate import configs, extreme_usage, fits, random_problem, with_exclusions

from ompq_plugin.allocate import AllocationProblem, objective_value, solve, usage
from ompq_plugin.budgets import Budgets
from ompq_plugin.errors import InfeasibleBudgetError, OmpqError

INF = Budgets()
FIELDS = ("weight_memory_bits", "bops", "act_buffer_bits")


def reference(problem: AllocationProblem, wb: dict[str, int], ab: dict[str, int]) -> float:
    total = math.fsum(problem.weight_value[i][wb[lay.name]] for i, lay in enumerate(problem.layers))
    groups = {lay.act_group: ab[lay.name] for lay in problem.layers}
    if problem.act_value is not None:
        total += math.fsum(problem.act_value[g][a] for g, a in groups.items())
    return total


def brute(problem: AllocationProblem):
    best = None
    for wb, ab in configs(problem):
        if fits(problem, wb, ab):
            obj = reference(problem, wb, ab)
            if best is None or obj > best[0]:
                best = (obj, wb, ab)
    return best


def with_values(
    rng: random.Random, problem: AllocationProblem, shape: str, acts: bool = True
) -> AllocationProblem:
    """Random per-option values: any order ("random"), or minus an error theta * 2^(-2b)."""

    def value(theta: float, bits: int) -> float:
        if shape == "random":
            return rng.uniform(-1.0, 1.0)
        return -theta * 2.0 ** (-2 * bits)

    weight_value = tuple(
        {w: value(rng.uniform(0.01, 1.0), w) for w in lay.weight_choices} for lay in problem.layers
    )
    act_value = None
    if acts:
        act_value = {}
        for lay in problem.layers:
            theta = rng.uniform(0.01, 1.0)
            table = act_value.setdefault(lay.act_group, {})
            for a in lay.act_choices:
                table.setdefault(a, value(theta, a))
    return replace(
        problem,
        weight_coeff=(0.0,) * len(problem.layers),
        weight_value=weight_value,
        act_value=act_value,
    )


def check(problem: AllocationProblem, solver: str) -> None:
    best = brute(problem)
    if best is None:
        with pytest.raises(InfeasibleBudgetError):
            solve(problem, solver=solver)
        return
    result = solve(problem, solver=solver)
    assert fits(problem, result.weight_bits, result.act_bits)
    scale = sum(max(abs(v) for v in table.values()) for table in problem.weight_value)
    tol = 1e-9 * scale
    assert reference(problem, result.weight_bits, result.act_bits) >= best[0] - tol
    assert result.objective == pytest.approx(best[0], rel=1e-9, abs=tol)
    assert result.objective == objective_value(problem, result.weight_bits, result.act_bits)


@pytest.mark.parametrize("solver", ["dp", "highs"])
@pytest.mark.parametrize("shape", ["random", "error"])
@pytest.mark.parametrize("seed", range(15))
def test_per_option_values_match_brute_force(seed: int, shape: str, solver: str) -> None:
    rng = random.Random(7000 + seed)
    problem = random_problem(rng)
    if seed % 3 == 0:
        problem = with_exclusions(rng, problem)
        if next(iter(configs(problem)), None) is None:
            return
    check(with_values(rng, problem, shape, acts=seed % 4 != 1), solver)


@pytest.mark.parametrize("shape", ["random", "error"])
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("seed", range(6))
def test_per_option_values_at_and_just_below_each_budget(seed: int, which: int, shape: str) -> None:
    rng = random.Random(8000 + seed)
    base = random_problem(rng, scale=1 + 5000 * (seed % 2))
    base = with_values(rng, replace(base, budgets=INF), shape)
    lo, hi = (u[which] for u in extreme_usage(base))
    field = FIELDS[which]
    constrained = replace(base, budgets=replace(INF, **{field: (lo + hi) / 2}))
    best = brute(constrained)
    assert best is not None
    at = usage(constrained, best[1], best[2])[which]
    for limit in (at, at - 1):
        problem = replace(base, budgets=replace(INF, **{field: limit}))
        for solver in ("dp", "highs"):
            check(problem, solver)


def test_nonmonotone_values_pick_the_best_option_not_the_most_bits() -> None:
    rng = random.Random(3)
    problem = random_problem(rng)
    problem = replace(
        problem,
        budgets=INF,
        weight_coeff=(0.0,) * len(problem.layers),
        weight_value=tuple({w: -abs(w - 5) for w in lay.weight_choices} for lay in problem.layers),
    )
    result = solve(problem)
    for lay in problem.layers:
        assert result.weight_bits[lay.name] == min(lay.weight_choices, key=lambda w: abs(w - 5))
    assert result.objective == pytest.approx(brute(problem)[0])


def test_missing_or_nonfinite_value_names_layer_and_width() -> None:
    problem = random_problem(random.Random(4))
    lay = problem.layers[1]
    w = lay.weight_choices[-1]
    table = tuple({b: 1.0 for b in x.weight_choices} for x in problem.layers)
    bad = list(table)
    bad[1] = {b: v for b, v in table[1].items() if b != w}
    with pytest.raises(OmpqError, match=rf"layer {lay.name}: .*for {w} weight bits"):
        solve(replace(problem, weight_value=tuple(bad)))
    bad[1] = {**table[1], w: math.nan}
    with pytest.raises(OmpqError, match=rf"layer {lay.name}: .*for {w} weight bits"):
        solve(replace(problem, weight_value=tuple(bad)))
    with pytest.raises(OmpqError, match="entries for"):
        solve(replace(problem, weight_value=table[:-1]))
    g = lay.act_group
    acts: dict[str, dict[int, float]] = {}
    for x in problem.layers:
        acts.setdefault(x.act_group, {}).update({a: 0.0 for a in x.act_choices})
    a = min(set.intersection(*(set(x.act_choices) for x in problem.layers if x.act_group == g)))
    acts[g][a] = math.inf
    problem = replace(problem, budgets=INF, weight_value=table, act_value=acts)
    with pytest.raises(OmpqError, match=rf"act group '{g}': .*for {a} act bits"):
        solve(problem)
    acts[g][a] = 0.0
    assert solve(replace(problem, act_value=acts)).status == "optimal"
    with pytest.raises(OmpqError, match="unknown act groups"):
        solve(replace(problem, act_value={**acts, "nope": {2: 0.0}}))
