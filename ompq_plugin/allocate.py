"""Bit-width allocation: OMPQ's integer program (paper Eq. 10), solved exactly.

The problem (an exact 0-1 integer program, not an LP plus rounding):

* every layer ``i`` takes one allowed pair (weight bits ``w``, input-act bits ``a``); a pair is
  allowed when both widths are in the layer's choices (after pins) and the pair is not in the
  layer's ``excluded_pairs`` (e.g. CMSIS-NN has no int4-weight kernel for int16 inputs);
* the layers of an activation group (layers reading the same quantized tensor) share ``a``;
* objective: maximise ``sum_i c_i * w_i + sum_g d_g * a_g`` with ``c`` from
  :func:`eq10_coefficients` and ``d_g`` (default) the sum of ``c_i`` over the group's layers;
  or, per option, ``sum_i v_i(w_i) + sum_g u_g(a_g)`` with any finite values (``weight_value``,
  ``act_value``; e.g. minus a predicted error, increasing in the bits but not linearly). Nothing
  below assumes the objective is linear or monotone in the bits;
* budgets: ``sum params_i * w_i <= M`` (weight memory), ``sum macs_i * w_i * a_i <= B`` (BOPs);
  since the activation buffer is a maximum, act bits with ``input_numel * a > A`` are simply not
  offered. Infinite budgets add nothing.

Solver (:func:`solve`): an exact dynamic program over the act groups with Lagrangian bounds.

* Items: a group of one layer is one item whose options are its (w, a) pairs, minus pairs another
  pair dominates (no better objective, no cheaper in either resource). A group of several layers
  is a block of consecutive steps: first its act bits ``a`` (carried in the state), then each
  member's weight bits.
* Bound: multipliers ``lam = (lam_mem, lam_bops) >= 0`` minimising the Lagrangian dual
  ``L(lam) = sum_items max_option (obj - lam . resources) + lam . budgets`` (which equals the LP
  relaxation bound; found by a nested golden-section search -- any ``lam >= 0`` gives a valid
  bound, a better one only prunes more). A partial state (value, memory, BOPs, open group's a)
  after step k can complete to at most
  ``value - lam . used + suffix_k(a) + lam . budgets``, ``suffix_k`` being the sum of the later
  items' largest reduced profits.
* States are pruned when (a) even the cheapest completion breaks a budget (exact, in integers),
  (b) their bound is below a target ``T``, or (c) another state with the same open ``a`` is no
  worse in value and no larger in memory and in BOPs (dominance; exact duplicates keep one).
  Every pruning keeps at least one optimal completion of every state at or above ``T``, so when
  the best final state reaches ``T`` it is optimal. ``T`` starts just below the root bound and is
  lowered geometrically (never below the best configuration already found, which then closes the
  search) until that happens.
* Exactness: memory and BOPs are integers and compared exactly. The objective is a float sum:
  bounds are compared with a slack of ``1e-9`` relative to the objective's scale (the sum over
  steps of the largest option magnitude; on the safe side: it keeps states), and two
  configurations whose objectives agree to about ``1e-12`` relative (float rounding) are
  treated as equal -- either may be returned.
* If the states of one step exceed a limit (a hard instance), the same problem goes to CBC
  (python-mip), as before: one binary per (layer, pair) and per (group, act bits), the budget rows
  scaled to 1, solved to proven optimality within the time limit.

Never returning a configuration that breaks a budget: the answer is checked against the budgets
exactly, in integers (:func:`usage`). (The DP is exact in integers; CBC's tolerance can let a
configuration through that meets a budget only approximately: it is cut off with a no-good cut,
the violated row is tightened slightly, and the model is re-solved.)

Infeasibility is decided exactly: the smallest achievable value of each budget is computed per
act group (each of its act bits, each member at its cheapest allowed weight bits for it); without
excluded pairs this is simply every layer at its lowest bits, which minimises all three budgets
at once. A budget below its minimum is an error naming that minimum. With excluded pairs the
budgets can also be infeasible only together; the DP proves that and says so.

This module is pure maths: it imports neither torch, Brevitas nor ONNX.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import mip
import numpy as np

from ompq_plugin.budgets import KIB_BITS, Budgets
from ompq_plugin.errors import InfeasibleBudgetError, OmpqError

LAYER_KINDS = ("conv", "depthwise", "pointwise", "linear")
_MAX_RESOLVES = 20  # tolerance repairs before giving up (in practice 0 or 1 are needed)
_MAX_STATES = 1_500_000  # DP states per step before handing the instance to CBC
_BOUND_SLACK = 1e-9  # relative: a bound this close below the target keeps its state

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
    solver: str = "dp"  # "dp" (the exact DP) or "cbc" (the fallback integer program)


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
    act_allowed: dict[str, tuple[int, ...]]  # per group: intersection, pins applied, and
    # only act bits every member can pair with some allowed weight bits
    wval: list[dict[int, float]]  # per layer: objective contribution of each allowed w
    aval: dict[str, dict[int, float]]  # per group: objective contribution of each allowed a
    excluded: list[frozenset[tuple[int, int]]]  # per layer

    def weights_for(self, i: int, a: int) -> tuple[int, ...]:
        """Layer ``i``'s allowed weight bits when its input has ``a`` bits."""
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
    return _Prepared(groups, weight_allowed, act_allowed, wval, aval, excluded)


