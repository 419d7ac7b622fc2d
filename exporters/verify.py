"""Reading bits back from an exported graph and checking it against the torch quantized model.

Works on the ONNX files alone (no Brevitas needed for the graph side), for both formats:

* QONNX: a weight is ``initializer -> Quant(x, scale, zeropt, bitwidth) -> Conv/Gemm/MatMul``;
  an activation is quantized by the nearest ``Quant`` / ``Trunc`` / ``BipolarQuant`` upstream of
  the layer's data input (through layout-only ops and pooling).
* QCDQ: ``int constant -> [Clip] -> DequantizeLinear -> Conv/Gemm``; bits come from the Clip
  bounds (narrow ranges) or else from the integer type.

The torch-side helpers (reference outputs, per-layer hooks) import torch lazily.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ompq_plugin.errors import OmpqError

LAYER_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
QUANT_OPS = ("Quant", "BipolarQuant", "Trunc", "IntQuant")
# Ops that do not change which quantizer a tensor's values come from (layout, selection, pooling).
PASS_THROUGH_OPS = (
    "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Pad", "Identity", "MaxPool",
    "GlobalMaxPool", "AveragePool", "GlobalAveragePool", "Dropout", "Slice", "Gather",
)  # fmt: skip
META_PREFIX = "ompq."


# ------------------------------------------------------------------------------------------------
# graph access


class Graph:
    """Read-only index over an ONNX graph: producers, consumers and constant values."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.inits: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
        self._const: dict[str, bool] = {}

    def const(self, name: str) -> np.ndarray | None:
        """Value of an initializer or a Constant node's output, else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name in ("value_float", "value_int"):
                    return np.array(onnx.helper.get_attribute_value(attr))
                if attr.name in ("value_floats", "value_ints"):
                    return np.array(onnx.helper.get_attribute_value(attr))
        return None

    def is_const(self, name: str) -> bool:
        """An initializer, a Constant, or computed from constants only (a quantizer / cast chain
        on weights). Iterative and memoised: a recursive walk back along the data path exceeded
        Python's recursion limit on EfficientNet-V2 and cost time quadratic in the depth."""
        cache = self._const
        stack = [name]
        while stack:
            top = stack[-1]
            if top in cache:
                stack.pop()
                continue
            node = self.producer.get(top)
            if top in self.inits or (node is not None and node.op_type == "Constant"):
                cache[top] = True
            elif node is None:
                cache[top] = False
            else:
                pending = [i for i in node.input if i and i not in cache]
                if pending:
                    stack.extend(pending)
                    continue
                cache[top] = all(cache[i] for i in node.input if i)
            stack.pop()
        return cache[name]

    def shape(self, name: str) -> list[int] | None:
        value = self.const(name)
        if value is not None:
            return list(value.shape)
        for vi in list(self.graph.value_info) + list(self.graph.input) + list(self.graph.output):
            if vi.name == name and vi.type.tensor_type.HasField("shape"):
                return [
                    d.dim_value if d.HasField("dim_value") else -1
                    for d in vi.type.tensor_type.shape.dim
                ]
        return None


def node_meta(node: onnx.NodeProto) -> dict[str, str]:
    """Our per-node annotations (``ompq.*`` metadata_props)."""
    return {
        p.key[len(META_PREFIX) :]: p.value
        for p in node.metadata_props
        if p.key.startswith(META_PREFIX)
    }


def set_node_meta(node: onnx.NodeProto, **values: Any) -> None:
    keep = [
        (p.key, p.value) for p in node.metadata_props if p.key[len(META_PREFIX) :] not in values
    ]
    del node.metadata_props[:]
    for key, value in keep:
        node.metadata_props.add(key=key, value=value)
    for key, value in values.items():
        if value is not None:
            node.metadata_props.add(key=META_PREFIX + key, value=str(value))
    node.doc_string = "; ".join(f"{p.key}={p.value}" for p in node.metadata_props)


