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
from dataclasses import dataclass, field
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
                return [d.dim_value if d.HasField("dim_value") else -1
                        for d in vi.type.tensor_type.shape.dim]
        return None


def node_meta(node: onnx.NodeProto) -> dict[str, str]:
    """Our per-node annotations (``ompq.*`` metadata_props)."""
    return {p.key[len(META_PREFIX):]: p.value for p in node.metadata_props
            if p.key.startswith(META_PREFIX)}


def set_node_meta(node: onnx.NodeProto, **values: Any) -> None:
    keep = [(p.key, p.value) for p in node.metadata_props
            if p.key[len(META_PREFIX):] not in values]
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
                return QuantInfo(node.name, op, _bits_from_range(float(lo), float(hi)), scale,
                                 float(lo) < 0)
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
            same = all(i.bits == first.bits and i.signed == first.signed
                       and _same_scale(i.scale, first.scale) for i in infos)
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


# ------------------------------------------------------------------------------------------------
# float scales: layer-by-layer check with torch's own inputs (teacher forcing)
#
# With float (non power-of-two) scales torch and the runtime accumulate a convolution in a
# different order; an activation within ~1e-7 of a rounding boundary can then be rounded to the
# neighbouring level in one of them, and that one-LSB flip propagates to the logits. To tell this
# apart from an export bug, every activation quantizer's output in the graph is replaced by
# torch's value (so nothing propagates) and each quantizer's graph output, computed from torch's
# upstream values, must equal torch's within ``tol``, except isolated exact one-LSB flips of
# values that lie on a rounding boundary.

FLIP_LSB_TOL = 1e-3  # a flip must be 1 LSB within this (in LSBs)
BOUNDARY_TOL = 1e-3  # ... of a value this close (in LSBs) to a rounding boundary
MAX_FLIP_FRACTION = 1e-3  # at most this fraction of a tensor's elements (at least 1) may flip
FORCEABLE_OPS = ("Quant", "IntQuant", "DequantizeLinear")


@dataclass
class ActCall:
    """One call of an enabled torch activation quantizer."""

    name: str
    value: np.ndarray
    scale: np.ndarray


@dataclass
class FlipCheck:
    """Outcome of the teacher-forced check on the images that needed it."""

    n_images: int = 0
    flips: int = 0  # one-LSB rounding-boundary flips seen, all images
    quantizers: set[str] = field(default_factory=set)  # torch quantizers with flips
    layers: set[str] = field(default_factory=set)  # layers whose output quantizer flipped
    max_forced_diff: float = 0.0  # largest non-flip |diff| layer by layer


def torch_act_calls(qmodel: Any, image: Any) -> list[ActCall]:
    """Every enabled Brevitas activation quantizer call for one image, in call order."""
    return _act_calls_and_output(qmodel, image)[0]


def _act_calls_and_output(qmodel: Any, image: Any) -> tuple[list[ActCall], np.ndarray]:
    from brevitas.proxy.runtime_quant import ActQuantProxyFromInjectorBase

    calls: list[ActCall] = []

    def record(name: str) -> Any:
        def hook(_m: Any, _i: Any, out: Any) -> None:
            scale = getattr(out, "scale", None)
            if scale is not None:
                calls.append(ActCall(name, out.value.detach().cpu().numpy(),
                                     scale.detach().cpu().numpy()))

        return hook

    out = forward_with_hooks(qmodel, image, [
        (module, record(name)) for name, module in qmodel.named_modules()
        if isinstance(module, ActQuantProxyFromInjectorBase) and module.is_quant_enabled
    ])
    return calls, getattr(out, "value", out).detach().cpu().numpy()


