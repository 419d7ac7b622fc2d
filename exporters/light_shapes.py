"""ONNX shape inference without serializing a model's weights around it.

``onnx.shape_inference.infer_shapes`` serializes the whole model, parses it in C++, serializes
the result and parses it back in Python: four passes over a VGG's 530 MB of weights for each
call, and the export's cleanup makes two. Shape inference reads an initializer's values only for
the inputs whose values decide a shape (Reshape's shape, Slice's starts, ...); a weight read only
by a layer, an elementwise op or a quantizer is needed for its type and dimensions alone. Here
such weights (4 KiB or more, stored as ``raw_data``) have their data taken out of the model for
the duration of the call and put back, in the input and in the result: the same result as
``infer_shapes`` of the whole model (tests/test_export_speedups.py compares them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx

from .ort_session import nbytes

MIN_BYTES = 4096
# standard ops whose ONNX shape inference uses only the types and shapes of their inputs
VALUE_FREE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization",
    "Identity", "Cast", "Relu",
})  # fmt: skip
# QONNX quantizers: qonnx hides them behind a Cast / Identity of their first input
QUANT_OPS = frozenset({"Quant", "IntQuant", "Trunc", "BipolarQuant"})


def _value_free(node: onnx.NodeProto) -> bool:
    if node.domain in ("", "ai.onnx"):
        return node.op_type in VALUE_FREE_OPS
    return node.op_type in QUANT_OPS and node.domain.startswith(("qonnx", "onnx.brevitas"))


def detachable(model: onnx.ModelProto) -> list[int]:
    """Positions of the initializers whose data shape inference does not read (see module
    doc): 4 KiB or more of ``raw_data``, read by value-free ops only (not a graph output)."""
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    found = []
    for k, t in enumerate(graph.initializer):
        nodes = readers.get(t.name, [])
        if (nodes and t.name not in outputs and t.HasField("raw_data")
                and nbytes(t) >= MIN_BYTES and all(_value_free(n) for n in nodes)):
            found.append(k)
    return found


@contextlib.contextmanager
def data_detached(model: onnx.ModelProto) -> Iterator[dict[int, bytes]]:
    """Inside, the :func:`detachable` initializers of ``model`` have no data (in place); yields
    their data by position. Put back on leaving, also on an error."""
    inits = model.graph.initializer
    data = {}
    for k in detachable(model):
        data[k] = inits[k].raw_data
        inits[k].ClearField("raw_data")
    try:
        yield data
    finally:
        for k, raw in data.items():
            inits[k].raw_data = raw


def attach(model: onnx.ModelProto, data: dict[int, bytes], names: list[str]) -> None:
    """Put detached ``data`` back into ``model``'s initializers (same positions and ``names``
    as where it was taken from); in place."""
    inits = model.graph.initializer
    if [t.name for t in inits] != names:
        raise RuntimeError("the initializers changed while their data was detached")
    for k, raw in data.items():
        inits[k].raw_data = raw


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes(model)``, the weights' data not serialized (see
    module doc); ``model`` is left as it was."""
    names = [t.name for t in model.graph.initializer]
    with data_detached(model) as data:
        inferred = onnx.shape_inference.infer_shapes(model)
    attach(inferred, data, names)
    return inferred
