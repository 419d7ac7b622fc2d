"""Exact allocation solvers compared on ResNet-50 instances (54 layers, 7 weight x 4 act widths).

Instance families (30 each: 3 importance draws x 2 betas x 5 (memory, BOPs) budget pairs, first
and last layer pinned 8/8):

* ``eq10``: the Eq. 10 objective, memory + BOPs budgets (the search's own problem);
* ``eq10_buffer``: the same plus an activation-buffer budget (5 bits x the largest input);
* ``error``: per-option values shaped like an error, ``-theta_i * 2^(-2w)`` per layer and
  ``-sum_{i in g} theta_i * 2^(-2a)`` per act group (increasing in the bits, not linear).

Solvers, each with a 10 s limit, every answer re-checked in exact integers and its objective
compared with the best found:

* ``dp``: the project's DP (``solve(solver="dp")``);
* ``highspy``: the project's HiGHS path (``solve(solver="highs")``, highspy called directly);
* ``scipy_milp``: the same formulation through ``scipy.optimize.milp`` (HiGHS bundled in scipy);
* ``mip_highs``: the same formulation through python-mip with ``mip.HIGHS``; python-mip 1.16/2.0
  only loads highspy < 1.15, so this runs in a child process with ``--highspy-path`` (a folder
  holding highspy 1.14, e.g. ``pip install --target /tmp/hs114 "highspy<1.15"``) first on the
  path. Without it this solver is skipped.

Run: ``nice -n 10 python bench/solvers.py [--highspy-path /tmp/hs114] [--repeats R]`` (a few
minutes on 2 cores per repeat). Each instance is solved R times in a row by each solver and its
fastest time counts (the same rule for all). Writes bench/results/solvers.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from architectures import code_version

RESULTS = Path(__file__).resolve().parent / "results" / "solvers.json"
FAMILIES = ("eq10", "eq10_buffer", "error")
TIME_LIMIT_S = 10.0


def instances() -> list[tuple[dict, object]]:
    """(description, AllocationProblem) for every instance of every family."""
    import numpy as np
    import torch

    from ompq_plugin.allocate import AllocationLayer, AllocationProblem, eq10_coefficients
    from ompq_plugin.budgets import Budgets
    from ompq_plugin.layers import discover_layers
    from ompq_plugin.models import build_model

    model, _ = build_model("resnet50")
    found = discover_layers(model, torch.randn(1, 3, 224, 224))
    weights, acts = (2, 3, 4, 5, 6, 7, 8), (2, 4, 6, 8)
    layers = tuple(
        AllocationLayer(
            lay.name, lay.kind, lay.params, lay.macs, lay.input_numel, lay.act_group, weights, acts
        )
        for lay in found.layers
    )
    pins = {layers[0].name: (8, 8), layers[-1].name: (8, 8)}
    biggest = max(lay.input_numel for lay in layers)
    out = []
    for family in FAMILIES:
        rng = random.Random(0)
        for draw in range(3):
            gamma = np.array([rng.uniform(5, 15) for _ in layers[1:-1]])
            for beta in (0.3, 1.0):
                theta = np.exp(-beta * (gamma - gamma.min()))
                coeff = (0.0, *eq10_coefficients(list(theta)), 0.0)
                full_theta = (float(theta.mean()), *map(float, theta), float(theta.mean()))
                for avg_bits, bops_per_mac in ((4, 16), (5, 20), (3, 12), (6, 30), (4, 36)):
                    budgets = Budgets(
                        weight_memory_bits=avg_bits * found.total_params,
                        bops=bops_per_mac * found.total_macs,
                        act_buffer_bits=5 * biggest if family == "eq10_buffer" else math.inf,
                    )
                    problem = AllocationProblem(layers, coeff, budgets, pins)
                    if family == "error":
                        act_value: dict[str, dict[int, float]] = {}
                        for t, lay in zip(full_theta, layers, strict=True):
                            table = act_value.setdefault(lay.act_group, dict.fromkeys(acts, 0.0))
                            for a in acts:
                                table[a] -= t * 2.0 ** (-2 * a)
                        problem = AllocationProblem(
                            layers,
                            (0.0,) * len(layers),
                            budgets,
                            pins,
                            weight_value=tuple(
                                {w: -t * 2.0 ** (-2 * w) for w in weights} for t in full_theta
                            ),
                            act_value=act_value,
                        )
                    desc = {
                        "family": family,
                        "draw": draw,
                        "beta": beta,
                        "avg_weight_bits": avg_bits,
                        "bops_per_mac": bops_per_mac,
                    }
                    out.append((desc, problem))
    return out


def _choice_from_x(form, x) -> list[tuple[int, int]]:
    import numpy as np

    return [
        lp[int(np.argmax(x[f : f + len(lp)]))] for f, lp in zip(form.first, form.pairs, strict=True)
    ]


def _via_formulation(problem, backend: str) -> tuple[str, list[tuple[int, int]] | None]:
    """Solve the package's HiGHS formulation with another front end (no repair loop)."""
    import numpy as np

    from ompq_plugin.allocate.feasibility import check_feasible
    from ompq_plugin.allocate.highs import formulate
    from ompq_plugin.allocate.problem import budget_limits, prepare

    prep = prepare(problem)
    check_feasible(problem, prep)
    form = formulate(problem, prep, budget_limits(problem.budgets))
    n = len(form.cost)
    if backend == "scipy_milp":
        from scipy.optimize import LinearConstraint, milp
        from scipy.sparse import csr_matrix

        a = csr_matrix((form.a_value, form.a_index, form.a_start), shape=(len(form.row_lower), n))
        res = milp(
            -form.cost,
            integrality=np.ones(n),
            bounds=(0, 1),
            constraints=LinearConstraint(a, form.row_lower, form.row_upper),
            options={"disp": False, "time_limit": TIME_LIMIT_S, "mip_rel_gap": 1e-9},
        )
        if res.status != 0:
            return f"status {res.status}", None
        return "optimal", _choice_from_x(form, res.x)
    import mip

    m = mip.Model(sense=mip.MAXIMIZE, solver_name=mip.HIGHS)
    m.verbose = 0
    m.max_mip_gap = 1e-9
    xs = [m.add_var(var_type=mip.BINARY, obj=float(c)) for c in form.cost]
    for r in range(len(form.row_lower)):
        lo, hi = form.a_start[r], form.a_start[r + 1]
        cols, vals = form.a_index[lo:hi], form.a_value[lo:hi]
        expr = mip.xsum(float(v) * xs[int(j)] for j, v in zip(cols, vals, strict=True))
        if form.row_lower[r] == form.row_upper[r]:
            m.add_constr(expr == float(form.row_upper[r]))
        else:
            m.add_constr(expr <= float(form.row_upper[r]))
    status = m.optimize(max_seconds=TIME_LIMIT_S)
    if status != mip.OptimizationStatus.OPTIMAL:
        return status.name, None
    return "optimal", _choice_from_x(form, np.array([v.x for v in xs]))


