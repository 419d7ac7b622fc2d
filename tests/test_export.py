"""Verified QONNX / QCDQ export: bits read back, annotations, refusal of bad graphs, atomicity."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from ompq_plugin.exporters import export_qcdq, export_qonnx, inspect_onnx
from ompq_plugin.exporters import verify as V
from ompq_plugin.exporters.qonnx_verify import verify_qonnx
from torch import nn

from ompq_plugin.bitconfig import BitConfig, LayerBits
from ompq_plugin.errors import OmpqError

MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
SMALL_BITS = {"conv1": (4, 8), "conv2": (3, 6), "linear": (6, 5)}  # (weight, input act) bits


def real_images(data_dir: Path, n: int, batch: str = "test_batch") -> torch.Tensor:
    with open(data_dir / "cifar10-exact" / batch, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    x = d[b"data"][:n].reshape(n, 3, 32, 32).astype(np.float32) / 255
    return torch.from_numpy((x - MEAN) / STD)


class Small(nn.Module):
    """QuantIdentity -> QuantConv2d -> QuantReLU -> QuantConv2d -> QuantReLU -> avgpool ->
    QuantLinear, mixed bit widths; power-of-two (fixed-point) or float scales."""

    def __init__(self, po2: bool = True) -> None:
        super().__init__()
        import brevitas.nn as qnn
        from brevitas import quant as bq

        w = bq.Int8WeightPerTensorFixedPoint if po2 else bq.Int8WeightPerTensorFloat
        a = bq.Int8ActPerTensorFixedPoint if po2 else bq.Int8ActPerTensorFloat
        u = bq.Uint8ActPerTensorFixedPoint if po2 else bq.Uint8ActPerTensorFloat
        b = SMALL_BITS
        self.inp = qnn.QuantIdentity(act_quant=a, bit_width=b["conv1"][1],
                                     return_quant_tensor=True)
        self.conv1 = qnn.QuantConv2d(3, 8, 3, padding=1, weight_quant=w,
                                     weight_bit_width=b["conv1"][0], bias_quant=bq.Int32Bias)
        self.relu1 = qnn.QuantReLU(act_quant=u, bit_width=b["conv2"][1], return_quant_tensor=True)
        self.conv2 = qnn.QuantConv2d(8, 16, 3, padding=1, stride=2, weight_quant=w,
                                     weight_bit_width=b["conv2"][0], bias_quant=bq.Int32Bias)
        self.relu2 = qnn.QuantReLU(act_quant=u, bit_width=b["linear"][1], return_quant_tensor=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = qnn.QuantLinear(16, 10, bias=True, weight_quant=w,
                                      weight_bit_width=b["linear"][0], bias_quant=bq.Int32Bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(self.inp(x)))
        x = self.relu2(self.conv2(x))
        return self.linear(torch.flatten(self.pool(x), 1))


def small_bitconfig() -> BitConfig:
    figures = {  # params, MACs, input numel
        "conv1": (8 * 3 * 9, 8 * 32 * 32 * 3 * 9, 3 * 32 * 32),
        "conv2": (16 * 8 * 9, 16 * 16 * 16 * 8 * 9, 8 * 32 * 32),
        "linear": (160, 160, 16),
    }
    layers = [LayerBits(name=n, kind="linear" if n == "linear" else "conv", weight_bits=w,
                        act_bits=a, params=figures[n][0], macs=figures[n][1],
                        input_numel=figures[n][2], act_group=n)
              for n, (w, a) in SMALL_BITS.items()]
    return BitConfig(model="small", profile="hls4ml", method="manual", layers=layers)


def make_small(data_dir: Path, po2: bool = True) -> nn.Module:
    torch.manual_seed(0)
    m = Small(po2)
    from brevitas.graph.calibrate import calibration_mode

    with torch.no_grad(), calibration_mode(m):
        m(real_images(data_dir, 64, "data_batch_1"))
    return m.eval()


@pytest.fixture(scope="module")
def small(data_dir: Path) -> nn.Module:
    return make_small(data_dir)


@pytest.fixture(scope="module")
def images(data_dir: Path) -> torch.Tensor:
    return real_images(data_dir, 8)


def _no_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("fmt", ["qonnx", "qcdq"])
def test_export_small_verified_and_annotated(small, images, tmp_path, fmt):
    bits = small_bitconfig()
    export = export_qonnx if fmt == "qonnx" else export_qcdq
    report = export(small, tmp_path / "m.onnx", images, bits)
    # QCDQ with a dynamic batch axis: the exporter computes the linear's bias scale in the graph
    # (Mul -> Reshape), so the check takes the layer-by-layer route; the outputs are still equal
    assert report.verified and (report.exact or fmt == "qcdq") and report.max_abs_diff == 0.0
    assert report.n_images == 8
    assert report.bits == {n: wa for n, wa in SMALL_BITS.items()}
    assert set(report.node_map) == set(SMALL_BITS)
    # the BitConfig's profile is hls4ml: the QONNX file comes with its hls4ml config entries
    hls = ["m.hls4ml.json"] if fmt == "qonnx" else []
    assert _no_leftovers(tmp_path) == [*hls, "m.onnx"]
    assert report.target == ("hls4ml" if fmt == "qonnx" else "generic")
    # annotations survive the save / reload
    model = onnx.load(str(tmp_path / "m.onnx"))
    meta = V.model_meta(model)
    assert BitConfig.from_json(json.loads(meta["ompq.bitconfig"])).by_name().keys() == set(
        SMALL_BITS)
    node_map = json.loads(meta["ompq.node_map"])
    nodes = {n.name: n for n in model.graph.node}
    for name, (w, _a) in SMALL_BITS.items():
        layer = nodes[node_map[name]["node"]]
        assert V.node_meta(layer)["layer"] == name
        assert V.node_meta(layer)["weight_bits"] == str(w)
        assert V.node_meta(nodes[node_map[name]["weight_quant"]])["role"] == "weight"
        assert name in V.node_meta(nodes[node_map[name]["act_quant"]])["feeds"]
    assert {rb.layer: (rb.weight_bits, rb.act_bits) for rb in V.read_layers(model)
            if rb.layer} == SMALL_BITS


def test_float_scales_within_tolerance(data_dir, images, tmp_path):
    m = make_small(data_dir, po2=False)
    for export in (export_qonnx, export_qcdq):
        report = export(m, tmp_path / "f.onnx", images)
        assert not report.exact and report.max_abs_diff <= 1e-5
        assert {n: wb for n, (wb, _) in report.bits.items()} == {
            n: w for n, (w, _) in SMALL_BITS.items()}


def test_bitconfig_mismatch_refused_and_no_file(small, images, tmp_path):
    bits = small_bitconfig()
    bits.layers[1] = dataclasses.replace(bits.layers[1], weight_bits=5)
    out = tmp_path / "bad.onnx"
    with pytest.raises(OmpqError, match=r"layer conv2: .*3-bit weights.*says 5"):
        export_qonnx(small, out, images, bits)
    assert not out.exists() and _no_leftovers(tmp_path) == []


def test_tampered_bit_width_refused(small, images, tmp_path):
    export_qonnx(small, tmp_path / "m.onnx", images, small_bitconfig())
    model = onnx.load(str(tmp_path / "m.onnx"))
    g = V.Graph(model)
    wq = next(n for n in model.graph.node if V.node_meta(n).get("role") == "weight"
              and V.node_meta(n).get("layer") == "conv2")
    init = g.inits[wq.input[3]]
    init.CopyFrom(onnx.numpy_helper.from_array(np.array(4.0, np.float32), init.name))
    with pytest.raises(OmpqError, match=r"layer conv2: the exported graph has 4-bit weights"):
        verify_qonnx(model, small, images, small_bitconfig())


def test_tampered_weights_name_first_diverging_layer(small, images, tmp_path):
    export_qonnx(small, tmp_path / "m.onnx", images, small_bitconfig())
    model = onnx.load(str(tmp_path / "m.onnx"))
    g = V.Graph(model)
    wq = next(n for n in model.graph.node if V.node_meta(n).get("role") == "weight"
              and V.node_meta(n).get("layer") == "conv2")
    init = g.inits[wq.input[0]]
    w = onnx.numpy_helper.to_array(init).copy()
    w[0] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    with pytest.raises(OmpqError, match=r"first diverging layer conv2"):
        verify_qonnx(model, small, images, small_bitconfig())


def test_failed_export_leaves_nothing(images, tmp_path):
    plain = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(OmpqError, match="no Brevitas quantized layers"):
        export_qonnx(plain, tmp_path / "x.onnx", images)
    assert _no_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# ResNet-20 with the real weights, quantized under the hls4ml profile (mixed bits)


def quantized_resnet20(data_dir: Path) -> tuple[nn.Module, BitConfig]:
    from ompq_plugin.hw_profiles.loader import load_profile

    from ompq_plugin import quantizer as quantize
    from ompq_plugin.models import build_model
    from ompq_plugin.ptq import calibrate

    net, _ = build_model("resnet20", data_dir=data_dir)
    bc = quantize.uniform_bitconfig(net, real_images(data_dir, 1), 8, 8, "resnet20", "hls4ml")
    cycle = (4, 5, 6, 3)
    bc.layers = [dataclasses.replace(lb, weight_bits=8 if i in (0, len(bc.layers) - 1)
                                     else cycle[i % 4]) for i, lb in enumerate(bc.layers)]
    q = quantize.quantize(net, bc, load_profile("hls4ml"))
    calibrate(q, real_images(data_dir, 128, "data_batch_1"))
    return q, bc


@pytest.fixture(scope="session")
def resnet20_q(data_dir: Path) -> tuple[nn.Module, BitConfig]:
    return quantized_resnet20(data_dir)


@pytest.mark.parametrize("fmt", ["qonnx", "qcdq"])
def test_resnet20_export(resnet20_q, images, tmp_path, fmt):
    q, bc = resnet20_q
    export = export_qonnx if fmt == "qonnx" else export_qcdq
    report = export(q, tmp_path / "r20.onnx", images, bc)
    # QCDQ (dynamic batch): bias scales computed in the graph, checked layer by layer
    assert report.verified and (report.exact or fmt == "qcdq") and report.max_abs_diff == 0.0
    read = report.bits
    for lb in bc.layers:
        assert read[lb.name] == (lb.weight_bits, lb.act_bits), lb.name
    # the file's own layers, read back by `ompq inspect`: the model's, the two frozen shortcut
    # convs `quantize` adds and (hls4ml profile) the global average pool the QONNX export for
    # hls4ml writes as a 64-channel 8x8 depthwise conv; the BitConfig counts all three
    fixed = {lb.name: lb for lb in bc.fixed_layers}
    assert [(pc.name, pc.counted) for pc in report.pool_convs] == (  # the BitConfig counts it
        [("pool", True)] if fmt == "qonnx" else [])
    assert list(fixed) == ["layer2.0.shortcut", "layer3.0.shortcut", "pool"]
    rows = {r.name: r for r in inspect_onnx(tmp_path / "r20.onnx").layers}
    in_file = [*bc.layers, *(lb for lb in bc.fixed_layers if fmt == "qonnx" or lb.name != "pool")]
    assert {lb.name for lb in in_file} == set(rows)  # QCDQ keeps the GlobalAveragePool
    for lb in in_file:
        r = rows[lb.name]
        assert (r.weight_bits, r.params, r.macs) == (lb.weight_bits, lb.params, lb.macs), lb.name
        if lb.name in fixed:  # the model's layers: their act bits are checked above
            assert (r.act_bits, r.bops) == (lb.act_bits, lb.bops), lb.name
    in_file_bits = sum(rows[lb.name].size_bits for lb in in_file)
    pool_bits = fixed["pool"].weight_memory_bits
    assert in_file_bits == bc.totals.weight_memory_bits - (0 if fmt == "qonnx" else pool_bits)


# ------------------------------------------------------------------------------------------------
# float scales: one-LSB rounding-boundary flips (accumulation order) accepted, bugs refused


@pytest.fixture(scope="module")
def small_float(data_dir: Path, images, tmp_path_factory) -> tuple[nn.Module, onnx.ModelProto]:
    m = make_small(data_dir, po2=False)
    path = tmp_path_factory.mktemp("float") / "f.onnx"
    export_qonnx(m, path, images)
    return m, onnx.load(str(path))


def _nudge(model: onnx.ModelProto, images: torch.Tensor, image: int, to_boundary: bool,
           feeds: str = "conv2") -> onnx.ModelProto:
    """Copy of ``model`` with an Add before the input quantizer of ``feeds`` that moves one value
    of
    ``image``: just across its nearest rounding boundary (``to_boundary``, a 1-LSB flip of a
    value on the boundary, as float accumulation order causes), or by a whole LSB."""
    from ompq_plugin.exporters.qonnx import run_qonnx_feeds

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = V.Graph(model)
    quant = next(n for n in model.graph.node if V.node_meta(n).get("role") == "act"
                 and V.node_meta(n).get("feeds") == feeds)
    scale = float(g.const(quant.input[1]))
    ctx = run_qonnx_feeds(model, {model.graph.input[0].name: images[image : image + 1].numpy()})
    x = np.asarray(ctx[quant.input[0]], np.float64)
    u = x / scale
    inside = (u > 1) & (u < 2 ** SMALL_BITS[feeds][1] - 2)
    gap = np.where(inside, np.abs(u - np.floor(u) - 0.5), np.inf if to_boundary else -1)
    k = np.unravel_index(int(np.argmin(gap) if to_boundary else np.argmax(gap)), u.shape)
    boundary = np.floor(u[k]) + 0.5
    away = 1.0 if np.round(u[k]) == np.floor(u[k]) else -1.0  # towards the other level
    step = (boundary - u[k] + away * 1e-5) if to_boundary else 1.0
    eps = np.zeros(x.shape, np.float32)
    eps[k] = np.float32(step * scale)
    model.graph.initializer.append(onnx.numpy_helper.from_array(eps, "nudge"))
    add = onnx.helper.make_node("Add", [quant.input[0], "nudge"], ["nudged"], name="Nudge")
    model.graph.node.insert(list(model.graph.node).index(quant), add)
    quant.input[0] = "nudged"
    model.graph.value_info.append(onnx.helper.make_tensor_value_info(
        "nudged", onnx.TensorProto.FLOAT, list(x.shape)))
    return model


def test_float_rounding_boundary_flip_accepted_and_counted(small_float, images):
    m, model = small_float
    ver = verify_qonnx(_nudge(model, images, 3, to_boundary=True), m, images)
    assert ver.boundary_flips == 1 and ver.flip_layers == ["conv1"] and ver.forced_images == 8
    assert ver.max_forced_diff <= 1e-5 and ver.top1_agree is not None


def test_float_one_lsb_off_boundary_refused(small_float, images):
    m, model = small_float
    with pytest.raises(OmpqError, match=r"first diverging layer conv1 .*not rounding-boundary"):
        verify_qonnx(_nudge(model, images, 3, to_boundary=False), m, images)


def test_float_tampered_weights_and_scale_refused(small_float, images):
    m, model = small_float
    tampered = onnx.ModelProto.FromString(model.SerializeToString())
    g = V.Graph(tampered)
    wq = next(n for n in tampered.graph.node if V.node_meta(n).get("role") == "weight"
              and V.node_meta(n).get("layer") == "conv2")
    init = g.inits[wq.input[0]]
    w = onnx.numpy_helper.to_array(init).copy()
    w[0] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    with pytest.raises(OmpqError, match=r"first diverging layer conv2"):
        verify_qonnx(tampered, m, images)
    tampered = onnx.ModelProto.FromString(model.SerializeToString())
    g = V.Graph(tampered)
    aq = next(n for n in tampered.graph.node if V.node_meta(n).get("role") == "act"
              and V.node_meta(n).get("feeds") == "linear")
    init = g.inits[aq.input[1]]
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.01,
                                               init.name))
    with pytest.raises(OmpqError, match=r"first diverging layer conv2"):
        verify_qonnx(tampered, m, images)
    bits = small_bitconfig()
    bits.layers[1] = dataclasses.replace(bits.layers[1], weight_bits=5)
    with pytest.raises(OmpqError, match=r"layer conv2: .*3-bit weights.*says 5"):
        verify_qonnx(model, m, images, bits)


def test_power_of_two_still_bit_exact(small, images, tmp_path):
    export_qonnx(small, tmp_path / "m.onnx", images, small_bitconfig())
    model = _nudge(onnx.load(str(tmp_path / "m.onnx")), images, 3, True, feeds="linear")
    with pytest.raises(OmpqError, match=r"required bit-exact"):
        verify_qonnx(model, small, images, small_bitconfig())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["qonnx", "qcdq"])
def test_resnet20_generic_profile_float_scales(data_dir, tmp_path, fmt):
    """The README flow: searched mixed bits, generic profile (float scales), bias correction;
    exports verify despite isolated rounding-boundary flips, and report them. (How many depends
    on the bits and on the runtime's float arithmetic: 1 with qonnx's executor and the old
    default bits, 12 with onnxruntime's lowered Quant ops and the ompq-noise bits.)"""
    from ompq_plugin.hw_profiles import load_profile

    from ompq_plugin import Budgets, build_model, calibrate, quantize, search
    from ompq_plugin.data import search_samples

    model, spec = build_model("resnet20", data_dir=data_dir)
    samples = search_samples(data_dir, spec, 64)
    bits = search(model, samples, "generic", Budgets(weight_memory_bits=4 * 268_336),
                  act_bits=[8])
    q = quantize(model, bits, load_profile("generic"))
    calibrate(q, samples, bias_correction=True)
    export = export_qonnx if fmt == "qonnx" else export_qcdq
    report = export(q, tmp_path / "r20.onnx", samples[:8], bits)
    assert report.verified and not report.exact
    assert report.boundary_flips >= 1 and report.forced_images == 8
    assert report.max_forced_diff <= 1e-5 and report.top1_agree == 8
    assert "rounding-boundary flip" in report.summary()
    assert report.bits == {lb.name: (lb.weight_bits, lb.act_bits) for lb in bits.layers} | {
        n: wa for n, wa in report.bits.items() if n not in bits.by_name()}


# ------------------------------------------------------------------------------------------------
# QCDQ: dynamic batch axis, onnxruntime at batch 1 and 64 agree with torch bit for bit


def test_qcdq_dynamic_batch_1_and_64(small, data_dir, tmp_path):
    import onnxruntime as ort

    report = export_qcdq(small, tmp_path / "q.onnx", real_images(data_dir, 8), small_bitconfig())
    model = onnx.load(str(report.path))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value  # a named, free batch axis
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    x = real_images(data_dir, 64)
    with torch.no_grad():
        ref = small(x).numpy()
    name = sess.get_inputs()[0].name
    batch64 = sess.run(None, {name: x.numpy()})[0]
    batch1 = np.concatenate([sess.run(None, {name: x[i : i + 1].numpy()})[0] for i in range(64)])
    assert batch64.shape == (64, 10)
    np.testing.assert_array_equal(batch64, batch1)
    np.testing.assert_array_equal(batch64, ref)
