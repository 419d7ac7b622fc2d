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
from ompq_plugin.exporters import export_qcdq, export_qonnx
from ompq_plugin.exporters import verify as V
from ompq_plugin.exporters.qonnx import verify_qonnx
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
    assert report.verified and report.exact and report.max_abs_diff == 0.0
    assert report.n_images == 8
    assert report.bits == {n: wa for n, wa in SMALL_BITS.items()}
    assert set(report.node_map) == set(SMALL_BITS)
    assert _no_leftovers(tmp_path) == ["m.onnx"]
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
    assert {rb.layer: (rb.weight_bits, rb.act_bits) for rb in V.read_layers(model)} == SMALL_BITS


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


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["qonnx", "qcdq"])
def test_resnet20_export(resnet20_q, images, tmp_path, fmt):
    q, bc = resnet20_q
    export = export_qonnx if fmt == "qonnx" else export_qcdq
    report = export(q, tmp_path / "r20.onnx", images, bc)
    assert report.verified and report.exact and report.max_abs_diff == 0.0
    read = report.bits
    for lb in bc.layers:
        assert read[lb.name] == (lb.weight_bits, lb.act_bits), lb.name
