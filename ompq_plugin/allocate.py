"""Bit-width allocation: OMPQ's integer program (paper Eq. 10), solved exactly with python-mip/CBC.

Formulation (an exact 0-1 integer program, not an LP plus rounding):

* one binary ``z[i, w, a]`` per layer ``i`` and allowed pair (weight bits ``w``, act bits ``a``)
  with ``sum_{w,a} z[i, w, a] = 1``;
* one binary ``y[g, a]`` per activation group ``g`` (layers reading the same quantized tensor)
  with ``sum_a y[g, a] = 1`` and, for every layer ``i`` of ``g`` and every ``a``,
  ``sum_w z[i, w, a] = y[g, a]``, which ties the group's act bits together;
* objective: maximise ``sum_i c_i * w * z[i, w, a] + sum_g d_g * a * y[g, a]`` with ``c`` from
  :func:`eq10_coefficients` and ``d_g`` (default) the sum of ``c_i`` over the group's layers;
* budgets: ``sum params_i * w * z <= M`` (weight memory), ``sum macs_i * w * a * z <= B`` (BOPs),
  and, since the activation buffer is a maximum, act choices with ``input_numel * a > A`` are
  simply not offered. Infinite budgets add nothing. The two sum rows are divided by their budget
  so that CBC's tolerances act on numbers near 1 even when BOPs are ~1e11.

Never returning a configuration that breaks a budget: after each solve the configuration is
checked against the budgets exactly, in integers (:func:`usage`). A configuration that only met a
budget thanks to the solver's tolerance is cut off (a no-good cut) and the violated row is
tightened slightly; the loop re-solves until the answer is exactly feasible.

Infeasibility is decided exactly and without a solver: every resource grows with every bit width,
so the configuration with each layer at its lowest allowed bits (pins kept) minimises weight
memory, BOPs and the activation buffer *at the same time*. The budgets are feasible iff that one
configuration meets all of them; otherwise the first budget it breaks is named together with its
value there, which is the smallest achievable value of that budget. (For the same reason budgets
can never be "only jointly" infeasible.)

This module is pure maths: it imports neither torch, Brevitas nor ONNX.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import mip

from ompq_plugin.budgets import KIB_BITS, Budgets
from ompq_plugin.errors import InfeasibleBudgetError, OmpqError

LAYER_KINDS = ("conv", "depthwise", "pointwise", "linear")
_MAX_RESOLVES = 20  # tolerance repairs before giving up (in practice 0 or 1 are needed)

Pin = tuple[int | None, int | None]


@dataclass(frozen=True)
class AllocationLayer:
    """One quantizable layer as the integer program sees it."""

    name: str
    kind: str  # conv | depthwise | pointwise | linear
    params: int  # weight parameters: memory = params * weight_bits
    macs: int  # BOPs = macs * weight_bits * act_bits
    input_numel: int  # activation buffer = input_numel * act_bits
    act_group: str  # layers sharing an input activation quantizer share act bits
    weight_choices: tuple[int, ...]
    act_choices: tuple[int, ...]


@dataclass(frozen=True)
class AllocationProblem:
    """Layers in execution order, their objective coefficients, budgets and pins.

    ``pins`` maps a layer name to ``(weight_bits, act_bits)``; ``None`` leaves that one free.
    ``act_coeff`` maps an act group to its objective coefficient; by default it is the sum of the
    ``weight_coeff`` of the group's layers (Eq. 10 extended to activation bits).
    """

    layers: tuple[AllocationLayer, ...]
    weight_coeff: tuple[float, ...]
    budgets: Budgets = field(default_factory=Budgets)
    pins: Mapping[str, Pin] = field(default_factory=dict)
    act_coeff: Mapping[str, float] | None = None


@dataclass(frozen=True)
class Allocation:
    """The chosen bits per layer and what they cost."""

    weight_bits: dict[str, int]
    act_bits: dict[str, int]  # per layer: its act group's bits
    objective: float
    weight_memory_bits: int
    bops: int
    max_act_buffer_bits: int
    solve_s: float
    status: str  # "optimal"


# --- objective -------------------------------------------------------------------------------


def eq10_coefficients(theta: Sequence[float]) -> list[float]:
    """OMPQ Eq. 10: ``c_i = (1 / (L - i + 1)) * sum_{j >= i} theta_j`` (1-based), scaled to max 1.

    ``c_i`` is the mean importance of layer ``i`` and every later layer, so bits spent early
    (which every later feature depends on) are weighted by what follows them.
    """
    values = [float(t) for t in theta]
    if not values:
        return []
    if not all(math.isfinite(t) for t in values):
        raise OmpqError(
            "layer importances (theta) contain NaN or Inf; check the ORM/importance step"
        )
    coeff = [0.0] * len(values)
    suffix: list[float] = []
    for i in range(len(values) - 1, -1, -1):
        suffix.append(values[i])
        coeff[i] = math.fsum(suffix) / len(suffix)
    top = max(coeff)
    if not top > 0:
        raise OmpqError("layer importances (theta) have no positive value; use a positive theta")
    return [c / top for c in coeff]


# --- exact bookkeeping -----------------------------------------------------------------------


def usage(
    problem: AllocationProblem, weight_bits: Mapping[str, int], act_bits: Mapping[str, int]
) -> tuple[int, int, int]:
    """Exact integer (weight memory bits, BOPs, largest activation buffer bits) of a config."""
    memory = sum(lay.params * weight_bits[lay.name] for lay in problem.layers)
    bops = sum(lay.macs * weight_bits[lay.name] * act_bits[lay.name] for lay in problem.layers)
    buffer = max((lay.input_numel * act_bits[lay.name] for lay in problem.layers), default=0)
    return memory, bops, buffer


def objective_value(
    problem: AllocationProblem, weight_bits: Mapping[str, int], act_bits: Mapping[str, int]
) -> float:
    """The Eq. 10 objective of a configuration (what :func:`solve` maximises)."""
    act_coeff = _act_coefficients(problem)
    seen: dict[str, int] = {}
    for lay in problem.layers:
        seen.setdefault(lay.act_group, act_bits[lay.name])
    terms = [
        c * weight_bits[lay.name]
        for c, lay in zip(problem.weight_coeff, problem.layers, strict=True)
    ]
    terms += [act_coeff[g] * a for g, a in seen.items()]
    return math.fsum(terms)


def _violations(problem: AllocationProblem, used: tuple[int, int, int]) -> list[int]:
    """Indices (0 memory, 1 BOPs, 2 buffer) of the budgets that ``used`` breaks."""
    limits = _limits(problem.budgets)
    return [k for k in range(3) if used[k] > limits[k]]


def _limits(budgets: Budgets) -> tuple[float, float, float]:
    return (budgets.weight_memory_bits, budgets.bops, budgets.act_buffer_bits)


# --- validation and preparation --------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    """Validated problem: allowed weight bits per layer, allowed act bits per group."""

    groups: dict[str, list[int]]  # group -> layer indices, in order of first appearance
    weight_allowed: list[tuple[int, ...]]  # per layer, pins applied
    act_allowed: dict[str, tuple[int, ...]]  # per group: intersection, pins applied
    act_coeff: dict[str, float]


def _act_coefficients(problem: AllocationProblem) -> dict[str, float]:
    default: dict[str, float] = {}
    for c, lay in zip(problem.weight_coeff, problem.layers, strict=True):
        default[lay.act_group] = default.get(lay.act_group, 0.0) + float(c)
    if problem.act_coeff is None:
        return default
    unknown = sorted(set(problem.act_coeff) - set(default))
    if unknown:
        raise OmpqError(f"act_coeff names unknown act groups {unknown}; use the layers' act_group")
    missing = sorted(set(default) - set(problem.act_coeff))
    if missing:
        raise OmpqError(f"act_coeff lacks act groups {missing}; give one value per act group")
    return {g: float(problem.act_coeff[g]) for g in default}


def _check_choices(lay: AllocationLayer, attr: str) -> tuple[int, ...]:
    choices = getattr(lay, attr)
    if not choices or not all(isinstance(b, int) and b >= 1 for b in choices):
        raise OmpqError(
            f"layer {lay.name}: {attr}={choices!r}; give at least one positive integer bit width"
        )
    return tuple(sorted(set(choices)))


def _prepare(problem: AllocationProblem) -> _Prepared:
    layers = problem.layers
    if len(problem.weight_coeff) != len(layers):
        raise OmpqError(
            f"{len(problem.weight_coeff)} objective coefficients for {len(layers)} layers; "
            "give one per layer"
        )
    if not all(math.isfinite(c) for c in problem.weight_coeff):
        raise OmpqError("objective coefficients contain NaN or Inf; check the importances")
    names = [lay.name for lay in layers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise OmpqError(f"duplicate layer names {dupes}; every layer needs a unique name")
    unknown = sorted(set(problem.pins) - set(names))
    if unknown:
        raise OmpqError(f"pinned layers {unknown} are not in the model; check the --pin names")
    act_coeff = _act_coefficients(problem)

    groups: dict[str, list[int]] = {}
    weight_allowed: list[tuple[int, ...]] = []
    layer_acts: list[tuple[int, ...]] = []
    for i, lay in enumerate(layers):
        if lay.kind not in LAYER_KINDS:
            raise OmpqError(
                f"layer {lay.name}: unknown kind {lay.kind!r}; use one of {LAYER_KINDS}"
            )
        for attr in ("params", "macs", "input_numel"):
            value = getattr(lay, attr)
            if not isinstance(value, int) or value < 0:
                raise OmpqError(f"layer {lay.name}: {attr}={value!r}; must be an integer >= 0")
        w_choices = _check_choices(lay, "weight_choices")
        a_choices = _check_choices(lay, "act_choices")
        pin_w, pin_a = problem.pins.get(lay.name, (None, None))
        if pin_w is not None:
            if pin_w not in w_choices:
                raise OmpqError(
                    f"pin {lay.name}: weight bits {pin_w} not allowed for this {lay.kind} layer "
                    f"(allowed {list(w_choices)}); pin one of those"
                )
            w_choices = (pin_w,)
        if pin_a is not None:
            if pin_a not in a_choices:
                raise OmpqError(
                    f"pin {lay.name}: act bits {pin_a} not allowed for this {lay.kind} layer "
                    f"(allowed {list(a_choices)}); pin one of those"
                )
            a_choices = (pin_a,)
        weight_allowed.append(w_choices)
        layer_acts.append(a_choices)
        groups.setdefault(lay.act_group, []).append(i)

    act_allowed: dict[str, tuple[int, ...]] = {}
    for g, members in groups.items():
        common = set(layer_acts[members[0]])
        for i in members[1:]:
            common &= set(layer_acts[i])
        if not common:
            detail = ", ".join(f"{layers[i].name} {list(layer_acts[i])}" for i in members)
            raise OmpqError(
                f"act group {g!r} has no act bit width allowed by all its layers ({detail}); "
                "change the pins or the profile's allowed bits so they overlap"
            )
        act_allowed[g] = tuple(sorted(common))
    return _Prepared(groups, weight_allowed, act_allowed, act_coeff)


# --- infeasibility ---------------------------------------------------------------------------


def _fmt_up(value: float, digits: int = 4) -> str:
    """``value`` rounded *up* to ``digits`` significant digits, so 'at least X' is enough."""
    if value <= 0:
        return "0"
    q = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return f"{math.ceil(value / q * (1 - 1e-12)) * q:.{digits}g}"


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def _check_feasible(problem: AllocationProblem, prep: _Prepared) -> None:
    """Raise InfeasibleBudgetError unless the all-lowest configuration meets every budget."""
    w_low = {lay.name: prep.weight_allowed[i][0] for i, lay in enumerate(problem.layers)}
    a_low = {lay.name: prep.act_allowed[lay.act_group][0] for lay in problem.layers}
    low = usage(problem, w_low, a_low)
    limits = _limits(problem.budgets)
    how = "all free layers at their lowest bits, pins kept"
    if low[0] > limits[0]:
        total_params = sum(lay.params for lay in problem.layers)
        avg = f" (or --avg-weight-bits to at least {_fmt_up(low[0] / total_params)})"
        raise InfeasibleBudgetError(
            f"weight memory budget {_fmt(limits[0] / KIB_BITS)} KiB is infeasible: the smallest "
            f"achievable is {_fmt_up(low[0] / KIB_BITS)} KiB ({low[0]} bits; {how}); raise "
            f"--weight-memory-kib to at least {_fmt_up(low[0] / KIB_BITS)}"
            + (avg if total_params else "")
        )
    if low[1] > limits[1]:
        raise InfeasibleBudgetError(
            f"BOPs budget {_fmt(limits[1] / 1e9)} G is infeasible: the smallest achievable is "
            f"{_fmt_up(low[1] / 1e9)} G ({low[1]} BOPs; {how}); raise --bops-g to at least "
            f"{_fmt_up(low[1] / 1e9)}"
        )
    if low[2] > limits[2]:
        raise InfeasibleBudgetError(
            f"activation buffer budget {_fmt(limits[2] / KIB_BITS)} KiB is infeasible: the "
            f"smallest achievable is {_fmt_up(low[2] / KIB_BITS)} KiB ({low[2]} bits; {how}); "
            f"raise --act-buffer-kib to at least {_fmt_up(low[2] / KIB_BITS)}"
        )


# --- the integer program ---------------------------------------------------------------------


@dataclass
class _Model:
    model: mip.Model
    pairs: list[list[tuple[int, int]]]  # per layer: its (w, a) pairs
    z: list[list[mip.Var]]  # per layer: one binary per pair


def _build(
    problem: AllocationProblem, prep: _Prepared, limits: tuple[float, float, float]
) -> _Model:
    layers = problem.layers
    m = mip.Model(sense=mip.MAXIMIZE, solver_name=mip.CBC)
    m.verbose = 0
    m.threads = 1
    m.max_mip_gap = 1e-7
    m.max_mip_gap_abs = 1e-9

    # act choices per group after the buffer budget (a max over layers: a per-layer filter)
    act_ok: dict[str, tuple[int, ...]] = {}
    for g, members in prep.groups.items():
        biggest = max(layers[i].input_numel for i in members)
        act_ok[g] = tuple(a for a in prep.act_allowed[g] if biggest * a <= limits[2])

    pairs: list[list[tuple[int, int]]] = []
    z: list[list[mip.Var]] = []
    for i, lay in enumerate(layers):
        c = float(problem.weight_coeff[i])
        # a group of one layer needs no y[g, a] (it would equal sum_w z[i, w, a]): its act term
        # d_g * a goes straight onto z
        d = prep.act_coeff[lay.act_group] if len(prep.groups[lay.act_group]) == 1 else 0.0
        lay_pairs = [(w, a) for w in prep.weight_allowed[i] for a in act_ok[lay.act_group]]
        if d:
            lay_pairs = _undominated(lay_pairs, c, d, lay, finite_bops=math.isfinite(limits[1]))
        pairs.append(lay_pairs)
        z.append([m.add_var(var_type=mip.BINARY, obj=c * w + d * a) for w, a in lay_pairs])
        m.add_constr(mip.xsum(z[i]) == 1)

    for g, members in prep.groups.items():
        if len(members) == 1:
            continue
        y = {a: m.add_var(var_type=mip.BINARY, obj=prep.act_coeff[g] * a) for a in act_ok[g]}
        m.add_constr(mip.xsum(y.values()) == 1)
        for i in members:
            for a, y_a in y.items():
                terms = [z[i][k] for k, (_, b) in enumerate(pairs[i]) if b == a]
                m.add_constr(mip.LinExpr(terms + [y_a], [1.0] * len(terms) + [-1.0]) == 0)

    if math.isfinite(limits[0]):
        variables = [v for zi in z for v in zi]
        coeffs = [
            lay.params * w / limits[0] for lay, lp in zip(layers, pairs, strict=True) for w, _ in lp
        ]
        m.add_constr(mip.LinExpr(variables, coeffs) <= 1.0)
    if math.isfinite(limits[1]):
        variables = [v for zi in z for v in zi]
        coeffs = [
            lay.macs * w * a / limits[1]
            for lay, lp in zip(layers, pairs, strict=True)
            for w, a in lp
        ]
        m.add_constr(mip.LinExpr(variables, coeffs) <= 1.0)
    return _Model(m, pairs, z)


def _undominated(
    pairs: list[tuple[int, int]], c: float, d: float, lay: AllocationLayer, finite_bops: bool
) -> list[tuple[int, int]]:
    """Drop (w, a) pairs of a one-layer act group that another pair dominates.

    Once the buffer budget has filtered the act choices, a pair only matters through its
    objective ``c*w + d*a``, memory ``params*w`` and BOPs ``macs*w*a``. A pair no better in the
    objective and no cheaper in either resource than another can be dropped without losing every
    optimum (exact ties keep the first pair). With the default ``d = c`` this removes e.g. (8, 2)
    in favour of (2, 8): same objective and BOPs, less memory -- a symmetry that otherwise leaves
    CBC with a flat tree it cannot close.
    """
    keys = [
        (c * w + d * a, lay.params * w, lay.macs * w * a if finite_bops else 0) for w, a in pairs
    ]
    keep = []
    for k, (obj, mem, bops) in enumerate(keys):
        dominated = False
        for j, (obj2, mem2, bops2) in enumerate(keys):
            if j == k or obj2 < obj or mem2 > mem or bops2 > bops:
                continue
            if (obj2, mem2, bops2) != (obj, mem, bops) or j < k:
                dominated = True
                break
        if not dominated:
            keep.append(pairs[k])
    return keep


def _read(built: _Model) -> list[tuple[int, int]]:
    """The chosen (w, a) per layer: the pair whose binary is (nearest to) one."""
    chosen = []
    for lay_pairs, zi in zip(built.pairs, built.z, strict=True):
        values = [v.x for v in zi]
        chosen.append(lay_pairs[max(range(len(values)), key=values.__getitem__)])
    return chosen


def _timeout(time_limit_s: float) -> OmpqError:
    return OmpqError(
        f"the integer program was not solved to proven optimality within {time_limit_s:g} s; "
        "offer fewer bit choices in the profile or pass a longer --time-limit"
    )


def solve(problem: AllocationProblem, time_limit_s: float = 60.0) -> Allocation:
    """Maximise the Eq. 10 objective under the budgets; exact, proven optimal, never over budget.

    Raises InfeasibleBudgetError (naming the budget and its smallest achievable value) when no
    configuration meets the budgets, and OmpqError on bad input or when CBC cannot prove
    optimality within ``time_limit_s``.
    """
    start = time.perf_counter()
    prep = _prepare(problem)
    _check_feasible(problem, prep)
    layers = problem.layers
    if not layers:
        return Allocation({}, {}, 0.0, 0, 0, 0, time.perf_counter() - start, "optimal")

    limits = _limits(problem.budgets)
    effective = list(limits)
    cuts: list[list[tuple[int, int]]] = []  # configurations found over budget (tolerance)
    for attempt in range(_MAX_RESOLVES + 1):
        built = _build(problem, prep, (effective[0], effective[1], effective[2]))
        for cut in cuts:  # no-good cuts: never return these over-budget configurations again
            chosen_vars = [built.z[i][built.pairs[i].index(p)] for i, p in enumerate(cut)]
            built.model.add_constr(mip.xsum(chosen_vars) <= len(layers) - 1)
        remaining = time_limit_s - (time.perf_counter() - start)
        if remaining <= 0:
            raise _timeout(time_limit_s)
        status = built.model.optimize(max_seconds=remaining)
        if status == mip.OptimizationStatus.INFEASIBLE and attempt > 0:
            # the tightening overshot (the exact problem is feasible, checked above): keep the
            # cuts, which alone guarantee progress, and go back to the true budgets
            effective = list(limits)
            continue
        if status != mip.OptimizationStatus.OPTIMAL:
            if status in (
                mip.OptimizationStatus.FEASIBLE,
                mip.OptimizationStatus.NO_SOLUTION_FOUND,
            ):
                raise _timeout(time_limit_s)
            raise OmpqError(
                f"CBC returned status {status.name} for a feasible allocation problem; "
                "please report this with the model and budgets"
            )
        chosen = _read(built)
        weight_bits = {lay.name: w for lay, (w, _) in zip(layers, chosen, strict=True)}
        act_bits = {lay.name: a for lay, (_, a) in zip(layers, chosen, strict=True)}
        used = usage(problem, weight_bits, act_bits)
        broken = _violations(problem, used)
        if not broken:
            return Allocation(
                weight_bits=weight_bits,
                act_bits=act_bits,
                objective=objective_value(problem, weight_bits, act_bits),
                weight_memory_bits=used[0],
                bops=used[1],
                max_act_buffer_bits=used[2],
                solve_s=time.perf_counter() - start,
                status="optimal",
            )
        cuts.append(chosen)
        for k in broken:  # tighten by twice the excess, growing on repeats
            excess = used[k] - limits[k]
            effective[k] = min(effective[k], limits[k] - excess * 2 ** (attempt + 1))
    raise OmpqError(
        "the solver kept returning configurations over budget by a rounding tolerance; "
        "loosen the budgets slightly (e.g. by 0.01%) and retry"
    )
