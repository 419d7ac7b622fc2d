"""``measured``: each layer quantized alone at each width, the output's distortion measured.

Sony MCT's sensitivity measurement as a baseline for the ORM methods: on the N search images,
the model's output with one layer's weights quantized at ``b`` bits (the profile's own rule, as
:mod:`ompq_plugin.methods.quant_error` emulates it; BatchNorm folded first, as ``quantize`` does)
against the float output, ``D_i(b) = ||f_q(x) - f(x)||^2 / ||f(x)||^2``; the same for each act
group with the inputs of its layers quantized at ``a`` bits (per-tensor, the calibration
threshold of those very inputs). The solver maximises ``-sum_i D_i(w_i) - sum_g D_g(a_g)``: the
distortions are taken as adding up, which is the one modelling assumption.

Cost: one forward pass of the N images per (free layer, width) and per (free act group, width):
``sum_i |W_i| + sum_g |A_g|`` passes (126 for ResNet-20 with 7 weight widths and fixed
activations), against one pass for ``ompq-noise``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ompq_plugin.errors import OmpqError
from ompq_plugin.methods.folding import folded_copy
from ompq_plugin.methods.quant_error import QuantRule, act_threshold, quantize_act, quantize_weight

Values = dict[int, float]


@dataclass(frozen=True)
class Distortions:
    """Output distortion per free layer and width, per free act group and width."""

    weights: dict[str, Values]
    acts: dict[str, Values]
    forwards: int
    seconds: float


def _flat_output(out: object) -> torch.Tensor:
    leaves = [
        t.detach().float().reshape(-1)
        for t in torch.utils._pytree.tree_leaves(out)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    if not leaves:
        raise OmpqError("measured: the model's output has no floating-point tensor to compare")
    return torch.cat(leaves)


def _distortion(out: object, reference: torch.Tensor, energy: float) -> float:
    diff = _flat_output(out) - reference
    return float(torch.dot(diff, diff)) / energy


def measure(
    model: nn.Module,
    samples: torch.Tensor,
    weight_widths: Mapping[str, Sequence[int]],
    act_groups: Mapping[str, tuple[Sequence[str], Sequence[int]]],
    rule: QuantRule,
) -> Distortions:
    """Distortions of the layers in ``weight_widths`` (layer -> widths) and of the act groups in
    ``act_groups`` (group -> (its layers, widths)). ``model`` is left unchanged."""
    start = time.perf_counter()
    folded = folded_copy(model)
    modules = dict(folded.named_modules())
    missing = [n for n in [*weight_widths, *(m for ls, _ in act_groups.values() for m in ls)]
               if n not in modules]
    if missing:
        raise OmpqError(f"measured: layers {missing[:3]} are not modules of the model")
    was_training = folded.training  # folded_copy may hand back the model itself
    folded.eval()
    try:
        return _measure(folded, modules, samples, weight_widths, act_groups, rule, start)
    finally:
        folded.train(was_training)


def _measure(
    folded: nn.Module,
    modules: Mapping[str, nn.Module],
    samples: torch.Tensor,
    weight_widths: Mapping[str, Sequence[int]],
    act_groups: Mapping[str, tuple[Sequence[str], Sequence[int]]],
    rule: QuantRule,
    start: float,
) -> Distortions:
    forwards = 0
    with torch.no_grad():
        reference = _flat_output(folded(samples))
        energy = float(torch.dot(reference, reference))
        if energy == 0.0:
            raise OmpqError("measured: the model's output is all zero on the search samples")
        weights: dict[str, Values] = {}
        for name, widths in weight_widths.items():
            param = modules[name].weight
            original = param.data
            weights[name] = {}
            try:
                for b in widths:
                    param.data = quantize_weight(original, b, rule).to(original.dtype)
                    weights[name][b] = _distortion(folded(samples), reference, energy)
                    forwards += 1
            finally:
                param.data = original
        acts: dict[str, Values] = {}
        for group, (members, widths) in act_groups.items():
            acts[group] = {}
            for a in widths:
                handles = [
                    modules[m].register_forward_pre_hook(_quantize_input(a, rule.power_of_two))
                    for m in members
                ]
                try:
                    acts[group][a] = _distortion(folded(samples), reference, energy)
                finally:
                    for h in handles:
                        h.remove()
                forwards += 1
    return Distortions(weights, acts, forwards, time.perf_counter() - start)


def _quantize_input(bits: int, power_of_two: bool):  # noqa: ANN202 - a forward pre-hook
    def hook(_module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...] | None:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        signed = bool((x < 0).any())
        thr = act_threshold(x, signed)
        return (quantize_act(x, bits, signed, thr, power_of_two).to(x.dtype), *args[1:])

    return hook
