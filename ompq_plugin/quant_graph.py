"""The torch.fx side of :func:`ompq_plugin.quantizer.quantize`: which ops are ReLUs, residual
adds or grid-preserving ("transparent"), the tracer that keeps every Conv / Linear / BatchNorm
one node, BatchNorm folding, and small helpers for editing a GraphModule's submodules.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ompq_plugin.errors import OmpqError

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
FOLDABLE_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)

RELU_MODULES = (nn.ReLU, nn.ReLU6)
RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu6}
RELU_METHODS = {"relu", "relu_"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
# Ops that keep a Brevitas IntQuantTensor a QuantTensor on the same (or an exactly rescaled) grid.
TRANSPARENT_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
)
TRANSPARENT_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    F.max_pool1d,
    F.max_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.dropout,
    F.dropout2d,
    F.pad,
}
TRANSPARENT_METHODS = {"view", "reshape", "flatten", "contiguous"}
NON_TENSOR_METHODS = {"size", "dim"}


class FixedShortcutConv(nn.Conv2d):
    """Option-A shortcut as a frozen 1x1 stride-2 conv with 0/1 weights (never trained)."""

    def __init__(self, in_planes: int, planes: int, pad_before: int) -> None:
        super().__init__(in_planes, planes, kernel_size=1, stride=2, bias=False)
        weight = torch.zeros(planes, in_planes, 1, 1)
        for c in range(in_planes):
            weight[pad_before + c, c, 0, 0] = 1.0
        self.weight = nn.Parameter(weight, requires_grad=False)




def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(module_of(gm, node), RELU_MODULES)
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    return node.op == "call_method" and node.target in RELU_METHODS


def is_residual_add(node: fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ADD_METHODS
    )
    if not is_add or len(node.args) < 2:
        return False
    return all(isinstance(a, fx.Node) for a in node.args[:2]) and not node.kwargs.get("alpha")


def is_transparent(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(module_of(gm, node), TRANSPARENT_MODULES)
    if node.op == "call_function":
        if node.target is F.pad:
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0.0)
            return mode == "constant" and not value
        return node.target in TRANSPARENT_FUNCTIONS
    return node.op == "call_method" and node.target in TRANSPARENT_METHODS


def is_non_tensor_use(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in NON_TENSOR_METHODS:
        return True
    return node.op == "call_function" and node.target is getattr


def source_of(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Walk back from a layer's input through transparent ops to the tensor that gets quantized."""
    while is_transparent(gm, node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def unique_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while has_attr_path(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def has_attr_path(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def owner_path(node: fx.Node) -> str:
    """Dotted path of the module whose forward created ``node`` ('' at top level)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        if isinstance(path, tuple):
            path = path[0]
        return str(path)
    return ""


def is_leaf_type(module: nn.Module) -> bool:
    """A torch.nn module type, which torch.fx keeps as one opaque call."""
    return type(module).__module__.startswith("torch.nn")


class QuantTracer(fx.Tracer):
    """Keeps every Conv/Linear/BatchNorm (subclasses too) and activation a single graph node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf_types = SUPPORTED_LAYERS + FOLDABLE_NORMS + RELU_MODULES + TRANSPARENT_MODULES
        return isinstance(m, leaf_types) or super().is_leaf_module(m, module_qualified_name)


def trace_model(model: nn.Module) -> fx.GraphModule:
    try:
        tracer = QuantTracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # noqa: BLE001 - fx raises many types
        raise OmpqError(
            f"{type(model).__name__} is not traceable by torch.fx ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); remove data-dependent control flow"
        ) from None


def fold_batchnorms(gm: fx.GraphModule, float_ops: dict[str, str]) -> list[str]:
    """Fold each BatchNorm into the Conv/Linear feeding it; one that follows no layer
    (pre-activation) stays a float per-channel affine, recorded in ``float_ops``."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    folded = []
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, FOLDABLE_NORMS):
            continue
        if not bn.track_running_stats or bn.running_mean is None:
            raise OmpqError(f"BatchNorm {node.target} has no running statistics to fold")
        prev = node.args[0]
        layer = module_of(gm, prev) if isinstance(prev, fx.Node) else None
        if (
            not isinstance(layer, SUPPORTED_LAYERS)
            or isinstance(layer, FixedShortcutConv)
            or len(prev.users) != 1
        ):
            float_ops[str(node.target)] = "BatchNorm after no Conv/Linear: float affine"
            continue
        if isinstance(layer, nn.Linear):
            fused = fuse_linear_bn_eval(layer, bn)
        else:
            fused = fuse_conv_bn_eval(layer, bn)
        set_submodule(gm, str(prev.target), fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        delete_submodule(gm, str(node.target))
        folded.append(str(node.target))
    return folded


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def delete_submodule(root: nn.Module, path: str) -> None:
    parent_name, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if hasattr(parent, attr):
        delattr(parent, attr)
