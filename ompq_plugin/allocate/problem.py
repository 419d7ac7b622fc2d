"""The allocation problem: its types, objective, exact integer bookkeeping and validation.

The problem (an exact 0-1 integer program, not an LP plus rounding):

* every layer ``i`` takes one allowed pair (weight bits ``w``, input-act bits ``a``); a pair is
  allowed when both widths are in the layer's choices (after pins) and the pair is not in the
  layer's ``excluded_pairs`` (e.g. CMSIS-NN has no int4-weight kernel for int16 inputs);
* the layers of an activation group (layers reading the same quantized tensor) share ``a``;
* objective: maximise ``sum_i c_i * w_i + sum_g d_g * a_g`` with ``c`` from
  :func:`eq10_coefficients` and ``d_g`` (default) the sum of ``c_i`` over the group's layers;
  or, per option, ``sum_i v_i(w_i) + sum_g u_g(a_g)`` with any finite values (``weight_value``,
  ``act_value``; e.g. minus a predicted error, increasing in the bits but not linearly). No
  solver assumes the objective is linear or monotone in the bits;
* budgets: ``sum params_i * w_i <= M`` (weight memory), ``sum macs_i * w_i * a_i <= B`` (BOPs);
  since the activation buffer is a maximum, act bits with ``input_numel * a > A`` are simply not
  offered. Infinite budgets add nothing.

Memory, BOPs and buffer are integers and every answer is checked against the budgets exactly
(:func:`usage`), whichever solver found it. Pure maths: no torch, Brevitas or ONNX.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ompq_plugin.bitconfig import FIXED_KIND
from ompq_plugin.budgets import Budgets
from ompq_plugin.errors import OmpqError

# "fixed": a layer the quantizer adds at one weight width (ompq_plugin.fixed_layers): it uses the
# budgets and has no say in the objective
LAYER_KINDS = ("conv", "depthwise", "pointwise", "linear", FIXED_KIND)

Pin = tuple[int | None, int | None]


@dataclass(frozen=True)
class AllocationLayer:
    """One quantizable layer as the integer program sees it."""

    name: str
    kind: str  # conv | depthwise | pointwise | linear | fixed
    params: int  # weight parameters: memory = params * weight_bits
    macs: int  # BOPs = macs * weight_bits * act_bits
    input_numel: int  # activation buffer = input_numel * act_bits
    act_group: str  # layers sharing an input activation quantizer share act bits
    weight_choices: tuple[int, ...]
    act_choices: tuple[int, ...]
    # (weight bits, input-act bits) combinations this layer may not use although each width is
    # allowed on its own (a target without that kernel)
    excluded_pairs: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class AllocationProblem:
    """Layers in execution order, their objective coefficients, budgets and pins.

    ``pins`` maps a layer name to ``(weight_bits, act_bits)``; ``None`` leaves that one free.
    ``act_coeff`` maps an act group to its objective coefficient; by default it is the sum of the
    ``weight_coeff`` of the group's layers (Eq. 10 extended to activation bits).

    Per-option objective (any values, not necessarily linear or increasing in the bits):
    ``weight_value[i][w]`` replaces ``weight_coeff[i] * w`` (``weight_coeff`` is then ignored but
    must still have one entry per layer, e.g. zeros) and ``act_value[g][a]`` replaces
    ``act_coeff[g] * a``. With ``weight_value`` given and ``act_value`` None, every act option
    contributes 0. Every allowed width (after pins) needs a finite value.
    """

    layers: tuple[AllocationLayer, ...]
    weight_coeff: tuple[float, ...]
    budgets: Budgets = field(default_factory=Budgets)
    pins: Mapping[str, Pin] = field(default_factory=dict)
    act_coeff: Mapping[str, float] | None = None
    # Per-option objective (maximised). When given, the objective contribution of layer i at
    # weight width w is weight_value[i][w] (replaces weight_coeff[i] * w) ...
    weight_value: tuple[Mapping[int, float], ...] | None = None
    # ... and of act group g at act width a is act_value[g][a] (replaces act_coeff[g] * a).
    act_value: Mapping[str, Mapping[int, float]] | None = None


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
    # "dp" (the exact DP), "highs" (the HiGHS integer program), "unbounded" (no finite budget:
    # each act group's best choice, :mod:`.unbounded`) or "knapsack" (weight memory the only
    # finite budget, :mod:`.knapsack`)
    solver: str = "dp"


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
    """The objective of a configuration (what :func:`solve` maximises): Eq. 10 or per option."""
    seen: dict[str, int] = {}
    for lay in problem.layers:
        seen.setdefault(lay.act_group, act_bits[lay.name])
    terms = [
        _weight_value(problem, i, weight_bits[lay.name]) for i, lay in enumerate(problem.layers)
    ]
    act_coeff = _act_coefficients(problem) if problem.act_value is None else {}
    terms += [_act_value(problem, act_coeff, g, a) for g, a in seen.items()]
    return math.fsum(terms)


def _weight_value(problem: AllocationProblem, i: int, w: int) -> float:
    """Objective contribution of layer ``i`` at ``w`` weight bits."""
    if problem.weight_value is None:
        return float(problem.weight_coeff[i]) * w
    try:
        value = float(problem.weight_value[i][w])
    except (KeyError, IndexError, TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise OmpqError(
            f"layer {problem.layers[i].name}: weight_value has no finite value for {w} weight "
            "bits; give one finite value per allowed weight width"
        )
    return value


def _act_value(problem: AllocationProblem, act_coeff: Mapping[str, float], g: str, a: int) -> float:
    """Objective contribution of act group ``g`` at ``a`` bits (``act_coeff`` when linear)."""
    if problem.act_value is None:
        return 0.0 if problem.weight_value is not None else act_coeff[g] * a
    try:
        value = float(problem.act_value[g][a])
    except (KeyError, TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise OmpqError(
            f"act group {g!r}: act_value has no finite value for {a} act bits; give one finite "
            "value per allowed act width"
        )
    return value


def violations(problem: AllocationProblem, used: tuple[int, int, int]) -> list[int]:
    """Indices (0 memory, 1 BOPs, 2 buffer) of the budgets that ``used`` breaks."""
    limits = budget_limits(problem.budgets)
    return [k for k in range(3) if used[k] > limits[k]]


def budget_limits(budgets: Budgets) -> tuple[float, float, float]:
    return (budgets.weight_memory_bits, budgets.bops, budgets.act_buffer_bits)


# --- validation and preparation --------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """Validated problem: allowed weight bits per layer, allowed act bits per group."""

    groups: dict[str, list[int]]  # group -> layer indices, in order of first appearance
    weight_allowed: list[tuple[int, ...]]  # per layer, pins applied
    act_allowed: dict[str, tuple[int, ...]]  # per group: intersection, pins applied, and
    # only act bits every member can pair with some allowed weight bits
    wval: list[dict[int, float]]  # per layer: objective contribution of each allowed w
    aval: dict[str, dict[int, float]]  # per group: objective contribution of each allowed a
    excluded: list[frozenset[tuple[int, int]]]  # per layer

    def weights_for(self, i: int, a: int) -> tuple[int, ...]:
        """Layer ``i``'s allowed weight bits when its input has ``a`` bits."""
        if not self.excluded[i]:  # the common case: no excluded pair
            return self.weight_allowed[i]
        return tuple(w for w in self.weight_allowed[i] if (w, a) not in self.excluded[i])


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


