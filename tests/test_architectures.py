"""Small models reproducing each architecture blocker of issue 10 (torchvision's models have them
at scale; bench/architectures.py runs those): concatenated branches, LayerNorm, constant
features, upsampling adaptive pools, pre-activation BatchNorm, F.avg_pool2d keywords, Conv1d
export, weights used through F.linear, and the forward check before a file is written."""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from ompq_plugin.exporters import export_qonnx
from ompq_plugin.exporters import graph_session as GS
from ompq_plugin.exporters import verify as V
from ompq_plugin.hw_profiles import load_profile
from torch import nn

from ompq_plugin import Budgets, OmpqError, calibrate, discover_layers, quantize, search
from ompq_plugin.quantizer import uniform_bitconfig


def _quantized(model: nn.Module, x: torch.Tensor, profile: str = "generic") -> nn.Module:
    model.eval()
    bits = uniform_bitconfig(model, x, 6, 8)
    q = quantize(model, bits, load_profile(profile))
    calibrate(q, x)
    return q


def _export(q: nn.Module, x: torch.Tensor, tmp_path) -> onnx.ModelProto:  # noqa: ANN001
    report = export_qonnx(q, tmp_path / "m.onnx", x[:3])
    assert report.verified and report.n_images == 3
    return onnx.load(str(tmp_path / "m.onnx"))


class Branches(nn.Module):
    """Inception-style block: branches with different scales concatenated, then a pooled branch
    with F.avg_pool2d keyword arguments, then a pre-activation BatchNorm (DenseNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 4, 1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.c = nn.Conv2d(8, 2, 1)
        self.norm = nn.BatchNorm2d(12)
        self.mix = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        y = torch.cat([F.relu(self.a(x)), self.b(x) * 3.0, self.c(pooled)], 1)
        y = self.mix(F.relu(self.norm(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(y), 1), 1))


def _random_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)


def _branches_and_images(n: int) -> tuple[nn.Module, torch.Tensor]:
    """:class:`Branches` (seed 0) with random BatchNorm statistics, and ``n`` random 12x12
    images drawn after it."""
    torch.manual_seed(0)
    model = Branches().eval()
    _random_bn(model)
    return model, torch.randn(n, 3, 12, 12)


def test_cat_keywords_avg_pool_and_preactivation_bn_quantize_and_export(tmp_path):
    model, x = _branches_and_images(8)
    q = _quantized(model, x)
    report = q.ompq_report
    # one shared quantizer on all three concatenated inputs, so the cat runs on one grid
    assert len(report.shared_cat_quantizers) == 1
    name = report.shared_cat_quantizers[0]
    calls = [n for n in q.graph.nodes if n.op == "call_module" and n.target == name]
    assert len(calls) == 3
    assert "norm" in report.float_ops and "BatchNorm" in report.float_ops["norm"]
    assert any("norm" in note for note in report.notes())
    with torch.no_grad():
        out, ref = q(x), model(x)
    assert torch.isfinite(out).all()
    assert float(((out - ref) ** 2).mean() / (ref**2).mean()) < 0.05
    _export(q, x, tmp_path)


class Normed(nn.Module):
    """ConvNeXt-style: LayerNorm on channels-last features and a per-channel layer scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.pw = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.full((8,), 0.5))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1)
        y = self.scale * F.gelu(self.pw(self.norm(y)))
        return self.fc(y.mean((1, 2)))


def test_layernorm_and_layer_scale_stay_float_with_a_report(tmp_path):
    torch.manual_seed(0)
    model = Normed().eval()
    x = torch.randn(6, 3, 8, 8)
    q = _quantized(model, x)
    floats = q.ompq_report.float_ops
    assert "LayerNorm" in floats["norm"] and "elementwise" in floats["scale"]
    _export(q, x, tmp_path)


