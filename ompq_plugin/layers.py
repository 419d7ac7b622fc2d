"""Find every quantizable layer of a model, with the figures the search and budgets need.

One forward pass of a single example (forward hooks) gives each layer's execution order,
input/output shapes and MACs. A torch.fx trace of the same model gives the structure:

* **Feature point** (where ORM reads the layer's function f_i): we follow the authors' code,
  which takes post-activation features. From the layer we walk forward along a chain of
  single-consumer ops that keep the same feature (BatchNorm, activations, residual add):
  conv -> BN -> ReLU gives the post-ReLU map, and a ResNet block's second conv
  (conv2 -> BN -> add -> ReLU) gives the block output. The walk stops where the tensor fans
  out or reaches another layer, so a Linear classifier's feature is its logits.
* **Activation group**: the tensor a layer reads, traced back through ops that do not change
  its quantization grid (flatten/view, dropout, identity, pooling, zero-padding, slicing). Layers
  reading the same tensor read the same quantizer, so they share input-activation bits. The two
  inputs of a residual add share one quantizer too; when both are layer inputs their groups are
  merged.

Models that torch.fx cannot trace still get a search: each layer's feature is its own output and
its input is a group of its own (``ModelLayers.traced`` is False and the report says so).

Conv1d/Conv2d (plain, grouped, depthwise) and Linear are quantizable. ConvTranspose, Conv3d,
recurrent and attention layers are *unsupported*: they are listed by name, never dropped.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ompq_plugin.errors import OmpqError
from ompq_plugin.quant_graph import RELU_FUNCTIONS, RELU_METHODS, RELU_MODULES

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
UNSUPPORTED_TYPES: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Conv3d,
    nn.RNNBase,
    nn.RNNCellBase,
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.Bilinear,
    nn.Embedding,
)

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
_ACTIVATION_TYPES = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SiLU, nn.Hardswish,
    nn.GELU, nn.Sigmoid, nn.Tanh,
)
_SAME_FEATURE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.silu, F.hardswish, F.gelu,
    torch.sigmoid, torch.tanh, F.batch_norm, operator.add, operator.iadd, torch.add,
}
_SAME_FEATURE_METHODS = {"relu", "relu_", "add", "add_", "sigmoid", "tanh"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}

_TRANSPARENT_TYPES = (
    nn.Flatten, nn.Dropout, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.ZeroPad2d,
)
_TRANSPARENT_FUNCTIONS = {
    torch.flatten, F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.pad,
    operator.getitem, torch.reshape,
}
_TRANSPARENT_METHODS = {"view", "reshape", "flatten", "contiguous", "mean", "squeeze", "unsqueeze"}


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer; shapes and counts are per sample (batch 1)."""

    name: str
    index: int
    module_type: str
    kind: str  # conv | depthwise | pointwise | linear
    params: int  # weight parameters (bias kept at 32 bit, not counted)
    macs: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    feature_node: str  # fx node (or, untraced, the layer itself) whose output is f_i
    act_group: str  # input-activation quantizer this layer reads

    @property
    def input_numel(self) -> int:
        return math.prod(self.input_shape)


@dataclass(frozen=True)
class UnsupportedLayer:
    name: str
    module_type: str


