"""The knapsack bounds of the DP (dp_memory) against brute force on tiny instances.

The bound must never fall below the best feasible objective, for any multiplier and any memory
unit (exact gcd units and coarsened ones); and the DP with this bound switched on from the first
state (as on hard instances) must still return proven optima at and just below each budget.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from test_allocate import (
    brute_force,
    configs,
    extreme_usage,
    fits,
    random_problem,
    with_exclusions,
)
from test_allocate_values import brute, reference, with_values

from ompq_plugin.allocate import dp, dp_memory, objective_value, solve, usage
from ompq_plugin.allocate.dp_bounds import Step, build_steps, lagrangian
from ompq_plugin.allocate.problem import budget_limits, prepare
from ompq_plugin.budgets import Budgets
from ompq_plugin.errors import InfeasibleBudgetError

FIELDS = ("weight_memory_bits", "bops", "act_buffer_bits")


def _instance(seed: int):
    """A random problem with finite memory and BOPs budgets, per-option values half the time."""
    rng = random.Random(7000 + seed)
    base = random_problem(rng, scale=1 + 3000 * (seed % 3 == 0))
    if seed % 4 == 1:
        base = with_exclusions(rng, base)
    if seed % 2:
        base = with_values(rng, base, "error" if seed % 4 == 1 else "random")
    lo, hi = extreme_usage(replace(base, budgets=Budgets()))
    budgets = Budgets(rng.uniform(lo[0], hi[0]), rng.uniform(lo[1], hi[1]))
    return replace(base, budgets=budgets), seed % 2 == 1


def _best(problem, per_option: bool):
    return brute(problem) if per_option else brute_force(problem)


@pytest.mark.parametrize("exact", [0, 1])  # memory or BOPs kept as the knapsack
@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize("seed", range(16))
def test_knapsack_bound_never_below_the_optimum(
    seed: int, coarse: bool, exact: int, monkeypatch
) -> None:
    problem, per_option = _instance(seed)
    best = _best(problem, per_option)
    if best is None:
        pytest.skip("infeasible draw")
    if coarse:  # a few units only: options' memories are rounded down heavily
        monkeypatch.setattr(dp_memory, "_MAX_UNITS", 5)
    limits = budget_limits(problem.budgets)
    steps, a_max = build_steps(problem, prepare(problem), limits)
    caps = (math.floor(limits[0]), math.floor(limits[1]))
    for mu in (0.0, 1e-7, 1e-4, 1e-2):
        bound = dp_memory.memory_bound(steps, a_max, caps, mu, exact=exact)
        root = bound.root(caps)
        assert bound.units <= (5 if coarse else caps[exact])
        assert root >= best[0] - 1e-9 * max(1.0, abs(best[0]))
    searched = dp_memory.memory_bound(steps, a_max, caps, 1e-6, iters=8, exact=exact).root(caps)
    assert searched >= best[0] - 1e-9 * max(1.0, abs(best[0]))


def _states(steps: list[Step], problem, wb: dict[str, int], ab: dict[str, int]):
    """The DP's state (value, memory, BOPs, open act bits) after each step on the way to this
    configuration; None where a step lacks its option (a pair another pair dominates)."""
    value, mem, bops, open_a, out = 0.0, 0, 0, 0, []
    for k, st in enumerate(steps):
        if st.kind == "pair":
            name = problem.layers[st.layer].name
            hit = [o for o in range(len(st.w)) if (st.w[o], st.a[o]) == (wb[name], ab[name])]
        elif st.kind == "open":
            member = problem.layers[steps[k + 1].layer].name  # the block's first layer
            hit = [o for o in range(len(st.a)) if st.a[o] == ab[member]]
        else:
            hit = [o for o in range(len(st.w)) if st.w[o] == wb[problem.layers[st.layer].name]]
        if not hit:
            return None
        o = hit[0]
        value += float(st.value[o])
        mem += int(st.mem[o])
        bops += int(st.bops[o]) * (open_a if st.kind == "member" else 1)
        if st.kind == "open":
            open_a = int(st.a[o])
        elif st.kind == "pair" or st.last:
            open_a = 0
        out.append((value, mem, bops, open_a))
    return out


@pytest.mark.parametrize("exact", [0, 1])
@pytest.mark.parametrize("seed", range(12))
def test_knapsack_bound_holds_at_every_state_of_every_feasible_configuration(
    seed: int, exact: int
) -> None:
    """The tables hold only the rows states can query (windows): every state on the way to a
    configuration that fits must still be bounded by that configuration's objective, at the
    cap and at the largest cap the tables serve (as a sweep reuses them)."""
    import numpy as np

    problem, per_option = _instance(300 + seed)
    limits = budget_limits(problem.budgets)
    steps, a_max = build_steps(problem, prepare(problem), limits)
    caps = (math.floor(limits[0]), math.floor(limits[1]))
    mu = lagrangian(steps, caps, (True, True))[1 - exact]
    bound = dp_memory.memory_bound(steps, a_max, caps, mu, cover=caps[exact] * 2, exact=exact)
    wider = (caps[0] * 2, caps[1]) if exact == 0 else (caps[0], caps[1] * 2)
    checked = 0
    for wb, ab in configs(problem):
        if not fits(problem, wb, ab):
            continue
        states = _states(steps, problem, wb, ab)
        if states is None:
            continue
        obj = reference(problem, wb, ab) if per_option else objective_value(problem, wb, ab)
        assert states[-1][0] == pytest.approx(obj, rel=1e-9, abs=1e-12)
        for k, (value, mem, bops, act) in enumerate(states):
            for at in (caps, wider):
                got = bound.bound(
                    k, np.array([value]), np.array([act]), (np.array([mem]), np.array([bops])), at
                )[0]
                assert got >= obj - 1e-9 * max(1.0, abs(obj))
        checked += 1
    assert checked or brute_force(problem) is None


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("seed", range(12))
def test_dp_with_memory_bound_at_and_just_below_each_budget(
    seed: int, which: int, monkeypatch
) -> None:
    monkeypatch.setattr(dp, "_EASY_STATES", 0)  # the memory bound from the first step on
    problem, per_option = _instance(100 + seed)
    best = _best(problem, per_option)
    if best is None:
        pytest.skip("infeasible draw")
    at = usage(problem, best[1], best[2])[which]
    for budget in (at, at - 1):
        p = replace(problem, budgets=replace(problem.budgets, **{FIELDS[which]: budget}))
        reference = _best(p, per_option)
        if reference is None:
            with pytest.raises(InfeasibleBudgetError):
                solve(p, solver="dp")
            continue
        result = solve(p, solver="dp")
        assert fits(p, result.weight_bits, result.act_bits)
        assert result.objective == pytest.approx(reference[0], rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("n", [5, 40, 64, 65, 300])  # pair by pair up to 64, then sweeps
def test_dominance_keeps_every_undominated_state_and_one_of_each_duplicate(n: int) -> None:
    import numpy as np

    rng = np.random.default_rng(n)
    value = rng.integers(0, 6, n).astype(float)  # few levels: ties and duplicates
    mem, bops, act = (rng.integers(0, 6, n) for _ in range(3))
    act = act % 2
    kept = set(dp._undominated_states(value, mem, bops, act).tolist())
    key = list(zip(value, mem, bops, act, strict=True))
    for i in range(n):
        dominated = any(
            act[j] == act[i]
            and value[j] >= value[i]
            and mem[j] <= mem[i]
            and bops[j] <= bops[i]
            and key[j] != key[i]
            for j in range(n)
        )
        if not dominated:  # kept, or an exact duplicate of a kept state
            assert i in kept or any(key[j] == key[i] for j in kept)
    if n > dp._PAIRWISE:
        return  # two sweeps by sort order: not every dominated state is found (by design)
    for i in kept:  # pair by pair: nothing kept is dominated, and duplicates are kept once
        assert not any(
            act[j] == act[i]
            and value[j] >= value[i]
            and mem[j] <= mem[i]
            and bops[j] <= bops[i]
            and key[j] != key[i]
            for j in kept
        )
    assert len({key[i] for i in kept}) == len(kept)