def torch_outputs_and_act_calls(qmodel: Any, images: Any) -> tuple[np.ndarray, list[list[ActCall]]]:
    """The outputs (as :func:`torch_outputs` with the whole batch) and :func:`torch_act_calls` of
    every image, from ONE batched forward pass (per-tensor scales are the same for every image;
    the torch side of a verification is otherwise two passes); falls back to one pass per image
    when a quantizer's output does not keep the batch as its first dimension."""
    n = images.shape[0]
    calls, out = _act_calls_and_output(qmodel, images)
    if n == 1 or any(c.value.shape[:1] != (n,) or c.scale.size != 1 and c.scale.shape[:1] == (n,)
                     for c in calls):
        each = [_act_calls_and_output(qmodel, images[i : i + 1]) for i in range(n)]
        return np.concatenate([o for _, o in each]), [c for c, _ in each]
    return out, [[ActCall(c.name, c.value[i : i + 1], c.scale) for c in calls] for i in range(n)]


def torch_act_calls_batched(qmodel: Any, images: Any) -> list[list[ActCall]]:
    """:func:`torch_act_calls` of every image from one batched forward pass (see
    :func:`torch_outputs_and_act_calls`)."""
    return torch_outputs_and_act_calls(qmodel, images)[1]


def act_quant_nodes(g: Graph) -> list[onnx.NodeProto]:
    """Activation quantizers of the graph (not on constants) whose outputs can be forced."""
    return [n for n in g.graph.node
            if n.op_type in FORCEABLE_OPS and not g.is_const(n.input[0])]


def _scale_of(g: Graph, node: onnx.NodeProto) -> np.ndarray | None:
    scale = g.const(node.input[1]) if len(node.input) > 1 else None
    return None if scale is None else np.asarray(scale, dtype=np.float64)


