"""Allocation methods: the pure maths (no model), then the methods on a tiny model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from ompq_plugin.allocate import AllocationLayer, AllocationProblem, solve, usage
from ompq_plugin.budgets import Budgets
from ompq_plugin.methods.hawq import hutchinson_traces, layer_traces
from ompq_plugin.methods.objectives import (
    group_noise_values,
    hawq_values,
    noise_values,
    random_values,
    range_ends,
    uniform_order,
)
from ompq_plugin.methods.quant_error import (
    QuantRule,
    act_errors,
    quantize_act,
    quantize_weight,
    weight_error,
)

RULES = [QuantRule(po2, pc) for po2 in (False, True) for pc in (False, True)]


# --- quantization error ----------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_weight_quantizer_matches_brevitas(rule: QuantRule, bits: int) -> None:
    """Our emulation of the profile's weight quantizer = Brevitas' own quant_weight()."""
    from ompq_plugin.hw_profiles.profile import HardwareProfile

    from ompq_plugin.quantizer import _quant_layer, _quantizers

    torch.manual_seed(bits)
    conv = nn.Conv2d(4, 6, 3)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(6, 1, 1, 1) * 4)
    profile = HardwareProfile.__new__(HardwareProfile)
    object.__setattr__(profile, "power_of_two_scales", rule.power_of_two)
    object.__setattr__(profile, "per_channel_weights", rule.per_channel)
    q = _quant_layer(conv, bits, _quantizers(profile), fixed=False)
    theirs = q.quant_weight().value.detach().double()
    ours = quantize_weight(conv.weight, bits, rule)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_weight_error_direct_computation() -> None:
    w = torch.tensor([[0.9, -0.3], [0.2, 0.1]])
    rule = QuantRule(power_of_two=False, per_channel=False)
    # per tensor, 2 bits: scale = 0.9 / 1, levels {-0.9, 0, 0.9}
    q = torch.tensor([[0.9, 0.0], [0.0, 0.0]])
    expected = float(((q - w) ** 2).sum() / (w**2).sum())
    assert weight_error(w, 2, rule) == pytest.approx(expected)
    # per channel, 3 bits: row 0 scale 0.3 (exact), row 1 scale 0.2/3 -> 0.2, 0.0667*2
    rule_c = QuantRule(power_of_two=False, per_channel=True)
    q1 = torch.tensor([[0.9, -0.3], [0.2, 2 * 0.2 / 3]])
    assert weight_error(w, 3, rule_c) == pytest.approx(float(((q1 - w) ** 2).sum() / (w**2).sum()))
    errs = [weight_error(torch.randn(64, 32), b, rule_c) for b in range(2, 9)]
    assert all(a > b for a, b in itertools.pairwise(errs))  # more bits, less error
    assert errs[-1] < 1e-3


@pytest.mark.parametrize("po2", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_act_quantizer_matches_brevitas_calibration(po2: bool, signed: bool) -> None:
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.nn import QuantIdentity
    from brevitas.quant import (
        Int8ActPerTensorFixedPoint,
        Int8ActPerTensorFloat,
        Uint8ActPerTensorFixedPoint,
        Uint8ActPerTensorFloat,
    )

    quant = {
        (False, True): Int8ActPerTensorFloat,
        (False, False): Uint8ActPerTensorFloat,
        (True, True): Int8ActPerTensorFixedPoint,
        (True, False): Uint8ActPerTensorFixedPoint,
    }
    torch.manual_seed(1)
    x = torch.randn(8, 16, 6, 6) * 1.7
    if not signed:
        x = x.relu()
    for bits in (3, 6):
        qi = QuantIdentity(act_quant=quant[po2, signed], bit_width=bits).eval()
        with torch.no_grad(), calibration_mode(qi):
            qi(x)
        theirs = qi(x).detach()
        from ompq_plugin.methods.quant_error import act_threshold

        ours = quantize_act(x, bits, signed, act_threshold(x, signed), po2)
        assert (ours.float() - theirs).abs().max() <= 1e-4 * float(x.abs().max())
    errs = act_errors(x, [2, 4, 8], po2)
    assert errs[2] > errs[4] > errs[8] > 0


# --- objectives ------------------------------------------------------------------------------


def test_noise_and_hawq_values_by_hand() -> None:
    errors = [{2: 0.5, 4: 0.1}, {2: 0.2, 4: 0.05}]
    assert noise_values([1.0, 0.5], errors) == [{2: -0.5, 4: -0.1}, {2: -0.1, 4: -0.025}]
    act_err = [{8: 0.01, 4: 0.2}, {8: 0.02, 4: 0.4}]
    groups = group_noise_values({"g": [0, 1]}, [1.0, 0.5], act_err)
    assert groups["g"] == pytest.approx({8: -0.02, 4: -0.4})
    heavier = group_noise_values({"g": [0, 1]}, [1.0, 0.5], act_err, 3)
    assert heavier["g"] == pytest.approx({8: -0.06, 4: -1.2})
    # HAWQ-V3: -(Tr/n) * ||Q(W)-W||^2
    assert hawq_values([6.0], [3], [{2: 0.5, 8: 0.01}]) == [{2: -1.0, 8: -0.02}]


def test_uniform_order_and_range_ends() -> None:
    order = uniform_order([2, 4, 8], [4, 8])
    assert order[0] == (8, 8) and order.index((4, 8)) < order.index((8, 4)) < order.index((2, 8))
    ends = range_ends(
        {"a": 2, "b": 5, "c": 8, "d": 8}, {"a": (2, 8), "b": (2, 8), "c": (2, 8), "d": (8,)}
    )
    assert ends == {"a": "min", "c": "max"}


def _toy_layers() -> tuple[AllocationLayer, ...]:
    specs = [("a", 100, 1000), ("b", 400, 2000), ("c", 1600, 3000), ("d", 50, 500)]
    return tuple(
        AllocationLayer(n, "conv", p, m, 64, f"g{i}", (2, 3, 4, 8), (4, 8))
        for i, (n, p, m) in enumerate(specs)
    )


def test_random_configurations_always_feasible() -> None:
    layers = _toy_layers()
    params = sum(lay.params for lay in layers)
    budgets = Budgets(weight_memory_bits=3 * params, bops=4 * 6 * sum(lay.macs for lay in layers))
    seen = set()
    for seed in range(40):
        w_val, a_val = random_values(
            [lay.weight_choices for lay in layers],
            {lay.act_group: lay.act_choices for lay in layers},
            seed,
        )
        problem = AllocationProblem(layers, (0.0,) * 4, budgets, {}, None, tuple(w_val), a_val)
        alloc = solve(problem)
        mem, bops, _ = usage(problem, alloc.weight_bits, alloc.act_bits)
        assert mem <= budgets.weight_memory_bits and bops <= budgets.bops
        seen.add(tuple(alloc.weight_bits.values()))
    assert len(seen) > 5  # it is random


def test_size_greedy_and_uniform_by_hand() -> None:
    from ompq_plugin.methods.build import solve_uniform

    layers = _toy_layers()
    params = sum(lay.params for lay in layers)  # 2150
    budgets = Budgets(weight_memory_bits=3.5 * params)  # 7525 bits
    problem = AllocationProblem(layers, (1.0,) * 4, budgets, {}, {f"g{i}": 0.0 for i in range(4)})
    # uniform: 4 bits cost 8600 > 7525, 3 bits 6450 fits -> W3 everywhere, acts 8
    uni = solve_uniform(problem)
    assert set(uni.weight_bits.values()) == {3} and set(uni.act_bits.values()) == {8}
    # size-greedy (theta = 1: maximise the sum of bits): by hand, the big layer c at 2 bits
    # (3200) leaves 4325 for a, b, d: a=8 (800), d=8 (400), b=8 (3200) -> 7600 > 7525, so b=4
    # (1600) + a=8 + d=8 = 2800 + 3200 = 6000; b=7 is not offered; b=4 -> sum 8+4+2+8 = 22
    greedy = solve(problem)
    assert greedy.weight_bits == {"a": 8, "b": 4, "c": 2, "d": 8}


def test_heavier_activation_weight_never_adds_activation_error() -> None:
    """W + l*A minimised at l2 > l1 has A(x2) <= A(x1) (add the two optimality inequalities);
    at a BOPs budget the solver moves bits from weights to activations as l grows."""
    layers = _toy_layers()
    w_err = [{b: 4.0**-b * (1 + i) for b in lay.weight_choices} for i, lay in enumerate(layers)]
    a_err = [{a: 4.0**-a * (2 + i) for a in lay.act_choices} for i, lay in enumerate(layers)]
    groups = {lay.act_group: [i] for i, lay in enumerate(layers)}
    budgets = Budgets(bops=4 * 6 * sum(lay.macs for lay in layers))
    act_error, act_bits = [], []
    for weight in (0.25, 1.0, 4.0, 16.0, 64.0):
        a_val = group_noise_values(groups, [1.0] * 4, a_err, weight)
        problem = AllocationProblem(
            layers, (0.0,) * 4, budgets, {}, None, tuple(noise_values([1.0] * 4, w_err)), a_val
        )
        alloc = solve(problem)
        act_error.append(sum(a_err[i][alloc.act_bits[lay.name]] for i, lay in enumerate(layers)))
        act_bits.append(sum(alloc.act_bits.values()))
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(act_error)), act_error
    assert act_bits[-1] > act_bits[0], act_bits


# --- HAWQ ------------------------------------------------------------------------------------


def test_hutchinson_trace_on_known_quadratic() -> None:
    torch.manual_seed(0)
    a = torch.randn(6, 6)
    h1 = a @ a.T + torch.eye(6)  # block 1: 6 x 6
    h2 = torch.diag(torch.tensor([2.0, -1.0, 5.0]))  # block 2: 3 x 3
    x1 = torch.randn(6, requires_grad=True)
    x2 = torch.randn(3, requires_grad=True)
    loss = 0.5 * x1 @ h1 @ x1 + 0.5 * x2 @ h2 @ x2 + (x1[:3] * x2).sum()  # coupled off-diagonal
    grads = torch.autograd.grad(loss, [x1, x2], create_graph=True)

    def hvp(vs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(torch.autograd.grad(grads, [x1, x2], grad_outputs=vs, retain_graph=True))

    result = hutchinson_traces(hvp, [x1.shape, x2.shape], max_iter=100, tol=0.0, seed=0)
    assert result.iterations == 100
    # block 2 is diagonal, so v^T H v is its trace plus the coupling term v2 . v1[:3] (mean 0)
    assert result.traces[1] == pytest.approx(6.0, abs=0.6)
    assert result.traces[0] == pytest.approx(float(torch.trace(h1)), rel=0.15)


def test_layer_traces_on_tiny_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    tr = layer_traces(model, ["0", "3"], x, y, max_iter=30)
    assert len(tr.weight_traces) == 2 and all(t > 0 for t in tr.weight_traces)
    assert tr.inputs[0].shape == x.shape and tr.inputs[1].shape == (16, 144)
    assert 1 <= tr.iterations <= 30
    assert not any(p.grad is not None for p in model.parameters())
    assert math.isfinite(sum(tr.input_traces))
