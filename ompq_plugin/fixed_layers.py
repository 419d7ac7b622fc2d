"""Layers that ``ompq quantize`` adds to the model, and what they cost on the target.

``quantize`` replaces every option-A ``ShortcutA`` (subsample by 2, zero-pad the channels) by an
exactly equivalent frozen 1x1 stride-2 convolution with 0/1 weights
(:class:`~ompq_plugin.quant_graph.FixedShortcutConv`), so that the exported graph needs no Slice
or Pad. Its weights are exact at any width; they take the narrowest 1x1-convolution weight width
the target runs (:func:`shortcut_weight_bits`: 2 bits on FINN, hls4ml, IMX500 and the generic
profile, 4 on CMSIS-NN and Hexagon, 8 on TensorRT). On the target that convolution is real:
it stores its weights and does its MACs on the block's quantized input, whose width is that of
the layers reading the same tensor (the block's first convolution). :func:`fixed_layers` lists
these convolutions so that the search counts them in the budgets: the exported file, not only
the model's own layers, stays within them.

The hls4ml export adds one more kind (``exporters/targets.py``): a global average pool over
H x W = 2^k pixels becomes a depthwise H x W convolution with ``POOL_WEIGHT_BITS``-bit weights
(C x H x W of them, C x H x W MACs) reading the quantized tensor the layer after the pool
reads. :func:`hls4ml_pool_layers` lists those for a search on the hls4ml profile.

Contract: input a float model and its :class:`~ompq_plugin.layers.ModelLayers` (traced); output
one :class:`FixedLayer` per ``ShortcutA`` the forward pass calls whose input a quantizable
layer also reads, in the order of the model's modules. A shortcut whose input no quantizable
layer reads is returned in ``uncounted`` (its input width would be the profile's default,
outside the search's choices). An untraced model gives nothing (``quantize`` cannot build it
either).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ompq_plugin.bitconfig import FIXED_KIND, LayerBits
from ompq_plugin.graph_ops import adaptive_pool_output, is_one_by_one
from ompq_plugin.hw_profiles.profile import HardwareProfile
from ompq_plugin.layers import ModelLayers, input_point

POOL_WEIGHT_BITS = 2  # the hls4ml export's pool weights: 1 = 2^k x scale 2^-k, exact at 2 bits
POOLS_AS_CONVS = ("hls4ml",)  # the export targets that turn global average pools into convs


def shortcut_weight_bits(profile: HardwareProfile) -> int:
    """The weight width of the frozen shortcut convolutions on ``profile``: its narrowest
    1x1-convolution width from 2 bits up (0/1 weights are exact at any of them: narrow range,
    scale 1)."""
    return min(b for b in profile.bits_for("pointwise").weight if b >= 2)


@dataclass(frozen=True)
class FixedLayer:
    """A convolution the quantizer adds: fixed weight width, input width shared with
    ``reader`` (the model layer that reads the same quantized tensor, in ``act_group``);
    counts per sample."""

    name: str
    params: int
    macs: int
    input_numel: int
    weight_bits: int
    reader: str
    act_group: str

    def layer_bits(self, act_bits: int) -> LayerBits:
        """This layer as a BitConfig entry (``fixed_layers``), its input at ``act_bits``."""
        return LayerBits(name=self.name, kind=FIXED_KIND, weight_bits=self.weight_bits,
                         act_bits=act_bits, params=self.params, macs=self.macs,
                         input_numel=self.input_numel, act_group=self.act_group)


@dataclass(frozen=True)
class FixedLayers:
    """The fixed layers the search counts, and the shortcuts it cannot (named in a warning)."""

    layers: tuple[FixedLayer, ...] = ()
    uncounted: tuple[str, ...] = field(default_factory=tuple)
    uncounted_pools: tuple[str, ...] = field(default_factory=tuple)  # size unknown to the search

    @property
    def weight_memory_bits(self) -> int:
        """What the fixed layers add to a weight-memory budget given as average bits of the
        model's own layers (``--avg-weight-bits``, :func:`average_bits_memory`)."""
        return sum(f.params * f.weight_bits for f in self.layers)


def average_bits_memory(avg_weight_bits: float, model_params: int, fixed_bits: int) -> float:
    """The weight-memory budget ``--avg-weight-bits`` stands for: the average over the model's
    own ``model_params`` weights, with the fixed layers' ``fixed_bits`` of memory on top."""
    return avg_weight_bits * model_params + fixed_bits


def added_layers(model: nn.Module, found: ModelLayers, profile: HardwareProfile) -> FixedLayers:
    """Every layer the quantizer and ``profile``'s export add to ``model``: the shortcut
    convolutions (:func:`fixed_layers`) and the pools the export turns into convolutions
    (:func:`hls4ml_pool_layers`, when the profile is hls4ml's)."""
    shortcuts = fixed_layers(model, found, shortcut_weight_bits(profile))
    pools = hls4ml_pool_layers(model, found, profile.name)
    return FixedLayers(shortcuts.layers + pools.layers, shortcuts.uncounted, pools.uncounted_pools)


