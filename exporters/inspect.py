"""``ompq inspect``: per-layer bits, params, MACs, size and BOPs of an ONNX file, from the file
alone. Works on files this tool wrote (layer names come from the ``ompq.*`` annotations) and on
any QONNX / QCDQ graph:

* layers are the Conv / ConvTranspose / Gemm / MatMul nodes with a constant weight, found by
  position (nodes may have empty or repeated names); params and MACs come from the weight as the
  layer consumes it (after any Transpose / Reshape between its quantizer and the layer) and the
  inferred output shape, as in qonnx's ``inference_cost``;
* weight bits from the quantizer in front of the weight: ``Quant`` / ``IntQuant``,
  ``BipolarQuant`` (1), ``FloatQuant`` (1 + exponent + mantissa bits, reported as ``fp<N>``),
  QCDQ ``[Clip] -> DequantizeLinear`` (Clip bounds, else the integer type, 4 for (u)int4 and
  ``com.microsoft`` int4); where qonnx cleanup folded a weight Clip away, the ``ompq.bits``
  annotation of our own files keeps the true width;
* activation bits from the quantizer the input values come from, traced back only through ops
  that keep the values on that quantizer's grid (layout ops, max pool, zero padding, ReLU,
  nearest-neighbour Resize). An average pool, a linear Resize, an Add or Mul of two tensors, a
  Concat etc. put values off the grid: the bits are then unknown (``None``; "float" in the table,
  as qonnx's inference_cost says FLOAT32), and the row's ``act_note`` says which op;
* a FINN hardware graph (``MVAU_hls`` & co.) or a file that is not a QONNX/QCDQ model is refused
  in one line naming what was found.

Unknown weight or activation bits are counted as 32-bit float in size and BOPs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ompq_plugin.errors import OmpqError

from . import verify as V

FLOAT_BITS = 32


@dataclass
class LayerRow:
    name: str  # torch layer name if annotated, else the ONNX node name
    node: str
    op: str
    weight_bits: int | None
    act_bits: int | None
    params: int
    macs: int
    size_bits: int
    bops: int
    weight_shape: list[int]
    output_shape: list[int]
    weight_format: str = "int"  # "int", "bipolar", "fp<N>" (FloatQuant) or "float"
    act_note: str = ""  # why the input bits are unknown (e.g. "after AveragePool")


@dataclass
class InspectTable:
    path: str
    layers: list[LayerRow]
    format: str  # "qonnx", "qcdq" or "onnx"
    annotated: bool  # written by this tool (ompq.* annotations present)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def totals(self) -> dict[str, Any]:
        params = sum(r.params for r in self.layers)
        size = sum(r.size_bits for r in self.layers)
        return {
            "layers": len(self.layers),
            "params": params,
            "macs": sum(r.macs for r in self.layers),
            "size_bits": size,
            "size_bytes": size / 8,
            "bops": sum(r.bops for r in self.layers),
            "average_weight_bits": size / params if params else 0.0,
        }

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "annotated": self.annotated,
                "layers": [asdict(r) for r in self.layers], "totals": self.totals}

    def format_table(self) -> str:
        def b(v: int | None) -> str:
            return "float" if v is None else str(v)

        head = ("layer", "op", "W", "A", "params", "MACs", "size [KiB]", "BOPs [M]")
        rows = [(r.name, r.op, r.weight_format if r.weight_format.startswith("fp")
                 else b(r.weight_bits), b(r.act_bits), f"{r.params:,}", f"{r.macs:,}",
                 f"{r.size_bits / 8192:.2f}", f"{r.bops / 1e6:.1f}") for r in self.layers]
        t = self.totals
        rows.append(("total", "", f"{t['average_weight_bits']:.2f}", "", f"{t['params']:,}",
                     f"{t['macs']:,}", f"{t['size_bits'] / 8192:.2f}", f"{t['bops'] / 1e6:.1f}"))
        widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
        line = lambda cells: "  ".join(  # noqa: E731
            str(c).ljust(w) if i < 2 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        out = [f"{self.path}  ({self.format}{', annotated by ompq' if self.annotated else ''})",
               line(head), line(["-" * w for w in widths])]
        out += [line(r) for r in rows[:-1]] + [line(["-" * w for w in widths]), line(rows[-1])]
        out.append("W: weight bits (total: average), A: input activation bits")
        notes = sorted({f"{r.name}: A {r.act_note}" for r in self.layers if r.act_note})
        out += notes[:8]
        return "\n".join(out)

    __str__ = format_table


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    if any(n.domain == "qonnx.custom_op.channels_last" for n in model.graph.node):
        # qonnx 1.0's channels-last Conv builds a dense stand-in tensor for shape inference
        # that takes minutes (inference_cost hangs too): keep the shapes the file records
        try:
            return onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001
            return model
    try:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.transformation.infer_shapes import InferShapes

        return ModelWrapper(model).transform(InferShapes()).model
    except Exception:  # a graph qonnx cannot handle: fall back to plain ONNX inference
        try:
            return onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - shapes stay unknown; MACs then 0
            return model


def inspect_model(model: onnx.ModelProto, path: str = "<model>") -> InspectTable:
    refuse_hardware_graph(model, path)
    model = _infer_shapes(model)
    g = V.Graph(model)
    ops = {n.op_type for n in g.graph.node}
    fmt = ("qonnx" if ops & {*V.QUANT_OPS, "FloatQuant"} else
           "qcdq" if ops & {"QuantizeLinear", "DequantizeLinear"} else "onnx")
    rows: list[LayerRow] = []
    annotated = False
    for index, node in enumerate(g.graph.node):
        if not _is_layer(g, node):
            continue
        meta = V.node_meta(node)
        annotated |= "layer" in meta
        wshape = g.shape(node.input[1]) or []
        if any(d <= 0 for d in wshape):
            wshape = []
        params = int(np.prod(wshape)) if wshape else 0
        oshape = g.shape(node.output[0]) or []
        macs = layer_macs(node, wshape, oshape)
        wbits, wlabel = weight_bits(g, node)
        abits, note = act_bits(g, node.input[0])
        name = meta.get("layer") or meta.get("module") or node.name or f"{node.op_type}#{index}"
        wb = wbits if wbits is not None else FLOAT_BITS
        ab = abits if abits is not None else FLOAT_BITS
        rows.append(LayerRow(
            name=name, node=node.name or f"#{index}", op=node.op_type, weight_bits=wbits,
            act_bits=abits, params=params, macs=macs, size_bits=params * wb,
            bops=macs * wb * ab, weight_shape=list(wshape), output_shape=list(oshape),
            weight_format=wlabel, act_note=note))
    if not rows:
        raise OmpqError(f"{path} has no Conv / Gemm / MatMul layer with constant weights; "
                        "pass a QONNX or QCDQ model file")
    return InspectTable(path=path, layers=rows, format=fmt, annotated=annotated,
                        metadata=V.model_meta(model))


# ------------------------------------------------------------------------------------------------
# layers, MACs, bits

HARDWARE_DOMAINS = ("finn.custom_op.fpgadataflow",)
# values stay on the producing quantizer's grid through these ops
GRID_KEEPING_OPS = {
    "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "MaxPool",
    "GlobalMaxPool", "Dropout", "Slice", "Gather", "Relu", "Im2Col", "SpaceToDepth",
    "DepthToSpace",
}  # fmt: skip
WEIGHT_LAYOUT_OPS = ("Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze")


def refuse_hardware_graph(model: onnx.ModelProto, path: str) -> None:
    hw = sorted({n.op_type for n in model.graph.node
                 if n.domain.startswith(HARDWARE_DOMAINS) or n.op_type.endswith(("_hls", "_rtl"))})
    if hw:
        raise OmpqError(f"{path} is a FINN hardware graph ({', '.join(hw[:4])}), not a QONNX / "
                        "QCDQ model; inspect the QONNX file it was built from")


def _is_layer(g: V.Graph, node: onnx.NodeProto) -> bool:
    return (node.op_type in V.LAYER_OPS and len(node.input) > 1 and bool(node.input[1])
            and g.is_const(node.input[1]))


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def layer_macs(node: onnx.NodeProto, wshape: list[int], oshape: list[int]) -> int:
    """Multiply-accumulates of one inference (batch 1) from the consumed weight and output shape.

    Conv: output elements x (C_in / group x kernel); ConvTranspose: input pixels x weight size;
    Gemm / MatMul: output elements x the reduced dimension K."""
    # the batch dimension may be symbolic (-1: a QCDQ file's dynamic batch); per-sample MACs
    # need only the others
    if node.op_type == "MatMul" and wshape and (not oshape or any(d <= 0 for d in oshape[1:])):
        # output shape not inferable (e.g. a Reshape fed by Shape -> Gather -> Concat): one row
        # per sample, as for a Flatten -> MatMul classifier (what qonnx's inference_cost finds
        # after folding those shapes)
        return int(np.prod(wshape))
    if not wshape or not oshape or any(d <= 0 for d in oshape[1:]) or (
            len(oshape) == 1 and oshape[0] <= 0):
        return 0
    per_sample = int(np.prod(oshape[1:])) if len(oshape) > 1 else int(oshape[0])
    if node.op_type == "Conv":
        return per_sample * int(np.prod(wshape[1:]))
    if node.op_type == "ConvTranspose":
        group = _attr(node, "group", 1)
        cout = wshape[1] * group
        strides = next((list(a.ints) for a in node.attribute if a.name == "strides"), None)
        spatial = per_sample // cout if cout else 0
        step = int(np.prod(strides)) if strides else 1
        return (spatial // step) * int(np.prod(wshape))
    if node.op_type == "Gemm":
        k = wshape[1] if _attr(node, "transB", 0) else wshape[0]
        return per_sample * k
    return per_sample * (wshape[-2] if len(wshape) > 1 else 1)  # MatMul


def _weight_quantizer(g: V.Graph, layer: onnx.NodeProto) -> onnx.NodeProto | None:
    node = g.producer.get(layer.input[1])
    for _ in range(8):
        if node is None:
            return None
        if node.op_type in (*V.QUANT_OPS, "FloatQuant", "DequantizeLinear", "Clip"):
            return node
        if node.op_type not in WEIGHT_LAYOUT_OPS:
            return None
        node = g.producer.get(node.input[0])
    return None


def float_quant_bits(g: V.Graph, node: onnx.NodeProto) -> int | None:
    """FloatQuant(x, scale, exponent_bitwidth, mantissa_bitwidth, ...): 1 + e + m bits."""
    e = g.const(node.input[2]) if len(node.input) > 2 else None
    m = g.const(node.input[3]) if len(node.input) > 3 else None
    if e is None or m is None:
        return None
    return 1 + int(np.asarray(e).max()) + int(np.asarray(m).max())


def _int4_bits(g: V.Graph, name: str) -> int | None:
    init = g.inits.get(name)
    if init is not None and init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return 4
    return None


def quantizer_bits(g: V.Graph, q: onnx.NodeProto) -> tuple[int | None, str]:
    """(bits, format label) of one quantizer node; (None, 'float') if it is not one."""
    if q.op_type == "FloatQuant":
        bits = float_quant_bits(g, q)
        return bits, f"fp{bits}" if bits else "float"
    if q.op_type == "DequantizeLinear":
        src = g.producer.get(q.input[0])
        if src is None or src.op_type != "Clip":
            int4 = _int4_bits(g, q.input[0])
            if int4 is None and src is not None and src.op_type == "QuantizeLinear":
                zp = src.input[2] if len(src.input) > 2 else ""
                int4 = _int4_bits(g, zp) if zp else None
            if int4 is not None:
                return int4, "int"
            if V.node_meta(q).get("bits"):  # a weight Clip folded away by qonnx cleanup
                return int(V.node_meta(q)["bits"]), "int"
    info = V.quant_info(g, q)
    if info is None:
        return None, "float"
    return info.bits, "bipolar" if q.op_type == "BipolarQuant" else "int"


def weight_bits(g: V.Graph, layer: onnx.NodeProto) -> tuple[int | None, str]:
    q = _weight_quantizer(g, layer)
    if q is None:
        return None, "float"
    if q.op_type == "Clip":  # a Clip -> DequantizeLinear chain seen from its far end is handled
        return None, "float"  # by quant_info; a bare Clip is no quantizer
    return quantizer_bits(g, q)


def act_bits(g: V.Graph, name: str) -> tuple[int | None, str]:
    """(bits, note) of the values arriving in tensor ``name``: the nearest quantizer upstream
    through grid-keeping ops; (None, why) when the values are off any quantizer's grid."""
    for _ in range(64):
        node = g.producer.get(name)
        if node is None:
            return None, "graph input (not quantized)" if not g.is_const(name) else "constant"
        op = node.op_type
        if op in (*V.QUANT_OPS, "FloatQuant", "DequantizeLinear"):
            bits, label = quantizer_bits(g, node)
            return bits, "" if label in ("int", "bipolar") else label
        if op == "Pad":
            value = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
            if mode != "constant" or (value is not None and np.any(np.asarray(value) != 0)):
                return None, "after Pad (non-zero value)"
        elif op == "Resize":
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
            if mode != "nearest":
                return None, f"after Resize ({mode})"
        elif op in ("Mul", "Div", "Add", "Sub"):
            return None, f"after {op}"
        elif op in ("Conv", "Gemm", "MatMul") and V.node_meta(node).get("role") == "pool":
            return None, "after AveragePool (exported as depthwise Conv)"
        elif op not in GRID_KEEPING_OPS:
            return None, f"after {op}"
        name = node.input[0]
    return None, "unknown"
def inspect_onnx(path: str | os.PathLike[str]) -> InspectTable:
    """Per-layer table of an ONNX file (see module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise OmpqError(f"model file {p} not found: check the path")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # protobuf decode errors have several types
        raise OmpqError(f"{p} is not an ONNX model ({type(exc).__name__}); pass a .onnx file "
                        "written by `ompq export` or another QONNX/QCDQ exporter") from None
    if not model.graph.node:
        raise OmpqError(f"{p} holds no ONNX graph (no nodes); pass a QONNX or QCDQ model file")
    return inspect_model(model, str(p))


def table_json(table: InspectTable) -> str:
    return json.dumps(table.to_json(), indent=2)