def model_meta(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def set_model_meta(model: onnx.ModelProto, values: dict[str, str]) -> None:
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    for key, value in [*keep, *values.items()]:
        model.metadata_props.add(key=key, value=value)


# ------------------------------------------------------------------------------------------------
# quantizers in the graph


@dataclass(frozen=True)
class QuantInfo:
    """One quantizer found in the graph: the node, its bit width, scale and signedness."""

    node: str
    op: str
    bits: int
    scale: np.ndarray | None
    signed: bool | None


def _bits_from_range(lo: float, hi: float) -> int:
    return max(1, math.ceil(math.log2(hi - lo + 1)))


def _int_type_bits(dtype: np.dtype) -> tuple[int, bool]:
    return np.dtype(dtype).itemsize * 8, np.issubdtype(dtype, np.signedinteger)


def same_scale(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.size != b.size and min(a.size, b.size) != 1:
        return False
    return bool(np.all(np.abs(a - b) <= 1e-6 * np.abs(b)))


def quant_info(g: Graph, node: onnx.NodeProto) -> QuantInfo | None:
    """Bits of a QONNX Quant/Trunc/BipolarQuant node or a QCDQ Q/[Clip]/DQ chain end."""
    op = node.op_type
    if op in ("Quant", "IntQuant"):
        bits = g.const(node.input[3])
        if bits is None:
            return None
        scale = g.const(node.input[1])
        signed = next((bool(a.i) for a in node.attribute if a.name == "signed"), True)
        return QuantInfo(node.name, op, int(np.asarray(bits).max()), scale, signed)
    if op == "BipolarQuant":
        return QuantInfo(node.name, op, 1, g.const(node.input[1]), True)
    if op == "Trunc":
        bits = g.const(node.input[4])  # output bit width
        if bits is None:
            return None
        return QuantInfo(node.name, op, int(np.asarray(bits).max()), g.const(node.input[1]), None)
    if op == "DequantizeLinear":
        scale = g.const(node.input[1])
        src = g.producer.get(node.input[0])
        value = g.const(node.input[0])
        if src is not None and src.op_type == "Clip":
            lo, hi = g.const(src.input[1]), g.const(src.input[2])
            if lo is not None and hi is not None:
                return QuantInfo(
                    node.name, op, _bits_from_range(float(lo), float(hi)), scale, float(lo) < 0
                )
            value = g.const(src.input[0])
        if value is not None and np.issubdtype(value.dtype, np.integer):
            bits, signed = _int_type_bits(value.dtype)
            return QuantInfo(node.name, op, bits, scale, signed)
        if src is not None and src.op_type == "QuantizeLinear":
            zp = g.const(src.input[2]) if len(src.input) > 2 and src.input[2] else None
            if zp is not None:
                bits, signed = _int_type_bits(zp.dtype)
                return QuantInfo(node.name, op, bits, scale, signed)
            return QuantInfo(node.name, op, 8, scale, False)
    return None


def weight_quant(g: Graph, layer: onnx.NodeProto) -> tuple[onnx.NodeProto | None, str | None]:
    """(quantizer node, weight tensor name) of a layer's weight input."""
    if len(layer.input) < 2:
        return None, None
    name = layer.input[1]
    node = g.producer.get(name)
    hops = 0
    while node is not None and hops < 4:
        if node.op_type in QUANT_OPS or node.op_type == "DequantizeLinear":
            src = node.input[0]
            while src in g.producer and g.producer[src].op_type in ("Clip", "Cast", "Identity"):
                src = g.producer[src].input[0]
            return node, src
        if node.op_type not in ("Transpose", "Reshape", "Identity", "Cast"):
            break
        node = g.producer.get(node.input[0])
        hops += 1
    return None, name if g.is_const(name) else None


def is_weight_layer(g: Graph, node: onnx.NodeProto) -> bool:
    """A Conv/Gemm/MatMul whose second input is a constant (possibly quantized) weight."""
    return node.op_type in LAYER_OPS and len(node.input) > 1 and g.is_const(node.input[1])


def act_quant(g: Graph, layer: onnx.NodeProto) -> onnx.NodeProto | None:
    """The quantizer that produced the values of the layer's data input (None: unquantized)."""
    return _quant_of(g, layer.input[0])


def _quant_of(g: Graph, name: str, hops: int = 32) -> onnx.NodeProto | None:
    """The quantizer a tensor's values come from, through layout-only ops, pooling, and a
    Concat whose inputs all come from quantizers with the same bits, sign and scale (one shared
    quantizer: the concatenation is on its grid; the first input's quantizer is returned)."""
    for _ in range(hops):
        node = g.producer.get(name)
        if node is None:
            return None
        if node.op_type in QUANT_OPS or node.op_type == "DequantizeLinear":
            return node
        if node.op_type == "Concat":
            found = [_quant_of(g, i, hops - 1) for i in node.input if i and not g.is_const(i)]
            infos = [quant_info(g, f) if f is not None else None for f in found]
            if not infos or any(i is None or i.scale is None for i in infos):
                return None
            first = infos[0]
            same = all(
                i.bits == first.bits
                and i.signed == first.signed
                and same_scale(i.scale, first.scale)
                for i in infos
            )
            return found[0] if same else None
        # a global average pool we exported as a depthwise conv (exporters.targets) counts as
        # the pool it stands for
        if node.op_type not in PASS_THROUGH_OPS and node_meta(node).get("role") != "pool":
            return None
        name = node.input[0]
    return None


@dataclass
class LayerReadBack:
    """A weight layer as found in the graph, with the bits read from its quantizers."""

    node: str
    op: str
    weight_name: str | None
    weight_shape: list[int]
    weight_bits: int | None
    act_bits: int | None
    bias_bits: int | None
    weight_quant_node: str | None
    act_quant_node: str | None
    layer: str | None  # torch name from our annotations, if present


def read_layers(model: onnx.ModelProto) -> list[LayerReadBack]:
    """Every weight layer of the graph in graph order, bits read back from the quantizers."""
    g = Graph(model)
    found: list[LayerReadBack] = []
    for node in g.graph.node:
        if not is_weight_layer(g, node):
            continue
        wq, wname = weight_quant(g, node)
        wq_info = quant_info(g, wq) if wq is not None else None
        aq = act_quant(g, node)
        aq_info = quant_info(g, aq) if aq is not None else None
        bias_bits = None
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias_name is None and node.op_type == "MatMul":
            adds = [c for c in g.consumers.get(node.output[0], []) if c.op_type == "Add"]
            if len(adds) == 1:
                other = [i for i in adds[0].input if i != node.output[0]]
                bias_name = other[0] if other and g.is_const(other[0]) else None
        if bias_name is not None and bias_name in g.producer:
            binfo = quant_info(g, g.producer[bias_name])
            bias_bits = binfo.bits if binfo else None
        wshape = g.shape(wname) if wname else None
        if wshape is None and wq is not None:
            wshape = g.shape(wq.output[0])
        meta = node_meta(node)
        found.append(
            LayerReadBack(
                node=node.name,
                op=node.op_type,
                weight_name=wname,
                weight_shape=list(wshape or []),
                weight_bits=wq_info.bits if wq_info else None,
                act_bits=aq_info.bits if aq_info else None,
                bias_bits=bias_bits,
                weight_quant_node=wq.name if wq is not None else None,
                act_quant_node=aq.name if aq is not None else None,
                layer=meta.get("layer"),
            )
        )
    return found


def all_scales_power_of_two(model: onnx.ModelProto) -> bool:
    """True when every quantizer scale in the graph is an exact power of two."""
    g = Graph(model)
    seen = False
    for node in g.graph.node:
        if node.op_type in QUANT_OPS or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale = g.const(node.input[1]) if len(node.input) > 1 else None
            if scale is None:
                return False
            seen = True
            s = np.asarray(scale, dtype=np.float64)
            if np.any(s <= 0) or not np.all(np.log2(s) == np.round(np.log2(s))):
                return False
    return seen


# ------------------------------------------------------------------------------------------------
# expected bits and comparison


@dataclass(frozen=True)
class Expected:
    """Bits a layer must have: from the BitConfig, else from the torch module's quantizers."""

    weight_bits: int
    act_bits: int | None
    source: str  # "BitConfig" or "model"


def check_bits(
    readback: Sequence[LayerReadBack], names: dict[str, str], expected: dict[str, Expected]
) -> None:
    """Raise naming the first layer (graph order) whose bits in the file differ from ``expected``.

    ``names`` maps ONNX layer node name -> torch layer name.
    """
    seen = set()
    for rb in readback:
        torch_name = names.get(rb.node)
        if torch_name is None or torch_name not in expected:
            continue
        seen.add(torch_name)
        exp = expected[torch_name]
        if rb.weight_bits != exp.weight_bits:
            raise OmpqError(
                f"layer {torch_name}: the exported graph has {rb.weight_bits}-bit weights "
                f"(node {rb.weight_quant_node}) but the {exp.source} says {exp.weight_bits}; "
                "re-quantize the model with this BitConfig before exporting"
            )
        if exp.act_bits is not None and rb.act_bits is not None and rb.act_bits != exp.act_bits:
            raise OmpqError(
                f"layer {torch_name}: the exported graph quantizes its input to {rb.act_bits} "
                f"bits (node {rb.act_quant_node}) but the {exp.source} says {exp.act_bits}; "
                "re-quantize the model with this BitConfig before exporting"
            )
        if exp.act_bits is not None and rb.act_bits is None:
            raise OmpqError(
                f"layer {torch_name}: no activation quantizer found before node {rb.node}; "
                "quantize the model with ompq_plugin.quantizer so every layer input is quantized"
            )
    missing = [n for n in expected if n not in seen]
    if missing:
        raise OmpqError(
            f"layer {missing[0]} of the {expected[missing[0]].source} has no quantized "
            "layer in the exported graph; check that the model was quantized with this BitConfig"
        )


def compare(ref: np.ndarray, got: np.ndarray) -> float:
    if ref.shape != got.shape:
        got = got.reshape(ref.shape) if got.size == ref.size else got
    if ref.shape != got.shape:
        raise OmpqError(f"exported graph output shape {got.shape} differs from torch {ref.shape}")
    if not ref.size:
        return 0.0
    return float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))


