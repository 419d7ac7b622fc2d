"""Export targets: the graph hls4ml / FINN / qonnx tooling take as it is (exporters.targets)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from ompq_plugin.exporters import export_qonnx
from ompq_plugin.exporters import targets as T
from ompq_plugin.exporters import verify as V
from ompq_plugin.exporters.export_report import PoolConv
from test_export import make_small, real_images, small_bitconfig


@pytest.fixture(scope="module")
def exported(data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("targets")
    m = make_small(data_dir)
    images = real_images(data_dir, 4)
    out = {t: export_qonnx(m, folder / f"{t}.onnx", images, small_bitconfig(), target=t)
           for t in ("hls4ml", "finn")}
    return out, images


def test_hls4ml_target_pool_as_depthwise_conv_and_config(exported):
    reports, _ = exported
    rep = reports["hls4ml"]
    model = onnx.load(str(rep.path))
    ops = [n.op_type for n in model.graph.node]
    assert "GlobalAveragePool" not in ops
    pool = [n for n in model.graph.node if V.node_meta(n).get("role") == "pool"]
    assert len(pool) == 1 and pool[0].op_type == "Conv"
    g = V.Graph(model)
    group = next(a.i for a in pool[0].attribute if a.name == "group")
    wq = g.producer[pool[0].input[1]]
    assert group == 16 and float(g.const(wq.input[1])[0]) == 2.0**-8  # 16x16 pixels
    # the input quantizer is 8-bit signed with a power-of-two scale 2^-f: fixed<8+24, 8-f>
    entries = json.loads(rep.hls4ml_config.read_text())["LayerName"]
    iq = g.consumers[model.graph.input[0].name][0]
    f = -int(np.log2(float(g.const(iq.input[1]))))
    want = {"Precision": {"result": f"fixed<32,{8 - f},TRN,SAT>"}}
    assert entries == {model.graph.input[0].name: want}
    assert json.loads(V.model_meta(model)["ompq.hls4ml_config"]) == entries
    # the layer reading the pool still reports the quantizer before the pool for the check
    assert rep.bits["linear"] == (6, 5)


def test_hls4ml_export_names_the_pool_conv_its_bitconfig_does_not_count(exported):
    reports, _ = exported
    # the hand-made BitConfig lists no fixed layers: the 16-channel 16x16 pool conv is extra
    (pool,) = reports["hls4ml"].pool_convs
    assert pool == PoolConv("pool", 2, 16 * 16 * 16, counted=False)
    summary = reports["hls4ml"].summary()
    assert "(qonnx, 3 quantized layers + 1 pool as depthwise conv)" in summary
    assert "do not count pool (2-bit weights, 1.00 KiB)" in summary
    assert "`ompq search --profile hls4ml` counts it" in summary
    assert reports["finn"].pool_convs == []  # FINN keeps the pool


def test_finn_target_keeps_pool_and_no_config(exported):
    rep = exported[0]["finn"]
    model = onnx.load(str(rep.path))
    assert "GlobalAveragePool" in [n.op_type for n in model.graph.node]
    assert rep.hls4ml_config is None and rep.target == "finn"


@pytest.mark.parametrize("target", ["hls4ml", "finn"])
def test_bias_quant_params_are_vectors_and_extract_bias_works(exported, target):
    """qonnx's ExtractBiasFromConv (run by FINN's step_qonnx_to_finn) on the file as written."""
    from ompq_plugin.exporters.qonnx import run_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.extract_conv_bias import ExtractBiasFromConv
    from qonnx.util.cleanup import cleanup_model

    reports, images = exported
    model = onnx.load(str(reports[target].path))
    g = V.Graph(model)
    bias_quants = [g.producer[n.input[2]] for n in model.graph.node
                   if n.op_type == "Conv" and len(n.input) > 2]
    assert bias_quants
    for bq in bias_quants:
        assert g.const(bq.input[1]).shape == (1,) and g.const(bq.input[2]).shape == (1,)
    w = cleanup_model(ModelWrapper(model)).transform(ExtractBiasFromConv())
    assert not any(len(n.input) > 2 for n in w.graph.node if n.op_type == "Conv")
    x = images.numpy()
    np.testing.assert_array_equal(run_qonnx(w.model, x), run_qonnx(model, x))


def test_unknown_target_refused(data_dir, tmp_path):
    from ompq_plugin.errors import OmpqError

    with pytest.raises(OmpqError, match="unknown export target"):
        export_qonnx(make_small(data_dir), tmp_path / "x.onnx", real_images(data_dir, 1),
                     small_bitconfig(), target="vivado")
    assert list(tmp_path.iterdir()) == []


def test_target_for_profile():
    assert T.target_for_profile("hls4ml") == "hls4ml"
    assert T.target_for_profile("finn") == "finn"
    assert T.target_for_profile("tensorrt") == "generic" and T.target_for_profile(None) == "generic"


class _FunctionalPoolNet(torch.nn.Module):
    """conv -> ReLU -> F.adaptive_avg_pool2d(., 1) -> linear: a pool with no module name."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_functional_pool_the_search_counted_is_matched_by_size(tmp_path):
    import dataclasses

    from ompq_plugin.hw_profiles import load_profile

    from ompq_plugin.ptq import calibrate
    from ompq_plugin.quantizer import quantize
    from ompq_plugin.searcher import run_search

    torch.manual_seed(0)
    model = _FunctionalPoolNet().eval()
    x = torch.rand(16, 3, 8, 8)
    config = run_search(model, x, "hls4ml").config
    assert [(lb.name, lb.params) for lb in config.fixed_layers] == [("adaptive_avg_pool2d", 256)]
    q = quantize(model, config, load_profile("hls4ml"))
    calibrate(q, x)
    (pool,) = export_qonnx(q, tmp_path / "f.onnx", x[:4], config).pool_convs
    assert pool.counted and pool.params == 256
    older = dataclasses.replace(config, fixed_layers=[])
    (pool,) = export_qonnx(q, tmp_path / "g.onnx", x[:4], older).pool_convs
    assert not pool.counted and pool.params == 256
