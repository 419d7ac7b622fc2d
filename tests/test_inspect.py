"""`ompq inspect`: per-layer table from the ONNX file alone (ours and a hand-built QONNX graph)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import pytest
from ompq_plugin.exporters import export_qonnx, inspect_onnx
from onnx import TensorProto, helper, numpy_helper
from test_export import make_small, real_images, small_bitconfig

from ompq_plugin.cli import export_cmd
from ompq_plugin.errors import OmpqError

QDOMAIN = "qonnx.custom_op.general"


def _quant(name: str, x: str, out: str, bits: int, scale: float, signed: bool,
           inits: list[onnx.TensorProto]) -> onnx.NodeProto:
    for suffix, value in (("s", scale), ("z", 0.0), ("b", float(bits))):
        inits.append(numpy_helper.from_array(np.array(value, np.float32), f"{name}_{suffix}"))
    return helper.make_node("Quant", [x, f"{name}_s", f"{name}_z", f"{name}_b"], [out], name=name,
                            domain=QDOMAIN, signed=int(signed), narrow=0, rounding_mode="ROUND")


def hand_built_qonnx(path) -> None:
    """input 1x2x8x8 -> Quant(5b) -> Conv 4x2x3x3 (Quant 3b, pad 1) -> Relu -> Quant(4b, unsigned)
    -> Flatten -> Gemm 256->6 (Quant 7b, transB)"""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((6, 256)).astype(np.float32), "w2")]
    nodes = [
        _quant("qa", "inp", "xa", 5, 0.125, True, inits),
        _quant("qw1", "w1", "w1q", 3, 0.5, True, inits),
        helper.make_node("Conv", ["xa", "w1q"], ["c1"], name="conv", pads=[1, 1, 1, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        _quant("qr", "r1", "xr", 4, 0.25, False, inits),
        helper.make_node("Flatten", ["xr"], ["f"], name="flat", axis=1),
        _quant("qw2", "w2", "w2q", 7, 0.0625, True, inits),
        helper.make_node("Gemm", ["f", "w2q"], ["out"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("inp", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 6])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid(QDOMAIN, 1)])
    onnx.save(model, str(path))


def test_inspect_foreign_qonnx(tmp_path):
    hand_built_qonnx(tmp_path / "hand.onnx")
    table = inspect_onnx(tmp_path / "hand.onnx")
    assert table.format == "qonnx" and not table.annotated
    conv, fc = table.layers
    assert (conv.name, conv.weight_bits, conv.act_bits) == ("conv", 3, 5)
    assert (conv.params, conv.macs) == (72, 4 * 8 * 8 * 2 * 9)
    assert (fc.name, fc.weight_bits, fc.act_bits, fc.params, fc.macs) == ("fc", 7, 4, 1536, 1536)
    assert conv.size_bits == 72 * 3 and conv.bops == conv.macs * 3 * 5
    t = table.totals
    assert t["params"] == 72 + 1536 and t["bops"] == conv.bops + fc.bops
    assert "total" in table.format_table()


def test_inspect_our_file_matches_bitconfig(data_dir, tmp_path):
    path = tmp_path / "small.onnx"
    export_qonnx(make_small(data_dir), path, real_images(data_dir, 2), small_bitconfig())
    table = inspect_onnx(path)
    assert table.annotated
    rows = {r.name: r for r in table.layers}
    for lb in small_bitconfig().layers:
        r = rows[lb.name]
        assert (r.weight_bits, r.params, r.macs) == (lb.weight_bits, lb.params, lb.macs)
        assert r.size_bits == lb.weight_memory_bits
        if lb.name == "linear":  # reads the average pool: the mean is off the 5-bit grid
            assert r.act_bits is None and "AveragePool" in r.act_note
        else:
            assert r.act_bits == lb.act_bits and r.bops == lb.bops


def test_inspect_qcdq_after_qonnx_cleanup_keeps_narrow_weight_bits(data_dir, tmp_path):
    """qonnx cleanup folds the weight Clips of a QCDQ file; the ompq.bits annotation keeps 4."""
    from ompq_plugin.exporters import export_qcdq
    from ompq_plugin.exporters.qonnx import qonnx_cleanup

    path = tmp_path / "q.onnx"
    export_qcdq(make_small(data_dir), path, real_images(data_dir, 2), small_bitconfig())
    cleaned = qonnx_cleanup(onnx.load(str(path)))
    ops = [n.op_type for n in cleaned.graph.node]
    assert ops.count("Clip") < [n.op_type for n in onnx.load(str(path)).graph.node].count("Clip")
    onnx.save(cleaned, str(tmp_path / "clean.onnx"))
    for table in (inspect_onnx(path), inspect_onnx(tmp_path / "clean.onnx")):
        bits = {r.name: r.weight_bits for r in table.layers}
        assert bits == {n: lb.weight_bits for n, lb in small_bitconfig().by_name().items()}


def test_inspect_cli_json_and_errors(tmp_path, capsys):
    hand_built_qonnx(tmp_path / "hand.onnx")
    parser = argparse.ArgumentParser()
    export_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["inspect", str(tmp_path / "hand.onnx"), "--json"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data["layers"]] == ["conv", "fc"]
    assert data["totals"]["params"] == 1608
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(OmpqError, match="not an ONNX model"):
        inspect_onnx(tmp_path / "junk.onnx")
    with pytest.raises(OmpqError, match="not found"):
        inspect_onnx(tmp_path / "missing.onnx")
