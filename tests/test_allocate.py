"""The allocation integer program against brute force (itertools.product) on tiny instances.

Run this file directly (``python tests/test_allocate.py``) for a hand-run speed check on a
ResNet-50-sized instance; it is not part of the timed test suite.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import sys
import time
from dataclasses import replace

import pytest

from ompq_plugin import allocate
from ompq_plugin.allocate import (
    AllocationLayer,
    AllocationProblem,
    eq10_coefficients,
    objective_value,
    solve,
    usage,
)
from ompq_plugin.budgets import KIB_BITS, Budgets
from ompq_plugin.errors import InfeasibleBudgetError, OmpqError

KINDS = ("conv", "depthwise", "pointwise", "linear")
INF = Budgets()

# --- helpers -----------------------------------------------------------------------------------


def random_problem(rng: random.Random, scale: int = 1) -> AllocationProblem:
    """3-5 layers, some sharing an act group, 2-3 bit choices each, random budgets."""
    n = rng.randint(3, 5)
    groups = [f"g{rng.randint(0, n - 2)}" for _ in range(n)]
    shared = {g: sorted(rng.sample([2, 4, 6, 8], rng.randint(2, 3))) for g in sorted(set(groups))}
    layers = []
    for i in range(n):
        layers.append(
            AllocationLayer(
                name=f"l{i}",
                kind=rng.choice(KINDS),
                params=rng.randint(10, 5000) * scale,
                macs=rng.randint(100, 10**6) * scale,
                input_numel=rng.randint(10, 4000),
                act_group=groups[i],
                weight_choices=tuple(sorted(rng.sample(range(2, 9), rng.randint(2, 3)))),
                # a group's layers overlap in act choices; some allow an extra width of their own
                act_choices=tuple(sorted({*shared[groups[i]], rng.choice([2, 3, 4, 6, 8])})),
            )
        )
    coeff = tuple(eq10_coefficients([rng.uniform(0.05, 1.0) for _ in range(n)]))
    problem = AllocationProblem(tuple(layers), coeff, INF)
    lo, hi = extreme_usage(problem)
    budgets = Budgets(
        weight_memory_bits=rng.uniform(lo[0], hi[0]) if rng.random() < 0.8 else math.inf,
        bops=rng.uniform(lo[1], hi[1]) if rng.random() < 0.8 else math.inf,
        act_buffer_bits=rng.uniform(lo[2], hi[2]) if rng.random() < 0.5 else math.inf,
    )
    return AllocationProblem(tuple(layers), coeff, budgets)


def configs(problem: AllocationProblem):
    """Every configuration (weight_bits, act_bits) allowed by choices, group ties and pins."""
    layers = problem.layers
    groups = list(dict.fromkeys(lay.act_group for lay in layers))
    w_sets = []
    for lay in layers:
        pin_w = problem.pins.get(lay.name, (None, None))[0]
        w_sets.append([w for w in lay.weight_choices if pin_w in (None, w)])
    excluded = {lay.name: set(lay.excluded_pairs) for lay in layers}
    a_sets = []
    for g in groups:
        common = None
        for lay in layers:
            if lay.act_group == g:
                pin_a = problem.pins.get(lay.name, (None, None))[1]
                allowed = {a for a in lay.act_choices if pin_a in (None, a)}
                common = allowed if common is None else common & allowed
        a_sets.append(sorted(common))
    for ws in itertools.product(*w_sets):
        for acts in itertools.product(*a_sets):
            by_group = dict(zip(groups, acts, strict=True))
            if any(
                (w, by_group[lay.act_group]) in excluded[lay.name]
                for lay, w in zip(layers, ws, strict=True)
            ):
                continue
            yield (
                {lay.name: w for lay, w in zip(layers, ws, strict=True)},
                {lay.name: by_group[lay.act_group] for lay in layers},
            )


def fits(problem: AllocationProblem, wb: dict[str, int], ab: dict[str, int]) -> bool:
    used = usage(problem, wb, ab)
    b = problem.budgets
    return used[0] <= b.weight_memory_bits and used[1] <= b.bops and used[2] <= b.act_buffer_bits


def brute_force(problem: AllocationProblem):
    """(best objective, its config) over all feasible configurations, or None."""
    best = None
    for wb, ab in configs(problem):
        if fits(problem, wb, ab):
            obj = objective_value(problem, wb, ab)
            if best is None or obj > best[0]:
                best = (obj, wb, ab)
    return best


def extreme_usage(problem: AllocationProblem):
    """Usage of the all-lowest and the all-highest configuration."""
    usages = [usage(problem, wb, ab) for wb, ab in configs(problem)]
    return tuple(min(u[k] for u in usages) for k in range(3)), tuple(
        max(u[k] for u in usages) for k in range(3)
    )


def with_budgets(problem: AllocationProblem, **kw: float) -> AllocationProblem:
    values = {
        "weight_memory_bits": problem.budgets.weight_memory_bits,
        "bops": problem.budgets.bops,
        "act_buffer_bits": problem.budgets.act_buffer_bits,
    }
    values.update(kw)
    return AllocationProblem(problem.layers, problem.weight_coeff, Budgets(**values), problem.pins)


def check_against_brute_force(problem: AllocationProblem, solver: str = "auto") -> None:
    best = brute_force(problem)
    if best is None:
        with pytest.raises(InfeasibleBudgetError):
            solve(problem, solver=solver)
        return
    result = solve(problem, solver=solver)
    assert result.status == "optimal"
    assert result.solver == solver or solver == "auto"
    assert fits(problem, result.weight_bits, result.act_bits)
    assert result.objective == pytest.approx(best[0], rel=1e-7, abs=1e-9)
    assert (result.weight_memory_bits, result.bops, result.max_act_buffer_bits) == usage(
        problem, result.weight_bits, result.act_bits
    )
    for lay in problem.layers:  # tied groups share act bits
        for other in problem.layers:
            if lay.act_group == other.act_group:
                assert result.act_bits[lay.name] == result.act_bits[other.name]


def tiny(pins=None, budgets=INF) -> AllocationProblem:
    layers = (
        AllocationLayer("a", "conv", 100, 1000, 50, "g0", (2, 4, 8), (4, 8)),
        AllocationLayer("b", "depthwise", 10, 500, 80, "g1", (2, 4, 8), (4, 8)),
        AllocationLayer("c", "linear", 300, 300, 80, "g1", (4, 8), (2, 4, 8)),
    )
    return AllocationProblem(layers, (1.0, 0.7, 0.4), budgets, pins or {})


# --- Eq. 10 --------------------------------------------------------------------------------------


def test_eq10_hand_computed() -> None:
    # c = [(1+2+3)/3, (2+3)/2, 3/1] = [2, 2.5, 3], scaled by 1/3
    assert eq10_coefficients([1, 2, 3]) == pytest.approx([2 / 3, 5 / 6, 1.0])
    # c = [(3+1)/2, 1] = [2, 1] -> [1, 0.5]
    assert eq10_coefficients([3.0, 1.0]) == pytest.approx([1.0, 0.5])
    # c = [(4+0+2)/3, (0+2)/2, 2] = [2, 1, 2] -> [1, 0.5, 1]
    assert eq10_coefficients([4.0, 0.0, 2.0]) == pytest.approx([1.0, 0.5, 1.0])
    assert eq10_coefficients([0.3]) == [1.0]
    assert eq10_coefficients([]) == []


def test_eq10_rejects_bad_theta() -> None:
    with pytest.raises(OmpqError, match="NaN"):
        eq10_coefficients([1.0, math.nan])
    with pytest.raises(OmpqError, match="positive"):
        eq10_coefficients([0.0, 0.0])


# --- brute force -------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["dp", "highs"])
@pytest.mark.parametrize("seed", range(30))
def test_matches_brute_force(seed: int, solver: str) -> None:
    check_against_brute_force(random_problem(random.Random(seed)), solver)


@pytest.mark.parametrize("solver", ["dp", "highs"])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_at_resnet_scale(seed: int, solver: str) -> None:
    # BOPs ~1e11 and memory ~1e8 bits: HiGHS's tolerances act on scaled rows
    check_against_brute_force(random_problem(random.Random(100 + seed), scale=20000), solver)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("which", [0, 1, 2])
def test_budget_exactly_at_and_just_below_the_optimum(seed: int, which: int) -> None:
    base = random_problem(random.Random(1000 + seed), scale=1 + 5000 * (seed % 2))
    base = AllocationProblem(base.layers, base.weight_coeff, INF)
    field = ("weight_memory_bits", "bops", "act_buffer_bits")[which]
    # make the budget bind: the unconstrained optimum (all max bits) must not fit
    hi = extreme_usage(base)[1][which]
    lo = extreme_usage(base)[0][which]
    constrained = with_budgets(base, **{field: (lo + hi) / 2})
    best = brute_force(constrained)
    assert best is not None
    at = usage(constrained, best[1], best[2])[which]

    exact = with_budgets(base, **{field: at})
    result = solve(exact)
    assert usage(exact, result.weight_bits, result.act_bits)[which] <= at
    assert result.objective == pytest.approx(best[0], rel=1e-7, abs=1e-9)

    below = with_budgets(base, **{field: at - 1})
    reference = brute_force(below)
    if reference is None:
        with pytest.raises(InfeasibleBudgetError):
            solve(below)
    else:
        result = solve(below)
        assert usage(below, result.weight_bits, result.act_bits)[which] <= at - 1
        assert result.objective == pytest.approx(reference[0], rel=1e-7, abs=1e-9)
        assert result.objective <= best[0] + 1e-9


# --- pins, groups, infinite budgets ------------------------------------------------------------


def test_infinite_budgets_give_max_bits() -> None:
    result = solve(tiny())
    assert result.weight_bits == {"a": 8, "b": 8, "c": 8}
    # b and c share g1: act choices {4, 8} & {2, 4, 8} = {4, 8}
    assert result.act_bits == {"a": 8, "b": 8, "c": 8}


def _dominated(keys: list[tuple[float, int, int]], k: int) -> bool:
    o, m, b = keys[k]
    return any(
        j != k
        and keys[j][0] >= o
        and keys[j][1] <= m
        and keys[j][2] <= b
        and (keys[j] != keys[k] or j < k)
        for j in range(len(keys))
    )


@pytest.mark.parametrize("finite_bops", [False, True])
def test_undominated_pairs_match_the_definition(finite_bops: bool) -> None:
    """A pair is dropped iff another is no worse in objective, memory and BOPs (BOPs only when
    that budget is finite) and strictly better in one of them or, on an exact tie, earlier."""
    from ompq_plugin.allocate.pairs import undominated_pairs

    rng = random.Random(11)
    for _ in range(500):
        lay = AllocationLayer(
            "l", "conv", rng.randint(1, 50), rng.randint(1, 500), 10, "g", (2,), (2,)
        )
        pairs = sorted(
            {(rng.randint(1, 8), rng.choice([2, 4, 8])) for _ in range(rng.randint(1, 20))}
        )
        obj = [rng.choice([0.0, 1.0, 2.0, rng.random()]) for _ in pairs]
        keys = [
            (o, lay.params * w, lay.macs * w * a if finite_bops else 0)
            for o, (w, a) in zip(obj, pairs, strict=True)
        ]

        expected = [p for k, p in enumerate(pairs) if not _dominated(keys, k)]
        assert undominated_pairs(pairs, obj, lay, finite_bops) == expected


@pytest.mark.parametrize("seed", range(20))
def test_without_budgets_each_group_takes_its_best_choice(seed: int) -> None:
    """No finite budget: "auto" answers directly (solver "unbounded"), with the brute-force
    optimum and the DP's objective; pins and excluded pairs hold."""
    rng = random.Random(900 + seed)
    problem = random_problem(rng)
    layers = tuple(
        replace(lay, excluded_pairs=((lay.weight_choices[-1], lay.act_choices[-1]),))
        if rng.random() < 0.3 and len(lay.weight_choices) > 1
        else lay
        for lay in problem.layers
    )
    pins = {layers[0].name: (layers[0].weight_choices[0], None)} if seed % 2 else {}
    problem = AllocationProblem(layers, problem.weight_coeff, INF, pins)
    if seed % 3 == 0:  # per-option values (as ompq-noise), some equal
        values = tuple(
            {w: -round(rng.uniform(0, 1), 1) for w in lay.weight_choices} for lay in layers
        )
        problem = replace(problem, weight_coeff=(0.0,) * len(layers), weight_value=values)
    got = solve(problem)
    assert got.solver == "unbounded"
    best = brute_force(problem)
    assert best is not None
    assert got.objective == pytest.approx(best[0], rel=1e-12, abs=1e-12)
    assert got.objective == pytest.approx(solve(problem, solver="dp").objective, rel=1e-12)
    for lay in layers:
        assert (got.weight_bits[lay.name], got.act_bits[lay.name]) not in lay.excluded_pairs
    for name, (w, _) in pins.items():
        assert got.weight_bits[name] == w


