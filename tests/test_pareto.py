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


def test_cli_pareto_writes_a_bitconfig_per_point_that_quantize_reads(data_dir, tmp_path, capsys):
    import json

    from ompq_plugin.bitconfig import BitConfig
    from ompq_plugin.cli import main

    out, bits = tmp_path / "front.json", tmp_path / "points"
    argv = ["pareto", "--model", "resnet20", "--data", str(data_dir), "--samples", "16",
            "--avg-weight-bits", "3:6", "--bops-g", "20:80", "--points", "3", "--act-bits", "8",
            "-o", str(out), "--bits-dir", str(bits)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "the BOPs budget never binds" in captured.err  # ResNet-20 can use 2.6 G at most
    front = json.loads(out.read_text())
    assert front["search"]["method"] == "ompq-noise" and front["search"]["samples"] == 16
    assert front["search"]["weights"]["sha256"] and front["search"]["input"]["size"] == [3, 32, 32]
    assert [p["status"] for p in front["points"]] == ["optimal"] * 3
    for i, point in enumerate(front["points"]):
        config = BitConfig.load(bits / f"point_{i:03d}.json")
        every = [*config.layers, *config.fixed_layers]  # the two frozen shortcut convs too
        assert [lb.name for lb in config.fixed_layers] == ["layer2.0.shortcut", "layer3.0.shortcut"]
        assert {lb.name: lb.weight_bits for lb in every} == point["weight_bits"]
        assert {lb.name: lb.act_bits for lb in every} == point["act_bits"]
        assert config.totals.weight_memory_bits == point["weight_memory_bits"]
        assert config.average_weight_bits == pytest.approx(point["avg_weight_bits"])
        assert config.budgets.weight_memory_bits == point["budgets"]["weight_memory_bits"]
        assert config.weights is not None  # the checkpoint's hash, as `ompq search` records
    assert set(point["act_bits"].values()) == {8}  # --act-bits narrowed the free layers
    # a folder already holding point files is refused before any work, nothing is written
    again = tmp_path / "again.json"
    assert main([*argv[:-4], "-o", str(again), "--bits-dir", str(bits)]) == 1
    assert "already holds point files (point_000.json" in capsys.readouterr().err
    assert not again.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no budget to sweep"),
        (["--avg-weight-bits", "8:3"], "the low end comes first"),
        (["--avg-weight-bits", "3:inf"], "positive and finite"),
        (["--avg-weight-bits", "-1:8"], "positive and finite"),
        (["--bops-g", "1:2", "--time-limit", "0"], "--time-limit must be a positive finite"),
        (["--bops-g", "1:2", "--samples", "-1"], "--samples must be a positive number"),
        (["--avg-weight-bits", "4"], "no budget to sweep"),
        (["--avg-weight-bits", "4:4", "--bops-g", "2"], "no budget to sweep"),
        (["--bops-g", "1:2", "--pin", "nope"], "NAME=W/A"),
    ],
)
def test_cli_pareto_refuses_bad_input_before_any_work(extra, message, tmp_path, capsys):
    from ompq_plugin.cli import main

    out = tmp_path / "front.json"
    code = main(["pareto", "--model", "resnet20", *extra, "-o", str(out)])
    assert code == 1 and message in capsys.readouterr().err and not out.exists()


def test_cli_pareto_notes_only_budgets_the_model_cannot_reach(data_dir, tmp_path, capsys):
    """A fixed 4-bit memory budget binds (the optimum sits just under it): no note; a BOPs
    range above what every layer at its widest uses gets one. A folder already holding an
    older front's point file is refused."""
    from ompq_plugin.cli import main

    base = ["pareto", "--model", "resnet20", "--data", str(data_dir), "--samples", "16",
            "--points", "3"]
    out = tmp_path / "front.json"
    assert main([*base, "--avg-weight-bits", "4", "--bops-g", "0.8:2.6", "-o", str(out)]) == 0
    assert "never binds" not in capsys.readouterr().err
    assert main([*base, "--avg-weight-bits", "3:6", "--bops-g", "20:80", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "the BOPs budget never binds" in err and "weight memory budget never" not in err
    old = tmp_path / "points"
    old.mkdir()
    (old / "point_007.json").write_text("{}")
    again = tmp_path / "again.json"
    argv = [*base, "--bops-g", "1:2", "--bits-dir", str(old), "-o", str(again)]
    assert main(argv) == 1 and "already holds point files" in capsys.readouterr().err
    assert not again.exists() and sorted(p.name for p in old.iterdir()) == ["point_007.json"]