def fixed_layers(model: nn.Module, found: ModelLayers, weight_bits: int) -> FixedLayers:
    """The frozen shortcut convolutions ``quantize`` will add to ``model``, at ``weight_bits``
    (:func:`shortcut_weight_bits` of the target; see the module doc)."""
    from ompq_plugin.models.cifar_resnet import ShortcutA

    shortcuts = {n: m for n, m in model.named_modules() if isinstance(m, ShortcutA)}
    if not shortcuts or found.graph is None:
        return FixedLayers()
    modules = dict(model.named_modules())
    by_name = {layer.name: layer for layer in found.layers}
    entry: dict[str, torch.fx.Node] = {}  # shortcut -> its first node in the trace
    owned: set[torch.fx.Node] = set()  # the nodes inside a shortcut
    for node in found.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        owner = next((k for k in reversed(stack) if k in shortcuts), None)
        if node.op == "call_module" and str(node.target) in shortcuts:
            owner = str(node.target)
        if owner is not None:
            owned.add(node)
            entry.setdefault(owner, node)
    readers: dict[torch.fx.Node | None, str] = {}  # input point -> first layer reading it
    for node in found.graph.nodes:
        target = str(node.target)
        if (node.op == "call_module" and target in by_name and node.args
                and not _through(node.args[0], owned, modules)):
            readers.setdefault(input_point(node.args[0], modules), target)
    counted, uncounted = [], []
    for name, shortcut in shortcuts.items():
        node = entry.get(name)
        if node is None:  # never called: not in the traced (or exported) graph
            continue
        reader = readers.get(input_point(node.args[0], modules)) if node.args else None
        if reader is None:
            uncounted.append(name)
            continue
        _, *spatial = by_name[reader].input_shape
        out_positions = 1
        for size in spatial:
            out_positions *= (size - 1) // 2 + 1  # 1x1 kernel, stride 2, no padding
        params = shortcut.planes * shortcut.in_planes
        counted.append(FixedLayer(
            name=name, params=params, macs=params * out_positions,
            input_numel=by_name[reader].input_numel, weight_bits=weight_bits,
            reader=reader, act_group=by_name[reader].act_group,
        ))
    return FixedLayers(tuple(counted), tuple(uncounted))


def _through(arg: object, owned: set[torch.fx.Node], modules: dict[str, nn.Module]) -> bool:
    """Whether a layer input reaches its input point through a shortcut's nodes (it then reads
    the shortcut's output, not the tensor the shortcut reads)."""
    node = arg if isinstance(arg, torch.fx.Node) else None
    while node is not None and node not in owned:
        if input_point(node, modules) is node:  # not a transparent op: the walk ends here
            return False
        first = node.args[0] if node.args else None
        node = first if isinstance(first, torch.fx.Node) else None
    return node is not None


def hls4ml_pool_layers(model: nn.Module, found: ModelLayers, target: str) -> FixedLayers:
    """The depthwise convolutions the ``target``'s export makes of global average pools (only
    hls4ml's, see the module doc): one per ``AdaptiveAvgPool2d(1)`` module or
    ``F.adaptive_avg_pool2d(x, 1)`` call over 2^k pixels whose output a quantizable layer reads.
    The pool's input shape is the output shape of the layer whose feature it is (the block
    output of a ResNet); a pool reading anything else is in ``uncounted_pools``."""
    if target not in POOLS_AS_CONVS or found.graph is None:
        return FixedLayers()
    modules = dict(model.named_modules())
    shape_of = {layer.feature_node: layer.output_shape for layer in found.layers}
    names = set(found.names)
    layer_nodes = [n for n in found.graph.nodes if n.op == "call_module" and str(n.target) in names]
    by_name = {layer.name: layer for layer in found.layers}
    counted, uncounted = [], []
    for pool in found.graph.nodes:
        if not (_is_global_average_pool(pool, modules) and isinstance(pool.args[0], torch.fx.Node)):
            continue
        reader = next((str(n.target) for n in layer_nodes
                       if n.args and _through(n.args[0], {pool}, modules)), None)
        if reader is None:  # no quantized layer reads it: the pool's input is not on a grid
            continue
        shape = shape_of.get(pool.args[0].name)
        if shape is None or len(shape) != 3:
            uncounted.append(str(pool.target) if pool.op == "call_module" else pool.name)
            continue
        channels, height, width = shape
        pixels = height * width
        if pixels & (pixels - 1):  # not a power of two: the export keeps the pool
            continue
        size = channels * pixels
        counted.append(FixedLayer(
            name=str(pool.target) if pool.op == "call_module" else pool.name, params=size,
            macs=size, input_numel=size, weight_bits=POOL_WEIGHT_BITS, reader=reader,
            act_group=by_name[reader].act_group,
        ))
    return FixedLayers(tuple(counted), uncounted_pools=tuple(uncounted))


def _is_global_average_pool(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An average pool to 1 x 1 that the ONNX export writes as ``GlobalAveragePool``."""
    size = adaptive_pool_output(node, modules)
    return size is not None and is_one_by_one(size)