def test_without_budgets_ties_keep_the_narrowest_bits() -> None:
    """Equal objectives: the cheapest choice, as the DP's dominance rule keeps."""
    problem = random_problem(random.Random(3))
    flat = AllocationProblem(problem.layers, (0.0,) * len(problem.layers), INF)
    got = solve(flat)
    assert got.solver == "unbounded"
    for lay in flat.layers:
        assert got.weight_bits[lay.name] == min(lay.weight_choices)
        assert got.weight_bits == solve(flat, solver="dp").weight_bits


def test_pins_are_respected() -> None:
    problem = tiny(pins={"a": (2, None), "c": (None, 4)}, budgets=Budgets(bops=2e6))
    result = solve(problem)
    assert result.weight_bits["a"] == 2
    assert result.act_bits["c"] == 4 and result.act_bits["b"] == 4  # tied to c's group
    check_against_brute_force(problem)


@pytest.mark.parametrize("seed", range(8))
def test_random_pins_match_brute_force(seed: int) -> None:
    rng = random.Random(500 + seed)
    problem = random_problem(rng)
    lay = rng.choice(problem.layers)
    pins = {lay.name: (rng.choice(lay.weight_choices), rng.choice([None, *lay.act_choices]))}
    pinned = AllocationProblem(problem.layers, problem.weight_coeff, problem.budgets, pins)
    try:
        list(configs(pinned))[0]
    except IndexError:  # the pinned act bits leave the group no common choice
        with pytest.raises(OmpqError):
            solve(pinned)
        return
    check_against_brute_force(pinned)


