"""The shortcut convolutions `quantize` adds are counted in the search's budgets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from ompq_plugin.hw_profiles import load_profile
from torch import nn

from ompq_plugin.allocate import AllocationLayer, AllocationProblem, solve, usage
from ompq_plugin.bitconfig import BitConfig, LayerBits
from ompq_plugin.budgets import Budgets
from ompq_plugin.fixed_layers import (
    POOL_WEIGHT_BITS,
    FixedLayer,
    FixedLayers,
    added_layers,
    fixed_layers,
    hls4ml_pool_layers,
    shortcut_weight_bits,
)
from ompq_plugin.layers import discover_layers
from ompq_plugin.methods.build import with_fixed_layers
from ompq_plugin.models.cifar_resnet import resnet20
from ompq_plugin.searcher import run_search


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return resnet20().eval()  # random weights: only the structure counts here


def test_resnet20_has_two_fixed_shortcut_convs(net):
    found = discover_layers(net, torch.randn(1, 3, 32, 32))
    fixed = fixed_layers(net, found, 2)
    assert fixed.uncounted == ()
    first, second = fixed.layers
    group = {layer.name: layer.act_group for layer in found.layers}
    # 16 -> 32 channels on 32x32 inputs (16x16 out); 32 -> 64 on 16x16 (8x8 out)
    assert first == FixedLayer("layer2.0.shortcut", 16 * 32, 16 * 32 * 16 * 16, 16 * 32 * 32,
                               2, "layer2.0.conv1", group["layer2.0.conv1"])
    assert second == FixedLayer("layer3.0.shortcut", 32 * 64, 32 * 64 * 8 * 8, 32 * 16 * 16,
                                2, "layer3.0.conv1", group["layer3.0.conv1"])
    assert first.layer_bits(6) == LayerBits("layer2.0.shortcut", "fixed", 2, 6, 16 * 32,
                                            16 * 32 * 16 * 16, 16 * 32 * 32,
                                            group["layer2.0.conv1"])


def test_no_shortcut_or_no_trace_gives_nothing(net):
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    assert fixed_layers(plain, discover_layers(plain, torch.randn(1, 3, 32, 32)), 2).layers == ()
    found = discover_layers(net, torch.randn(1, 3, 32, 32))
    untraced = dataclasses.replace(found, traced=False, graph=None)
    assert fixed_layers(net, untraced, 2).layers == ()


def _problem(budgets: Budgets) -> AllocationProblem:
    layers = tuple(
        AllocationLayer(name, "conv", params, macs, 10, group, (2, 4, 8), (4, 8))
        for name, params, macs, group in (
            ("a", 100, 1000, "g0"), ("b", 100, 1000, "g1"), ("c", 100, 1000, "g1"),
        )
    )
    return AllocationProblem(layers, (1.0, 2.0, 3.0), budgets)


def test_fixed_layer_takes_its_readers_act_width_and_uses_the_budgets():
    extra = FixedLayer("b_short", 50, 4000, 10, 2, "b", "g1")
    free = with_fixed_layers(_problem(Budgets()), (extra,))
    assert [lay.name for lay in free.layers] == ["a", "b", "b_short", "c"]
    assert free.pins["b_short"] == (2, None) and free.weight_coeff[2] == 0.0
    widest = solve(free)
    assert widest.weight_bits["b_short"] == 2
    assert widest.act_bits["b_short"] == widest.act_bits["b"] == 8
    # at the widest answer's exact BOPs the fixed layer fits; one BOP less and it does not
    wbits, abits = widest.weight_bits, widest.act_bits
    bops = usage(free, wbits, abits)[1]
    assert bops == 3 * 1000 * 8 * 8 + 4000 * 2 * 8
    at = solve(with_fixed_layers(_problem(Budgets(bops=bops)), (extra,)))
    assert (at.weight_bits, at.act_bits) == (wbits, abits)
    below = solve(with_fixed_layers(_problem(Budgets(bops=bops - 1)), (extra,)))
    assert below.weight_bits != wbits or below.act_bits != abits
    assert usage(free, below.weight_bits, below.act_bits)[1] <= bops - 1


@pytest.mark.parametrize("method", ["ompq-noise", "ompq", "uniform"])
def test_search_totals_count_the_fixed_convs_within_the_budget(net, method):
    x = torch.randn(8, 3, 32, 32)
    free = run_search(net, x, "generic", method=method).config
    fixed_bops = sum(lb.bops for lb in free.fixed_layers)
    assert [lb.name for lb in free.fixed_layers] == ["layer2.0.shortcut", "layer3.0.shortcut"]
    assert fixed_bops > 0
    budget = 0.6 * free.totals.bops
    config = run_search(net, x, "generic", Budgets(bops=budget), method=method).config
    assert config.totals.bops <= budget
    assert config.totals.bops == sum(lb.bops for lb in [*config.layers, *config.fixed_layers])
    groups = {lb.name: lb.act_bits for lb in config.layers}
    for lb in config.fixed_layers:
        assert lb.weight_bits == 2  # the generic profile's narrowest
        assert lb.act_bits == groups[lb.name.replace("shortcut", "conv1")]
    again = BitConfig.from_json(config.to_json())
    assert again.fixed_layers == config.fixed_layers and again.totals == config.totals


def test_bitconfig_without_fixed_layers_still_loads(net):
    config = run_search(net, torch.randn(8, 3, 32, 32), "generic").config
    data = config.to_json()
    del data["fixed_layers"]
    data["totals"] = None
    old = BitConfig.from_json(data)
    assert old.fixed_layers == [] and old.layers == config.layers


def test_shortcut_whose_input_no_layer_reads_is_named_not_counted():
    from ompq_plugin.models.cifar_resnet import ShortcutA

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), ShortcutA(4, 8),
                          nn.Conv2d(8, 2, 1), nn.Flatten(), nn.Linear(2 * 16 * 16, 3)).eval()
    found = discover_layers(model, torch.randn(1, 3, 32, 32))
    assert fixed_layers(model, found, 2) == FixedLayers((), ("2",))
    with pytest.warns(UserWarning, match="2: `ompq quantize` turns this shortcut"):
        config = run_search(model, torch.randn(4, 3, 32, 32), "generic").config
    assert config.fixed_layers == []


@pytest.mark.parametrize(("profile", "width"), [("generic", 2), ("hls4ml", 2), ("finn", 2),
                                                ("cmsis-nn", 4), ("tensorrt", 8)])
def test_shortcut_width_is_the_targets_narrowest_and_quantize_builds_it(net, profile, width):
    from ompq_plugin.quantizer import quantize

    hw = load_profile(profile)
    assert shortcut_weight_bits(hw) == width
    config = run_search(net, torch.randn(8, 3, 32, 32), hw).config
    assert {lb.weight_bits for lb in config.fixed_layers} == {width}
    for lb in config.fixed_layers:  # never a pair the target cannot run (CMSIS-NN: no 4/16)
        assert hw.pair_allowed(lb.weight_bits, lb.act_bits)
    report = quantize(net, config, hw).ompq_report
    shortcuts = [lb.name for lb in config.fixed_layers if lb.name.endswith("shortcut")]
    assert shortcuts == report.fixed_layers == ["layer2.0.shortcut", "layer3.0.shortcut"]
    assert {report.weight_bits[name] for name in shortcuts} == {width}


def test_quantize_names_fixed_convs_an_older_bitconfig_does_not_count(net):
    from ompq_plugin.quantizer import quantize

    config = run_search(net, torch.randn(8, 3, 32, 32), "generic").config
    assert quantize(net, config, load_profile("generic")).ompq_report.uncounted_fixed == []
    older = dataclasses.replace(config, fixed_layers=[])  # as written before they were counted
    report = quantize(net, older, load_profile("generic")).ompq_report
    assert report.uncounted_fixed == ["layer2.0.shortcut", "layer3.0.shortcut"]
    assert report.weight_bits["layer2.0.shortcut"] == 2  # the target's narrowest, as counted now
    assert any("does not count the frozen shortcut convs layer2.0.shortcut, layer3.0.shortcut"
               in line for line in report.notes())


def test_hls4ml_pool_conv_is_counted_on_the_hls4ml_profile_only(net):
    found = discover_layers(net, torch.randn(1, 3, 32, 32))
    group = {layer.name: layer.act_group for layer in found.layers}
    pool = FixedLayer("pool", 64 * 8 * 8, 64 * 8 * 8, 64 * 8 * 8, POOL_WEIGHT_BITS, "linear",
                      group["linear"])
    assert hls4ml_pool_layers(net, found, "hls4ml") == FixedLayers((pool,))
    for target in ("generic", "finn", "tensorrt"):
        assert hls4ml_pool_layers(net, found, target) == FixedLayers()
    both = added_layers(net, found, load_profile("hls4ml"))
    assert [f.name for f in both.layers] == ["layer2.0.shortcut", "layer3.0.shortcut", "pool"]
    assert [f.name for f in added_layers(net, found, load_profile("finn")).layers] == [
        "layer2.0.shortcut", "layer3.0.shortcut"]


class _FunctionalPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, (1, 1)), 1))


@pytest.mark.parametrize(("side", "counted"), [(8, True), (6, False)])  # 64 / 36 pixels
def test_functional_global_pool_over_power_of_two_pixels_is_counted(side, counted):
    model = _FunctionalPool().eval()
    found = discover_layers(model, torch.randn(1, 3, side, side))
    pools = hls4ml_pool_layers(model, found, "hls4ml")
    assert [(f.params, f.reader) for f in pools.layers] == ([(4 * 64, "fc")] if counted else [])


def test_pool_whose_input_size_the_search_cannot_tell_is_named_not_counted():
    class Summed(_FunctionalPool):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.conv(x))
            pooled = torch.nn.functional.adaptive_avg_pool2d(y + y.flip(2), 1)
            return self.fc(torch.flatten(pooled, 1))

    model = Summed().eval()  # pools y + flip(y): no layer's feature, so no known shape
    found = discover_layers(model, torch.randn(1, 3, 8, 8))
    assert hls4ml_pool_layers(model, found, "hls4ml") == FixedLayers(
        uncounted_pools=("adaptive_avg_pool2d",))
    with pytest.warns(UserWarning, match="adaptive_avg_pool2d: the hls4ml export turns"):
        run_search(model, torch.randn(4, 3, 8, 8), "hls4ml")


def test_hls4ml_search_keeps_the_file_within_the_memory_budget(net):
    x = torch.randn(8, 3, 32, 32)
    hw = load_profile("hls4ml")
    free = run_search(net, x, hw).config
    assert [lb.name for lb in free.fixed_layers][-1] == "pool"
    budget = 0.7 * free.totals.weight_memory_bits
    config = run_search(net, x, hw, Budgets(weight_memory_bits=budget)).config
    pool = config.fixed_layers[-1]
    assert pool.weight_memory_bits == 64 * 8 * 8 * POOL_WEIGHT_BITS
    assert pool.act_bits == config.by_name()["linear"].act_bits
    assert config.totals.weight_memory_bits <= budget
    assert config.totals.weight_memory_bits == sum(
        lb.weight_memory_bits for lb in [*config.layers, *config.fixed_layers])
