"""Float weights as the quantizer sees them: BatchNorm folded into the preceding layer."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from ompq_plugin.errors import OmpqError


def folded_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm folded (same function, same layer
    names), the weights ``quantize`` quantizes; ``model`` itself when folding is impossible."""
    from ompq_plugin.quant_graph import fold_batchnorms, trace_model

    try:
        gm = trace_model(copy.deepcopy(model).eval())
        fold_batchnorms(gm, {})  # an unfoldable BatchNorm stays as it is: weights unchanged
        gm.recompile()
    except OmpqError:
        return model
    return gm.eval()


def folded_weights(
    model: nn.Module, names: Sequence[str], graph: fx.Graph | None = None
) -> list[torch.Tensor]:
    """The weights of the layers ``names`` as ``folded_copy`` would have them, computed without
    copying the model: each Conv/Linear followed by a BatchNorm (its only user) gets the
    BatchNorm folded in (``torch.nn.utils.fusion``'s formula, as ``quantize`` uses).

    ``graph``: a trace of ``model`` (targets naming ``model``'s modules) whose Conv/Linear/
    BatchNorm modules are single nodes (the layer discovery's), reused instead of tracing again;
    untraceable models keep their weights.
    """
    from ompq_plugin.quant_graph import FOLDABLE_NORMS, SUPPORTED_LAYERS, trace_model

    exact = (*SUPPORTED_LAYERS, *FOLDABLE_NORMS)
    if graph is not None and any(  # a subclass may trace differently: trace as quantize does
        isinstance(m, exact) and type(m) not in exact for m in model.modules()
    ):
        graph = None
    if graph is None:
        try:
            graph = trace_model(model).graph
        except OmpqError:
            graph = None
    modules = dict(model.named_modules())
    out = {name: modules[name].weight.detach() for name in names}
    with torch.no_grad():  # no autograd record of the folding: only the values are kept
        _fold_into(out, modules, graph)
    return [out[name] for name in names]


def _fold_into(
    out: dict[str, torch.Tensor], modules: dict[str, nn.Module], graph: fx.Graph | None
) -> None:
    """Replace, in ``out``, each layer's weight by its BatchNorm-folded weight."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

    from ompq_plugin.quant_graph import FOLDABLE_NORMS, SUPPORTED_LAYERS, FixedShortcutConv

    for node in graph.nodes if graph is not None else ():
        bn = modules.get(str(node.target)) if node.op == "call_module" else None
        prev = node.args[0] if node.args else None
        if not isinstance(bn, FOLDABLE_NORMS) or not isinstance(prev, fx.Node):
            continue
        layer = modules.get(str(prev.target)) if prev.op == "call_module" else None
        if (
            str(prev.target) not in out
            or not isinstance(layer, SUPPORTED_LAYERS)
            or isinstance(layer, FixedShortcutConv)
            or len(prev.users) != 1
            or not bn.track_running_stats
            or bn.running_mean is None
        ):
            continue
        args = (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        if isinstance(layer, nn.Linear):
            w, _ = fuse_linear_bn_weights(layer.weight, layer.bias, *args)
        else:
            w, _ = fuse_conv_bn_weights(layer.weight, layer.bias, *args)
        out[str(prev.target)] = w.detach()