def test_act_group_without_common_choice_is_an_error() -> None:
    with pytest.raises(OmpqError, match=r"act group 'g1'.*b \[4, 8\].*c \[2\]"):
        solve(tiny(pins={"c": (None, 2)}))


def test_bad_pins_are_errors() -> None:
    with pytest.raises(OmpqError, match="not in the model"):
        solve(tiny(pins={"zz": (8, 8)}))
    with pytest.raises(OmpqError, match="weight bits 3 not allowed"):
        solve(tiny(pins={"a": (3, None)}))


def test_custom_act_coefficients() -> None:
    base = tiny(budgets=Budgets(bops=3e6))
    problem = AllocationProblem(
        base.layers, base.weight_coeff, base.budgets, {}, {"g0": 0.0, "g1": 5.0}
    )
    check_against_brute_force(problem)


# --- infeasible budgets ------------------------------------------------------------------------

_BITS = re.compile(r"\((\d+) (?:bits|BOPs);")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("which", [0, 1, 2])
def test_infeasible_message_names_budget_and_smallest_value(seed: int, which: int) -> None:
    problem = random_problem(random.Random(2000 + seed))
    problem = AllocationProblem(
        problem.layers, problem.weight_coeff, INF, {problem.layers[0].name: (None, None)}
    )
    smallest = extreme_usage(problem)[0][which]
    field = ("weight_memory_bits", "bops", "act_buffer_bits")[which]
    bad = with_budgets(problem, **{field: smallest - 1})
    assert brute_force(bad) is None
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(bad)
    message = str(info.value)
    assert "\n" not in message
    name, flag, unit = [
        ("weight memory", "--weight-memory-kib", KIB_BITS),
        ("BOPs", "--bops-g", 1e9),
        ("activation buffer", "--act-buffer-kib", KIB_BITS),
    ][which]
    assert message.startswith(name) and flag in message
    assert int(_BITS.search(message).group(1)) == smallest
    suggested = float(re.search(re.escape(flag) + r" to at least ([0-9.e+-]+)", message).group(1))
    assert smallest / unit <= suggested <= smallest / unit * 1.001