def within(diff: float, exact: bool, tol: float) -> bool:
    return diff == 0.0 if exact else diff <= tol


# ------------------------------------------------------------------------------------------------
# torch side


def torch_outputs(qmodel: Any, images: Any, batch: int = 1) -> np.ndarray:
    """Outputs of the torch quantized model, ``batch`` images at a time (1: as the graph runs)."""
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            out = qmodel(images[i : i + batch])
            out = getattr(out, "value", out)
            outs.append(out.detach().cpu().numpy())
    return np.concatenate(outs)


def forward_with_hooks(qmodel: Any, image: Any, hooks: Iterable[tuple[Any, Any]]) -> Any:
    """One no-grad forward pass of ``image`` with ``(module, forward_hook)`` pairs attached;
    returns the model's output."""
    import torch

    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            return qmodel(image)
    finally:
        for h in handles:
            h.remove()


def torch_layer_outputs(qmodel: Any, image: Any, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Output of each named torch layer for one image (forward hooks)."""
    captured: dict[str, np.ndarray] = {}

    def capture(name: str) -> Any:
        def hook(_m: Any, _i: Any, out: Any) -> None:
            captured[name] = getattr(out, "value", out).detach().cpu().numpy()

        return hook

    forward_with_hooks(qmodel, image, [(qmodel.get_submodule(n), capture(n)) for n in names])
    return captured


def first_diverging_layer(
    layer_order: Sequence[tuple[str, str]],
    torch_out: dict[str, np.ndarray],
    graph_ctx: dict[str, np.ndarray],
    exact: bool,
    tol: float,
) -> tuple[str, float] | None:
    """First (torch name, diff) in graph order whose output differs; ``layer_order`` holds
    (torch name, ONNX output tensor) pairs."""
    for torch_name, tensor in layer_order:
        if torch_name not in torch_out or tensor not in graph_ctx:
            continue
        diff = compare(torch_out[torch_name], np.asarray(graph_ctx[tensor]))
        if not within(diff, exact, tol):
            return torch_name, diff
    return None
