"""Running a QONNX or QCDQ graph fast: the whole graph in one onnxruntime session.

qonnx's ``execute_onnx`` runs a graph node by node and builds an onnxruntime session for every
standard node, which costs seconds per image on a torchvision-size model. Here the QONNX custom
ops are rewritten as the standard ONNX ops computing exactly the same float32 expressions as
qonnx's numpy implementations (``int_quant``, ``trunc_v1`` / ``trunc_v2``, same operation order),
and the graph runs in a single session with graph optimisations off, so every node is the same
onnxruntime kernel qonnx would call. A graph holding a custom op this rewrite does not cover is
executed by qonnx itself (slow, never wrong).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .ort_session import dataless, external_arrays, large_array, ort_session, session_of
from .verify import Graph

QONNX_DOMAIN_PREFIX = "qonnx.custom_op"
_ROUNDING_OPS = {"ROUND": "Round", "FLOOR": "Floor", "CEIL": "Ceil"}


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
        forced.graph.input.append(
            infos.get(name)
            or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    return forced


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
            return self.op(
                "Mul", [self.op("Sign", [x], base), self.op("Floor", [half], base)], base
            )
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
        y = self.op(
            "Clip",
            [y, self.const("lo", np.float32(lo)), self.const("hi", np.float32(hi))],
            node.name,
        )
        y = self.rounding(_attr(node, "rounding_mode", "ROUND"), y, node.name)
        self.op("Mul", [self.op("Sub", [y, z], node.name), s], node.name, out=node.output[0])

    def trunc(self, node: onnx.NodeProto) -> None:
        """qonnx ``trunc_v1`` (5 inputs) / ``trunc_v2`` (6 inputs)."""
        x, s, z = node.input[0], node.input[1], node.input[2]
        y = self.op(
            "Round", [self.op("Add", [self.op("Div", [x, s], node.name), z], node.name)], node.name
        )
        if len(node.input) == 5:
            in_bits, out_bits = self.const_input(node, 3), self.const_input(node, 4)
            t = np.float32(2.0) ** (in_bits - out_bits)
            y = self.rounding(
                _attr(node, "rounding_mode", "FLOOR"),
                self.op("Div", [y, self.const("t", t)], node.name),
                node.name,
            )
            self.op("Mul", [self.op("Sub", [y, z], node.name), s], node.name, out=node.output[0])
            return
        scale, zeropt = self.const_input(node, 1), self.const_input(node, 2)
        out_scale, out_bits = self.const_input(node, 4), self.const_input(node, 5)
        t = 2 ** np.round(np.log2(out_scale / scale))
        signed, narrow = bool(_attr(node, "signed", 1)), bool(_attr(node, "narrow", 0))
        b = float(out_bits)
        lo = -(2 ** (b - 1)) + (1 if narrow else 0) if signed else 0.0
        hi = 2 ** (b - 1) - 1 if signed else 2**b - (2 if narrow else 1)
        y = self.op("Div", [y, self.const("t", t)], node.name)
        y = self.op(
            "Clip",
            [y, self.const("lo", np.float32(lo)), self.const("hi", np.float32(hi))],
            node.name,
        )
        y = self.rounding(_attr(node, "rounding_mode", "ROUND"), y, node.name)
        zo = self.const("zo", zeropt / t)
        self.op(
            "Mul",
            [self.op("Sub", [y, zo], node.name), node.input[4]],
            node.name,
            out=node.output[0],
        )


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
    out.opset_import.extend(
        o for o in model.opset_import if not o.domain.startswith(QONNX_DOMAIN_PREFIX)
    )
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
        """The session of :func:`forced_model` ``(model, tensors)``: built from the plain
        session when it can (:meth:`GraphSession.forced`), else by the factory."""
        if tensors not in self._forced:
            if hasattr(self.plain, "forced"):
                self._forced[tensors] = self.plain.forced(tensors)
            else:
                self._forced[tensors] = self.factory(forced_model(self.model, list(tensors)))
        return self._forced[tensors]


class GraphSession:
    """Runs a QONNX or QCDQ graph, returning every tensor: one onnxruntime session with QONNX ops
    lowered (see :func:`lower_qonnx_ops`), else qonnx's node-by-node ``execute_onnx``.

    The nodes computed from constants only (the weights' quantizers) run once, here, in their
    own onnxruntime session (same kernels, same values); every run then returns them as they
    are, without recomputing or copying a model's worth of weights per image."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.output = model.graph.output[0].name
        self.constants: dict[str, np.ndarray] = {}
        try:
            lowered = lower_qonnx_ops(model)
        except NotLowerable as exc:
            self.session, self.reason = None, str(exc)
            return
        self.lowered = len(lowered.graph.node) != len(model.graph.node)
        # the graph's own tensors (not the lowering's intermediates), weights' computed once
        wanted = [o for n in model.graph.node for o in n.output if o]
        lowered, folded, self.constants = fold_constants(lowered, set(wanted))
        self._wanted = [o for o in wanted if o not in self.constants]
        # the lowered, folded graph, its large initializers handed over as arrays (for forced
        # copies: see forced)
        self._external = external_arrays(lowered, folded)
        self._prepared = lowered
        self.session, self.reason = session_of(lowered, self._wanted, self._external), ""

    def forced(self, tensors: Sequence[str]) -> GraphSession:
        """The session of :func:`forced_model` ``(self.model, tensors)``.

        Forcing renames the outputs of some of the graph's own nodes and makes the tensors graph
        inputs; lowering keeps those nodes' outputs and folding leaves them (an activation is not
        computed from constants only), so the forced copy of this session's lowered, folded graph
        is the lowered, folded forced graph: the same nodes, the same values handed over, and
        nothing lowered, folded or converted a second time. A tensor that is a folded constant
        (or a graph run by qonnx) gets the forced graph built from scratch."""
        if self.session is None or not self.constants.keys().isdisjoint(tensors):
            return GraphSession(forced_model(self.model, tensors))
        renamed = {t: t + "__ompq_graph" for t in tensors}
        out = GraphSession.__new__(GraphSession)
        out.model, out.output, out.constants = self.model, self.output, self.constants
        out.lowered, out.reason = self.lowered, ""
        out._wanted = [renamed.get(o, o) for o in self._wanted]
        out._external = self._external
        out._prepared = forced_model(self._prepared, tensors)
        out.session = session_of(out._prepared, out._wanted, out._external)
        return out

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

            return oxe.execute_onnx(ModelWrapper(self.model), feeds, return_full_exec_context=True)
        inputs = {i.name for i in self.session.get_inputs()}
        names = [o.name for o in self.session.get_outputs()]
        values = self.session.run(names, {k: v for k, v in feeds.items() if k in inputs})
        return {**self.constants, **feeds, **dict(zip(names, values, strict=True))}


def fold_constants(
    model: onnx.ModelProto, keep: set[str]
) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``model`` (changed in place) without the nodes computed from constants only, their
    outputs consumed by the other nodes made initializers (marked external, without data: their
    values are the second result, which :func:`ort_session` hands to onnxruntime), the
    initializers only they read removed; and the values of those outputs named in ``keep``.
    The folded nodes run in one onnxruntime session (graph optimisations off), as they would in
    the graph, their large inputs handed over as arrays (not copied into its model). Nodes
    producing a graph output stay."""
    graph = model.graph
    const = {t.name for t in graph.initializer} | {""}
    outputs = {o.name for o in graph.output}
    is_folded = []
    for node in graph.node:
        is_folded.append(all(i in const for i in node.input)
                         and not outputs.intersection(node.output))
        if is_folded[-1]:
            const.update(node.output)
    folded = [n for n, f in zip(graph.node, is_folded, strict=True) if f]
    if not folded:
        return model, {}, {}
    rest = [n for n, f in zip(graph.node, is_folded, strict=True) if not f]
    used = {i for n in rest for i in n.input}
    made = [o for n in folded for o in n.output if o]
    needed = [o for o in made if o in used or o in keep]
    read = {i for n in folded for i in n.input}
    inputs = [t for t in graph.initializer if t.name in read]
    handed = {t.name: v for t in inputs if (v := large_array(t)) is not None}
    sub = onnx.helper.make_graph(
        folded,
        "constants",
        [],
        [onnx.ValueInfoProto(name=o) for o in needed],
        [dataless(t.name, handed[t.name]) if t.name in handed else t for t in inputs],
    )
    sub_model = onnx.helper.make_model(sub, opset_imports=list(model.opset_import))
    sub_model.ir_version = model.ir_version
    values = dict(zip(needed, ort_session(sub_model, needed, handed).run(needed, {}),
                      strict=True))
    for k in reversed(range(len(graph.node))):
        if is_folded[k]:
            del graph.node[k]
    for k in reversed(range(len(graph.initializer))):
        if graph.initializer[k].name not in used:
            del graph.initializer[k]
    arrays = {o: values[o] for o in needed if o in used}
    graph.initializer.extend(dataless(o, v) for o, v in arrays.items())
    return model, arrays, {o: values[o] for o in needed if o in keep}