# --- infeasibility ---------------------------------------------------------------------------


def _fmt_up(value: float, digits: int = 4) -> str:
    """``value`` rounded *up* to ``digits`` significant digits, so 'at least X' is enough."""
    if value <= 0:
        return "0"
    q = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return f"{math.ceil(value / q * (1 - 1e-12)) * q:.{digits}g}"


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def _act_ok(
    problem: AllocationProblem, prep: _Prepared, buffer_limit: float
) -> dict[str, tuple[int, ...]]:
    """Per group: its allowed act bits whose largest input activation fits the buffer budget."""
    out: dict[str, tuple[int, ...]] = {}
    for g, members in prep.groups.items():
        biggest = max(problem.layers[i].input_numel for i in members)
        out[g] = tuple(a for a in prep.act_allowed[g] if biggest * a <= buffer_limit)
    return out


def _smallest(
    problem: AllocationProblem, prep: _Prepared, act_ok: Mapping[str, tuple[int, ...]], k: int
) -> int:
    """Exact minimum of weight memory (k=0) or BOPs (k=1) over configurations using ``act_ok``.

    Groups are independent, so the minimum is a sum over groups of the best act bits for that
    group with each member at its cheapest weight bits allowed with those act bits.
    """
    total = 0
    for g, members in prep.groups.items():
        per_a = []
        for a in act_ok[g]:
            cost = 0
            for i in members:
                lay = problem.layers[i]
                w = min(prep.weights_for(i, a))
                cost += lay.params * w if k == 0 else lay.macs * w * a
            per_a.append(cost)
        total += min(per_a)
    return total


def _check_feasible(problem: AllocationProblem, prep: _Prepared) -> None:
    """Raise InfeasibleBudgetError when a budget is below its smallest achievable value."""
    limits = _limits(problem.budgets)
    layers = problem.layers
    any_excluded = any(prep.excluded)
    how = (
        "each layer at its cheapest allowed (weight, act) pair, pins kept"
        if any_excluded
        else "all free layers at their lowest bits, pins kept"
    )
    # buffer: a max over groups, each group independently at its lowest act bits
    low_buffer = max(
        (
            max(layers[i].input_numel for i in members) * prep.act_allowed[g][0]
            for g, members in prep.groups.items()
        ),
        default=0,
    )
    act_ok = _act_ok(problem, prep, limits[2])
    low_memory = _smallest(problem, prep, act_ok, 0) if low_buffer <= limits[2] else 0
    low_bops = _smallest(problem, prep, act_ok, 1) if low_buffer <= limits[2] else 0
    if low_memory > limits[0]:
        total_params = sum(lay.params for lay in layers)
        avg = f" (or --avg-weight-bits to at least {_fmt_up(low_memory / total_params)})"
        raise InfeasibleBudgetError(
            f"weight memory budget {_fmt(limits[0] / KIB_BITS)} KiB is infeasible: the smallest "
            f"achievable is {_fmt_up(low_memory / KIB_BITS)} KiB ({low_memory} bits; {how}); "
            f"raise --weight-memory-kib to at least {_fmt_up(low_memory / KIB_BITS)}"
            + (avg if total_params else "")
        )
    if low_bops > limits[1]:
        raise InfeasibleBudgetError(
            f"BOPs budget {_fmt(limits[1] / 1e9)} G is infeasible: the smallest achievable is "
            f"{_fmt_up(low_bops / 1e9)} G ({low_bops} BOPs; {how}); raise --bops-g to at least "
            f"{_fmt_up(low_bops / 1e9)}"
        )
    if low_buffer > limits[2]:
        raise InfeasibleBudgetError(
            f"activation buffer budget {_fmt(limits[2] / KIB_BITS)} KiB is infeasible: the "
            f"smallest achievable is {_fmt_up(low_buffer / KIB_BITS)} KiB ({low_buffer} bits; "
            f"{how}); raise --act-buffer-kib to at least {_fmt_up(low_buffer / KIB_BITS)}"
        )


