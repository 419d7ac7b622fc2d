"""Stream each layer's feature f_i(X) through one forward pass and keep only its N x N Gram.

The traced graph runs in a torch.fx Interpreter that frees every value after its last use; at
each layer's feature point (see ``layers``) the feature is turned into its float64 Gram and
dropped. Peak memory is therefore one forward pass plus L Grams of N x N, never all features at
once. An untraceable model falls back to forward hooks on the layers themselves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
from torch import nn

from ompq_plugin.errors import OmpqError
from ompq_plugin.layers import ModelLayers

# Columns of a feature converted to float64 at a time: bounds the float64 copy to ~64 MiB.
_CHUNK_ELEMENTS = 1 << 23


@dataclass
class GramResult:
    grams: list[torch.Tensor]  # one N x N float64 Gram per layer, in layer order
    features_s: float  # forward pass time, Gram products excluded
    gram_s: float  # time spent forming Grams


class _GramAccumulator:
    def __init__(self, layers: ModelLayers) -> None:
        self.by_point: dict[str, list[int]] = {}
        for i, layer in enumerate(layers.layers):
            self.by_point.setdefault(layer.feature_node, []).append(i)
        self.names = layers.names
        self.grams: list[torch.Tensor | None] = [None] * len(layers.layers)
        self.seconds = 0.0

    def add(self, point: str, value: object) -> None:
        indices = self.by_point.get(point)
        if not indices:
            return
        if not isinstance(value, torch.Tensor):
            raise OmpqError(f"feature of layer {self.names[indices[0]]} is not a tensor")
        start = time.perf_counter()
        g = streamed_gram(value.detach())
        self.seconds += time.perf_counter() - start
        check_gram(g, [self.names[i] for i in indices])
        for i in indices:
            self.grams[i] = g

    def result(self) -> list[torch.Tensor]:
        missing = [self.names[i] for i, g in enumerate(self.grams) if g is None]
        if missing:
            raise OmpqError(f"no feature was produced for layers {missing}; is the model static?")
        return [g for g in self.grams if g is not None]


def streamed_gram(features: torch.Tensor) -> torch.Tensor:
    """Float64 Gram Y Y^T of (N, ...) features, converting a bounded slice at a time.

    The product runs in numpy: on this CPU build its float64 GEMM for this short-and-wide shape
    was 3-6x faster than torch's, and the float32 -> float64 conversion 10x faster (measured).
    """
    y = features.detach().reshape(features.shape[0], -1).cpu()
    if y.dtype not in (torch.float32, torch.float64):
        y = y.float()  # half / bfloat16 / integer features
    y = y.numpy()
    n, d = y.shape
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    g = np.zeros((n, n), dtype=np.float64)
    for start in range(0, d, step):
        block = y[:, start : start + step].astype(np.float64)
        g += block @ block.T
    return torch.from_numpy(g)


def check_gram(g: torch.Tensor, layer_names: list[str]) -> None:
    """A non-finite or all-zero feature makes ORM meaningless: stop with the layer's name."""
    diag = torch.diagonal(g)
    name = layer_names[0]
    if not torch.isfinite(diag).all():
        raise OmpqError(
            f"layer {name} produced NaN/Inf activations on the search samples; check the "
            "weights (corrupt checkpoint?) and the input normalisation"
        )
    if float(diag.max()) == 0.0:
        raise OmpqError(
            f"layer {name} produced all-zero activations on every search sample; check the "
            "weights and the input normalisation"
        )


class _TapInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, acc: _GramAccumulator) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.acc = acc

    def run_node(self, n: torch.fx.Node) -> object:
        value = super().run_node(n)
        self.acc.add(n.name, value)
        return value


def collect_grams(model: nn.Module, layers: ModelLayers, samples: torch.Tensor) -> GramResult:
    """Run ``samples`` (N, ...) once through the float model; return every layer's Gram."""
    acc = _GramAccumulator(layers)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if layers.traced and layers.graph_module is not None:
                layers.graph_module.eval()
                _TapInterpreter(layers.graph_module, acc).run(samples)
            else:
                _run_with_hooks(model, acc, samples)
    finally:
        model.train(was_training)
    total = time.perf_counter() - start
    return GramResult(acc.result(), features_s=total - acc.seconds, gram_s=acc.seconds)


def _run_with_hooks(model: nn.Module, acc: _GramAccumulator, samples: torch.Tensor) -> None:
    modules = dict(model.named_modules())
    handles = [
        modules[point].register_forward_hook(
            lambda _m, _i, out, point=point: acc.add(point, out)
        )
        for point in acc.by_point
    ]
    try:
        model(samples)
    finally:
        for h in handles:
            h.remove()
