"""One AllocationProblem per method: the same layers, budgets, pins and groups; only the
objective differs (see :mod:`ompq_plugin.methods.objectives`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from ompq_plugin.allocate import (
    Allocation,
    AllocationLayer,
    AllocationProblem,
    eq10_coefficients,
    solve,
)
from ompq_plugin.bitconfig import FIXED_KIND
from ompq_plugin.budgets import Budgets
from ompq_plugin.errors import InfeasibleBudgetError, OmpqError
from ompq_plugin.fixed_layers import FixedLayer
from ompq_plugin.hw_profiles.profile import HardwareProfile
from ompq_plugin.layers import ModelLayers
from ompq_plugin.methods import DEFAULT_ACT_WEIGHT, hawq, measured
from ompq_plugin.methods.folding import folded_copy, folded_weights
from ompq_plugin.methods.objectives import (
    group_noise_values,
    hawq_values,
    noise_values,
    random_values,
    uniform_order,
)
from ompq_plugin.methods.quant_error import (
    QuantRule,
    act_errors,
    many_weight_errors,
    weight_sq_error,
)

Pin = tuple[int | None, int | None]


def _groups(layers: tuple[AllocationLayer, ...]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, lay in enumerate(layers):
        groups.setdefault(lay.act_group, []).append(i)
    return groups


def _coefficients(n_layers: int, theta: Mapping[int, float]) -> list[float]:
    """Eq. 10 coefficients over the scored layers; layers outside (pinned) get 0."""
    scored = sorted(theta)
    coeff = [0.0] * n_layers
    for i, c in zip(scored, eq10_coefficients([theta[i] for i in scored]), strict=True):
        coeff[i] = c
    return coeff


def _weights(model: nn.Module, names: list[str]) -> list[torch.Tensor]:
    modules = dict(model.named_modules())
    return [modules[n].weight.detach() for n in names]


def build_problem(
    method: str,
    model: nn.Module,
    found: ModelLayers,
    layers: tuple[AllocationLayer, ...],
    budgets: Budgets,
    pins: Mapping[str, Pin],
    hw: HardwareProfile,
    *,
    theta: Mapping[int, float],
    act_errors: Mapping[str, Mapping[int, float]],
    labelled: tuple[torch.Tensor, torch.Tensor] | None,
    seed: int | None,
    samples: torch.Tensor | None = None,
    timings: dict[str, float],
    act_weight: float = DEFAULT_ACT_WEIGHT,
) -> AllocationProblem:
    """The integer program ``method`` solves (``uniform`` pins it further in ``solve_uniform``)."""
    n = len(layers)
    names = [lay.name for lay in layers]
    zeros = (0.0,) * n
    if method == "ompq":
        return AllocationProblem(layers, tuple(_coefficients(n, theta)), budgets, pins)
    if method in ("size-greedy", "uniform"):
        ones = {i: 1.0 for i in range(n) if names[i] not in pins or method == "uniform"}
        return AllocationProblem(layers, tuple(_coefficients(n, ones)), budgets, pins)
    if method == "random":
        w_val, a_val = random_values(
            [lay.weight_choices for lay in layers],
            _group_choices(layers),
            0 if seed is None else seed,
        )
        return AllocationProblem(layers, zeros, budgets, pins, None, tuple(w_val), a_val)
    rule = QuantRule(hw.power_of_two_scales, hw.per_channel_weights)
    start = time.perf_counter()
    if method == "ompq-noise":
        weights = folded_weights(model, names, found.graph if found.traced else None)
        errors = many_weight_errors(weights, [lay.weight_choices for lay in layers], rule)
        timings["weight_error_s"] = time.perf_counter() - start
        full = [theta.get(i, 1.0) for i in range(n)]
        a_err = [_act_errors_of(lay, act_errors, pins) for lay in layers]
        w_val = noise_values(full, errors)
        a_val = group_noise_values(_groups(layers), full, a_err, act_weight)
        return AllocationProblem(layers, zeros, budgets, pins, None, tuple(w_val), a_val)
    if method == "hawq":
        assert labelled is not None
        folded = folded_copy(model)
        weights = _weights(folded, names)
        images, labels = labelled
        tr = hawq.layer_traces(folded, names, images, labels, seed=0 if seed is None else seed)
        timings["hessian_s"] = tr.seconds
        timings["hessian_iterations"] = float(tr.iterations)
        sq = [
            {b: weight_sq_error(w, b, rule) for b in lay.weight_choices}
            for w, lay in zip(weights, layers, strict=True)
        ]
        w_val = hawq_values(tr.weight_traces, [w.numel() for w in weights], sq)
        a_val = _hawq_act_values(layers, tr, hw.power_of_two_scales)
        return AllocationProblem(layers, zeros, budgets, pins, None, tuple(w_val), a_val)
    if method == "measured":
        if samples is None:
            raise OmpqError("--method measured needs the search images")
        free_w = {
            lay.name: lay.weight_choices
            for lay in layers
            if pins.get(lay.name, (None, None))[0] is None and len(lay.weight_choices) > 1
        }
        choices = _group_choices(layers)
        free_a = {
            g: ([names[i] for i in members], choices[g])
            for g, members in _groups(layers).items()
            if len(choices[g]) > 1
            and all(pins.get(names[i], (None, None))[1] is None for i in members)
        }
        dist = measured.measure(model, samples, free_w, free_a, rule)
        timings["distortion_s"] = dist.seconds
        timings["distortion_forwards"] = float(dist.forwards)
        w_val = [
            {b: -d for b, d in dist.weights.get(lay.name, {}).items()}
            or dict.fromkeys(lay.weight_choices, 0.0)
            for lay in layers
        ]
        a_val = {
            g: {a: -d for a, d in dist.acts[g].items()} if g in dist.acts
            else dict.fromkeys(c, 0.0)
            for g, c in choices.items()
        }
        return AllocationProblem(layers, zeros, budgets, pins, None, tuple(w_val), a_val)
    raise OmpqError(f"unknown method {method!r}")


def with_fixed_layers(
    problem: AllocationProblem,
    fixed: tuple[FixedLayer, ...],
    excluded_pairs: tuple[tuple[int, int], ...] = (),
) -> AllocationProblem:
    """``problem`` with the convolutions ``quantize`` adds (see :mod:`ompq_plugin.fixed_layers`):
    each one a layer pinned at its weight width, right after the layer that reads the same input
    (same act group, so the same input width; never a (weight, act) pair in the target's
    ``excluded_pairs``), worth nothing in the objective: it only uses the budgets (memory,
    BOPs, buffer) as it will on the target."""
    if not fixed:
        return problem
    layers = list(problem.layers)
    coeff = list(problem.weight_coeff)
    values = list(problem.weight_value) if problem.weight_value is not None else None
    pins = dict(problem.pins)
    for extra in fixed:
        at = next(i for i, lay in enumerate(layers) if lay.name == extra.reader) + 1
        reader = layers[at - 1]
        layers.insert(at, AllocationLayer(
            name=extra.name, kind=FIXED_KIND, params=extra.params, macs=extra.macs,
            input_numel=extra.input_numel, act_group=reader.act_group,
            weight_choices=(extra.weight_bits,), act_choices=reader.act_choices,
            excluded_pairs=excluded_pairs,
        ))
        coeff.insert(at, 0.0)
        if values is not None:
            values.insert(at, {extra.weight_bits: 0.0})
        pins[extra.name] = (extra.weight_bits, None)
    return replace(
        problem, layers=tuple(layers), weight_coeff=tuple(coeff), pins=pins,
        weight_value=tuple(values) if values is not None else None,
    )


def _act_errors_of(
    lay: AllocationLayer, measured: Mapping[str, Mapping[int, float]], pins: Mapping[str, Pin]
) -> dict[int, float]:
    """A layer's measured input errors; zeros where its act width is fixed (nothing to choose)."""
    if lay.name in measured:
        return dict(measured[lay.name])
    if len(lay.act_choices) > 1 and pins.get(lay.name, (None, None))[1] is None:
        raise OmpqError(f"no input statistics were seen for layer {lay.name}")
    return dict.fromkeys(lay.act_choices, 0.0)