def _same_scale(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.size != b.size and min(a.size, b.size) != 1:
        return False
    return bool(np.all(np.abs(a - b) <= 1e-6 * np.abs(b)))


def _layer_near(g: Graph, node: onnx.NodeProto) -> str | None:
    """Torch name of the annotated weight layer whose output ``node`` quantizes (nearest
    upstream, not crossing other quantizers), else of the layer it feeds."""
    start = node
    if node.op_type == "DequantizeLinear":  # DequantizeLinear <- [Clip] <- QuantizeLinear
        src = g.producer.get(node.input[0])
        while src is not None and src.op_type in ("Clip", "Cast", "Identity"):
            src = g.producer.get(src.input[0])
        start = src if src is not None and src.op_type == "QuantizeLinear" else node
    stack, seen = [start.input[0]], set()
    while stack:
        name = stack.pop()
        prod = g.producer.get(name)
        if prod is None or name in seen:
            continue
        seen.add(name)
        layer = node_meta(prod).get("layer")
        if layer and prod.op_type in LAYER_OPS:
            return layer
        if prod.op_type in QUANT_OPS or prod.op_type in ("DequantizeLinear", "QuantizeLinear"):
            continue
        stack.extend(i for i in prod.input if i and not g.is_const(i))
    stack, seen = [node.output[0]], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for c in g.consumers.get(name, []):
            layer = node_meta(c).get("layer")
            if layer and c.op_type in LAYER_OPS:
                return layer
            stack.extend(c.output)
    return None


def match_act_quants(
    g: Graph, nodes: Sequence[onnx.NodeProto], calls: Sequence[ActCall],
    graph_ctx: dict[str, np.ndarray],
) -> dict[str, ActCall]:
    """Graph quantizer node name -> the torch quantizer call it implements: same shape and scale;
    among several (a quantizer module called twice), the call whose value is closest to the
    graph's own (unforced) value."""
    free = list(range(len(calls)))
    out: dict[str, ActCall] = {}
    for node in nodes:
        scale = _scale_of(g, node)
        value = graph_ctx.get(node.output[0])
        if value is None or scale is None:
            continue
        value = np.asarray(value)
        cands = [i for i in free if calls[i].value.shape == value.shape
                 and _same_scale(scale, calls[i].scale)]
        if not cands:
            layer = _layer_near(g, node)
            raise OmpqError(
                f"first diverging layer {layer or '?'}: quantizer node {node.name} (scale "
                f"{float(scale.ravel()[0]):.6g}, shape {list(value.shape)}) matches no torch "
                "activation quantizer of the same scale and shape; re-export from the same "
                "quantized model"
            )
        best = min(cands, key=lambda i: float(np.mean(np.abs(calls[i].value - value))))
        free.remove(best)
        out[node.name] = calls[best]
    return out


def forced_model(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """Copy of ``model`` where each named tensor becomes a graph input (fed with torch's value);
    the value the graph computes for it is kept as ``<name>__ompq_graph``."""
    forced = onnx.ModelProto.FromString(model.SerializeToString())
    want = set(tensors)
    for node in forced.graph.node:
        for k, out in enumerate(node.output):
            if out in want:
                node.output[k] = out + "__ompq_graph"
    infos = {}
    for vi in forced.graph.value_info:
        if vi.name in want:
            infos[vi.name] = onnx.ValueInfoProto.FromString(vi.SerializeToString())
            vi.name = vi.name + "__ompq_graph"
    for name in tensors:
        forced.graph.input.append(infos.get(name) or onnx.helper.make_tensor_value_info(
            name, onnx.TensorProto.FLOAT, None))
    return forced


def _pre_quant_units(g: Graph, node: onnx.NodeProto, ctx: dict[str, np.ndarray],
                     scale: np.ndarray) -> np.ndarray | None:
    """The quantizer's input in units of its scale (broadcast to the output's shape) plus zero
    point: the value it rounds."""
    if node.op_type in ("Quant", "IntQuant"):
        x, zp_name = ctx.get(node.input[0]), node.input[2]
    else:  # DequantizeLinear <- [Clip] <- QuantizeLinear
        src = g.producer.get(node.input[0])
        while src is not None and src.op_type in ("Clip", "Cast", "Identity"):
            src = g.producer.get(src.input[0])
        if src is None or src.op_type != "QuantizeLinear":
            return None
        x = ctx.get(src.input[0])
        zp_name = src.input[2] if len(src.input) > 2 else ""
    if x is None or np.asarray(x).size != scale.size:
        return None
    x = np.asarray(x, np.float64).reshape(scale.shape)
    zp = g.const(zp_name) if zp_name else None
    zp = np.asarray(zp if zp is not None else 0.0, np.float64)
    if zp.ndim == 1 and zp.size > 1 and x.ndim > 1:  # per-channel zero point on axis 1
        zp = zp.reshape((1, -1) + (1,) * (x.ndim - 2))
    return x / scale + zp


def _broadcast_scale(scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    s = np.asarray(scale, np.float64)
    if s.ndim == 1 and s.size > 1 and len(shape) > 1:
        s = s.reshape((1, -1) + (1,) * (len(shape) - 2))
    return np.broadcast_to(s, shape)


def close(ref: np.ndarray, got: np.ndarray, tol: float) -> np.ndarray:
    """Elementwise: within ``tol`` absolute, or relative for values above 1."""
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return np.abs(ref64 - got64) <= tol * np.maximum(1.0, np.abs(ref64))


def close_to_scale(ref: np.ndarray, got: np.ndarray, tol: float) -> bool:
    """Within ``tol`` relative to the largest value of ``ref`` (absolute below 1). For a layer
    output that is not on a quantization grid (the logits): float32 accumulation errs relative
    to the size of the terms summed, so a logit near zero among logits of 1e8 (large random
    activations, e.g. Inception's init) carries the rounding error of its large terms."""
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    scale = max(1.0, float(np.abs(ref64).max(initial=0.0)))
    return bool(np.all(np.abs(ref64 - got64) <= tol * scale))


def teacher_forced_check(
    model: onnx.ModelProto,
    calls: Sequence[ActCall],
    torch_out: np.ndarray,
    graph_ctx: dict[str, np.ndarray],
    sessions: Sessions,
    feeds: dict[str, np.ndarray],
    tol: float,
    stats: FlipCheck,
) -> None:
    """Check one image layer by layer from torch's inputs; raise naming the first layer that is
    not explained by isolated one-LSB rounding-boundary flips. ``graph_ctx``: the unforced run's
    tensors (to pair quantizers); ``sessions``: runs the forced copies of ``model``; ``feeds``:
    the graph inputs; updates ``stats``."""
    g = sessions.graph
    nodes = act_quant_nodes(g)
    matched = match_act_quants(g, nodes, calls, graph_ctx)
    nodes = [n for n in nodes if n.name in matched]
    forced = sessions.forced(tuple(n.output[0] for n in nodes))
    ctx = forced.run({**feeds, **{n.output[0]: matched[n.name].value.astype(np.float32)
                                  for n in nodes}})
    stats.n_images += 1
    for node in nodes:  # graph order
        call = matched[node.name]
        got = np.asarray(ctx[node.output[0] + "__ompq_graph"], np.float64).reshape(
            call.value.shape)
        ref = call.value.astype(np.float64)
        ok = close(ref, got, tol)
        if ok.all():
            stats.max_forced_diff = max(stats.max_forced_diff, float(np.abs(ref - got).max()))
            continue
        scale = _broadcast_scale(_scale_of(g, node), ref.shape)
        lsb = np.abs(ref - got) / scale
        flip = ~ok & (np.abs(lsb - 1.0) <= FLIP_LSB_TOL)
        units = _pre_quant_units(g, node, ctx, scale)
        if units is not None:
            units = units.reshape(ref.shape)
            frac = units - np.floor(units)
            dist = np.minimum(np.minimum(frac, 1.0 - frac), np.abs(frac - 0.5))
            flip &= dist <= BOUNDARY_TOL
        bad = ~ok & ~flip
        n_flip = int(flip.sum())
        allowed = max(1, int(MAX_FLIP_FRACTION * ref.size))
        if bad.any() or n_flip > allowed:
            layer = _layer_near(g, node)
            what = (f"{int(bad.sum())} of {ref.size} values differ by up to "
                    f"{float(lsb[bad].max()):.3g} LSB (max |diff| "
                    f"{float(np.abs(ref - got)[bad].max()):.3g}), not rounding-boundary flips"
                    if bad.any() else
                    f"{n_flip} of {ref.size} values flip by one LSB, more than the {allowed} "
                    "isolated rounding-boundary flips accepted")
            raise OmpqError(
                f"first diverging layer {layer or '?'} (quantizer {call.name}, node {node.name}, "
                f"computed from torch's own inputs): {what}"
            )
        stats.flips += n_flip
        stats.quantizers.add(call.name)
        layer = _layer_near(g, node)
        if layer:
            stats.layers.add(layer)
        stats.max_forced_diff = max(stats.max_forced_diff,
                                    float(np.abs(ref - got)[~flip].max(initial=0.0)))
    out_name = model.graph.output[0].name
    got = np.asarray(ctx[out_name], np.float64).reshape(torch_out.shape)
    if not close_to_scale(torch_out, got, tol):
        last = next((rb.layer for rb in reversed(read_layers(model)) if rb.layer), "?")
        scale = max(1.0, float(np.abs(torch_out).max(initial=0.0)))
        raise OmpqError(
            f"first diverging layer {last} (graph output computed from torch's own inputs): "
            f"max |diff| {float(np.abs(torch_out - got).max()):.3g}, required within {tol:g} "
            f"x {scale:.3g} (the largest output)"
        )
    stats.max_forced_diff = max(stats.max_forced_diff, float(np.abs(torch_out - got).max()))


# ------------------------------------------------------------------------------------------------
# fast execution: the whole graph in one onnxruntime session
#
# qonnx's ``execute_onnx`` runs a graph node by node and builds an onnxruntime session for every
# standard node, which costs seconds per image on a torchvision-size model. Here the QONNX
# custom ops are rewritten as the standard ONNX ops computing exactly the same float32
# expressions as qonnx's numpy implementations (``int_quant``, ``trunc_v1`` / ``trunc_v2``,
# same operation order), and the graph runs in a single session with graph optimisations off,
# so every node is the same onnxruntime kernel qonnx would call. A graph holding a custom op
# this rewrite does not cover is executed by qonnx itself (slow, never wrong).

QONNX_DOMAIN_PREFIX = "qonnx.custom_op"
_ROUNDING_OPS = {"ROUND": "Round", "FLOOR": "Floor", "CEIL": "Ceil"}


class NotLowerable(Exception):
    """A custom op (or an attribute of one) the standard-op rewrite does not cover."""


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


class _Lowering:
    """Builds the standard-op replacement of each custom node, with fresh tensor names."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}__ompq_low{self.count}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = self._name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, out: str | None = None) -> str:
        out = out or self._name(base)
        self.nodes.append(onnx.helper.make_node(op_type, inputs, [out], name=self._name(base)))
        return out

    def rounding(self, mode: str, x: str, base: str) -> str:
        if str(mode).upper() == "HALF_UP":  # qonnx: sign(x) * floor(|x| + 0.5)
            half = self.op("Add", [self.op("Abs", [x], base), self.const("half", 0.5)], base)
            return self.op("Mul", [self.op("Sign", [x], base), self.op("Floor", [half], base)],
                           base)
        op = _ROUNDING_OPS.get(str(mode).upper())
        if op is None:
            raise NotLowerable(f"rounding mode {mode}")
        return self.op(op, [x], base)

    def const_input(self, node: onnx.NodeProto, k: int) -> np.ndarray:
        value = self.g.const(node.input[k])
        if value is None:
            raise NotLowerable(f"{node.op_type} {node.name}: input {k} is not a constant")
        return np.asarray(value, np.float32)

    def quant(self, node: onnx.NodeProto) -> None:
        """qonnx ``int_quant``: x / s + z, clamp to the integer range, round, - z, * s."""
        bits = self.const_input(node, 3)
        signed, narrow = bool(_attr(node, "signed", 1)), bool(_attr(node, "narrow", 0))
        if bits.size != 1 or (float(bits) == 1 and signed):
            raise NotLowerable(f"Quant {node.name}: bit width {bits}")
        b = float(bits)
        lo = -(2 ** (b - 1)) + (1 if narrow else 0) if signed else 0.0
        hi = 2 ** (b - 1) - 1 if signed else 2**b - (2 if narrow else 1)
        x, s, z = node.input[0], node.input[1], node.input[2]
        y = self.op("Add", [self.op("Div", [x, s], node.name), z], node.name)
        y = self.op("Clip", [y, self.const("lo", np.float32(lo)),
                             self.const("hi", np.float32(hi))], node.name)
        y = self.rounding(_attr(node, "rounding_mode", "ROUND"), y, node.name)
        self.op("Mul", [self.op("Sub", [y, z], node.name), s], node.name, out=node.output[0])

    def trunc(self, node: onnx.NodeProto) -> None:
        """qonnx ``trunc_v1`` (5 inputs) / ``trunc_v2`` (6 inputs)."""
        x, s, z = node.input[0], node.input[1], node.input[2]
        y = self.op("Round", [self.op("Add", [self.op("Div", [x, s], node.name), z], node.name)],
                    node.name)
        if len(node.input) == 5:
            in_bits, out_bits = self.const_input(node, 3), self.const_input(node, 4)
            t = np.float32(2.0) ** (in_bits - out_bits)
            y = self.rounding(_attr(node, "rounding_mode", "FLOOR"),
                              self.op("Div", [y, self.const("t", t)], node.name), node.name)
            self.op("Mul", [self.op("Sub", [y, z], node.name), s], node.name,
                    out=node.output[0])
            return
        scale, zeropt = self.const_input(node, 1), self.const_input(node, 2)
        out_scale, out_bits = self.const_input(node, 4), self.const_input(node, 5)
        t = 2 ** np.round(np.log2(out_scale / scale))
        signed, narrow = bool(_attr(node, "signed", 1)), bool(_attr(node, "narrow", 0))
        b = float(out_bits)
        lo = -(2 ** (b - 1)) + (1 if narrow else 0) if signed else 0.0
        hi = 2 ** (b - 1) - 1 if signed else 2**b - (2 if narrow else 1)
        y = self.op("Div", [y, self.const("t", t)], node.name)
        y = self.op("Clip", [y, self.const("lo", np.float32(lo)),
                             self.const("hi", np.float32(hi))], node.name)
        y = self.rounding(_attr(node, "rounding_mode", "ROUND"), y, node.name)
        zo = self.const("zo", zeropt / t)
        self.op("Mul", [self.op("Sub", [y, zo], node.name), node.input[4]], node.name,
                out=node.output[0])


def lower_qonnx_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` with every QONNX Quant / Trunc node replaced by standard ONNX ops that
    compute the same float32 values; raises :class:`NotLowerable` for anything else custom."""
    g = Graph(model)
    low = _Lowering(g)
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if not node.domain.startswith(QONNX_DOMAIN_PREFIX):
            nodes.append(node)
            continue
        start = len(low.nodes)
        if node.op_type in ("Quant", "IntQuant"):
            low.quant(node)
        elif node.op_type == "Trunc":
            low.trunc(node)
        else:
            raise NotLowerable(f"{node.op_type} {node.name}")
        nodes.extend(low.nodes[start:])
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(low.inits)
    del out.opset_import[:]
    out.opset_import.extend(o for o in model.opset_import
                            if not o.domain.startswith(QONNX_DOMAIN_PREFIX))
    return out


class Sessions:
    """A graph's session and those of its teacher-forced copies, each built once."""

    def __init__(self, model: onnx.ModelProto, factory: Any = None) -> None:
        self.model = model
        self.graph = Graph(model)
        self.factory = factory or GraphSession
        self.plain = self.factory(model)
        self._forced: dict[tuple[str, ...], Any] = {}

    def forced(self, tensors: tuple[str, ...]) -> Any:
        if tensors not in self._forced:
            self._forced[tensors] = self.factory(forced_model(self.model, list(tensors)))
        return self._forced[tensors]


class GraphSession:
    """Runs a QONNX or QCDQ graph, returning every tensor: one onnxruntime session with QONNX ops
    lowered (see :func:`lower_qonnx_ops`), else qonnx's node-by-node ``execute_onnx``."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.output = model.graph.output[0].name
        try:
            lowered = lower_qonnx_ops(model)
        except NotLowerable as exc:
            self.session, self.reason = None, str(exc)
            return
        self.session, self.reason = _ort_every_tensor(lowered), ""
        self.lowered = len(lowered.graph.node) != len(model.graph.node)

    @property
    def engine(self) -> str:
        """What executes the graph, as the export report names it."""
        if self.session is None:
            return "qonnx"
        return "onnxruntime (QONNX ops as standard ops)" if self.lowered else "onnxruntime"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every tensor of one execution (graph inputs included)."""
        if self.session is None:
            import qonnx.core.onnx_exec as oxe
            from qonnx.core.modelwrapper import ModelWrapper

            return oxe.execute_onnx(ModelWrapper(self.model), feeds,
                                    return_full_exec_context=True)
        inputs = {i.name for i in self.session.get_inputs()}
        names = [o.name for o in self.session.get_outputs()]
        values = self.session.run(names, {k: v for k, v in feeds.items() if k in inputs})
        return {**feeds, **dict(zip(names, values, strict=True))}


def _ort_every_tensor(model: onnx.ModelProto) -> Any:
    """An onnxruntime session (graph optimisations off) whose outputs are every node output."""
    import onnxruntime as ort

    produced = {o for n in model.graph.node for o in n.output}
    produced |= {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    dangling = [o for o in model.graph.output if o.name not in produced]
    for o in dangling:  # extra outputs qonnx's cleanup can leave unconnected
        model.graph.output.remove(o)
    have = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in have:
                model.graph.output.append(onnx.ValueInfoProto(name=out))
                have.add(out)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise OmpqError(f"onnxruntime cannot load the exported graph ({str(exc)[:400]})") from None