def test_infeasible_with_pins_kept() -> None:
    problem = tiny(pins={"a": (8, 8)})
    smallest = 100 * 8 + 10 * 2 + 300 * 4
    with pytest.raises(InfeasibleBudgetError, match=rf"\({smallest} bits; .*pins kept"):
        solve(with_budgets(problem, weight_memory_bits=smallest - 0.5))
    assert solve(with_budgets(problem, weight_memory_bits=smallest)).weight_memory_bits == smallest


# --- excluded (weight, act) pairs ----------------------------------------------------------------


def with_exclusions(rng: random.Random, problem: AllocationProblem) -> AllocationProblem:
    """Exclude 1-3 random (w, a) pairs on some layers (never all of a layer's pairs)."""
    layers = []
    for lay in problem.layers:
        pairs = [(w, a) for w in lay.weight_choices for a in lay.act_choices]
        bad = tuple(rng.sample(pairs, min(len(pairs) - 1, rng.randint(1, 3))))
        layers.append(replace(lay, excluded_pairs=bad if rng.random() < 0.7 else ()))
    return AllocationProblem(tuple(layers), problem.weight_coeff, problem.budgets, problem.pins)


def test_excluded_pairs_are_respected() -> None:
    base = tiny()
    layers = (replace(base.layers[0], excluded_pairs=((8, 8),)), *base.layers[1:])
    result = solve(AllocationProblem(layers, base.weight_coeff, INF))
    assert (result.weight_bits["a"], result.act_bits["a"]) != (8, 8)
    check_against_brute_force(AllocationProblem(layers, base.weight_coeff, INF))
    check_against_brute_force(AllocationProblem(layers, base.weight_coeff, INF), "highs")


