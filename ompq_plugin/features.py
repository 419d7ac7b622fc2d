"""Stream each layer's feature f_i(X) through one forward pass and keep only its N x N Gram.

The traced graph runs in an interpreter that taps each layer's feature point (see ``layers``),
turning the feature into its Gram, and the feature is freed after its last use as in the plain
forward pass. Peak memory is therefore one forward pass plus L Grams of N x N, never all
features at once. An untraceable model falls back to forward hooks on the layers themselves.

Precision: for the centred ORM (the default) each feature's Gram is formed in float32 and
centred over the N samples (:func:`centred_gram`: after the product while the shared mean does
not dominate the features, before it otherwise), then stored in float64: the largest ORM
difference against float64 is recorded per model in ``bench/results/search_speed.json`` (below
1e-6 on ResNet-20/56, MobileNetV2 and ResNet-50). The uncentred ORM keeps the float64 Gram of
the raw features.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
from torch import nn

from ompq_plugin.errors import OmpqError
from ompq_plugin.graph_run import run_graph
from ompq_plugin.layers import (
    QUANTIZABLE_TYPES,
    ModelLayers,
    discover_layers,
    feature_points,
    relu_fed_layers,
)
from ompq_plugin.methods import act_stats

# Columns of a feature converted to float64 at a time: bounds the float64 copy to ~64 MiB.
_CHUNK_ELEMENTS = 1 << 23
_ONEDNN = torch.backends.mkldnn.is_available()
# Where oneDNN forms a block's Gram faster than numpy (measured, bench/gram_kernels.py): from
# 64 x 8192 or 32 x 16384 elements, from 24 rows, and up to 2^17 columns: past 393,216 columns
# its product fell off a cliff (60x slower, 1e-4 relative error)
_ONEDNN_MIN_ELEMENTS = 1 << 19
_ONEDNN_MIN_ROWS = 24
_ONEDNN_MAX_COLUMNS = 1 << 17
# A centred Gram is formed from the raw features' product while their energy is at most this
# multiple of their spread's (float32 error grows with it; see centred_gram)
_MAX_MEAN_SHARE = 32.0


@dataclass
class GramResult:
    grams: list[torch.Tensor]  # one N x N float64 Gram per layer, in layer order
    features_s: float  # forward pass time, Gram products excluded
    gram_s: float  # time spent forming Grams
    centred: bool = False  # Grams of features centred over the samples (float32 products)


class _GramAccumulator:
    def __init__(self, points: Mapping[str, str], centred: bool = False) -> None:
        """``points``: layer name -> the node (or module) whose output is its feature."""
        self.centred = centred
        self.by_point: dict[str, list[str]] = {}
        for name, point in points.items():
            self.by_point.setdefault(point, []).append(name)
        self.grams: dict[str, torch.Tensor] = {}
        self.seconds = 0.0

    def add(self, point: str, value: object) -> None:
        names = self.by_point.get(point)
        if not names:
            return
        if not isinstance(value, torch.Tensor):
            raise OmpqError(f"feature of layer {names[0]} is not a tensor")
        start = time.perf_counter()
        if self.centred:
            g, raw_zero = centred_gram(value.detach())
        else:
            g = streamed_gram(value.detach())
            raw_zero = float(torch.diagonal(g).max()) == 0.0
        self.seconds += time.perf_counter() - start
        check_gram(g, names, all_zero=raw_zero)
        for name in names:
            self.grams[name] = g

    def result(self, names: list[str]) -> list[torch.Tensor]:
        missing = [n for n in names if n not in self.grams]
        if missing:
            raise OmpqError(f"no feature was produced for layers {missing}; is the model static?")
        return [self.grams[n] for n in names]


def streamed_gram(features: torch.Tensor) -> torch.Tensor:
    """Float64 Gram Y Y^T of (N, ...) features, converting a bounded slice at a time.

    The product runs in numpy: on this CPU build its float64 GEMM for this short-and-wide shape
    was 3-6x faster than torch's, and the float32 -> float64 conversion 10x faster (measured).
    """
    y = features.detach().reshape(features.shape[0], -1)
    if y.dtype not in (torch.float32, torch.float64):
        y = y.float()  # half / bfloat16 / integer features
    if y.device.type != "cpu":  # on the GPU: one float64 product there, N x N comes back
        y64 = y.double()
        return (y64 @ y64.T).cpu()
    y = y.numpy()
    n, d = y.shape
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    g = np.zeros((n, n), dtype=np.float64)
    for start in range(0, d, step):
        block = y[:, start : start + step].astype(np.float64)
        g += block @ block.T
    return torch.from_numpy(g)


def centred_gram(features: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Float64 copy of the float32 Gram of (N, ...) features centred over the N samples.

    Returns ``(gram, all_zero)``, ``all_zero`` telling whether the raw features were all zero
    (the centred Gram alone cannot tell zero from constant features). The float32 product
    (:func:`_float32_gram`, at most 2^17 columns a slice) runs on the raw features and its N x N
    result is centred afterwards (``H G H``: the column means enter only through ``G 1 / N``),
    so no centred copy of the features is made (less Gram time than centring the columns first
    on every benchmark model: ``bench/gram_kernels.py``; the ORM's float32 error per model is in
    ``bench/results/search_speed.json``). Centring afterwards loses float32 digits in proportion
    to ``tr(G) / tr(H G H)``, the features' energy over that of their spread; past
    ``_MAX_MEAN_SHARE`` the columns are centred first.
    """
    y = features.detach().reshape(features.shape[0], -1)
    if y.dtype != torch.float32:
        y = y.float()
    if y.device.type != "cpu":  # on the GPU: centre and multiply there, N x N comes back
        all_zero = not bool(y.any())
        y = y - y.mean(dim=0)
        return (y @ y.T).double().cpu(), all_zero
    y = y.numpy()
    raw = _sliced_gram(y, centre_first=False)
    g = _double_centred(raw)
    if np.trace(raw) > _MAX_MEAN_SHARE * np.trace(g):  # the mean dominates (or constant columns)
        g = _sliced_gram(y, centre_first=True)
    return torch.from_numpy(g), not np.diagonal(raw).any()