def _group_choices(layers: tuple[AllocationLayer, ...]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for lay in layers:
        have = out.get(lay.act_group)
        out[lay.act_group] = (
            lay.act_choices if have is None else tuple(sorted(set(have) | set(lay.act_choices)))
        )
    return out


def _hawq_act_values(
    layers: tuple[AllocationLayer, ...], tr: hawq.HawqTraces, power_of_two: bool
) -> dict[str, dict[int, float]]:
    """Per group: sum over its distinct input tensors of ``-(Tr H_x / n_x) ||Q_a(x) - x||^2``."""
    choices = _group_choices(layers)
    out: dict[str, dict[int, float]] = {g: dict.fromkeys(c, 0.0) for g, c in choices.items()}
    seen: dict[str, list[torch.Tensor]] = {}
    for i, lay in enumerate(layers):
        x = tr.inputs[i]
        if any(x is other for other in seen.setdefault(lay.act_group, [])):
            continue
        seen[lay.act_group].append(x)
        sq = act_errors(x, choices[lay.act_group], power_of_two, relative=False)
        mean_trace = max(tr.input_traces[i], 0.0) / max(x.numel(), 1)
        for a, e in sq.items():
            out[lay.act_group][a] -= mean_trace * e
    return out


def solve_uniform(
    problem: AllocationProblem, time_limit_s: float = 60.0, soft_pins: frozenset[str] = frozenset()
) -> Allocation:
    """The widest uniform (w, a) that meets every budget.

    Widths are tried widest first; for each, first with every pin, then with the ``soft_pins``
    (the default first/last-layer pins) set to the same width too, so that "uniform W3" at a
    3-bit average is all layers at 3 bits rather than W2 under 8-bit ends. A layer that cannot
    run the width takes its widest allowed width below it (or its narrowest one)."""
    start = time.perf_counter()
    last: InfeasibleBudgetError | None = None
    for w, a in uniform_order(
        sorted({b for lay in problem.layers for b in lay.weight_choices}),
        sorted({b for lay in problem.layers for b in lay.act_choices}),
    ):
        for release in (frozenset(), soft_pins):
            pins = {n: p for n, p in problem.pins.items() if n not in release}
            for lay in problem.layers:
                if lay.name not in pins:
                    pins[lay.name] = (_nearest(lay.weight_choices, w), _nearest(lay.act_choices, a))
            try:
                alloc = solve(
                    AllocationProblem(problem.layers, problem.weight_coeff, problem.budgets, pins),
                    time_limit_s=time_limit_s,
                )
            except InfeasibleBudgetError as exc:
                last = exc
                continue
            return replace(alloc, solve_s=time.perf_counter() - start, solver="uniform")
    raise last if last is not None else OmpqError("no layer to allocate")


def _nearest(choices: tuple[int, ...], width: int) -> int:
    below = [b for b in choices if b <= width]
    return max(below) if below else min(choices)
