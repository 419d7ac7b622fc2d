"""``measured``: each layer quantized alone, the output distortion against a direct computation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ompq_plugin.methods.measured import measure
from ompq_plugin.methods.quant_error import QuantRule, act_threshold, quantize_act, quantize_weight
from ompq_plugin.searcher import run_search

RULE = QuantRule(power_of_two=False, per_channel=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def test_weight_distortion_equals_the_direct_computation_and_leaves_the_model() -> None:
    model, x = _model(), torch.rand(8, 3, 8, 8)
    before = copy.deepcopy(model.state_dict())
    got = measure(model, x, {"2": (2, 4, 8)}, {}, RULE)
    assert got.forwards == 3 and set(got.weights) == {"2"} and got.acts == {}
    with torch.no_grad():
        ref = model(x)
        other = copy.deepcopy(model)
        other[2].weight.data = quantize_weight(other[2].weight, 4, RULE).float()
        direct = float(((other(x) - ref) ** 2).sum() / (ref**2).sum())
    assert got.weights["2"][4] == pytest.approx(direct, rel=1e-5)
    assert got.weights["2"][2] > got.weights["2"][4] > got.weights["2"][8] > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_act_distortion_quantizes_the_inputs_of_the_group() -> None:
    model, x = _model(), torch.rand(8, 3, 8, 8)
    got = measure(model, x, {}, {"g": (["4"], (3, 8))}, RULE)
    with torch.no_grad():
        ref = model(x)
        h = model[:4](x)
        q = quantize_act(h, 3, False, act_threshold(h, False), False)
        direct = float(((model[4:](q) - ref) ** 2).sum() / (ref**2).sum())
    assert got.acts["g"][3] == pytest.approx(direct, rel=1e-5)
    assert got.acts["g"][3] > got.acts["g"][8]


def test_a_batchnorm_is_folded_before_measuring() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    model[1].running_var.uniform_(0.01, 4.0)
    x = torch.rand(4, 3, 8, 8)
    got = measure(model, x, {"0": (3,)}, {}, RULE)
    from ompq_plugin.methods.folding import folded_copy

    folded = folded_copy(model)
    with torch.no_grad():
        ref = folded(x)
        folded.get_submodule("0").weight.data = quantize_weight(
            folded.get_submodule("0").weight, 3, RULE
        ).float()
        direct = float(((folded(x) - ref) ** 2).sum() / (ref**2).sum())
    assert got.weights["0"][3] == pytest.approx(direct, rel=1e-5)


def test_measured_search_meets_the_budget_with_one_pass_per_free_option() -> None:
    model, x = _model(), torch.rand(16, 3, 8, 8)
    fixed = run_search(model, x, "generic", method="measured", avg_weight_bits=4, act_bits=(8,))
    assert fixed.config.method == "measured" and fixed.config.average_weight_bits <= 4
    assert fixed.config.timings["distortion_forwards"] == 2 * 7  # 2 free layers x widths 2..8
    free = run_search(model, x, "generic", method="measured", avg_weight_bits=4,
                      act_bits=(4, 8))
    assert free.config.timings["distortion_forwards"] == 2 * 7 + 2 * 2  # + 2 act groups x 2