def _solve_once(name: str, problem) -> tuple[float, str, dict | None, dict | None]:
    """(seconds, status, weight bits, act bits) of one solve by ``name``."""
    from ompq_plugin.allocate import solve
    from ompq_plugin.errors import OmpqError

    start = time.perf_counter()
    try:
        if name in ("dp", "highspy"):
            result = solve(problem, TIME_LIMIT_S, solver="dp" if name == "dp" else "highs")
            status, wb, ab = result.status, result.weight_bits, result.act_bits
        else:
            status, chosen = _via_formulation(problem, name)
            wb = ab = None
            if chosen is not None:
                wb = {lay.name: w for lay, (w, _) in zip(problem.layers, chosen, strict=True)}
                ab = {lay.name: a for lay, (_, a) in zip(problem.layers, chosen, strict=True)}
    except OmpqError as exc:
        status, wb, ab = f"error: {exc}"[:120], None, None
    return time.perf_counter() - start, status, wb, ab


def run_solver(name: str, repeats: int = 1) -> list[dict]:
    """Every instance solved ``repeats`` times in a row; its time is the fastest of them (the
    machine's speed drifts; the same rule for every solver)."""
    import torch

    from ompq_plugin.allocate import objective_value, usage

    torch.set_num_threads(1)
    runs = []
    for desc, problem in instances():
        times = []
        for _ in range(repeats):
            seconds, status, wb, ab = _solve_once(name, problem)
            times.append(seconds)
        run = {**desc, "seconds": min(times), "status": status}
        if repeats > 1:
            run["seconds_each"] = times
        if wb is not None:
            used = usage(problem, wb, ab)
            b = problem.budgets
            run["within_budget"] = (
                used[0] <= b.weight_memory_bits
                and used[1] <= b.bops
                and used[2] <= b.act_buffer_bits
            )
            run["objective"] = objective_value(problem, wb, ab)
        runs.append(run)
        print(json.dumps({"solver": name, **run}), file=sys.stderr, flush=True)
    return runs


