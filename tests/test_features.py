"""Streaming features into Grams: same numbers as materialising every feature."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ompq_plugin import features
from ompq_plugin.errors import OmpqError
from ompq_plugin.features import collect_grams, streamed_gram
from ompq_plugin.layers import discover_layers


def test_chunked_gram_equals_direct_product(monkeypatch):
    y = torch.randn(6, 4, 7, 7)
    flat = y.reshape(6, -1).double()
    monkeypatch.setattr(features, "_CHUNK_ELEMENTS", 6 * 10)  # 10 columns per slice, 20 slices
    torch.testing.assert_close(streamed_gram(y), flat @ flat.T, rtol=1e-12, atol=1e-12)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        out = F.relu(self.b(h) + h)  # functional add and relu: no module to hook
        return self.fc(out.mean((2, 3)))


def test_streamed_grams_equal_grams_of_materialised_features():
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(5, 3, 8, 8)
    found = discover_layers(model, x[:1])
    got = collect_grams(model, found, x).grams
    with torch.no_grad():
        h = F.relu(model.a(x))
        out = F.relu(model.b(h) + h)
        logits = model.fc(out.mean((2, 3)))
    for g, feat in zip(got, (h, out, logits), strict=True):
        f = feat.reshape(5, -1).double()
        torch.testing.assert_close(g, f @ f.T, rtol=1e-6, atol=1e-8)


def test_untraced_model_uses_hooks_on_layer_outputs():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(2 * 16, 3)).eval()
    x = torch.randn(4, 3, 4, 4)
    found = discover_layers(model, x[:1])
    found.traced = False
    for i, layer in enumerate(found.layers):
        found.layers[i] = type(layer)(**{**layer.__dict__, "feature_node": layer.name})
    got = collect_grams(model, found, x).grams
    conv_out = model[0](x).reshape(4, -1).double()
    torch.testing.assert_close(got[0], conv_out @ conv_out.T)


def test_all_zero_feature_names_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)  # ReLU(-1) == 0 everywhere
    x = torch.randn(4, 3, 4, 4)
    with pytest.raises(OmpqError, match="layer 0 produced all-zero"):
        collect_grams(model, discover_layers(model, x[:1]), x)


def test_models_reading_their_own_top_level_tensors_stream_too():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.gain = nn.Parameter(torch.tensor(3.0))
            self.register_buffer("offset", torch.ones(1, 2, 1, 1))

        def forward(self, x):
            return F.relu(self.conv(x) * self.gain + self.offset)

    model = Scaled().eval()
    x = torch.randn(4, 3, 4, 4)
    found = discover_layers(model, x[:1])
    assert found.traced
    assert found.layers[0].feature_node == "conv"  # the walk stops at the multiplication
    (g,) = collect_grams(model, found, x).grams
    with torch.no_grad():
        f = model.conv(x).reshape(4, -1).double()
    torch.testing.assert_close(g, f @ f.T)


def _centred64(y: torch.Tensor) -> torch.Tensor:
    flat = y.reshape(y.shape[0], -1).double()
    flat = flat - flat.mean(dim=0)
    return flat @ flat.T


@pytest.mark.parametrize("offset", [0.0, 3.0])  # post-ReLU-like; a large shared mean on top
def test_centred_float32_gram_equals_centred_float64_gram(monkeypatch, offset):
    torch.manual_seed(1)
    y = torch.relu(torch.randn(7, 5, 6, 6)) + offset
    monkeypatch.setattr(features, "_CHUNK_ELEMENTS", 7 * 16)  # 16 columns per slice
    g, all_zero = features.centred_gram(y)
    assert g.dtype == torch.float64 and not all_zero
    torch.testing.assert_close(g, _centred64(y), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(features, "_CHUNK_ELEMENTS", 1 << 20)
    monkeypatch.setattr(features, "_ONEDNN_MAX_COLUMNS", 50)  # slices of 50 columns, not 1e5
    sizes = []
    real = features._float32_gram
    monkeypatch.setattr(features, "_float32_gram", lambda b: sizes.append(b.shape[1]) or real(b))
    torch.testing.assert_close(features.centred_gram(y)[0], _centred64(y), rtol=1e-5, atol=1e-5)
    # one product of the raw slices; the mean of the offset features holds ~35x the energy of
    # their spread (above _MAX_MEAN_SHARE): the centred slices' product follows
    assert sizes == [50, 50, 50, 30] * (2 if offset else 1)


def test_centred_gram_centres_first_where_the_mean_would_swamp_float32(monkeypatch):
    torch.manual_seed(2)
    y = torch.relu(torch.randn(8, 4000)) + 1000.0  # the mean holds ~3e6 x the spread's energy
    exact = _centred64(y)
    g, _ = features.centred_gram(y)
    torch.testing.assert_close(g, exact, rtol=1e-5, atol=1e-3)
    monkeypatch.setattr(features, "_MAX_MEAN_SHARE", math.inf)  # always centre after
    after, _ = features.centred_gram(y)
    assert (after - exact).abs().max() > 100 * (g - exact).abs().max()


def test_centred_gram_tells_zero_from_constant_features():
    assert features.centred_gram(torch.zeros(3, 4))[1]
    g, all_zero = features.centred_gram(torch.ones(3, 4))  # constant, not zero
    assert not all_zero and not g.numpy().any()
    assert not features.centred_gram(torch.tensor([[1.0, -2.0], [-1.0, 2.0]]))[1]  # zero mean


@pytest.mark.parametrize("onednn", [True, False])  # oneDNN's convolution, numpy's product
@pytest.mark.parametrize("n", [2, 7, 8])  # the halves differ in size when N is odd
def test_float32_gram_is_the_symmetric_product_either_way(monkeypatch, onednn, n):
    torch.manual_seed(n)
    block = torch.randn(n, 300)
    monkeypatch.setattr(features, "_ONEDNN_MIN_ELEMENTS", 0 if onednn else 1 << 40)
    monkeypatch.setattr(features, "_ONEDNN_MIN_ROWS", 2)
    g = features._float32_gram(block)
    exact = block.double() @ block.double().T
    assert g.dtype == np.float64 and (g == g.T).all()
    np.testing.assert_allclose(g, exact.numpy(), rtol=1e-5, atol=1e-4)


def test_all_zero_feature_names_the_layer_with_centred_grams():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)
    x = torch.randn(4, 3, 4, 4)
    with pytest.raises(OmpqError, match="layer 0 produced all-zero"):
        collect_grams(model, discover_layers(model, x[:1]), x, centred=True)


def test_float32_centred_orm_matches_float64_on_real_resnet20(data_dir):
    from ompq_plugin.data import search_samples
    from ompq_plugin.models import build_model
    from ompq_plugin.orm import orm_matrix

    model, spec = build_model("resnet20", data_dir=data_dir)
    x = search_samples(data_dir, spec, 64, seed=0)
    found = discover_layers(model, x[:1])
    k64 = orm_matrix(collect_grams(model, found, x).grams)
    k32 = orm_matrix(collect_grams(model, found, x, centred=True).grams)
    assert float(abs(k64 - k32).max()) < 1e-6


@pytest.mark.parametrize("centred", [False, True])
def test_nan_feature_names_the_layer_when_grams_are_formed(centred):
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2)).eval()
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    x = torch.randn(4, 3, 4, 4)
    with pytest.raises(OmpqError, match="layer 3 produced NaN/Inf"):
        collect_grams(model, discover_layers(model, x[:1]), x, centred=centred)


def _stream(model, x, widths):
    return features.discover_and_stream(
        model, x, grams=False, centred=True, act_widths=lambda names, _o: widths, power_of_two=False
    )


@pytest.mark.parametrize("broken", [0, 3])
def test_the_plain_pass_names_the_layer_that_produced_nan(broken):
    """No reduction over every layer's output: the scored inputs (layer 3 reads layer 0's
    output) or the model's output (layer 3 is last and unscored) catch the NaN, then a second
    pass names the layer."""
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2)).eval()
    with torch.no_grad():
        model[broken].weight[0, 0] = float("nan")
    x = torch.randn(4, 3, 4, 4)
    with pytest.raises(OmpqError, match=f"layer {broken} produced NaN"):
        _stream(model, x, {"3": (4, 8)})
    with torch.no_grad():
        model[broken].weight[0, 0] = 1.0
    streamed = _stream(model, x, {"3": (4, 8)})
    assert streamed.layers.names == ["0", "3"] and set(streamed.act_stats.errors) == {"3"}


def test_layer_discovery_keeps_the_trace_as_a_graph_over_the_model():
    model = Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    found = discover_layers(model, x[:1])
    assert isinstance(found.graph, torch.fx.Graph)
    targets = {n.target for n in found.graph.nodes if n.op == "call_module"}
    assert targets <= dict(model.named_modules()).keys()  # the model's own names
    assert features.feature_points(model, found.graph) == {
        lay.name: lay.feature_node for lay in found.layers
    }