@dataclass
class ModelLayers:
    layers: list[LayerInfo]
    act_groups: dict[str, tuple[str, ...]]
    unsupported: list[UnsupportedLayer] = field(default_factory=list)
    traced: bool = True
    # the torch.fx trace of the model (its targets name the model's own modules); a Graph, not
    # a GraphModule: building one generates and compiles Python code that no caller runs
    graph: torch.fx.Graph | None = None

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def require_supported(self) -> None:
        """Raise an OmpqError naming every unsupported layer."""
        if self.unsupported:
            shown = self.unsupported[:3]
            listed = ", ".join(f"{u.name} ({u.module_type})" for u in shown)
            more = len(self.unsupported) - len(shown)
            raise OmpqError(
                f"unsupported layer types: {listed}{f' and {more} more' if more else ''}; only "
                "Conv1d/Conv2d/Linear are quantized — replace them, or pass --allow-unsupported "
                "to keep them in float"
            )


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
        return "depthwise"
    if module.groups == 1 and all(k == 1 for k in module.kernel_size):
        return "pointwise"
    return "conv"


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of one sample (output has a batch dimension)."""
    per_sample_out = output[0].numel()
    if isinstance(module, nn.Linear):
        return per_sample_out * module.in_features
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    return per_sample_out * (module.in_channels // module.groups) * math.prod(module.kernel_size)


Runner = Callable[[nn.Module, "torch.fx.Graph | None"], None]


def discover_layers(
    model: nn.Module, example_input: torch.Tensor, run: Runner | None = None
) -> ModelLayers:
    """Quantizable layers of ``model`` in execution order, with structure from torch.fx.

    The model is traced first, then run once with hooks that record each layer's call. By
    default that run is a forward pass of one example; ``run(model, graph)`` replaces it (the
    search streams all its samples through the traced graph in that same pass, see
    :mod:`ompq_plugin.features`); ``graph`` is the trace (a ``torch.fx.Graph`` over ``model``'s
    own modules), or None for an untraceable model.
    """
    if example_input.dim() < 2:
        raise OmpqError("example input needs a batch dimension, e.g. shape (1, 3, 32, 32)")
    try:  # the Graph alone: symbolic_trace's GraphModule would also generate and compile code
        graph: torch.fx.Graph | None = torch.fx.Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure falls back to hooks only
        graph = None
    if run is None:
        records = _record_calls(model, example_input[:1], lambda m, _g: m(example_input[:1]))
    else:
        records = _record_calls(model, example_input, lambda m, _g: run(m, graph), graph)
    unsupported = [
        UnsupportedLayer(name, type(m).__name__)
        for name, m in model.named_modules()
        if isinstance(m, UNSUPPORTED_TYPES)
    ]
    if not records:
        raise OmpqError(
            f"{type(model).__name__} has no Conv1d/Conv2d/Linear layer used in its forward pass; "
            "nothing to quantize"
        )
    if graph is not None:
        nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
        missing = [name for name, _, _, _ in records if name not in nodes]
        if missing:  # a layer hidden inside a leaf module: structure is unreliable
            graph = None
    unsupported += _weights_used_as_functions(model, graph, {name for name, *_ in records})
    features: dict[str, str] = {}
    groups: dict[str, str] = {}
    if graph is not None:
        modules = dict(model.named_modules())
        for name, _, _, _ in records:
            node = nodes[name]
            features[name] = _feature_node(node, modules).name
            groups[name] = _group_name(input_point(node.args[0], modules))
        groups = _merge_residual_groups(graph, modules, groups)
    else:
        for name, _, _, _ in records:
            features[name] = name
            groups[name] = f"{name}:input"

    layers = []
    for index, (name, module, (x_shape, y_shape), macs) in enumerate(records):
        layers.append(
            LayerInfo(
                name=name,
                index=index,
                module_type=type(module).__name__,
                kind=layer_kind(module),
                params=module.weight.numel(),
                macs=macs,
                input_shape=x_shape,
                output_shape=y_shape,
                feature_node=features[name],
                act_group=groups[name],
            )
        )
    act_groups: dict[str, tuple[str, ...]] = {}
    for layer in layers:
        act_groups[layer.act_group] = (*act_groups.get(layer.act_group, ()), layer.name)
    return ModelLayers(layers, act_groups, unsupported, traced=graph is not None, graph=graph)


def _weights_used_as_functions(
    model: nn.Module, graph: torch.fx.Graph | None, called: set[str]
) -> list[UnsupportedLayer]:
    """Weights the forward pass uses other than by calling a Conv/Linear module (``F.linear`` with
    a module's weight, as Swin's attention does; a bare parameter through ``F.conv2d``). They
    would stay float, so they are listed as unsupported instead of entering the budgets. Without
    a trace, a Conv/Linear module that never runs is listed too (its use cannot be seen)."""
    from ompq_plugin.graph_ops import weight_like_parameters

    used = weight_like_parameters(model, graph) if graph is not None else {}
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZABLE_TYPES) or name in called:
            continue
        via = used.pop(f"{name}.weight", None)
        if via is not None or graph is None:
            how = f"weight used through {via}" if via else "never called as a module"
            out.append(UnsupportedLayer(name, f"{type(module).__name__}, {how}"))
    for param, via in used.items():
        if not param.endswith(".bias"):
            how = "indexed (getitem)" if via == "getitem" else f"used as a weight through {via}"
            out.append(UnsupportedLayer(param, f"parameter {how}"))
    return out


Record = tuple[str, nn.Module, tuple[tuple[int, ...], tuple[int, ...]], int]


def _record_calls(
    model: nn.Module,
    x: torch.Tensor,
    forward: Runner,
    graph: torch.fx.Graph | None = None,
) -> list[Record]:
    """(name, module, (input shape, output shape) per sample, MACs per sample) of every
    quantizable layer, in call order, from hooks during ``forward(model, graph)``; shapes only, so
    a pass over many samples keeps no tensor alive."""
    records: list[Record] = []
    seen: set[str] = set()

    def hook(name: str):  # noqa: ANN202
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name in seen:
                raise OmpqError(
                    f"layer {name} runs more than once per forward pass (shared weights); "
                    "give each use its own module"
                )
            seen.add(name)
            shapes = (tuple(inputs[0].shape[1:]), tuple(output.shape[1:]))
            records.append((name, module, shapes, layer_macs(module, output)))

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZABLE_TYPES)
    ]
    # each module's mode, put back afterwards; a model already in eval mode is left alone
    # (switching costs ~0.2 ms: every module's __setattr__)
    modes = {m: m.training for m in model.modules()}
    switched = any(modes.values())
    if switched:
        model.eval()
    try:
        with torch.no_grad():
            forward(model, graph)
    except OmpqError:
        raise
    except Exception as exc:
        raise OmpqError(
            f"the model's forward pass failed on an input of shape {tuple(x.shape)} "
            f"({type(exc).__name__}: {exc}); check the model's input size"
        ) from None
    finally:
        for h in handles:
            h.remove()
        if switched:
            for m, training in modes.items():
                m.training = training
    return records


def feature_points(model: nn.Module, graph: torch.fx.Graph) -> dict[str, str]:
    """Every quantizable layer of ``graph`` (a trace of ``model``) -> the node whose output is
    its feature f_i."""
    modules = dict(model.named_modules())
    return {
        str(n.target): _feature_node(n, modules).name
        for n in graph.nodes
        if n.op == "call_module" and isinstance(modules.get(str(n.target)), QUANTIZABLE_TYPES)
    }


def relu_fed_layers(model: nn.Module, graph: torch.fx.Graph) -> frozenset[str]:
    """Quantizable layers of ``graph`` whose input is the output of a ReLU (or ReLU6) itself:
    inputs known to have no negative value, without looking at them."""
    modules = dict(model.named_modules())
    return frozenset(
        str(n.target)
        for n in graph.nodes
        if n.op == "call_module"
        and isinstance(modules.get(str(n.target)), QUANTIZABLE_TYPES)
        and n.args
        and isinstance(n.args[0], torch.fx.Node)
        and _is_op(n.args[0], modules, RELU_MODULES, RELU_FUNCTIONS, RELU_METHODS)
    )


def _is_op(node: torch.fx.Node, modules: dict[str, nn.Module], types, functions, methods) -> bool:  # noqa: ANN001
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), types)
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def _feature_node(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node:
    same = (*_BN_TYPES, *_ACTIVATION_TYPES)
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not _is_op(user, modules, same, _SAME_FEATURE_FUNCTIONS, _SAME_FEATURE_METHODS):
            break
        node = user
    return node


def input_point(arg: object, modules: dict[str, nn.Module]) -> torch.fx.Node | None:
    """The node a layer input reads, looking back through ops that keep the quantizer's grid
    (flatten, reshape, pooling, zero-pad, slicing, dropout); None for a constant."""
    node = arg if isinstance(arg, torch.fx.Node) else None
    while node is not None and _is_op(
        node, modules, _TRANSPARENT_TYPES, _TRANSPARENT_FUNCTIONS, _TRANSPARENT_METHODS
    ):
        first = node.args[0] if node.args else None
        if not isinstance(first, torch.fx.Node):
            break
        node = first
    return node


def _group_name(node: torch.fx.Node | None) -> str:
    if node is None or node.op == "placeholder":
        return "input"
    if node.op == "call_module":
        return str(node.target)
    return node.name


def _merge_residual_groups(
    graph: torch.fx.Graph, modules: dict[str, nn.Module], groups: dict[str, str]
) -> dict[str, str]:
    """Union the groups of layer inputs that meet at a residual add (one shared quantizer)."""
    parent = {g: g for g in groups.values()}

    def find(g: str) -> str:
        while parent[g] != g:
            g = parent[g]
        return g

    for node in graph.nodes:
        if not _is_op(node, modules, (), _ADD_FUNCTIONS, _ADD_METHODS):
            continue
        inputs = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        names = {_group_name(input_point(a, modules)) for a in inputs}
        roots = sorted({find(n) for n in names if n in parent})
        for other in roots[1:]:
            parent[other] = roots[0]
    return {layer: find(g) for layer, g in groups.items()}
