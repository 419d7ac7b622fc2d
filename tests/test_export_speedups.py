"""The export's speed-ups change nothing: exporters.fast_cleanup gives what qonnx's own
cleanup_model gives, the raw export without torch's TorchScript lint and on one torch thread is
the same graph, a teacher-forced session built from the plain one computes what one built from
scratch computes, and the bits expected of the layers are the same when Brevitas is not asked."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from ompq_plugin.exporters import fast_cleanup
from ompq_plugin.exporters.prefold import prefold_constants
from ompq_plugin.exporters.qonnx import brevitas_export
from onnx import numpy_helper
from test_architectures import _branches_and_images, _quantized

from ompq_plugin.models import build_model


def _raw(q: torch.nn.Module, x: torch.Tensor, tmp_path) -> onnx.ModelProto:  # noqa: ANN001
    from brevitas.export import export_qonnx

    return brevitas_export(export_qonnx, q, x[:1])


def _summary(model: onnx.ModelProto) -> dict:
    g = model.graph
    return {
        "nodes": [
            (
                n.op_type,
                n.name,
                n.domain,
                list(n.input),
                list(n.output),
                [a.SerializeToString() for a in n.attribute],
            )
            for n in g.node
        ],
        "inits": {t.name: numpy_helper.to_array(t) for t in g.initializer},
        "value_info": {v.name: v.SerializeToString() for v in g.value_info},
        "inputs": [v.SerializeToString() for v in g.input],
        "outputs": [v.SerializeToString() for v in g.output],
        "annotations": sorted(a.SerializeToString() for a in g.quantization_annotation),
    }


def _assert_same_as_qonnx(raw: onnx.ModelProto, fast: bool = True) -> None:
    """``fast``: the rewrite itself must clean the graph (no hand-over to qonnx)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    if fast:
        ours = _summary(fast_cleanup._cleanup_model(ModelWrapper(copy.deepcopy(raw))).model)
    else:
        ours = _summary(fast_cleanup.cleanup(copy.deepcopy(raw)))
    theirs = _summary(cleanup_model(ModelWrapper(copy.deepcopy(raw))).model)
    for key in ("nodes", "value_info", "inputs", "outputs", "annotations"):
        assert ours[key] == theirs[key], key
    assert ours["inits"].keys() == theirs["inits"].keys()
    for name, value in theirs["inits"].items():
        np.testing.assert_array_equal(ours["inits"][name], value, err_msg=name)


@pytest.mark.parametrize("prefold", [False, True])
def test_same_graph_as_qonnx_on_branches_concat_and_pooling(tmp_path, prefold):
    model, x = _branches_and_images(4)
    for profile in ("generic", "hls4ml", "finn"):
        raw = _raw(_quantized(model, x, profile), x, tmp_path)
        _assert_same_as_qonnx(prefold_constants(raw) if prefold else raw)


def test_same_graph_as_qonnx_on_resnet20(tmp_path):
    torch.manual_seed(0)
    model, _ = build_model("resnet20")
    x = torch.randn(4, 3, 32, 32)
    _assert_same_as_qonnx(prefold_constants(_raw(_quantized(model, x), x, tmp_path)))


def test_a_shared_weight_gets_its_own_copy_and_readable_names(tmp_path):
    """Two nodes reading one initializer (what GiveUniqueParameterTensors splits), an
    initializer graph input (RemoveStaticGraphInputs), a node out of order (SortGraph)."""
    h = onnx.helper
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    nodes = [
        h.make_node("MatMul", ["y", "w"], ["z"], name="late"),
        h.make_node("MatMul", ["x", "w"], ["y"], name="early"),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [
            h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2]),
            h.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [2, 2]),
        ],
        [h.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 2])],
        [w],
    )
    raw = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    _assert_same_as_qonnx(raw)
    out = fast_cleanup.cleanup(copy.deepcopy(raw))
    assert [n.name for n in out.graph.node] == ["MatMul_0", "MatMul_1"]
    assert [i.name for i in out.graph.input] == ["global_in"]
    assert sorted(t.name for t in out.graph.initializer) == ["MatMul_0_param0", "MatMul_1_param0"]


def test_an_empty_tensor_name_is_left_to_qonnx(tmp_path):
    from qonnx.core.modelwrapper import ModelWrapper

    h = onnx.helper
    nodes = [h.make_node("Clip", ["x", "", "hi"], ["y"], name="clip")]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "hi")],
    )
    raw = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    with pytest.raises(fast_cleanup._Unsupported):
        fast_cleanup._cleanup_model(ModelWrapper(copy.deepcopy(raw)))
    _assert_same_as_qonnx(raw, fast=False)


def test_the_raw_export_is_the_same_without_the_torchscript_lint(tmp_path):
    from brevitas.export import export_qonnx

    model, x = _branches_and_images(4)
    q = _quantized(model, x)
    lint = torch._C._jit_pass_lint
    assert torch.get_num_threads() > 1  # (tests/conftest.py: 2)
    threads = torch.get_num_threads()
    ours = _raw(q, x, tmp_path)
    assert torch._C._jit_pass_lint is lint  # restored after the export
    assert torch.get_num_threads() == threads  # ours ran on one thread, this one on two
    with_lint = tmp_path / "with_lint.onnx"
    export_qonnx(q, args=x[:1], export_path=str(with_lint), dynamo=False)
    assert ours.SerializeToString() == onnx.load(str(with_lint)).SerializeToString()


