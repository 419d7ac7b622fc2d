"""Constant folding in one pass, before qonnx's cleanup.

qonnx's ``FoldConstants`` folds one node per pass and re-runs shape inference on the whole model
(weights included) after each fold, so a graph with many constant shape computations (Shape /
Gather / Concat from ``x.size()`` in ShuffleNet's channel shuffle) or large weights costs
minutes. Here every node qonnx would fold -- a standard-domain node whose inputs are all
constants, or a ``Shape`` of a tensor whose shape is known -- is evaluated once, in graph order,
with ONNX's reference evaluator, and becomes an initializer. Quantizer nodes are never folded
(as qonnx's cleanup preserves them). The export's verification runs on the folded graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .light_shapes import data_detached

PRESERVED_OPS = ("Quant", "BipolarQuant", "QuantizeLinear", "DequantizeLinear", "Trunc")


def _known_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes = {}
    graph = model.graph
    for vi in [*graph.value_info, *graph.input, *graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[vi.name] = [d.dim_value for d in t.shape.dim]
    return shapes


def _shape_value(node: onnx.NodeProto, shape: list[int]) -> np.ndarray:
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return np.array(shape[start:end], dtype=np.int64)


def prefold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every foldable standard node replaced by its value (see module doc)."""
    from onnx.reference import ReferenceEvaluator

    with data_detached(model):  # (only the shapes are read: see exporters.light_shapes)
        inferred = onnx.shape_inference.infer_shapes(model)
    shapes = _known_shapes(inferred)
    const_names = {t.name for t in model.graph.initializer}
    values: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        if name not in values:
            init = next(t for t in model.graph.initializer if t.name == name)
            values[name] = numpy_helper.to_array(init)
        return values[name]

    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep, new_inits = [], []
    opset = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    for node in model.graph.node:
        standard = node.domain in ("", "ai.onnx") and node.op_type not in PRESERVED_OPS
        inputs = [i for i in node.input if i]
        folded: list[np.ndarray] | None = None
        if standard and node.op_type == "Shape" and inputs and inputs[0] in shapes:
            folded = [_shape_value(node, shapes[inputs[0]])]
        elif standard and all(i in const_names for i in inputs) and len(node.output) == 1:
            mini = onnx.helper.make_model(
                onnx.helper.make_graph([node], "fold", [], [onnx.ValueInfoProto(name=o)
                                                           for o in node.output]),
                opset_imports=opset)
            folded = list(ReferenceEvaluator(mini).run(None, {i: value(i) for i in inputs}))
        if folded is None:
            keep.append(node)
            continue
        for name, v in zip(node.output, folded, strict=True):
            arr = np.asarray(v)
            values[name] = arr
            const_names.add(name)
            new_inits.append(numpy_helper.from_array(arr, name))
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.graph.initializer.extend(new_inits)
    return out
