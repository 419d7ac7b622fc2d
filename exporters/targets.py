"""What the exported QONNX graph must look like for a given compiler, so that the compiler's own
documented flow takes the file as it is (no rewrite by the user, none hidden in our checks).

* every target: a bias ``Quant``'s scale and zero point are 1-element vectors, not 0-d arrays
  (qonnx's ``ExtractBiasFromConv``, run by FINN's ``step_qonnx_to_finn``, reshapes any parameter
  whose shape is not ``(1,)`` to ``(1, C, 1, 1)`` and fails on a 0-d one);
* ``hls4ml``: a ``GlobalAveragePool`` over H x W = 2^k pixels becomes the equivalent depthwise
  ``Conv`` (kernel H x W, every weight 1 = ``Quant(1, scale 2^-k, 2 bits)``; a search on the
  hls4ml profile counts it in the budgets, ``ompq_plugin.fixed_layers``). qonnx's
  ``ConvertToChannelsLastAndClean`` has no channels-last GlobalAveragePool and leaves a
  ``Transpose`` in front of it, which hls4ml's io_stream code mis-reads (wrong sums, or a crash
  with ``Illegal instruction``); a Conv goes channels-last and hls4ml sizes its accumulator
  exactly. The values are identical (the mean of 2^k values on a power-of-two grid is exact in
  float32), so the export's bit-exact verification still holds;
* ``finn``: a shared activation ``Quant`` (and its ``Relu``) is copied for each reader
  (:func:`split_shared_act_quants`), so FINN's default streamlining leaves every conv with an
  integer input;
* ``hls4ml``: :func:`hls4ml_config` is the part of hls4ml's config that its defaults get wrong:
  the network input. hls4ml converts the float input to ``fixed<16,6>`` by truncation before the
  first ``Quant``, which moves values onto rounding ties; ``fixed<b+24, i, TRN, SAT>`` keeps every
  float32 input on the same side of every tie of a b-bit input quantizer (a float32 value above a
  tie t exceeds it by at least one ulp of t >= 2^-(f+24) for a 2^-f grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ompq_plugin.fixed_layers import POOL_WEIGHT_BITS

from . import verify as V
from .export_report import PoolConv
from .graph_session import GraphSession

TARGETS = ("generic", "hls4ml", "finn")
QONNX_DOMAIN = "qonnx.custom_op.general"
FLOAT32_MANTISSA = 24  # bits of a float32 significand, hidden bit included


def target_for_profile(profile: str | None) -> str:
    """The export target a hardware profile implies (its name when it is a known target)."""
    return profile if profile in TARGETS else "generic"


def vector_bias_params(model: onnx.ModelProto) -> int:
    """Make the scale / zero point of every bias Quant a (1,) vector where it is 0-d; in place.
    Returns how many tensors changed."""
    g = V.Graph(model)
    changed = 0
    for node in g.graph.node:
        if node.op_type not in V.LAYER_OPS or len(node.input) < 3 or not node.input[2]:
            continue
        bq = g.producer.get(node.input[2])
        if bq is None or bq.op_type not in ("Quant", "IntQuant"):
            continue
        for name in bq.input[1:3]:
            init = g.inits.get(name)
            if init is not None and len(init.dims) == 0:
                value = numpy_helper.to_array(init).reshape(1)
                init.CopyFrom(numpy_helper.from_array(value, name))
                changed += 1
                stale = [vi for vi in g.graph.value_info if vi.name == name]
                for vi in stale:  # a recorded 0-d shape would contradict the new one
                    g.graph.value_info.remove(vi)
    return changed


def _shape(model: onnx.ModelProto, name: str) -> list[int] | None:
    shape = V.Graph(model).shape(name)
    return shape if shape and all(d > 0 for d in shape) else None


def global_pools_as_depthwise(model: onnx.ModelProto) -> list[str]:
    """Replace each GlobalAveragePool over 2^k pixels by the equal depthwise Conv; in place.
    Returns the names of the replaced nodes (they keep their names)."""
    graph = model.graph
    done: list[str] = []
    for gap in [n for n in graph.node if n.op_type == "GlobalAveragePool"]:
        shape = _shape(model, gap.input[0])
        if shape is None or len(shape) != 4:
            continue
        _, c, h, w = shape
        k = round(math.log2(h * w))
        if 2**k != h * w:
            continue  # 1/(H*W) is not a power of two: hls4ml cannot make it exact either
        base = f"{gap.name}_pool_weight"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.ones((c, 1, h, w), np.float32), base),
                numpy_helper.from_array(np.array([2.0**-k], np.float32), f"{base}_scale"),
                numpy_helper.from_array(np.array([0.0], np.float32), f"{base}_zeropt"),
                numpy_helper.from_array(
                    np.array(float(POOL_WEIGHT_BITS), np.float32), f"{base}_bitwidth"
                ),
            ]
        )
        quant = helper.make_node(
            "Quant",
            [base, f"{base}_scale", f"{base}_zeropt", f"{base}_bitwidth"],
            [f"{base}_quant"],
            name=f"{gap.name}_weight_quant",
            domain=QONNX_DOMAIN,
            signed=1,
            narrow=1,
            rounding_mode="ROUND",
        )
        conv = helper.make_node(
            "Conv",
            [gap.input[0], f"{base}_quant"],
            list(gap.output),
            name=gap.name,
            group=c,
            kernel_shape=[h, w],
            pads=[0, 0, 0, 0],
            strides=[1, 1],
            dilations=[1, 1],
        )
        V.set_node_meta(conv, role="pool", pool=f"global average over {h}x{w}",
                        module=V.node_meta(gap).get("module"))
        V.set_node_meta(quant, role="pool_weight", bits=POOL_WEIGHT_BITS)
        index = list(graph.node).index(gap)
        graph.node.remove(gap)
        graph.node.insert(index, conv)
        graph.node.insert(index, quant)
        done.append(conv.name)
    return done


def name_global_pools(model: onnx.ModelProto) -> None:
    """Annotate each ``GlobalAveragePool`` of a raw TorchScript export (node names still scoped:
    ``/layer4/pool/GlobalAveragePool``) with the torch module it came from (``ompq.module`` =
    ``layer4.pool``: the name a search on the hls4ml profile gives its pool conv, and the name
    ``ompq inspect`` shows; not ``ompq.layer``, which marks the model's quantized layers); in
    place, before qonnx's cleanup renames the nodes. A functional pool (no module scope) gets
    none."""
    for node in model.graph.node:
        scope = node.name.strip("/").split("/")[:-1]
        if node.op_type == "GlobalAveragePool" and scope:
            V.set_node_meta(node, module=".".join(scope))


def pool_convs(model: onnx.ModelProto, counted: dict[str, int]) -> list[PoolConv]:
    """The pool convolutions of the graph (:func:`global_pools_as_depthwise`), each marked as
    counted or not by a BitConfig's fixed layers (``counted``: name -> weights): the uncounted
    ones are memory the file holds beyond the BitConfig's totals. A pool conv matches the fixed
    layer of its module's name; one with no module (a functional pool) matches a fixed layer no
    module name took, of its number of weights."""
    g = V.Graph(model)
    convs = [n for n in g.graph.node if V.node_meta(n).get("role") == "pool"]
    named = {V.node_meta(n).get("module") for n in convs}
    spare = [w for name, w in counted.items() if name not in named]
    out = []
    for node in convs:
        module = V.node_meta(node).get("module")
        weights = int(np.prod(g.shape(node.input[1]) or [0]))
        by_size = module is None and weights in spare
        if by_size:
            spare.remove(weights)
        out.append(PoolConv(module or node.name, POOL_WEIGHT_BITS, weights,
                            counted=module in counted or by_size))
    return out


def input_precision(model: onnx.ModelProto) -> str | None:
    """hls4ml type for the network input that rounds every float32 input exactly as the first
    Quant does (see the module docstring); None when the input is not read by one Quant."""
    g = V.Graph(model)
    iname = model.graph.input[0].name
    readers = g.consumers.get(iname, [])
    if len(readers) != 1 or readers[0].op_type != "Quant":
        return None
    info = V.quant_info(g, readers[0])
    if info is None or info.scale is None or np.asarray(info.scale).size != 1:
        return None
    scale = float(np.asarray(info.scale).ravel()[0])
    frac = -math.log2(scale)
    if frac != round(frac):
        return None
    int_bits = info.bits - round(frac)  # includes the sign bit when signed
    kind = "fixed" if info.signed else "ufixed"
    return f"{kind}<{info.bits + FLOAT32_MANTISSA},{int_bits},TRN,SAT>"


def hls4ml_config(model: onnx.ModelProto) -> dict[str, dict[str, dict[str, object]]]:
    """The entries to merge into ``config_from_onnx_model(...)['LayerName']`` (may be empty)."""
    prec = input_precision(model)
    if prec is None:
        return {}
    return {model.graph.input[0].name: {"Precision": {"result": prec}}}


def set_act_rounding(model: onnx.ModelProto, mode: str) -> int:
    """Set ``rounding_mode`` of every activation ``Quant`` (one whose input is not a constant) to
    ``mode``; in place. Brevitas' QONNX export writes ``ROUND`` for every quantizer (its export op
    knows only its own rounding enum), so a model whose activation quantizers round half up
    (:func:`ompq_plugin.rounding.rounds_half_up`) needs this before its graph computes what the
    model computes. Returns how many nodes changed."""
    g = V.Graph(model)
    changed = 0
    for node in g.graph.node:
        if node.op_type != "Quant" or g.const(node.input[0]) is not None:
            continue
        attrs = [a for a in node.attribute if a.name == "rounding_mode"]
        if attrs and attrs[0].s.decode() == mode:
            continue
        for a in attrs:
            node.attribute.remove(a)
        node.attribute.append(helper.make_attribute("rounding_mode", mode))
        changed += 1
    return changed


def split_shared_act_quants(model: onnx.ModelProto) -> list[str]:
    """Give every reader of a shared activation ``Quant`` (a ResNet trunk: the next block's conv
    and the residual branch) its own copy of that Quant, and of the ``Relu`` in front of it when
    the Relu feeds only that Quant; in place. The copies compute the same values.

    Why: FINN turns each Quant into MultiThreshold -> Mul(scale); a shared Quant leaves one scale
    Mul feeding two nodes, which FINN's default ``Streamline`` cannot move past a fork
    (``MoveScalarLinearPastInvariants``: "is a fork-node, try MoveLinearPastFork first"), so the
    conv behind it keeps a float input and does not become an MVAU. With a copy per reader the
    fork sits before the thresholds, and each scale Mul moves into the conv's next threshold.
    FINN's Relu handler removes the Relu in front of the Quant it converts without looking at
    other readers, so the Relu is copied too. Returns the names of the copies."""
    g = V.Graph(model)
    graph = model.graph
    added: list[str] = []
    for quant in [n for n in graph.node if n.op_type == "Quant"]:
        if g.const(quant.input[0]) is not None:
            continue
        readers = g.consumers.get(quant.output[0], [])
        if len(readers) < 2:
            continue
        relu = g.producer.get(quant.input[0])
        if relu is not None and (relu.op_type != "Relu" or len(g.consumers[relu.output[0]]) != 1):
            relu = None
        anchor = relu or quant
        for k, reader in enumerate(readers[1:], start=1):
            copy_q = onnx.NodeProto()
            copy_q.CopyFrom(quant)
            copy_q.name = f"{quant.name}_copy{k}"
            copy_q.output[0] = f"{quant.output[0]}_copy{k}"
            new_nodes = [copy_q]
            if relu is not None:
                copy_r = onnx.NodeProto()
                copy_r.CopyFrom(relu)
                copy_r.name = f"{relu.name}_copy{k}"
                copy_r.output[0] = f"{relu.output[0]}_copy{k}"
                copy_q.input[0] = copy_r.output[0]
                new_nodes.insert(0, copy_r)
            for i, name in enumerate(reader.input):
                if name == quant.output[0]:
                    reader.input[i] = copy_q.output[0]
            index = list(graph.node).index(anchor)
            for node in reversed(new_nodes):
                graph.node.insert(index, node)
            added += [n.name for n in new_nodes]
    return added


def prepare_for_target(model: onnx.ModelProto, target: str) -> dict[str, object]:
    """Apply what ``target`` needs to the (cleaned, annotated) graph; in place. Returns a summary
    for the graph metadata."""
    done: dict[str, object] = {"target": target}
    done["bias_params_vectorised"] = vector_bias_params(model)
    if target == "hls4ml":
        done["global_pools_as_depthwise_conv"] = global_pools_as_depthwise(model)
    if target == "finn":
        done["shared_act_quants_split"] = split_shared_act_quants(model)
    return done


@dataclass(frozen=True)
class TieCount:
    """Activation values that land exactly on a rounding tie of their ``Quant`` (x / s = k + 1/2
    inside the clipping range), where FINN's thresholds (ties up) and the node's rounding mode
    may disagree: a ``HALF_UP`` Quant agrees with FINN on ``positive`` ties, never on
    ``negative`` ones; a ``ROUND`` (half to even) Quant on half of each."""

    values: int  # activation values quantized, all images
    positive: int
    negative: int
    per_quant: dict[str, tuple[int, int]]  # Quant node -> (positive, negative) ties
    modes: dict[str, str]  # Quant node -> rounding_mode

    @property
    def ties(self) -> int:
        return self.positive + self.negative

    def disagreeing(self) -> int:
        """Ties on which the node's rounding differs from FINN's floor(x / s + 1/2)."""
        return sum(
            neg if self.modes[q] == "HALF_UP" else pos + neg
            for q, (pos, neg) in self.per_quant.items()
        )


def count_ties(model: onnx.ModelProto, images: np.ndarray) -> TieCount:
    """Count rounding ties of every activation Quant of ``model`` on ``images`` (N x C x H x W,
    run one at a time through :class:`graph_session.GraphSession`). For ``ROUND`` quantizers
    every tie is counted, also those where half-even rounding happens to agree with FINN."""
    g = V.Graph(model)
    quants = [n for n in g.graph.node if n.op_type == "Quant" and g.const(n.input[0]) is None]
    modes = {
        q.name: next((a.s.decode() for a in q.attribute if a.name == "rounding_mode"), "ROUND")
        for q in quants
    }
    session = GraphSession(model)
    iname = model.graph.input[0].name
    counts = {q.name: [0, 0] for q in quants}
    values = 0
    for i in range(len(images)):
        ctx = session.run({iname: images[i : i + 1]})
        for q in quants:
            x = np.asarray(ctx[q.input[0]], np.float64)
            s = np.asarray(g.const(q.input[1]), np.float64)
            info = V.quant_info(g, q)
            lo, hi = _int_range(info.bits, info.signed, _narrow(q))
            y = x / s
            tie = (y - np.floor(y) == 0.5) & (y > lo) & (y < hi)
            counts[q.name][0] += int((tie & (y > 0)).sum())
            counts[q.name][1] += int((tie & (y < 0)).sum())
            values += x.size
    per = {k: (v[0], v[1]) for k, v in counts.items()}
    return TieCount(
        values, sum(v[0] for v in per.values()), sum(v[1] for v in per.values()), per, modes
    )


def _narrow(node: onnx.NodeProto) -> bool:
    return any(a.name == "narrow" and a.i for a in node.attribute)


def _int_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1 - int(narrow)