@pytest.mark.parametrize("solver", ["dp", "highs"])
@pytest.mark.parametrize("seed", range(25))
def test_excluded_pairs_match_brute_force(seed: int, solver: str) -> None:
    rng = random.Random(3000 + seed)
    problem = with_exclusions(rng, random_problem(rng))
    try:
        next(iter(configs(problem)))
    except StopIteration:  # exclusions leave some group no usable act bits
        with pytest.raises(OmpqError):
            solve(problem, solver=solver)
        return
    check_against_brute_force(problem, solver)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("which", [0, 1])
def test_excluded_pairs_infeasible_message_names_exact_minimum(seed: int, which: int) -> None:
    rng = random.Random(4000 + seed)
    problem = with_exclusions(rng, random_problem(rng))
    problem = AllocationProblem(problem.layers, problem.weight_coeff, INF)
    if next(iter(configs(problem)), None) is None:
        return
    smallest = extreme_usage(problem)[0][which]
    field = ("weight_memory_bits", "bops")[which]
    bad = with_budgets(problem, **{field: smallest - 1})
    assert brute_force(bad) is None
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(bad)
    assert int(_BITS.search(str(info.value)).group(1)) == smallest
    assert solve(with_budgets(problem, **{field: smallest})).status == "optimal"


def test_jointly_infeasible_budgets_with_excluded_pairs() -> None:
    # allowed: (2, 8) = 200 bits, 16000 BOPs and (4, 2) = 400 bits, 8000 BOPs
    lay = AllocationLayer("x", "conv", 100, 1000, 10, "g", (2, 4), (2, 8), ((2, 2), (4, 8)))
    problem = AllocationProblem((lay,), (1.0,), Budgets(weight_memory_bits=200, bops=16000))
    assert brute_force(problem) is not None
    assert solve(problem).weight_bits == {"x": 2}
    joint = with_budgets(problem, weight_memory_bits=399, bops=15999)
    assert brute_force(joint) is None
    with pytest.raises(InfeasibleBudgetError, match="infeasible together"):
        solve(joint)
    with pytest.raises(InfeasibleBudgetError):
        solve(joint, solver="highs")


def test_fully_excluded_layer_is_an_error() -> None:
    base = tiny(pins={"a": (8, 8)})
    layers = (replace(base.layers[0], excluded_pairs=((8, 8),)), *base.layers[1:])
    with pytest.raises(OmpqError, match="excluded_pairs"):
        solve(AllocationProblem(layers, base.weight_coeff, INF, base.pins))


# --- the DP against HiGHS on medium instances, the HiGHS fallback ------------------------------


