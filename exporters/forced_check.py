"""Float scales: a layer-by-layer check of an exported graph with torch's own inputs.

With float (non power-of-two) scales torch and the runtime accumulate a convolution in a
different order; an activation within ~1e-7 of a rounding boundary can then be rounded to the
neighbouring level in one of them, and that one-LSB flip propagates to the logits. To tell this
apart from an export bug, every activation quantizer's output in the graph is replaced by
torch's value (so nothing propagates) and each quantizer's graph output, computed from torch's
upstream values, must equal torch's within ``tol``, except isolated exact one-LSB flips of
values that lie on a rounding boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ompq_plugin.errors import OmpqError

from .graph_session import Sessions
from .verify import (
    LAYER_OPS,
    QUANT_OPS,
    Graph,
    forward_with_hooks,
    node_meta,
    read_layers,
    same_scale,
)

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
                calls.append(
                    ActCall(name, out.value.detach().cpu().numpy(), scale.detach().cpu().numpy())
                )

        return hook

    out = forward_with_hooks(
        qmodel,
        image,
        [
            (module, record(name))
            for name, module in qmodel.named_modules()
            if isinstance(module, ActQuantProxyFromInjectorBase) and module.is_quant_enabled
        ],
    )
    return calls, getattr(out, "value", out).detach().cpu().numpy()


def torch_outputs_and_act_calls(qmodel: Any, images: Any) -> tuple[np.ndarray, list[list[ActCall]]]:
    """The outputs (as :func:`torch_outputs` with the whole batch) and :func:`torch_act_calls` of
    every image, from ONE batched forward pass (per-tensor scales are the same for every image;
    the torch side of a verification is otherwise two passes); falls back to one pass per image
    when a quantizer's output does not keep the batch as its first dimension."""
    n = images.shape[0]
    calls, out = _act_calls_and_output(qmodel, images)
    if n == 1 or any(
        c.value.shape[:1] != (n,) or c.scale.size != 1 and c.scale.shape[:1] == (n,) for c in calls
    ):
        each = [_act_calls_and_output(qmodel, images[i : i + 1]) for i in range(n)]
        return np.concatenate([o for _, o in each]), [c for c, _ in each]
    return out, [[ActCall(c.name, c.value[i : i + 1], c.scale) for c in calls] for i in range(n)]


def torch_act_calls_batched(qmodel: Any, images: Any) -> list[list[ActCall]]:
    """:func:`torch_act_calls` of every image from one batched forward pass (see
    :func:`torch_outputs_and_act_calls`)."""
    return torch_outputs_and_act_calls(qmodel, images)[1]


def act_quant_nodes(g: Graph) -> list[onnx.NodeProto]:
    """Activation quantizers of the graph (not on constants) whose outputs can be forced."""
    return [n for n in g.graph.node if n.op_type in FORCEABLE_OPS and not g.is_const(n.input[0])]


def _scale_of(g: Graph, node: onnx.NodeProto) -> np.ndarray | None:
    scale = g.const(node.input[1]) if len(node.input) > 1 else None
    return None if scale is None else np.asarray(scale, dtype=np.float64)


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
    g: Graph,
    nodes: Sequence[onnx.NodeProto],
    calls: Sequence[ActCall],
    graph_ctx: dict[str, np.ndarray],
) -> dict[str, ActCall]:
    """Graph quantizer node name -> the torch quantizer call it implements: same shape and scale;
    among several (a quantizer module called twice), the call whose value is closest to the
    graph's own (unforced) value."""
    free: dict[tuple[int, ...], list[int]] = {}  # by shape, in call order
    for i, call in enumerate(calls):
        free.setdefault(call.value.shape, []).append(i)
    first = np.array([float(np.ravel(c.scale)[0]) if np.size(c.scale) else np.nan for c in calls])
    out: dict[str, ActCall] = {}
    for node in nodes:
        scale = _scale_of(g, node)
        value = graph_ctx.get(node.output[0])
        if value is None or scale is None:
            continue
        value = np.asarray(value)
        same_shape = np.array(free.get(value.shape, []), dtype=int)
        # the first scale element must already agree (a cheap, necessary test, vectorised)
        near = np.abs(first[same_shape] - float(np.ravel(scale)[0])) <= 1e-6 * np.abs(
            first[same_shape]
        )
        cands = [int(i) for i in same_shape[near] if same_scale(scale, calls[i].scale)]
        if not cands:
            layer = _layer_near(g, node)
            raise OmpqError(
                f"first diverging layer {layer or '?'}: quantizer node {node.name} (scale "
                f"{float(scale.ravel()[0]):.6g}, shape {list(value.shape)}) matches no torch "
                "activation quantizer of the same scale and shape; re-export from the same "
                "quantized model"
            )
        best = min(cands, key=lambda i: float(np.mean(np.abs(calls[i].value - value))))
        free[value.shape].remove(best)
        out[node.name] = calls[best]
    return out


def _pre_quant_units(
    g: Graph, node: onnx.NodeProto, ctx: dict[str, np.ndarray], scale: np.ndarray
) -> np.ndarray | None:
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
    ctx = forced.run(
        {**feeds, **{n.output[0]: matched[n.name].value.astype(np.float32) for n in nodes}}
    )
    stats.n_images += 1
    for node in nodes:  # graph order
        call = matched[node.name]
        got = np.asarray(ctx[node.output[0] + "__ompq_graph"], np.float64).reshape(call.value.shape)
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
            what = (
                f"{int(bad.sum())} of {ref.size} values differ by up to "
                f"{float(lsb[bad].max()):.3g} LSB (max |diff| "
                f"{float(np.abs(ref - got)[bad].max()):.3g}), not rounding-boundary flips"
                if bad.any()
                else f"{n_flip} of {ref.size} values flip by one LSB, more than the {allowed} "
                "isolated rounding-boundary flips accepted"
            )
            raise OmpqError(
                f"first diverging layer {layer or '?'} (quantizer {call.name}, node {node.name}, "
                f"computed from torch's own inputs): {what}"
            )
        stats.flips += n_flip
        stats.quantizers.add(call.name)
        layer = _layer_near(g, node)
        if layer:
            stats.layers.add(layer)
        stats.max_forced_diff = max(
            stats.max_forced_diff, float(np.abs(ref - got)[~flip].max(initial=0.0))
        )
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