def test_one_torch_thread_inside_and_restored_after():
    from ompq_plugin.exporters.torch_side import one_torch_thread

    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError), one_torch_thread():
        assert torch.get_num_threads() == 1
        with one_torch_thread():  # nested: a no-op
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == threads


def test_expected_bits_asks_brevitas_only_for_layers_the_bitconfig_does_not_name(monkeypatch):
    from ompq_plugin.exporters import torch_side
    from ompq_plugin.exporters.verify import Expected

    from ompq_plugin.quantizer import uniform_bitconfig

    model, x = _branches_and_images(4)
    q = _quantized(model, x)
    bits = uniform_bitconfig(model, x, 6, 8)
    layers = torch_side.quant_layers(q)
    # what it gave when every layer's quantizer was asked first
    want = {n: Expected(torch_side.module_weight_bits(m), None, "model") for n, m in layers.items()}
    for lb in bits.layers:
        want[lb.name] = Expected(lb.weight_bits, lb.act_bits, "BitConfig")
    asked = []
    real = torch_side.module_weight_bits
    monkeypatch.setattr(torch_side, "module_weight_bits", lambda m: asked.append(m) or real(m))
    got = torch_side.expected_bits(q, bits)
    assert list(got.items()) == list(want.items())  # same values, same order
    assert asked == [layers[n] for n in layers if n not in {lb.name for lb in bits.layers}]
    asked.clear()
    fewer = dataclasses.replace(bits, layers=bits.layers[1:])
    got = torch_side.expected_bits(q, fewer)
    assert asked == [layers[bits.layers[0].name]]
    assert got[bits.layers[0].name] == Expected(real(layers[bits.layers[0].name]), None, "model")
    assert list(got) == list(want)
    assert len(torch_side.expected_bits(q, None)) == len(layers)


def test_forced_session_from_the_plain_one_computes_what_a_fresh_one_computes(tmp_path):
    """ResNet-20 (weights above the 4 KiB handed to onnxruntime as arrays, float scales): every
    tensor of the forced session built from the plain session's folded graph equals that of a
    GraphSession built from the forced graph from scratch, bit for bit."""
    from ompq_plugin.exporters import forced_check as F
    from ompq_plugin.exporters import graph_session as GS
    from ompq_plugin.exporters.qonnx import export_qonnx

    torch.manual_seed(0)
    model, _ = build_model("resnet20")
    x = torch.randn(2, 3, 32, 32)
    export_qonnx(_quantized(model, x), tmp_path / "m.onnx", x)
    graph = onnx.load(str(tmp_path / "m.onnx"))
    before = graph.SerializeToString()
    sessions = GS.Sessions(graph)
    assert graph.SerializeToString() == before  # lowered and folded on a copy
    assert sessions.plain._external  # large weights handed over as arrays
    nodes = F.act_quant_nodes(sessions.graph)
    feeds = {graph.graph.input[0].name: x[:1].numpy()}
    ctx = sessions.plain.run(feeds)
    rng = np.random.default_rng(0)
    forced_feeds = {**feeds, **{n.output[0]: (ctx[n.output[0]] + rng.normal(
        size=ctx[n.output[0]].shape)).astype(np.float32) for n in nodes}}
    tensors = tuple(n.output[0] for n in nodes)
    ours = sessions.forced(tensors)
    assert sessions.forced(tensors) is ours  # built once
    fresh = GS.GraphSession(GS.forced_model(graph, list(tensors)))
    got, want = ours.run(forced_feeds), fresh.run(forced_feeds)
    assert got.keys() == want.keys()
    assert any(k.endswith("__ompq_graph") for k in got)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert ours.engine == fresh.engine
    # the plain session is unchanged by its forced copy
    again = sessions.plain.run(feeds)
    for k, v in ctx.items():
        np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_shape_inference_without_the_weights_gives_what_onnx_gives(tmp_path):
    from ompq_plugin.exporters import light_shapes

    torch.manual_seed(0)
    model, _ = build_model("resnet20")
    x = torch.randn(2, 3, 32, 32)
    raw = _raw(_quantized(model, x), x, tmp_path)
    before = raw.SerializeToString()
    assert light_shapes.detachable(raw)  # the conv weights (ResNet-20: up to 147 KiB)
    ours = light_shapes.infer_shapes(raw)
    assert raw.SerializeToString() == before  # the input is left as it was
    theirs = onnx.shape_inference.infer_shapes(raw)
    assert len(theirs.graph.value_info) > len(raw.graph.value_info)
    assert ours.SerializeToString() == theirs.SerializeToString()


def test_data_a_shape_may_depend_on_is_never_detached():
    from ompq_plugin.exporters import light_shapes

    h = onnx.helper
    big = numpy_helper.from_array(np.arange(2048, dtype=np.int64), "big_shape")
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    small = numpy_helper.from_array(np.ones((2, 2), np.float32), "small")
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        h.make_node("Reshape", ["y", "big_shape"], ["z"], name="reshape"),
        h.make_node("Add", ["big_shape", "big_shape"], ["s"], name="add"),
        h.make_node("Mul", ["small", "small"], ["t"], name="mul"),
    ]
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [h.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in ("z", "t")],
        [big, w, small],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    before = model.SerializeToString()
    assert light_shapes.detachable(model) == [1]  # w only (small: under 4 KiB)
    with pytest.raises(RuntimeError), light_shapes.data_detached(model) as data:
        assert list(data) == [1] and not model.graph.initializer[1].raw_data
        raise RuntimeError
    assert model.SerializeToString() == before  # put back after an error too