def _jointly_infeasible(problem: AllocationProblem) -> InfeasibleBudgetError:
    limits = _limits(problem.budgets)
    return InfeasibleBudgetError(
        f"the budgets are infeasible together: each alone is achievable, but no configuration "
        f"meets weight memory {_fmt(limits[0] / KIB_BITS)} KiB and BOPs {_fmt(limits[1] / 1e9)} G "
        f"(activation buffer {_fmt(limits[2] / KIB_BITS)} KiB) at once, because of the excluded "
        "(weight, act) pairs; raise --weight-memory-kib or --bops-g"
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
    act_ok = _act_ok(problem, prep, limits[2])

    scale = _objective_scale(problem, prep)
    pairs: list[list[tuple[int, int]]] = []
    z: list[list[mip.Var]] = []
    for i, lay in enumerate(layers):
        # a group of one layer needs no y[g, a] (it would equal sum_w z[i, w, a]): its act term
        # goes straight onto z
        single = len(prep.groups[lay.act_group]) == 1
        wv, av = prep.wval[i], prep.aval[lay.act_group]
        lay_pairs = [(w, a) for a in act_ok[lay.act_group] for w in prep.weights_for(i, a)]
        lay_pairs.sort()
        obj = [wv[w] + (av[a] if single else 0.0) for w, a in lay_pairs]
        if single:
            lay_pairs = _undominated(lay_pairs, obj, lay, finite_bops=math.isfinite(limits[1]))
            obj = [wv[w] + av[a] for w, a in lay_pairs]
        pairs.append(lay_pairs)
        z.append([m.add_var(var_type=mip.BINARY, obj=o / scale) for o in obj])
        m.add_constr(mip.xsum(z[i]) == 1)

    for g, members in prep.groups.items():
        if len(members) == 1:
            continue
        y = {a: m.add_var(var_type=mip.BINARY, obj=prep.aval[g][a] / scale) for a in act_ok[g]}
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


def _objective_scale(problem: AllocationProblem, prep: _Prepared) -> float:
    """Divisor of per-option objective values for CBC: their mean largest magnitude becomes 10.

    CBC's absolute tolerances suit Eq. 10's magnitudes (options of about 1-16) but lose tiny
    per-option values (e.g. errors of 1e-5); Eq. 10 problems are left as they are.
    """
    if problem.weight_value is None and problem.act_value is None:
        return 1.0
    tops = [max(map(abs, v.values())) for v in [*prep.wval, *prep.aval.values()]]
    return (sum(tops) / len(tops) / 10.0) or 1.0


def _undominated(
    pairs: list[tuple[int, int]], obj: list[float], lay: AllocationLayer, finite_bops: bool
) -> list[tuple[int, int]]:
    """Drop (w, a) pairs of a one-layer act group that another pair dominates.

    Once the buffer budget has filtered the act choices, a pair only matters through its
    objective ``obj`` (e.g. ``c*w + d*a``), memory ``params*w`` and BOPs ``macs*w*a``. A pair no
    better in the objective and no cheaper in either resource than another can be dropped without
    losing every optimum (exact ties keep the first pair). With the default ``d = c`` this
    removes e.g. (8, 2) in favour of (2, 8): same objective and BOPs, less memory -- a symmetry
    that otherwise leaves CBC with a flat tree it cannot close.
    """
    keys = [
        (o, lay.params * w, lay.macs * w * a if finite_bops else 0)
        for o, (w, a) in zip(obj, pairs, strict=True)
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


# --- the exact dynamic program ---------------------------------------------------------------


class _TooHard(Exception):
    """The DP's states outgrew _MAX_STATES: hand the instance to CBC."""


@dataclass
class _Step:
    """One DP step: a one-layer group's (w, a) pair, a block's act bits, or a member's w."""

    kind: str  # "pair" | "open" | "member"
    group: str
    layer: int  # the layer index ("pair", "member"); -1 for "open"
    w: np.ndarray  # per option: weight bits (0 for "open")
    a: np.ndarray  # per option: act bits (0 for "member": the state's open a)
    value: np.ndarray  # per option: objective contribution
    mem: np.ndarray  # per option: weight memory bits (0 when that budget is infinite)
    bops: np.ndarray  # per option: BOPs; for "member" macs * w, multiplied by the state's a
    ok: np.ndarray | None  # "member": [option, a] -> (w, a) allowed
    last: bool  # "member": the block's last layer (closes the block)


def _steps(
    problem: AllocationProblem, prep: _Prepared, limits: tuple[float, float, float]
) -> tuple[list[_Step], int]:
    """The DP's steps (groups in order of first appearance) and the largest act bit width."""
    layers = problem.layers
    act_ok = _act_ok(problem, prep, limits[2])
    mem_on, bops_on = math.isfinite(limits[0]), math.isfinite(limits[1])
    a_max = max((max(acts) for acts in act_ok.values() if acts), default=1)
    steps: list[_Step] = []
    for g, members in prep.groups.items():
        av = prep.aval[g]
        if len(members) == 1:
            i = members[0]
            lay = layers[i]
            wv = prep.wval[i]
            pairs = sorted((w, a) for a in act_ok[g] for w in prep.weights_for(i, a))
            obj = [wv[w] + av[a] for w, a in pairs]
            pairs = _undominated(pairs, obj, lay, finite_bops=bops_on)
            steps.append(
                _Step(
                    "pair",
                    g,
                    i,
                    np.array([w for w, _ in pairs], dtype=np.int64),
                    np.array([a for _, a in pairs], dtype=np.int64),
                    np.array([wv[w] + av[a] for w, a in pairs]),
                    np.array([lay.params * w * mem_on for w, _ in pairs], dtype=np.int64),
                    np.array([lay.macs * w * a * bops_on for w, a in pairs], dtype=np.int64),
                    None,
                    False,
                )
            )
            continue
        acts = act_ok[g]
        zeros = np.zeros(len(acts), dtype=np.int64)
        steps.append(
            _Step(
                "open",
                g,
                -1,
                zeros,
                np.array(acts, dtype=np.int64),
                np.array([av[a] for a in acts]),
                zeros,
                zeros,
                None,
                False,
            )
        )
        for n, i in enumerate(members):
            lay = layers[i]
            ws = prep.weight_allowed[i]
            ok = np.zeros((len(ws), a_max + 1), dtype=bool)
            for k, w in enumerate(ws):
                for a in acts:
                    ok[k, a] = (w, a) not in prep.excluded[i]
            steps.append(
                _Step(
                    "member",
                    g,
                    i,
                    np.array(ws, dtype=np.int64),
                    np.zeros(len(ws), dtype=np.int64),
                    np.array([prep.wval[i][w] for w in ws]),
                    np.array([lay.params * w * mem_on for w in ws], dtype=np.int64),
                    np.array([lay.macs * w * bops_on for w in ws], dtype=np.int64),
                    ok,
                    n == len(members) - 1,
                )
            )
    return steps, a_max


@dataclass
class _Suffix:
    """Per step k, indexed by the state's open act bits (0: none): what the later steps add."""

    bound: list[np.ndarray]  # largest total reduced profit (value - lam . resources)
    mem: list[np.ndarray]  # smallest weight memory
    bops: list[np.ndarray]  # smallest BOPs
    root: float  # the Lagrangian bound of the whole problem (without lam . budgets)


def _suffix(steps: list[_Step], a_max: int, lam: tuple[float, float]) -> _Suffix:
    size = a_max + 1
    bound: list[np.ndarray] = [np.empty(0)] * len(steps)
    mem: list[np.ndarray] = [np.empty(0)] * len(steps)
    bops: list[np.ndarray] = [np.empty(0)] * len(steps)
    tail, tail_mem, tail_bops = 0.0, 0, 0  # everything after the current block / step
    blk = np.zeros(size)  # inside a block: the later members, per open a
    blk_mem = np.zeros(size, dtype=np.int64)
    blk_bops = np.zeros(size, dtype=np.int64)
    acts = np.arange(size, dtype=np.int64)
    for k in range(len(steps) - 1, -1, -1):
        st = steps[k]
        if st.kind == "pair":
            bound[k] = np.full(size, tail)
            mem[k] = np.full(size, tail_mem, dtype=np.int64)
            bops[k] = np.full(size, tail_bops, dtype=np.int64)
            tail += float(np.max(st.value - lam[0] * st.mem - lam[1] * st.bops))
            tail_mem += int(st.mem.min())
            tail_bops += int(st.bops.min())
        elif st.kind == "member":
            if st.last:
                blk, blk_mem, blk_bops = np.zeros(size), blk_mem * 0, blk_bops * 0
            bound[k], mem[k], bops[k] = tail + blk, tail_mem + blk_mem, tail_bops + blk_bops
            assert st.ok is not None
            # [option, a]: reduced profit / resources of weight option w given act bits a
            red = (st.value - lam[0] * st.mem)[:, None] - lam[1] * np.outer(st.bops, acts)
            big = np.iinfo(np.int64).max // 4
            blk = blk + np.where(st.ok, red, -np.inf).max(axis=0)
            blk_mem = blk_mem + np.where(st.ok, st.mem[:, None], big).min(axis=0)
            blk_bops = blk_bops + np.where(st.ok, np.outer(st.bops, acts), big).min(axis=0)
        else:  # open: the whole block is now "later"
            bound[k], mem[k], bops[k] = tail + blk, tail_mem + blk_mem, tail_bops + blk_bops
            tail += float(np.max(st.value + blk[st.a]))
            tail_mem += int(blk_mem[st.a].min())
            tail_bops += int(blk_bops[st.a].min())
    return _Suffix(bound, mem, bops, tail)


class _Dual:
    """Fast evaluation of the Lagrangian bound ``max_config (obj - lam . used)`` for many lam."""

    def __init__(self, steps: list[_Step]) -> None:
        pv, pm, pb, pstart = [], [], [], []  # one-layer groups: their (w, a) options
        bv, bm, bb, bstart = [], [], [], []  # blocks: segments (block, a, member) of w options
        seg_start, act_value, blk_start = [], [], []  # per (block, a): its first segment
        n_seg = 0
        k = 0
        while k < len(steps):
            st = steps[k]
            if st.kind == "pair":
                pstart.append(sum(len(x) for x in pv))
                pv.append(st.value)
                pm.append(st.mem)
                pb.append(st.bops)
                k += 1
                continue
            end = k + 1
            while not steps[end].last:
                end += 1
            members = steps[k + 1 : end + 1]
            blk_start.append(len(act_value))
            for a, va in zip(st.a.tolist(), st.value.tolist(), strict=True):
                seg_start.append(n_seg)
                act_value.append(va)
                for m in members:
                    assert m.ok is not None
                    sel = m.ok[:, a]
                    bstart.append(sum(len(x) for x in bv))
                    bv.append(m.value[sel])
                    bm.append(m.mem[sel])
                    bb.append(m.bops[sel] * a)
                    n_seg += 1
            k = end + 1
        self.pv, self.pm, self.pb = _cat(pv, float), _cat(pm, float), _cat(pb, float)
        self.pstart = np.array(pstart, dtype=np.int64)
        self.bv, self.bm, self.bb = _cat(bv, float), _cat(bm, float), _cat(bb, float)
        self.bstart = np.array(bstart, dtype=np.int64)
        self.seg_start = np.array(seg_start, dtype=np.int64)
        self.act_value = np.array(act_value)
        self.blk_start = np.array(blk_start, dtype=np.int64)

    def __call__(self, l1: float, l2: float) -> float:
        total = 0.0
        if len(self.pstart):
            red = self.pv - l1 * self.pm - l2 * self.pb
            total += float(np.maximum.reduceat(red, self.pstart).sum())
        if len(self.blk_start):
            red = self.bv - l1 * self.bm - l2 * self.bb
            per_seg = np.maximum.reduceat(red, self.bstart)
            per_act = np.add.reduceat(per_seg, self.seg_start) + self.act_value
            total += float(np.maximum.reduceat(per_act, self.blk_start).sum())
        return total


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


def _golden(f: Callable[[float], float], hi: float, iters: int) -> tuple[float, float]:
    """(argmin, min) of a convex ``f`` on [0, hi] by golden sections (also tries 0)."""
    r = (math.sqrt(5) - 1) / 2
    lo, up = 0.0, hi
    x1, x2 = up - r * (up - lo), lo + r * (up - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(iters):
        if f1 <= f2:
            up, x2, f2 = x2, x1, f1
            x1 = up - r * (up - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + r * (up - lo)
            f2 = f(x2)
    best = (x1, f1) if f1 <= f2 else (x2, f2)
    f0 = f(0.0)
    return best if best[1] < f0 else (0.0, f0)


def _bracket(f: Callable[[float], float], start: float) -> float:
    """An upper end ``hi`` such that the convex ``f`` has a minimiser in [0, hi]."""
    hi = start
    for _ in range(60):
        if f(2 * hi) >= f(hi):
            return 2 * hi
        hi *= 2
    return hi


def _lagrangian(
    steps: list[_Step], caps: tuple[int, int], on: tuple[bool, bool]
) -> tuple[float, float]:
    """Multipliers (near-)minimising the Lagrangian dual bound, by nested golden sections.

    Searched in units of ``lam_k * budget_k`` so both live on the objective's scale. Any result
    is a valid bound; its precision only affects how much the DP prunes.
    """
    dual = _Dual(steps)
    c0, c1 = max(caps[0], 1), max(caps[1], 1)

    def f(u: float, v: float) -> float:
        return dual(u / c0, v / c1) + u + v

    spread = sum(float(st.value.max() - st.value.min()) for st in steps) + 1.0
    iters = 30
    if on[0] and on[1]:
        best_u: dict[float, float] = {}

        def inner(v: float) -> float:
            hi_u = _bracket(lambda u: f(u, v), spread)
            u, val = _golden(lambda x: f(x, v), hi_u, iters)
            best_u[v] = u
            return val

        v, _ = _golden(inner, _bracket(inner, spread), iters)
        if v not in best_u:
            inner(v)
        return best_u[v] / c0, v / c1
    if on[0]:
        g = lambda u: f(u, 0.0)  # noqa: E731
        return _golden(g, _bracket(g, spread), iters)[0] / c0, 0.0
    if on[1]:
        h = lambda v: f(0.0, v)  # noqa: E731
        return 0.0, _golden(h, _bracket(h, spread), iters)[0] / c1
    return 0.0, 0.0


def _undominated_states(
    value: np.ndarray, mem: np.ndarray, bops: np.ndarray, act: np.ndarray
) -> np.ndarray:
    """Indices of states to keep: one per (act, mem, BOPs), minus states another dominates.

    A state is dropped only for a state with the same open act bits that has at least its value
    and at most its memory and BOPs (every completion of the one completes the other at least as
    well). Checked against the best-valued earlier state in two sweeps (by memory, by BOPs): not
    every dominated state is found, but every state dropped is dominated.
    """
    order = np.lexsort((-value, bops, mem, act))
    v, m, b, a = value[order], mem[order], bops[order], act[order]
    first = np.ones(len(v), dtype=bool)
    first[1:] = (m[1:] != m[:-1]) | (b[1:] != b[:-1]) | (a[1:] != a[:-1])
    keep = order[first]
    for sweep in (0, 1):
        if len(keep) < 2:
            break
        v, m, b, a = value[keep], mem[keep], bops[keep], act[keep]
        order = np.lexsort((-v, b, m, a)) if sweep == 0 else np.lexsort((-v, m, b, a))
        v, m, b, a = v[order], m[order], b[order], a[order]
        dominated = np.zeros(len(v), dtype=bool)
        bounds = np.flatnonzero(np.diff(a)) + 1
        for lo, hi in zip(
            np.concatenate(([0], bounds)), np.concatenate((bounds, [len(v)])), strict=True
        ):
            seg_v = v[lo:hi]
            if len(seg_v) < 2:
                continue
            idx = np.arange(len(seg_v))
            running = np.maximum.accumulate(seg_v)
            champ = np.maximum.accumulate(np.where(seg_v == running, idx, 0))[:-1] + lo
            other = (m[lo + 1 : hi], b[lo + 1 : hi]) if sweep == 0 else (b[lo + 1 : hi],)
            # sorted by (m, b) [sweep 0] or (b, m) [sweep 1]: the champion is no larger in the
            # sort key; check value and the other resource
            worse = v[champ] >= seg_v[1:]
            if sweep == 0:
                worse &= b[champ] <= other[1]
            else:
                worse &= m[champ] <= m[lo + 1 : hi]
            dominated[lo + 1 : hi] = worse
        keep = keep[order[~dominated]]
    return keep


@dataclass
class _Found:
    value: float
    choice: list[tuple[int, int]]  # per layer (w, a)


def _dp(
    steps: list[_Step],
    n_layers: int,
    suffixes: list[_Suffix],
    lams: list[tuple[float, float]],
    caps: tuple[int, int],
    target: float,
    slack: float,
    deadline: float,
) -> _Found | None:
    """Best configuration among states whose bound reaches ``target - slack`` (None: none).

    States whose every completion is below ``target - slack`` are dropped, so the result is
    optimal whenever its value is at least ``target - slack``.
    """
    value = np.zeros(1)
    mem = np.zeros(1, dtype=np.int64)
    bops = np.zeros(1, dtype=np.int64)
    act = np.zeros(1, dtype=np.int64)
    trail: list[tuple[np.ndarray, np.ndarray]] = []  # per step: (parent, option) of each state
    offsets = [lam[0] * caps[0] + lam[1] * caps[1] for lam in lams]
    for k, st in enumerate(steps):
        if time.perf_counter() > deadline:
            raise TimeoutError
        n, n_opt = len(value), len(st.value)
        parent = np.tile(np.arange(n, dtype=np.int64), n_opt)
        option = np.repeat(np.arange(n_opt, dtype=np.int64), n)
        a_parent = act[parent]
        value = value[parent] + st.value[option]
        mem = mem[parent] + st.mem[option]
        if st.kind == "member":
            assert st.ok is not None
            bops = bops[parent] + st.bops[option] * a_parent
            act = a_parent
            keep = st.ok[option, a_parent]
        else:
            bops = bops[parent] + st.bops[option]
            act = st.a[option] if st.kind == "open" else a_parent
            keep = np.ones(len(value), dtype=bool)
        keep &= mem + suffixes[0].mem[k][act] <= caps[0]
        keep &= bops + suffixes[0].bops[k][act] <= caps[1]
        for lam, suf, off in zip(lams, suffixes, offsets, strict=True):
            bound = value - lam[0] * mem - lam[1] * bops + suf.bound[k][act] + off
            keep &= bound >= target - slack
        if st.kind == "member" and st.last:
            act = np.zeros_like(act)
        sel = np.flatnonzero(keep)
        sel = sel[_undominated_states(value[sel], mem[sel], bops[sel], act[sel])]
        if len(sel) > _MAX_STATES:
            raise _TooHard
        value, mem, bops, act = value[sel], mem[sel], bops[sel], act[sel]
        trail.append((parent[sel], option[sel]))
        if not len(sel):
            return None
    best = int(np.argmax(value))
    w_of = [0] * n_layers
    a_of = [0] * n_layers
    open_a: dict[str, int] = {}
    picks = []
    idx = best
    for k in range(len(steps) - 1, -1, -1):
        parent, option = trail[k]
        picks.append((k, int(option[idx])))
        idx = int(parent[idx])
    for k, o in reversed(picks):
        st = steps[k]
        if st.kind == "pair":
            w_of[st.layer], a_of[st.layer] = int(st.w[o]), int(st.a[o])
        elif st.kind == "open":
            open_a[st.group] = int(st.a[o])
        else:
            w_of[st.layer], a_of[st.layer] = int(st.w[o]), open_a[st.group]
    return _Found(float(value[best]), list(zip(w_of, a_of, strict=True)))


def _solve_dp(
    problem: AllocationProblem, prep: _Prepared, deadline: float
) -> list[tuple[int, int]]:
    """The exact DP with a falling target (see the module docstring); per layer (w, a)."""
    limits = _limits(problem.budgets)
    on = (math.isfinite(limits[0]), math.isfinite(limits[1]))
    caps = (
        math.floor(limits[0]) if on[0] else 0,
        math.floor(limits[1]) if on[1] else 0,
    )
    try:
        steps, a_max = _steps(problem, prep, limits)
    except OverflowError:  # resources beyond int64: leave it to CBC
        raise _TooHard from None
    for st in steps:
        if st.kind != "open" and int(st.bops.max(initial=0)) * max(a_max, 1) > 2**62 // (
            len(steps) + 1
        ):
            raise _TooHard  # BOPs could overflow int64: leave it to CBC
    lam = _lagrangian(steps, caps, on)
    lams = [lam]
    suffixes = [_suffix(steps, a_max, x) for x in lams]
    root = min(
        s.root + x[0] * caps[0] + x[1] * caps[1] for s, x in zip(suffixes, lams, strict=True)
    )
    floor = sum(float(st.value.min()) for st in steps) - 1.0  # below every objective
    # tolerances on the objective's own scale (per-option values may be tiny, e.g. errors)
    scale = sum(float(np.abs(st.value).max(initial=0.0)) for st in steps) or 1.0
    slack = _BOUND_SLACK * scale
    gap = 1e-6 * scale
    best: _Found | None = None
    while True:
        target = root - gap
        if best is not None:
            target = max(target, best.value)
        if target < floor:
            target = -math.inf
        found = _dp(steps, len(problem.layers), suffixes, lams, caps, target, slack, deadline)
        if found is not None and (best is None or found.value > best.value):
            best = found
        if best is not None and best.value >= target - slack:
            return best.choice
        if target == -math.inf:
            raise _jointly_infeasible(problem)
        gap *= 8


# --- entry point -----------------------------------------------------------------------------

SOLVERS = ("auto", "dp", "cbc")


def solve(
    problem: AllocationProblem, time_limit_s: float = 60.0, *, solver: str = "auto"
) -> Allocation:
    """Maximise the Eq. 10 objective under the budgets; exact, proven optimal, never over budget.

    ``solver``: "auto" runs the DP and hands instances too large for it to CBC; "dp" or "cbc"
    force one (for cross-checks; "dp" then fails on too-large instances).
    Raises InfeasibleBudgetError (naming the budget and its smallest achievable value) when no
    configuration meets the budgets, and OmpqError on bad input or when optimality is not
    proven within ``time_limit_s``.
    """
    if solver not in SOLVERS:
        raise OmpqError(f"unknown solver {solver!r}; use one of {SOLVERS}")
    start = time.perf_counter()
    prep = _prepare(problem)
    _check_feasible(problem, prep)
    layers = problem.layers
    if not layers:
        return Allocation({}, {}, 0.0, 0, 0, 0, time.perf_counter() - start, "optimal")
    if solver != "cbc":
        try:
            chosen = _solve_dp(problem, prep, start + time_limit_s)
        except TimeoutError:
            raise _timeout(time_limit_s) from None
        except _TooHard:
            if solver == "dp":
                raise OmpqError(
                    f"the DP needed more than {_MAX_STATES} states per step; use solver='auto'"
                ) from None
        else:
            allocation, broken = _checked_allocation(problem, chosen, start, "dp")
            if broken:  # cannot happen: the DP is exact in integers
                raise OmpqError(
                    "internal error: the DP returned a configuration over budget; "
                    "please report this with the model and budgets"
                )
            return allocation
    return _solve_cbc(problem, prep, start, time_limit_s)


def _checked_allocation(
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
    return allocation, _violations(problem, used)


def _solve_cbc(
    problem: AllocationProblem, prep: _Prepared, start: float, time_limit_s: float
) -> Allocation:
    """The 0-1 integer program in CBC, with exact post-checks and tolerance repairs."""
    layers = problem.layers
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
        if status == mip.OptimizationStatus.INFEASIBLE and any(prep.excluded):
            raise _jointly_infeasible(problem)  # each budget alone is achievable (checked)
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
        allocation, broken = _checked_allocation(problem, chosen, start, "cbc")
        if not broken:
            return allocation
        cuts.append(chosen)
        used = (allocation.weight_memory_bits, allocation.bops, allocation.max_act_buffer_bits)
        for k in broken:  # tighten by twice the excess, growing on repeats
            excess = used[k] - limits[k]
            effective[k] = min(effective[k], limits[k] - excess * 2 ** (attempt + 1))
    raise OmpqError(
        "the solver kept returning configurations over budget by a rounding tolerance; "
        "loosen the budgets slightly (e.g. by 0.01%) and retry"
    )