def _sliced_gram(y: np.ndarray, centre_first: bool) -> np.ndarray:
    """Float64 sum of the float32 Grams of ``y``'s column slices (each slice's columns centred
    over the rows first when ``centre_first``; numpy's column means: ~1.8x faster than torch's
    for these shapes)."""
    n, d = y.shape
    step = max(1, min(_CHUNK_ELEMENTS // max(n, 1), _ONEDNN_MAX_COLUMNS))
    g = np.zeros((n, n), dtype=np.float64)
    for start in range(0, d, step):
        block = y[:, start : start + step]
        if centre_first:
            block = block - block.mean(axis=0)
        g += _float32_gram(torch.from_numpy(np.ascontiguousarray(block)))
    return g


def _double_centred(g: np.ndarray) -> np.ndarray:
    """``H G H`` with ``H = I - 11^T / N``: the Gram of the columns centred over the rows."""
    row_means = g.mean(axis=0)
    return g - row_means[:, None] - row_means[None, :] + row_means.mean()


def _float32_gram(block: torch.Tensor) -> np.ndarray:
    """``block @ block.T`` of an (N, D) float32 CPU tensor, as a float64 array.

    Where torch has oneDNN, the product is a convolution of the N rows (as N one-channel 1 x D
    images) with the same rows (as 1 x D kernels): oneDNN's kernels ran it up to 1.65x faster
    than numpy's symmetric rank-k update (OpenBLAS) on the shapes of ResNet-20/-56, MobileNetV2
    and ResNet-50 features where it is used, single-threaded, with the same float32 accuracy
    (``bench/gram_kernels.py``). The rows are split in two halves so that the product skips one
    off-diagonal quarter, which the symmetry fills in. Elsewhere, and outside the block sizes
    where oneDNN was measured faster (``_ONEDNN_*``), numpy's rank-k update.
    """
    n, d = block.shape
    if not _onednn_applies(n, d):
        b = block.numpy()
        return (b @ b.T).astype(np.float64)
    return _onednn_gram(block)


def _onednn_applies(n: int, d: int) -> bool:
    """Whether :func:`_float32_gram` forms an ``n`` x ``d`` block's Gram in oneDNN."""
    return (_ONEDNN and n >= max(2, _ONEDNN_MIN_ROWS) and n * d >= _ONEDNN_MIN_ELEMENTS
            and d <= _ONEDNN_MAX_COLUMNS)


def _onednn_gram(block: torch.Tensor) -> np.ndarray:
    """oneDNN's ``block @ block.T`` (see :func:`_float32_gram`), whatever the block's size."""
    n, d = block.shape
    h = n // 2
    rows = block.reshape(n, 1, 1, d)
    g = np.empty((n, n), dtype=np.float64)
    left = torch.conv2d(rows, rows[:h]).reshape(n, h).numpy()  # every row against the first h
    g[:, :h] = left
    g[:h, h:] = left[h:].T
    g[h:, h:] = torch.conv2d(rows[h:], rows[h:]).reshape(n - h, n - h).numpy()
    return (g + g.T) / 2  # the diagonal blocks' two halves may round apart


def check_gram(g: torch.Tensor, layer_names: list[str], all_zero: bool | None = None) -> None:
    """A non-finite or all-zero feature makes ORM meaningless: stop with the layer's name.

    ``all_zero`` (when known) says whether the raw features were all zero; by default the
    Gram's diagonal decides (right for a Gram of raw features). The diagonal is read in numpy
    (the N x N Gram is on the CPU): torch's calls cost ~20 us more per layer.
    """
    diag = np.diagonal(g.numpy())
    name = layer_names[0]
    if not np.isfinite(diag).all():
        raise OmpqError(
            f"layer {name} produced NaN/Inf activations on the search samples; check the "
            "weights (corrupt checkpoint?) and the input normalisation"
        )
    if all_zero if all_zero is not None else float(diag.max()) == 0.0:
        raise OmpqError(
            f"layer {name} produced all-zero activations on every search sample; check the "
            "weights and the input normalisation"
        )


def _run_tapped(
    model: nn.Module, graph: torch.fx.Graph, acc: _GramAccumulator, samples: torch.Tensor
) -> None:
    """The traced graph on ``samples``, each feature point's value handed to ``acc`` as it is
    produced (:func:`ompq_plugin.graph_run.run_graph`: freed after its last use, as in the plain
    forward pass; building a tapped copy of the graph as a new GraphModule would cost a Python
    code generation per search, ~0.1x a forward)."""
    run_graph(model, graph, (samples,), acc.by_point, acc.add)


def collect_grams(
    model: nn.Module,
    layers: ModelLayers,
    samples: torch.Tensor,
    *,
    centred: bool = False,
    grams: bool = True,
) -> GramResult:
    """Run ``samples`` (N, ...) once through the float model; return every layer's Gram.

    ``centred``: Grams of the features centred over the samples, in float32 (all the centred
    ORM needs); otherwise float64 Grams of the raw features. ``grams=False`` runs the plain
    forward pass only (for forward hooks such as the activation statistics) and returns no Gram.
    """
    acc = _GramAccumulator({lay.name: lay.feature_node for lay in layers.layers}, centred)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if not grams:
                _run_checked(model, layers.names, samples)
                return GramResult(
                    [], features_s=time.perf_counter() - start, gram_s=0.0, centred=centred
                )
            if layers.traced and layers.graph is not None:
                _run_tapped(model, layers.graph, acc, samples)
            else:
                _run_with_hooks(model, acc, samples)
    finally:
        model.train(was_training)
    total = time.perf_counter() - start
    return GramResult(
        acc.result(layers.names),
        features_s=total - acc.seconds,
        gram_s=acc.seconds,
        centred=centred,
    )


def _run_with_hooks(model: nn.Module, acc: _GramAccumulator, samples: torch.Tensor) -> None:
    modules = dict(model.named_modules())
    handles = [
        modules[point].register_forward_hook(lambda _m, _i, out, point=point: acc.add(point, out))
        for point in acc.by_point
    ]
    try:
        model(samples)
    finally:
        for h in handles:
            h.remove()


def _run_checked(model: nn.Module, names: list[str], samples: torch.Tensor) -> None:
    """The plain forward pass, stopping at the first layer whose output is not finite."""
    modules = dict(model.named_modules())

    def check(name: str):  # noqa: ANN202
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            # one reduction: a NaN or Inf anywhere makes the sum non-finite
            if isinstance(out, torch.Tensor) and not math.isfinite(float(out.sum())):
                raise OmpqError(
                    f"layer {name} produced NaN/Inf activations on the search samples; check "
                    "the weights (corrupt checkpoint?) and the input normalisation"
                )

        return hook

    handles = [modules[n].register_forward_hook(check(n)) for n in names if n in modules]
    try:
        model(samples)
    finally:
        for h in handles:
            h.remove()


WidthsFor = Callable[[list[str], bool], Mapping[str, Sequence[int]]]


@dataclass
class StreamResult:
    """What the search's single forward pass produced."""

    layers: ModelLayers
    grams: GramResult  # no Gram when none was asked for
    act_stats: act_stats.ActErrorStats


def discover_and_stream(
    model: nn.Module,
    samples: torch.Tensor,
    *,
    grams: bool,
    centred: bool,
    act_widths: WidthsFor,
    power_of_two: bool,
) -> StreamResult:
    """One pass of all ``samples`` that discovers the layers (:func:`discover_layers` records
    every call) and, in the same forward, forms the Grams (``grams``) and the activation error
    statistics. ``act_widths(names, ordered)`` says which layers' inputs to score at which
    widths; ``names`` are the quantizable layers, in execution order when ``ordered``.

    Without Grams the pass is the traced graph untapped (:func:`run_graph`: the same values as
    the plain forward, each freed after its last use; whole default searches with it and with
    the model's own forward were level on ResNet-20 / -56 and 4 % faster with it on MobileNetV2,
    ``bench/results/untapped_pass.json``), or the plain forward of an untraceable model:
    non-finite values are caught where the pass looks anyway (each scored layer input, the
    model's outputs) rather than by a reduction over every layer's output; only then a second
    pass names the first layer that produced them.
    """
    found: dict[str, object] = {}

    def run(model: nn.Module, graph: torch.fx.Graph | None) -> None:
        if graph is not None:
            points = feature_points(model, graph)
        else:
            quantizable = (n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE_TYPES))
            points = {n: n for n in quantizable}
        acc = _GramAccumulator(points, centred)
        widths = act_widths(list(points), graph is not None)
        relu_fed = relu_fed_layers(model, graph) if graph is not None else frozenset()
        start = time.perf_counter()
        finite = True
        with act_stats.record(model, widths, power_of_two, relu_fed) as stats:
            if not grams:  # the traced graph where there is one: it frees values sooner
                output = run_graph(model, graph, (samples,)) if graph is not None else model(
                    samples)
                finite = _all_finite(output)
            elif graph is not None:
                _run_tapped(model, graph, acc, samples)
            else:
                _run_with_hooks(model, acc, samples)
        found.update(
            acc=acc,
            stats=stats,
            traced=graph is not None,
            seconds=time.perf_counter() - start,
            names=list(points),
            finite=finite and stats.non_finite is None,
        )

    layers = discover_layers(model, samples, run)
    acc, stats = found["acc"], found["stats"]
    assert isinstance(acc, _GramAccumulator) and isinstance(stats, act_stats.ActErrorStats)
    if not found["finite"]:
        was_training = model.training
        try:
            with torch.no_grad():
                _run_checked(model.eval(), found["names"], samples)  # type: ignore[arg-type]
        finally:
            model.train(was_training)
        where = f"the input of layer {stats.non_finite}" if stats.non_finite else "the output"
        raise OmpqError(
            f"{where} has NaN/Inf values on the search samples; check the weights (corrupt "
            "checkpoint?) and the input normalisation"
        )
    seconds = float(found["seconds"])  # type: ignore[arg-type]
    if not grams:
        result = GramResult([], features_s=seconds, gram_s=0.0, centred=centred)
    elif layers.traced != found["traced"]:  # the trace was dropped after the pass: hooks again
        result = collect_grams(model, layers, samples, centred=centred)
        result.features_s += seconds
    else:
        result = GramResult(
            acc.result(layers.names),
            features_s=seconds - acc.seconds,
            gram_s=acc.seconds,
            centred=centred,
        )
    return StreamResult(layers, result, stats)


def _all_finite(output: object) -> bool:
    """Whether every tensor in a model's output (nested tuples, lists, dicts) is finite (a
    finite sum proves it; a sum that overflowed is checked element by element)."""
    return all(
        math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())
        for t in torch.utils._pytree.tree_leaves(output)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    )