def _pinned(
    lay: AllocationLayer, what: str, pin: int | None, choices: tuple[int, ...]
) -> tuple[int, ...]:
    """``choices`` narrowed to the pinned width (``what``: "weight" or "act"), which must be one
    of them."""
    if pin is None:
        return choices
    if pin not in choices:
        raise OmpqError(
            f"pin {lay.name}: {what} bits {pin} not allowed for this {lay.kind} layer "
            f"(allowed {list(choices)}); pin one of those"
        )
    return (pin,)


def _check_choices(lay: AllocationLayer, attr: str) -> tuple[int, ...]:
    choices = getattr(lay, attr)
    if not choices or not all(isinstance(b, int) and b >= 1 for b in choices):
        raise OmpqError(
            f"layer {lay.name}: {attr}={choices!r}; give at least one positive integer bit width"
        )
    return tuple(sorted(set(choices)))


def prepare(problem: AllocationProblem) -> Prepared:
    layers = problem.layers
    if len(problem.weight_coeff) != len(layers):
        raise OmpqError(
            f"{len(problem.weight_coeff)} objective coefficients for {len(layers)} layers; "
            "give one per layer"
        )
    if not all(math.isfinite(c) for c in problem.weight_coeff):
        raise OmpqError("objective coefficients contain NaN or Inf; check the importances")
    if problem.weight_value is not None and len(problem.weight_value) != len(layers):
        raise OmpqError(
            f"weight_value has {len(problem.weight_value)} entries for {len(layers)} layers; "
            "give one mapping (weight bits -> value) per layer"
        )
    if problem.act_value is not None:
        known = {lay.act_group for lay in layers}
        unknown = sorted(set(problem.act_value) - known)
        if unknown:
            raise OmpqError(
                f"act_value names unknown act groups {unknown}; use the layers' act_group"
            )
    names = [lay.name for lay in layers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise OmpqError(f"duplicate layer names {dupes}; every layer needs a unique name")
    unknown = sorted(set(problem.pins) - set(names))
    if unknown:
        raise OmpqError(f"pinned layers {unknown} are not in the model; check the --pin names")
    act_coeff = _act_coefficients(problem) if problem.act_value is None else {}

    groups: dict[str, list[int]] = {}
    weight_allowed: list[tuple[int, ...]] = []
    layer_acts: list[tuple[int, ...]] = []
    excluded: list[frozenset[tuple[int, int]]] = []
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
        w_choices = _pinned(lay, "weight", pin_w, w_choices)
        a_choices = _pinned(lay, "act", pin_a, a_choices)
        bad = lay.excluded_pairs
        if not all(
            isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(b, int) for b in pair)
            for pair in bad
        ):
            raise OmpqError(
                f"layer {lay.name}: excluded_pairs={bad!r}; give (weight bits, act bits) tuples"
            )
        pairs_left = [(w, a) for w in w_choices for a in a_choices if (w, a) not in bad]
        if not pairs_left:
            raise OmpqError(
                f"layer {lay.name}: every (weight, act) pair it may use is in excluded_pairs "
                f"{sorted(bad)}; change the pins or the profile's excluded_pairs"
            )
        weight_allowed.append(w_choices)
        layer_acts.append(a_choices)
        excluded.append(frozenset(bad))
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
        usable = [
            a
            for a in sorted(common)
            if all(any((w, a) not in excluded[i] for w in weight_allowed[i]) for i in members)
        ]
        if not usable:
            raise OmpqError(
                f"act group {g!r}: for each act bit width {sorted(common)} some layer has only "
                "excluded (weight, act) pairs; change the pins or the profile's excluded_pairs"
            )
        act_allowed[g] = tuple(usable)
    wval = [{w: _weight_value(problem, i, w) for w in ws} for i, ws in enumerate(weight_allowed)]
    aval = {
        g: {a: _act_value(problem, act_coeff, g, a) for a in acts}
        for g, acts in act_allowed.items()
    }
    return Prepared(groups, weight_allowed, act_allowed, wval, aval, excluded)


def timeout_error(time_limit_s: float) -> OmpqError:
    return OmpqError(
        f"the integer program was not solved to proven optimality within {time_limit_s:g} s; "
        "offer fewer bit choices in the profile or pass a longer --time-limit"
    )


def checked_allocation(
    problem: AllocationProblem, chosen: list[tuple[int, int]], start: float, solver: str
) -> tuple[Allocation, list[int]]:
    """The Allocation of one (w, a) per layer, with the budgets it breaks (exact integers)."""
    weight_bits = {lay.name: w for lay, (w, _) in zip(problem.layers, chosen, strict=True)}
    act_bits = {lay.name: a for lay, (_, a) in zip(problem.layers, chosen, strict=True)}
    used = usage(problem, weight_bits, act_bits)
    allocation = Allocation(
        weight_bits=weight_bits,
        act_bits=act_bits,
        objective=objective_value(problem, weight_bits, act_bits),
        weight_memory_bits=used[0],
        bops=used[1],
        max_act_buffer_bits=used[2],
        solve_s=time.perf_counter() - start,
        status="optimal",
        solver=solver,
    )
    return allocation, violations(problem, used)
