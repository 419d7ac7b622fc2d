"""``ompq inspect``: per-layer bits, params, MACs, size and BOPs of an ONNX file, from the file
alone. Works on files this tool wrote (layer names come from the ``ompq.*`` annotations) and on
any QONNX / QCDQ graph: layers are the Conv / Gemm / MatMul nodes with constant weights, bits are
read from their Quant (or Clip / DequantizeLinear) nodes, MACs from the inferred shapes.

An unquantized weight or input is reported with ``None`` bits and counted as 32-bit float in
size and BOPs.
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
        rows = [(r.name, r.op, b(r.weight_bits), b(r.act_bits), f"{r.params:,}", f"{r.macs:,}",
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
        return "\n".join(out)

    __str__ = format_table


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.transformation.infer_shapes import InferShapes

        return ModelWrapper(model).transform(InferShapes()).model
    except Exception:  # a graph qonnx cannot handle: fall back to plain ONNX inference
        return onnx.shape_inference.infer_shapes(model)


def _out_channels(op: str, node: onnx.NodeProto, wshape: list[int]) -> int:
    if op == "MatMul":
        return wshape[-1]
    if op == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return wshape[0] if trans_b else wshape[-1]
    if op == "ConvTranspose":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return wshape[1] * group
    return wshape[0]


def inspect_model(model: onnx.ModelProto, path: str = "<model>") -> InspectTable:
    model = _infer_shapes(model)
    g = V.Graph(model)
    nodes = {n.name: n for n in g.graph.node}
    ops = {n.op_type for n in g.graph.node}
    fmt = ("qonnx" if ops & set(V.QUANT_OPS) else
           "qcdq" if ops & {"QuantizeLinear", "DequantizeLinear"} else "onnx")
    rows: list[LayerRow] = []
    annotated = False
    for rb in V.read_layers(model):
        node = nodes[rb.node]
        annotated |= rb.layer is not None
        wshape = rb.weight_shape
        params = int(np.prod(wshape)) if wshape else 0
        oshape = g.shape(node.output[0]) or []
        per_sample = int(np.prod(oshape[1:])) if len(oshape) > 1 else int(np.prod(oshape or [0]))
        cout = _out_channels(node.op_type, node, wshape) if wshape else 0
        positions = per_sample // cout if cout else 0  # output pixels (1 for a dense layer)
        macs = positions * params
        wb = rb.weight_bits if rb.weight_bits is not None else FLOAT_BITS
        ab = rb.act_bits if rb.act_bits is not None else FLOAT_BITS
        rows.append(LayerRow(
            name=rb.layer or rb.node, node=rb.node, op=node.op_type,
            weight_bits=rb.weight_bits, act_bits=rb.act_bits, params=params, macs=macs,
            size_bits=params * wb, bops=macs * wb * ab, weight_shape=list(wshape),
            output_shape=list(oshape)))
    if not rows:
        raise OmpqError(f"{path} has no Conv / Gemm / MatMul layer with constant weights; "
                        "pass a QONNX or QCDQ model file")
    return InspectTable(path=path, layers=rows, format=fmt, annotated=annotated,
                        metadata=V.model_meta(model))


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
    return inspect_model(model, str(p))


def table_json(table: InspectTable) -> str:
    return json.dumps(table.to_json(), indent=2)
