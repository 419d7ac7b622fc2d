"""The Pareto sweep: every point proven optimal (brute force / cold solves), front monotone."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from test_allocate import brute_force, extreme_usage, fits, medium_problem, random_problem
from test_allocate_values import brute, with_values

from ompq_plugin.allocate import budget_line, solve, sweep
from ompq_plugin.budgets import Budgets
from ompq_plugin.errors import InfeasibleBudgetError, OmpqError

INF = Budgets()


def monotone(points) -> bool:
    """Along a line where every budget grows, no objective may fall (exact float compare)."""
    for a, b in zip(points, points[1:], strict=False):
        grows = (
            b.budgets.weight_memory_bits >= a.budgets.weight_memory_bits
            and b.budgets.bops >= a.budgets.bops
            and b.budgets.act_buffer_bits >= a.budgets.act_buffer_bits
        )
        assert grows
        if b.allocation.objective < a.allocation.objective:
            return False
    return True


@pytest.mark.parametrize("per_option", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_sweep_points_are_optimal_and_the_front_is_monotone(seed: int, per_option: bool) -> None:
    rng = random.Random(9000 + seed)
    base = replace(random_problem(rng), budgets=INF)
    if per_option:
        base = with_values(rng, base, "error" if seed % 2 else "random")
    lo, hi = extreme_usage(base)
    axes = [k for k in range(3) if rng.random() < 0.7] or [0]
    low = Budgets(*(lo[k] if k in axes else math.inf for k in range(3)))
    high = Budgets(*(hi[k] if k in axes else math.inf for k in range(3)))
    points = sweep(base, budget_line(low, high, 12))
    assert len(points) == 12 and monotone(points)
    for point in points:
        problem = replace(base, budgets=point.budgets)
        best = brute(problem) if per_option else brute_force(problem)
        assert best is not None
        assert fits(problem, point.allocation.weight_bits, point.allocation.act_bits)
        assert point.allocation.objective == pytest.approx(best[0], rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("seed", range(2))
def test_sweep_matches_cold_solves_on_medium_instances(seed: int) -> None:
    problem = medium_problem(random.Random(9500 + seed))
    b = problem.budgets
    line = budget_line(
        Budgets(b.weight_memory_bits * 0.7, b.bops * 0.7),
        Budgets(b.weight_memory_bits * 1.3, b.bops * 1.3),
        10,
    )
    points = sweep(problem, line)
    assert monotone(points)
    for point in points[::3]:
        cold = solve(replace(problem, budgets=point.budgets))
        # both proven optimal: equal up to the DP's float slack (1e-9 of the objective's scale)
        assert point.allocation.objective == pytest.approx(cold.objective, rel=1e-7)


def test_budget_line_and_errors() -> None:
    line = budget_line(Budgets(10, 100), Budgets(20, 100), 3)
    assert [x.weight_memory_bits for x in line] == [10, 15, 20]
    assert all(x.bops == 100 and math.isinf(x.act_buffer_bits) for x in line)
    with pytest.raises(OmpqError, match="at least 2 points"):
        budget_line(Budgets(10), Budgets(20), 1)
    with pytest.raises(OmpqError, match="weight memory sweep"):
        budget_line(Budgets(20), Budgets(10), 5)
    base = replace(random_problem(random.Random(1)), budgets=INF)
    smallest = extreme_usage(base)[0][0]
    with pytest.raises(InfeasibleBudgetError, match="weight memory"):
        sweep(base, budget_line(Budgets(smallest - 1), Budgets(smallest + 1), 2))


def test_cli_pareto_writes_a_monotone_front(data_dir, tmp_path, capsys) -> None:
    import json

    from ompq_plugin.cli import main

    out = tmp_path / "front.json"
    argv = ["pareto", "--model", "resnet20", "--data", str(data_dir), "--samples", "16"]
    argv += ["--avg-weight-bits", "3:6", "--bops-g", "3", "--points", "6", "-o", str(out)]
    assert main(argv) == 0
    front = json.loads(out.read_text())
    assert len(front["points"]) == 6 and "6 points solved" in capsys.readouterr().out
    objective = [p["objective"] for p in front["points"]]
    memory = [p["budgets"]["weight_memory_bits"] for p in front["points"]]
    assert objective == sorted(objective) and memory == sorted(memory)
    assert all(p["budgets"]["bops"] == 3e9 and p["bops"] <= 3e9 for p in front["points"])
    assert main([*argv[:-1], str(tmp_path / "bad.json"), "--points", "1"]) == 1
    assert not (tmp_path / "bad.json").exists()