class FunctionalLinear(nn.Module):
    """Swin-style: a Linear module whose weight is used through F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.qkv = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        return self.fc(F.linear(y, self.qkv.weight, self.qkv.bias))


def test_weight_used_through_f_linear_is_unsupported_not_budgeted():
    model = FunctionalLinear().eval()
    x = torch.randn(4, 3, 8, 8)
    found = discover_layers(model, x[:1])
    assert found.names == ["conv", "fc"]
    assert [u.name for u in found.unsupported] == ["qkv"]
    assert "F.linear" in found.unsupported[0].module_type or "linear" in (
        found.unsupported[0].module_type)
    assert found.total_params == 4 * 3 * 9 + 3 * 4  # qkv not counted
    with pytest.raises(OmpqError, match=r"unsupported layer types: qkv"):
        search(model, x, "generic")
    # kept in float on request, and the quantized model says so
    bits = uniform_bitconfig(model, x, 8, 8)
    q = quantize(model, bits, load_profile("generic"))
    assert "NOT quantized" in q.ompq_report.float_ops["qkv.weight"]


class IndexedBias(nn.Module):
    """MaxViT-style: relative position bias tables (parameters) indexed, in several blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.tables = nn.ParameterList([nn.Parameter(torch.randn(9, 4)) for _ in range(5)])
        self.register_buffer("index", torch.tensor([0, 4, 8, 4]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        for table in self.tables:
            y = y + table[self.index].sum(0)
        return y


def test_indexed_parameters_are_refused_in_one_line_naming_three_and_counting_the_rest():
    model = IndexedBias().eval()
    found = discover_layers(model, torch.randn(1, 3, 8, 8))
    assert len(found.unsupported) == 5
    assert all("indexed" in u.module_type for u in found.unsupported)
    with pytest.raises(OmpqError) as err:
        found.require_supported()
    message = str(err.value)
    assert "\n" not in message and "and 2 more" in message
    assert message.count("indexed") == 3


class Gated(nn.Module):
    """SE gate whose feature is the same for every sample (its fc weights are zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.se = nn.Conv2d(8, 8, 1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.se.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        y = y * torch.sigmoid(self.se(F.adaptive_avg_pool2d(y, 1)))
        y = F.relu(self.mid(y))
        return self.fc(y.mean((2, 3)))


def test_constant_feature_is_uninformative_with_a_warning_naming_the_layer():
    torch.manual_seed(0)
    model = Gated().eval()
    x = torch.randn(8, 3, 8, 8)
    # the ORM is computed for --method ompq (the default method at beta 0 skips it)
    with pytest.warns(UserWarning, match=r"layer se: its feature is the same"):
        bits = search(model, x, "generic", Budgets(weight_memory_bits=6 * 1000), method="ompq")
    assert {lb.name for lb in bits.layers} == {"conv", "se", "mid", "fc"}


class Upsampling(nn.Module):
    """VGG at 64x64: a 2x2 map adaptively pooled to 3x3 (output does not divide the input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((3, 3))
        self.fc = nn.Linear(36, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


def test_upsampling_adaptive_pool_is_exact_and_exports(tmp_path):
    torch.manual_seed(0)
    model = Upsampling().eval()
    x = torch.randn(6, 3, 8, 8)
    q = _quantized(model, x)
    assert q.ompq_report.rewritten_pools == ["pool"]
    y = torch.randn(2, 4, 2, 2)
    torch.testing.assert_close(q.pool(y), F.adaptive_avg_pool2d(y, (3, 3)))
    torch.testing.assert_close(q.pool(torch.randn(2, 4, 6, 9)).shape, torch.Size([2, 4, 3, 3]))
    _export(q, x, tmp_path)


class Sequence1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3, padding=1)
        self.c2 = nn.Conv1d(6, 6, 3, padding=1, groups=3)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(y.mean(2))


def test_conv1d_model_exports_without_an_extra_batch_dimension(tmp_path):
    torch.manual_seed(0)
    model = Sequence1d().eval()
    x = torch.randn(5, 2, 16)  # N x C x L: 3-D, already batched
    q = _quantized(model, x, "hls4ml")
    model_file = _export(q, x, tmp_path)
    dims = [d.dim_value for d in model_file.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 2, 16]


@torch.fx.wrap
def _fails_on_quant_tensors(x: torch.Tensor) -> torch.Tensor:
    if type(x).__name__.endswith("QuantTensor"):
        raise RuntimeError("Scaling factors are different")
    return x


class FailsQuantized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _fails_on_quant_tensors(F.relu(self.conv(x)))
        return self.fc(y.mean((2, 3)))


def test_calibrate_runs_one_quantized_forward_and_refuses_a_model_that_fails():
    model = FailsQuantized().eval()
    x = torch.randn(4, 3, 8, 8)
    q = quantize(model, uniform_bitconfig(model, x, 8, 8), load_profile("generic"))
    with pytest.raises(OmpqError, match=r"fails at its first forward pass .*Scaling factors"):
        calibrate(q, x)


def _single_node_model(graph: onnx.ModelProto, node: onnx.NodeProto, shape: list[int]):
    g = V.Graph(graph)
    inits = [g.inits[i] for i in node.input[1:] if i in g.inits]
    inp = onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, shape)
    out = onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, shape)
    mini = onnx.helper.make_model(onnx.helper.make_graph([node], "one", [inp], [out], inits),
                                  opset_imports=list(graph.opset_import))
    return mini


def test_lowered_quant_ops_compute_what_qonnx_computes(tmp_path):
    """The fast verification runs the graph in onnxruntime with QONNX ops lowered to standard
    ops: each lowered Quant / Trunc must equal qonnx's own implementation bit for bit (float and
    power-of-two scales, values on rounding ties and outside the range included), and the whole
    graph must agree with qonnx's node-by-node run up to float summation order."""
    import qonnx.core.onnx_exec as oxe
    from qonnx.core.modelwrapper import ModelWrapper

    model, x = _branches_and_images(6)
    rng = np.random.default_rng(0)
    for profile in ("generic", "hls4ml"):
        graph = _export(_quantized(model, x, profile), x, tmp_path)
        feeds = {graph.graph.input[0].name: x[:1].numpy()}
        ours = GS.GraphSession(graph)
        assert ours.engine.startswith("onnxruntime")
        got = ours.run(feeds)
        ref = oxe.execute_onnx(ModelWrapper(graph), feeds, return_full_exec_context=True)
        g = V.Graph(graph)
        custom = [n for n in graph.graph.node
                  if n.domain.startswith(GS.QONNX_DOMAIN_PREFIX) and not g.is_const(n.input[0])]
        assert {n.op_type for n in custom} >= {"Quant"}
        for node in custom:
            value = np.asarray(ref[node.input[0]], np.float32)
            scale = np.asarray(g.const(node.input[1]), np.float32)
            ties = (np.round(value / scale) + 0.5) * scale
            wide = value * 1000.0
            for probe in (value, ties.astype(np.float32), wide, rng.normal(size=value.shape)):
                mini = _single_node_model(graph, node, list(value.shape))
                probe = {node.input[0]: np.asarray(probe, np.float32)}
                want = oxe.execute_onnx(ModelWrapper(mini), probe)[node.output[0]]
                have = GS.GraphSession(mini).run(probe)[node.output[0]]
                np.testing.assert_array_equal(have, want, err_msg=node.name)
        for k in ref:
            if k in got and not g.is_const(k):
                np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ref[k]), rtol=1e-5,
                                           atol=1e-6, err_msg=k)