def medium_problem(rng: random.Random) -> AllocationProblem:
    """15-25 layers, groups of 1-3 layers, 2-8 bit weights, some excluded pairs, two budgets."""
    n = rng.randint(15, 25)
    layers = []
    group = 0
    while len(layers) < n:
        size = rng.choice([1, 1, 1, 2, 3])
        acts = tuple(sorted(rng.sample([2, 4, 6, 8], rng.randint(2, 4))))
        for _ in range(min(size, n - len(layers))):
            params = rng.randint(1, 500) * 64
            layers.append(
                AllocationLayer(
                    f"l{len(layers)}",
                    "conv",
                    params,
                    params * rng.choice([1, 4, 16, 49, 196]),
                    rng.randint(1000, 100000),
                    f"g{group}",
                    tuple(range(2, 9)),
                    acts,
                    ((4, 8),) if rng.random() < 0.3 else (),
                )
            )
        group += 1
    coeff = tuple(eq10_coefficients([math.exp(-rng.uniform(0, 3)) for _ in layers]))
    params = sum(lay.params for lay in layers)
    macs = sum(lay.macs for lay in layers)
    budgets = Budgets(
        weight_memory_bits=rng.uniform(3, 6) * params, bops=rng.uniform(10, 30) * macs
    )
    return AllocationProblem(tuple(layers), coeff, budgets)