def summarise(runs: list[dict], best: list[float | None]) -> dict:
    out = {}
    for family in FAMILIES:
        rows = [(r, b) for r, b in zip(runs, best, strict=True) if r["family"] == family]
        proven = [
            r
            for r, b in rows
            if r["status"] == "optimal"
            and r.get("within_budget")
            and b is not None
            and r["objective"] >= b - 1e-9 * abs(b) - 1e-12
        ]
        secs = sorted(r["seconds"] for r, _ in rows)
        out[family] = {
            "instances": len(rows),
            "proven_and_best": len(proven),
            "median_s": secs[len(secs) // 2],
            "max_s": secs[-1],
        }
    return out


def sweep_profile(every: int = 10) -> dict:
    """Why the ResNet-50 Pareto sweep of the default method is slow: per point of the 100-budget
    line of ``bench/search_speed.py`` (every ``every``-th point), the solve time of HiGHS as
    ``solve`` runs it (a new model per point), HiGHS with one model whose budget rows are
    changed between points, the same plus the previous point's answer as MIP start (feasible:
    budgets only grow), and the DP (``solver="dp"``). The objective values are ``ompq-noise``'s
    (beta 0) from a real search of ResNet-50 (random weights, N = 8 images)."""
    import highspy
    import numpy as np
    import torch

    from ompq_plugin.allocate import budget_line, solve
    from ompq_plugin.allocate.highs import formulate, loaded_highs
    from ompq_plugin.allocate.problem import budget_limits, checked_allocation, prepare
    from ompq_plugin.budgets import Budgets
    from ompq_plugin.errors import OmpqError
    from ompq_plugin.models import build_model
    from ompq_plugin.searcher import run_search

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _ = build_model("resnet50")
    weights, acts = (2, 3, 4, 5, 6, 7, 8), (2, 4, 6, 8)
    result = run_search(
        model, torch.randn(8, 3, 224, 224), "generic", weight_bits=weights, act_bits=acts
    )
    problem = result.problem
    params, macs = result.layers.total_params, result.layers.total_macs
    line = budget_line(Budgets(2.6 * params, 8 * macs), Budgets(8 * params, 64 * macs), 100)
    prep = prepare(problem)
    top = budget_limits(line[-1])
    form = formulate(replace(problem, budgets=line[-1]), prep, top)
    rows = len(form.row_lower)
    h = loaded_highs(form)

    def reused(j: int, start: np.ndarray | None) -> tuple[float, float, np.ndarray]:
        lim = budget_limits(line[j])
        t = time.perf_counter()
        for k in (0, 1):  # the budget rows are the last two, scaled by the line's end
            h.changeRowBounds(rows - 2 + k, -math.inf, lim[k] / top[k])
        if start is not None:
            sol = highspy.HighsSolution()
            sol.col_value = list(start)
            sol.value_valid = True
            h.setSolution(sol)
        h.run()
        x = np.array(h.getSolution().col_value)
        chosen = [
            lp[int(np.argmax(x[f : f + len(lp)]))]
            for f, lp in zip(form.first, form.pairs, strict=True)
        ]
        alloc, broken = checked_allocation(replace(problem, budgets=line[j]), chosen, t, "highs")
        return time.perf_counter() - t, alloc.objective if not broken else math.nan, x

    points = []
    previous = None
    for j in range(0, len(line), every):
        row = {"point": j}
        t = time.perf_counter()
        row["highs_objective"] = solve(
            replace(problem, budgets=line[j]), 60, solver="highs"
        ).objective
        row["highs_s"] = time.perf_counter() - t
        row["reused_s"], row["reused_objective"], _ = reused(j, None)
        row["warm_s"], row["warm_objective"], previous = reused(j, previous)
        t = time.perf_counter()
        try:
            row["dp_objective"] = solve(
                replace(problem, budgets=line[j]), 30, solver="dp"
            ).objective
        except OmpqError as exc:
            row["dp_objective"] = str(exc)[:60]
        row["dp_s"] = time.perf_counter() - t
        points.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {
        "model": "resnet50",
        "layers": len(problem.layers),
        "choices": "weight 2..8, act 2/4/6/8",
        "points": points,
        "load_average_1min": os.getloadavg()[0],
    }


def _resnet50_problem(method: str, seed: int, real: bool = False, **search: object):
    """The allocation problem of one ResNet-50 search: random weights and N = 8 images of
    noise, or (``real``) the data folder's weights and N = 64 of its images, as
    ``bench/search_speed.py``'s sweep."""
    import torch

    from ompq_plugin.data import resolve_data_dir, search_samples
    from ompq_plugin.models import build_model
    from ompq_plugin.searcher import run_search

    torch.manual_seed(seed)
    if real:
        data_dir = resolve_data_dir(None)
        model, spec = build_model("resnet50", data_dir=data_dir)
        images = search_samples(data_dir, spec, 64, seed=seed)
        search = {"model_name": "resnet50", **search}
    else:
        model, _ = build_model("resnet50")
        images = torch.randn(8, 3, 224, 224)
    weights, acts = (2, 3, 4, 5, 6, 7, 8), (2, 4, 6, 8)
    result = run_search(
        model, images, "generic", method=method, weight_bits=weights, act_bits=acts, **search
    )
    return result.problem, result.layers.total_params, result.layers.total_macs


def sweep_time(highs_sweep: bool = True) -> dict:
    """The issue-11 figure: one search, then the 100-budget ResNet-50 line of
    :func:`sweep_profile` solved to proven optimality by ``allocate.sweep`` (wall and CPU
    seconds of the whole sweep). Every 11th point is re-solved cold by HiGHS (objective and
    time); ``highs_sweep`` also times the same 100 points solved by HiGHS one by one (what the
    sweep did before the DP took per-option problems)."""
    import torch

    from ompq_plugin.allocate import budget_line, solve, sweep
    from ompq_plugin.budgets import Budgets

    torch.set_num_threads(1)
    cases = [
        ("ompq-noise", 0, {}),  # the default method (beta 0)
        ("ompq-noise", 1, {}),  # another draw of the random weights and images
        ("ompq-noise", 0, {"real": True}),  # search_speed.py's sweep: real weights, N = 64
    ]
    rows = []
    for method, seed, search in cases:
        problem, params, macs = _resnet50_problem(method, seed, **search)
        line = budget_line(Budgets(2.6 * params, 8 * macs), Budgets(8 * params, 64 * macs), 100)
        sweep(problem, line[:2])  # imports and first-call costs out of the timing
        load = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        points = sweep(problem, line, 60)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        per_point = sorted(p.allocation.solve_s for p in points)
        checks = []
        for j in range(0, len(line), 11):
            t = time.perf_counter()
            cold = solve(replace(problem, budgets=line[j]), 120, solver="highs")
            got = points[j].allocation.objective
            checks.append(
                {
                    "point": j,
                    "sweep_objective": got,
                    "highs_objective": cold.objective,
                    "relative_difference": (got - cold.objective) / abs(cold.objective),
                    "highs_s": time.perf_counter() - t,
                }
            )
        row = {
            "method": method,
            "seed": seed,
            **search,
            "points": len(points),
            "sweep_wall_s": wall,
            "sweep_cpu_s": cpu,
            "per_point_median_s": per_point[len(per_point) // 2],
            "per_point_max_s": per_point[-1],
            "solvers": sorted({p.allocation.solver for p in points}),
            "front_monotone": all(
                b.allocation.objective >= a.allocation.objective
                for a, b in zip(points, points[1:], strict=False)
            ),
            "load_average_1min_before": load,
            "load_average_1min_after": os.getloadavg()[0],
            "highs_checks": checks,
        }
        if highs_sweep and method == "ompq-noise" and seed == 0:
            t, c = time.perf_counter(), time.process_time()
            for b in line:
                solve(replace(problem, budgets=b), 120, solver="highs")
            row["highs_one_by_one_wall_s"] = time.perf_counter() - t
            row["highs_one_by_one_cpu_s"] = time.process_time() - c
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "highs_checks"}), file=sys.stderr)
    hard = _eq10_pointwise(EQ10_POINT_LIMIT_S)
    print(json.dumps(hard), file=sys.stderr)
    return {
        "model": "resnet50 (random weights, N = 8 images of noise; real: weights and N = 64 "
        "images of the data folder)",
        "layers": len(problem.layers),
        "choices": "weight 2..8, act 2/4/6/8; first and last layer pinned 8/8",
        "line": "memory 2.6 -> 8 bits per weight, BOPs 8 -> 64 x MACs, 100 points",
        "machine": f"{os.cpu_count()} cores, one thread; load average recorded per case",
        "code": code_version(),
        "cases": rows,
        "eq10_pointwise": hard,
    }