def test_a_wrong_layer_is_still_caught_by_the_fast_verification(tmp_path):
    model, x = _branches_and_images(6)
    q = _quantized(model, x)
    graph = _export(q, x, tmp_path)
    g = V.Graph(graph)
    wq = next(n for n in graph.graph.node if V.node_meta(n).get("role") == "weight"
              and V.node_meta(n).get("layer") == "mix")
    init = g.inits[wq.input[0]]
    w = onnx.numpy_helper.to_array(init).copy()
    w[0] += 0.5 * math.copysign(1.0, float(w[0].sum()) or 1.0)
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    from ompq_plugin.exporters.qonnx_verify import verify_qonnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OmpqError, match=r"first diverging layer mix"):
            verify_qonnx(graph, q, x[:3])


def test_logits_of_large_activations_are_checked_relative_to_their_scale(tmp_path):
    """Inception's random init (weights of std 0.1) gives logits of ~1e8: a logit near zero then
    carries float32 accumulation error of its large terms, which is not an export bug."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, 300)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    x = torch.randn(3, 3, 8, 8) * 1000
    q = _quantized(model, x)
    with torch.no_grad():
        out = q(x)
    assert float(out.abs().max()) > 1e6 and float(out.abs().min()) < 1e4  # scale and near-zeros
    _export(q, x, tmp_path)


def test_constant_analysis_of_a_deep_graph_does_not_recurse():
    """EfficientNet-V2's exported graph is deeper than Python's recursion limit allows a
    recursive walk back along its data path (the export crashed with RecursionError)."""
    depth = 3000
    h = onnx.helper
    nodes = [h.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(depth)]
    nodes.append(h.make_node("Neg", ["w"], ["w_neg"]))
    nodes.append(h.make_node("Add", [f"t{depth}", "w_neg"], ["y"]))
    graph = h.make_graph(
        nodes, "deep", [h.make_tensor_value_info("t0", onnx.TensorProto.FLOAT, [1])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        [onnx.numpy_helper.from_array(np.ones(1, np.float32), "w")])
    g = V.Graph(h.make_model(graph))
    assert g.is_const("w_neg") and g.is_const("w")
    assert not g.is_const("y") and not g.is_const(f"t{depth // 2}") and not g.is_const("t0")