@pytest.mark.parametrize("seed", range(12))
def test_dp_matches_highs_on_medium_instances(seed: int) -> None:
    problem = medium_problem(random.Random(5000 + seed))
    dp = solve(problem, solver="dp")
    ref = solve(problem, time_limit_s=20, solver="highs")
    assert fits(problem, dp.weight_bits, dp.act_bits)
    assert dp.objective == pytest.approx(ref.objective, rel=1e-7)
    assert dp.objective >= ref.objective - 1e-9 * abs(ref.objective)
    for lay in problem.layers:
        assert (dp.weight_bits[lay.name], dp.act_bits[lay.name]) not in lay.excluded_pairs


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("seed", range(12))
def test_narrow_beam_still_exact(seed: int, beam: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The beam pass only sets where the exact rounds start: however poor its configuration,
    the answer stays the brute-force optimum."""
    monkeypatch.setattr(allocate.dp, "_BEAM", beam)
    check_against_brute_force(random_problem(random.Random(700 + seed)), "dp")


@pytest.mark.parametrize("seed", range(12))
def test_beam_pass_meets_the_budgets(seed: int) -> None:
    """The heuristic pass alone (beam of 2): a configuration within every budget, no better than
    the optimum; none only when the problem is infeasible."""
    from ompq_plugin.allocate import dp as dp_module
    from ompq_plugin.allocate.dp_bounds import build_steps, lagrangian, suffix_bounds
    from ompq_plugin.allocate.problem import budget_limits, prepare

    problem = random_problem(random.Random(800 + seed))
    prep = prepare(problem)
    limits = budget_limits(problem.budgets)
    on = (math.isfinite(limits[0]), math.isfinite(limits[1]))
    caps = (math.floor(limits[0]) if on[0] else 0, math.floor(limits[1]) if on[1] else 0)
    steps, a_max = build_steps(problem, prep, limits)
    lam = lagrangian(steps, caps, on, None)
    found = dp_module._dp(
        steps,
        len(problem.layers),
        [suffix_bounds(steps, a_max, lam)],
        [lam],
        caps,
        -math.inf,
        0.0,
        time.perf_counter() + 10,
        beam=2,
    )
    best = brute_force(problem)
    if found is None:
        assert best is None
        return
    assert best is not None
    wb = {lay.name: w for lay, (w, _) in zip(problem.layers, found.choice, strict=True)}
    ab = {lay.name: a for lay, (_, a) in zip(problem.layers, found.choice, strict=True)}
    assert fits(problem, wb, ab)
    assert objective_value(problem, wb, ab) == pytest.approx(found.value, rel=1e-9, abs=1e-12)
    assert found.value <= best[0] + 1e-9 * max(1.0, abs(best[0]))


@pytest.mark.parametrize("seed", range(6))
def test_too_many_states_falls_back_to_highs(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocate.dp, "_MAX_STATES", 2)
    problem = random_problem(random.Random(600 + seed))
    if brute_force(problem) is not None:
        assert solve(problem).solver in ("dp", "highs")  # tiny instances may stay under 2
    check_against_brute_force(problem)
    with pytest.raises(OmpqError, match="unknown solver"):
        solve(problem, solver="gurobi")


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("acts", [(2, 4, 6, 8), (4, 5, 6, 8)])
def test_resnet50_sized_instances_finish(acts: tuple[int, ...], tie: bool) -> None:
    # timings belong to bench/search_speed.py --ip; here: proven optimal by the DP, in budget
    layers = resnet50_layers(acts, tie)
    rng = random.Random(7)
    coeff = tuple(eq10_coefficients([math.exp(-rng.uniform(0, 3)) for _ in layers]))
    params = sum(lay.params for lay in layers)
    macs = sum(lay.macs for lay in layers)
    for avg_w, bops_per_mac in ((4, 16), (3, 12), (6, 30)):
        budgets = Budgets(weight_memory_bits=avg_w * params, bops=bops_per_mac * macs)
        problem = AllocationProblem(layers, coeff, budgets, {"conv1": (8, 8), "fc": (8, 8)})
        result = solve(problem, time_limit_s=30)
        assert result.status == "optimal" and result.solver == "dp"
        assert fits(problem, result.weight_bits, result.act_bits)


# --- hand-run speed check ------------------------------------------------------------------------


def resnet50_layers(acts: tuple[int, ...], tie_stage_inputs: bool) -> tuple[AllocationLayer, ...]:
    """ResNet-50 at 224x224 (54 layers); weight bits 2..8. Tied: block inputs per stage."""
    wc = tuple(range(2, 9))
    out: list[AllocationLayer] = []

    def add(name: str, kind: str, cin: int, cout: int, k: int, hin: int, s: int, g: str) -> int:
        hout = hin // s
        params = cout * cin * k * k
        out.append(
            AllocationLayer(name, kind, params, params * hout * hout, cin * hin * hin, g, wc, acts)
        )
        return hout

    h = add("conv1", "conv", 3, 64, 7, 224, 2, "conv1_in") // 2
    inplanes = 64
    for st, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True), 1):
        for b in range(blocks):
            stride = 2 if (b == 0 and st > 1) else 1
            p = f"layer{st}.{b}"
            gin = f"layer{st}_in" if tie_stage_inputs else f"{p}_in"
            add(f"{p}.conv1", "pointwise", inplanes, planes, 1, h, 1, gin)
            h2 = add(f"{p}.conv2", "conv", planes, planes, 3, h, stride, f"{p}.conv2_in")
            add(f"{p}.conv3", "pointwise", planes, planes * 4, 1, h2, 1, f"{p}.conv3_in")
            if b == 0:
                add(f"{p}.downsample.0", "pointwise", inplanes, planes * 4, 1, h, stride, gin)
            inplanes, h = planes * 4, h2
    out.append(AllocationLayer("fc", "linear", 2048000, 2048000, 2048, "fc_in", wc, acts))
    return tuple(out)


def _speed_check() -> None:
    for acts in ((2, 4, 6, 8), (4, 5, 6, 8)):
        for tie in (False, True):
            layers = resnet50_layers(acts, tie)
            rng = random.Random(0)
            coeff = tuple(eq10_coefficients([math.exp(-rng.uniform(0, 3)) for _ in layers]))
            params = sum(lay.params for lay in layers)
            macs = sum(lay.macs for lay in layers)
            n_groups = len({lay.act_group for lay in layers})
            for avg_w, bops_per_mac in ((4, 16), (5, 20), (3, 12), (3, 20), (6, 30)):
                budgets = Budgets(weight_memory_bits=avg_w * params, bops=bops_per_mac * macs)
                problem = AllocationProblem(layers, coeff, budgets, {"conv1": (8, 8), "fc": (8, 8)})
                start = time.perf_counter()
                try:
                    result = solve(problem, time_limit_s=10)
                    outcome = f"obj {result.objective:.4f}"
                except OmpqError as exc:
                    outcome = f"FAILED: {exc}"
                print(
                    f"{len(layers)} layers, {n_groups} act groups, acts {acts}, "
                    f"memory {avg_w} b/param, BOPs {bops_per_mac}x MACs: "
                    f"{time.perf_counter() - start:.3f} s, {outcome}"
                )
                sys.stdout.flush()


if __name__ == "__main__":
    _speed_check()