EQ10_POINT_LIMIT_S = 2.0


def _eq10_pointwise(limit_s: float) -> dict:
    """Where the sweep is not fast: the Eq. 10 objective (method ``ompq``, beta 1, with the
    ORM) on the same line. Its near-ties make every exact method slow (HiGHS too: over 60 s
    at some points); counted here: points proven within ``limit_s`` each, the sweep's DP
    (cache and incumbent as in ``sweep``) against the DP on cold solves."""
    from ompq_plugin.allocate import budget_line, solve
    from ompq_plugin.allocate.dp import DpCache
    from ompq_plugin.allocate.problem import prepare
    from ompq_plugin.allocate.solver import solve_prepared
    from ompq_plugin.budgets import Budgets
    from ompq_plugin.errors import OmpqError

    problem, params, macs = _resnet50_problem("ompq", 0, beta=1.0)
    line = budget_line(Budgets(2.6 * params, 8 * macs), Budgets(8 * params, 64 * macs), 100)
    prep, cache, previous = prepare(problem), DpCache(), None
    out = {"method": "ompq", "beta": 1.0, "seed": 0, "point_limit_s": limit_s}
    for name in ("sweep_dp", "cold_dp"):
        proven, wall = 0, time.perf_counter()
        for b in line:
            p = replace(problem, budgets=b)
            try:
                if name == "sweep_dp":
                    previous = solve_prepared(
                        p, prep, time.perf_counter(), limit_s, incumbent=previous, cache=cache
                    )
                else:
                    solve(p, limit_s, solver="dp")
                proven += 1
            except OmpqError:
                previous = None
        out[f"{name}_proven"] = proven
        out[f"{name}_wall_s"] = time.perf_counter() - wall
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--solver")
    parser.add_argument("--highspy-path", help="folder with highspy < 1.15 for mip.HIGHS")
    parser.add_argument(
        "--repeats", type=int, default=1, help="solves per instance and solver; the fastest counts"
    )
    parser.add_argument(
        "--sweep-profile",
        action="store_true",
        help="only profile the ResNet-50 sweep -> bench/results/sweep_profile.json",
    )
    parser.add_argument(
        "--sweep-time",
        action="store_true",
        help="only time the ResNet-50 100-point sweep -> bench/results/sweep_time.json",
    )
    args = parser.parse_args()
    if args.sweep_time:
        out = RESULTS.with_name("sweep_time.json")
        report = {"measured": time.strftime("%Y-%m-%d %H:%M"), **sweep_time()}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out)
        print(f"wrote {out}")
        return
    if args.sweep_profile:
        out = RESULTS.with_name("sweep_profile.json")
        report = {"measured": time.strftime("%Y-%m-%d %H:%M"), **sweep_profile()}
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
        return
    if args.solver:
        print(json.dumps(run_solver(args.solver, args.repeats)))
        return
    solvers = ["dp", "highspy", "scipy_milp"] + (["mip_highs"] if args.highspy_path else [])
    results: dict[str, list[dict]] = {}
    loads: dict[str, float] = {}  # 1-minute load average as each solver starts
    for name in solvers:
        env = dict(os.environ)
        if name == "mip_highs":
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [args.highspy_path, env.get("PYTHONPATH")])
            )
        print(f"{name} ...", flush=True)
        loads[name] = os.getloadavg()[0]
        out = subprocess.run(
            [sys.executable, __file__, "--solver", name, "--repeats", str(args.repeats)],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        ).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    n = len(next(iter(results.values())))
    best = []
    for k in range(n):
        values = [
            runs[k].get("objective") for runs in results.values() if runs[k].get("within_budget")
        ]
        best.append(max(values) if values else None)
    summary = {name: summarise(runs, best) for name, runs in results.items()}
    fastest = {}
    for k in range(n):
        times = {
            name: runs[k]["seconds"]
            for name, runs in results.items()
            if runs[k]["status"] == "optimal" and runs[k].get("within_budget")
        }
        winner = min(times, key=times.get) if times else None
        fastest[winner] = fastest.get(winner, 0) + 1
    import scipy

    report = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_1min_as_each_solver_starts": loads,
        },
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "time_limit_s": TIME_LIMIT_S,
        "repeats": args.repeats,
        "code": code_version(),
        "versions": {"scipy": scipy.__version__},
        "summary": summary,
        "fastest_count": {str(k): v for k, v in fastest.items()},
        "runs": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(RESULTS)
    print(json.dumps({"summary": summary, "fastest_count": report["fastest_count"]}, indent=1))


if __name__ == "__main__":
    main()
