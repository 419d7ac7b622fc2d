"""The search's activation statistics and folded weights: the fast paths against the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ompq_plugin.methods import act_stats
from ompq_plugin.methods.act_stats import SAMPLE, input_errors, percentile_threshold
from ompq_plugin.methods.folding import folded_copy, folded_weights
from ompq_plugin.methods.quant_error import act_errors, act_threshold

WIDTHS = range(2, 9)


def _inputs(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    return {"relu": torch.relu(x), "signed": x, "heavy": torch.relu(x) ** 3}


@pytest.mark.parametrize("po2", [False, True])
def test_small_tensors_are_scored_exactly(po2: bool) -> None:
    for x in _inputs(SAMPLE // 2, 0).values():
        got, ref = input_errors(x, WIDTHS, po2), act_errors(x, WIDTHS, po2)
        for b in WIDTHS:
            assert got[b] == pytest.approx(ref[b], rel=1e-4)


@pytest.mark.parametrize("po2", [False, True])
def test_large_tensors_are_estimated_within_five_percent(po2: bool) -> None:
    for name, x in _inputs(64 * 16 * 32 * 32, 1).items():
        x = x.reshape(64, 16, 32, 32)
        got, ref = input_errors(x, WIDTHS, po2), act_errors(x, WIDTHS, po2)
        assert got == input_errors(x, WIDTHS, po2)  # deterministic
        for b in WIDTHS:
            assert got[b] == pytest.approx(ref[b], rel=0.05), (name, b)


def test_threshold_search_matches_a_full_selection() -> None:
    for x in _inputs(1 << 20, 2).values():
        mag = x.abs()
        assert percentile_threshold(mag) == act_threshold(mag, signed=True)


def test_non_finite_input_is_an_error() -> None:
    x = torch.ones(10)
    x[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        input_errors(x, WIDTHS, False)


def test_a_tensor_read_by_two_layers_is_scored_once(monkeypatch: pytest.MonkeyPatch) -> None:
    class TwoReaders(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            x.mul_(2)  # the second reader sees a modified tensor: it must be scored again
            return y + self.b(x) + self.a.weight.sum() * 0

    calls = []
    real = act_stats._capture  # what the hook runs on each tensor it scores
    monkeypatch.setattr(act_stats, "_capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = TwoReaders()
    with act_stats.record(model, {"a": [4, 8], "b": [4, 8]}, False) as stats, torch.no_grad():
        model(torch.rand(2, 3, 4, 4))
    assert len(calls) == 2 and set(stats.errors) == {"a", "b"}
    calls.clear()

    class Shared(TwoReaders):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    model = Shared()
    with act_stats.record(model, {"a": [4, 8], "b": [4, 8]}, False) as stats, torch.no_grad():
        model(torch.rand(2, 3, 4, 4))
    assert len(calls) == 1 and stats.errors["a"] == stats.errors["b"]


def test_folded_weights_equal_those_of_the_folded_copy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        nn.Flatten(),
        nn.Linear(4 * 36, 5),
        nn.BatchNorm1d(5),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
    model.eval()
    names = ["0", "3", "5"]
    folded = dict(folded_copy(model).named_modules())
    got = folded_weights(model, names)
    for name, w in zip(names, got, strict=True):
        torch.testing.assert_close(w, folded[name].weight.detach(), rtol=0, atol=0)
    assert torch.equal(got[1], model[3].weight)  # no BatchNorm after it: unchanged
    assert not torch.equal(got[0], model[0].weight)


@pytest.mark.parametrize("po2", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_errors_at_every_width_equal_the_one_width_reference(
    po2: bool, per_channel: bool
) -> None:
    from ompq_plugin.methods.quant_error import QuantRule, weight_error, weight_errors

    rule = QuantRule(po2, per_channel)
    for w in (torch.randn(8, 4, 3, 3), torch.randn(5, 7), torch.zeros(3, 2)):
        got = weight_errors(w, WIDTHS, rule)
        for b in WIDTHS:
            assert got[b] == pytest.approx(weight_error(w, b, rule), rel=1e-5, abs=0)


@pytest.mark.parametrize("po2", [False, True])
def test_the_errors_of_two_parts_at_every_width_equal_the_reference(po2: bool) -> None:
    from ompq_plugin.methods.quant_error import quantize_act

    g = torch.Generator().manual_seed(3)
    top, rest = torch.randn(37, generator=g) * 4, torch.randn(1000, generator=g)
    thr = 3.0
    ranges = [act_stats._range(b, True, thr, po2) for b in WIDTHS]
    got = act_stats._rows_sq_errors([top, rest], [ranges, ranges])
    for part, row in zip((top, rest), got, strict=True):
        for b, value in zip(WIDTHS, row, strict=True):
            ref = float(((quantize_act(part, b, True, thr, po2) - part) ** 2).sum())
            assert value == pytest.approx(ref, rel=1e-5)


def test_a_non_finite_input_is_reported_not_scored() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Conv2d(2, 2, 1))
    with torch.no_grad():
        model[0].bias[0] = float("inf")
    with act_stats.record(model, {"0": [4, 8], "1": [4, 8]}, False) as stats, torch.no_grad():
        model(torch.rand(2, 3, 4, 4))
    assert stats.non_finite == "1" and set(stats.errors) == {"0"}


def test_weight_errors_in_blocks_of_a_few_widths_equal_all_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ompq_plugin.methods import quant_error
    from ompq_plugin.methods.quant_error import QuantRule, weight_errors

    w = torch.randn(8, 4, 3, 3)
    for rule in (QuantRule(False, True), QuantRule(True, False)):
        whole = weight_errors(w, WIDTHS, rule)
        monkeypatch.setattr(quant_error, "_BLOCK_ELEMENTS", 3 * w.numel())  # 3 widths a block
        assert weight_errors(w, WIDTHS, rule) == pytest.approx(whole, rel=1e-12, abs=0)
        monkeypatch.undo()


@pytest.mark.parametrize("po2", [False, True])
def test_same_shape_weights_scored_together_equal_one_at_a_time(
    po2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ompq_plugin.methods import quant_error
    from ompq_plugin.methods.quant_error import QuantRule, many_weight_errors, weight_error

    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(6, 3, 3, 3, generator=g) * s for s in (1.0, 0.01, 30.0)]
    weights += [torch.zeros(6, 3, 3, 3), torch.randn(4, 5, generator=g)]
    bits = [WIDTHS, WIDTHS, (2, 4), WIDTHS, WIDTHS]
    rule = QuantRule(po2, per_channel=True)
    together = many_weight_errors(weights, bits, rule)
    monkeypatch.setattr(quant_error, "_BLOCK_ELEMENTS", 2 * weights[0].numel())  # 1 layer, 2 widths
    apart = many_weight_errors(weights, bits, rule)
    for w, widths, a, b in zip(weights, bits, together, apart, strict=True):
        assert set(a) == set(widths) and a == pytest.approx(b, rel=1e-12, abs=0)
        for width in widths:
            assert a[width] == pytest.approx(weight_error(w, width, rule), rel=1e-5, abs=0)


def test_errors_scored_together_equal_those_scored_one_by_one() -> None:
    inputs = [*_inputs(SAMPLE // 4, 7).values(), *_inputs(3 * SAMPLE, 8).values()]
    inputs += [torch.zeros(100), torch.full((50,), 2.0)]
    for po2 in (False, True):
        prepared = [act_stats.prepare_input(x, WIDTHS, po2) for x in inputs]
        prepared.append(act_stats.prepare_input(inputs[0], (4, 8), po2))  # fewer widths
        together = act_stats.score(prepared)
        for p, got in zip(prepared, together, strict=True):
            assert got == pytest.approx(act_stats.score([p])[0], rel=1e-6, abs=1e-12)
        assert together[-1] == pytest.approx({b: together[0][b] for b in (4, 8)}, rel=1e-6)


def test_a_small_input_changed_in_place_after_its_layer_is_scored_as_the_layer_saw_it() -> None:
    class ChangesItsInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            x.mul_(0)
            return y

    x = torch.rand(2, 3, 4, 4)
    expected = input_errors(x, [4, 8], False)
    model = ChangesItsInput()
    with act_stats.record(model, {"a": [4, 8]}, False) as stats, torch.no_grad():
        model(x)
    assert float(x.abs().sum()) == 0.0 and stats.errors["a"] == pytest.approx(expected)


def test_a_relu_output_scored_as_nonnegative_gives_the_same_errors() -> None:
    for x in (torch.relu(torch.randn(64, 16, 32, 32)), torch.relu(torch.randn(300))):
        for po2 in (False, True):
            plain = act_stats.score([act_stats.prepare_input(x, WIDTHS, po2)])[0]
            known = act_stats.score([act_stats.prepare_input(x, WIDTHS, po2, nonnegative=True)])
            assert known[0] == plain


def test_layers_fed_by_a_relu_are_found_in_the_trace() -> None:
    from ompq_plugin.layers import relu_fed_layers

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
            self.c, self.relu = nn.Conv2d(4, 4, 1), nn.ReLU()
            self.d = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.b(self.relu(self.a(x)))
            y = self.c(torch.relu(y) - 1)  # not a ReLU's output
            return self.d(torch.flatten(y, 1)[:, :4].relu())

    model = Net()
    assert relu_fed_layers(model, torch.fx.Tracer().trace(model)) == {"b", "d"}
