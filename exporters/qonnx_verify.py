"""Verification of an exported, annotated graph against the torch quantized model (shared by the
export and usable on any graph, e.g. a tampered one)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from ompq_plugin.errors import OmpqError

from . import forced_check as F
from . import graph_session as GS
from . import verify as V
from .export_report import DEFAULT_TOL, LayerExport
from .torch_side import as_images, expected_bits, find_bitconfig

if TYPE_CHECKING:
    from torch import nn

    from ompq_plugin.bitconfig import BitConfig


@dataclass
class Verification:
    layers: list[LayerExport]
    max_abs_diff: float
    exact: bool
    tolerance: float
    n_images: int
    boundary_flips: int = 0
    flip_layers: list[str] = field(default_factory=list)
    forced_images: int = 0
    max_forced_diff: float = 0.0
    top1_agree: int | None = None
    runtime: str = "onnxruntime"  # what executed the graph (see graph_session.GraphSession)

    def report_fields(self) -> dict[str, Any]:
        """The figures ExportReport carries."""
        return dict(n_images=self.n_images, max_abs_diff=self.max_abs_diff, exact=self.exact,
                    tolerance=self.tolerance, boundary_flips=self.boundary_flips,
                    flip_layers=list(self.flip_layers), forced_images=self.forced_images,
                    max_forced_diff=self.max_forced_diff, top1_agree=self.top1_agree)


def verify_qonnx(
    model: onnx.ModelProto,
    qmodel: nn.Module,
    example_input: Any,
    bits: BitConfig | None = None,
    tol: float = DEFAULT_TOL,
    exact: bool | None = None,
    session_factory: Callable[[onnx.ModelProto], Any] = GS.GraphSession,
) -> Verification:
    """Check an exported, annotated graph against the torch model; raise naming the first
    diverging layer. ``exact`` None: bit-exact iff every scale is a power of two.

    Power-of-two scales: the outputs must be bit-identical. Float scales: every image is checked
    layer by layer from torch's own inputs (every activation
    quantizer's output replaced by torch's, see :func:`forced_check.teacher_forced_check`), which
    accepts only isolated exact one-LSB flips of values on a rounding boundary (float
    accumulation order) and within ``tol`` everywhere else.

    The graph runs in one onnxruntime session (:class:`graph_session.GraphSession`: QONNX ops
    lowered to the standard ops computing the same values); torch runs the images as one batch,
    and an image that disagrees is checked again from a one-image torch pass (as the graph runs)
    before anything is refused."""
    images = as_images(example_input, qmodel)
    qmodel.eval()
    bits = find_bitconfig(qmodel, bits)
    expected = expected_bits(qmodel, bits)
    readback = V.read_layers(model)
    names = {rb.node: rb.layer for rb in readback if rb.layer}
    if not names:
        raise OmpqError("the graph carries no ompq layer annotations: export it with ompq export")
    V.check_bits(readback, names, expected)
    if exact is None:
        exact = V.all_scales_power_of_two(model)
    x = images.detach().cpu().numpy().astype(np.float32)
    n = len(x)
    sessions = GS.Sessions(model, session_factory)
    iname, oname = model.graph.input[0].name, model.graph.output[0].name
    if exact:
        ref, calls = V.torch_outputs(qmodel, images, batch=n), []
    else:  # outputs and every quantizer's values from one batched pass
        ref, calls = F.torch_outputs_and_act_calls(qmodel, images)
    stats = F.FlipCheck()
    outs = []
    for i in range(n):
        feeds = {iname: x[i : i + 1]}
        ctx = sessions.plain.run(feeds)
        got_i = np.asarray(ctx[oname]).reshape(ref[i : i + 1].shape)
        if exact and not V.within(V.compare(ref[i : i + 1], got_i), exact, tol):
            ref[i : i + 1] = V.torch_outputs(qmodel, images[i : i + 1])  # as the graph runs
        if not exact:
            # float scales: every image layer by layer from torch's own inputs, which tells
            # rounding-boundary flips from export bugs (even bugs that the logits happen to hide)
            trial = copy.deepcopy(stats)
            try:
                F.teacher_forced_check(model, calls[i], ref[i : i + 1], ctx, sessions, feeds,
                                       tol, trial)
            except OmpqError:  # again from a one-image torch pass before refusing
                one = images[i : i + 1]
                ref[i : i + 1] = V.torch_outputs(qmodel, one)
                trial = copy.deepcopy(stats)
                F.teacher_forced_check(model, F.torch_act_calls(qmodel, one), ref[i : i + 1],
                                       ctx, sessions, feeds, tol, trial)
            stats = trial
        outs.append(got_i)
        del ctx
    got = np.concatenate(outs)
    diff = V.compare(ref, got)
    top1 = None
    if ref.ndim == 2 and ref.shape[1] > 1:
        top1 = int((ref.argmax(axis=1) == got.argmax(axis=1)).sum())
    if exact and not V.within(diff, exact, tol):
        per_image = np.abs(ref.reshape(n, -1) - got.reshape(n, -1)).max(axis=1)
        bad = int(np.argmax(per_image > (0 if exact else tol)))
        ctx = sessions.plain.run({iname: x[bad : bad + 1]})
        order = [(rb.layer, _layer_output(model, rb.node)) for rb in readback if rb.layer]
        torch_out = V.torch_layer_outputs(qmodel, images[bad : bad + 1], [n for n, _ in order])
        first = V.first_diverging_layer(order, torch_out, ctx, exact, tol)
        where = (f"first diverging layer {first[0]} (max |diff| {first[1]:.3g})" if first
                 else "the layers agree, the difference is after the last layer")
        crit = "bit-exact" if exact else f"within {tol:g}"
        raise OmpqError(
            f"{sessions.plain.engine} output differs from torch on image {bad} (max |diff| "
            f"{diff:.3g}, required {crit}): {where}; re-export from the same quantized model"
        )
    layers = []
    for rb in readback:
        if not rb.layer:
            continue
        exp = expected.get(rb.layer)
        layers.append(LayerExport(
            name=rb.layer, node=rb.node, op=rb.op, weight_bits=rb.weight_bits,
            act_bits=rb.act_bits, expected_weight_bits=exp.weight_bits if exp else None,
            expected_act_bits=exp.act_bits if exp else None,
            source=exp.source if exp else "model", weight_quant_node=rb.weight_quant_node,
            act_quant_node=rb.act_quant_node))
    order = [rb.layer for rb in readback if rb.layer]
    flip_layers = sorted(stats.layers, key=lambda n: order.index(n) if n in order else len(order))
    return Verification(layers, diff, exact, tol, n, boundary_flips=stats.flips,
                        flip_layers=flip_layers, forced_images=stats.n_images,
                        max_forced_diff=stats.max_forced_diff, top1_agree=top1,
                        runtime=sessions.plain.engine)


def _layer_output(model: onnx.ModelProto, node_name: str) -> str:
    """Output tensor of a layer node; for MatMul + bias Add, the Add's output."""
    g = V.Graph(model)
    node = next(n for n in g.graph.node if n.name == node_name)
    out = node.output[0]
    if node.op_type == "MatMul":
        adds = [c for c in g.consumers.get(out, []) if c.op_type == "Add"]
        if len(adds) == 1:
            return adds[0].output[0]
    return out
