"""Graph rewrites :func:`ompq_plugin.quantizer.quantize` applies to the traced float model.

* ``torch.cat`` nodes are found so that every input of one concatenation gets ONE shared
  activation quantizer (Brevitas concatenates QuantTensors only on the same grid);
* ``F.avg_pool2d`` calls get their keyword arguments as positional ones (Brevitas' QuantTensor
  handler takes positional arguments only);
* adaptive average pooling whose output size does not divide its input size (e.g. 2x2 -> 7x7
  in VGG / AlexNet at 64x64) becomes :class:`AnySizeAdaptiveAvgPool2d`, two constant pooling
  matrices that ONNX can express (torch's ONNX export refuses that case);
* parameters read straight off a module (not through Conv/Linear/BatchNorm) are sorted into
  elementwise ones (LayerNorm weights, a layer scale) and weight-like uses (``F.linear`` /
  ``F.conv2d`` / matmul with a parameter); both stay float, and the search lists the weight-like
  ones as unsupported (never counted in a budget as if quantized).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
# Functions that may read a parameter and stay exact float ops (elementwise, normalisation).
FLOAT_PARAM_FUNCTIONS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.iadd, operator.imul,
    torch.mul, torch.add, torch.sub, torch.div, F.layer_norm, F.group_norm, F.batch_norm,
    F.instance_norm,
}  # fmt: skip
FLOAT_PARAM_METHODS = {"mul", "add", "sub", "div", "mul_", "add_", "to", "type_as", "expand_as"}
FLOAT_MODULES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm1d,
    nn.InstanceNorm2d,
)  # fmt: skip
_AVG_POOL2D_DEFAULTS = (None, 0, False, True, None)  # stride, padding, ceil_mode, ..., divisor


def dequant(x: object) -> object:
    """The float value of a Brevitas QuantTensor (other values pass through)."""
    return getattr(x, "value", x) if type(x).__name__.endswith("QuantTensor") else x


def is_cat(node: fx.Node) -> bool:
    """A ``torch.cat`` of a list of graph tensors."""
    if node.op != "call_function" or node.target not in CAT_FUNCTIONS or not node.args:
        return False
    parts = node.args[0]
    return isinstance(parts, list | tuple) and all(isinstance(p, fx.Node) for p in parts)


def normalise_avg_pool(gm: fx.GraphModule) -> None:
    """``F.avg_pool2d(x, kernel_size=3, stride=1, ...)`` -> the same call, arguments by position."""
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override")
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not F.avg_pool2d or not node.kwargs:
            continue
        given = dict(zip(("input", *names), node.args, strict=False)) | dict(node.kwargs)
        defaults = dict(zip(names[1:], _AVG_POOL2D_DEFAULTS, strict=True))
        node.args = (given["input"], *(given.get(n, defaults.get(n)) for n in names))
        node.kwargs = {}


def pool_matrix(size: int, out: int) -> torch.Tensor:
    """``out x size`` matrix of adaptive average pooling along one axis (torch's windows)."""
    m = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, math.ceil((i + 1) * size / out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class AnySizeAdaptiveAvgPool2d(nn.Module):
    """Adaptive average pooling to any output size: ``F.adaptive_avg_pool2d`` where the output
    divides the input (ONNX AveragePool), else ``P_h @ x @ P_w^T`` with constant pooling matrices
    (ONNX MatMul, constant first so no graph reader takes it for a weight layer). Float output:
    the next layer's input quantizer puts it back on a grid."""

    def __init__(self, output_size: int | tuple[int | None, int | None]) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = dequant(x)  # type: ignore[assignment]
        h, w = int(x.shape[-2]), int(x.shape[-1])
        size = self.output_size
        oh, ow = (size, size) if isinstance(size, int) else size
        oh, ow = oh or h, ow or w
        if h % oh == 0 and w % ow == 0:
            return F.adaptive_avg_pool2d(x, (oh, ow))
        ph = pool_matrix(h, oh).to(x)
        pw = pool_matrix(w, ow).to(x)
        y = torch.matmul(ph, x)  # (..., oh, w)
        return torch.matmul(pw, y.transpose(-1, -2)).transpose(-1, -2)


def is_one_by_one(size: object) -> bool:
    """Whether an adaptive pool's output size is 1 x 1 (a global pool, ONNX GlobalAveragePool)."""
    sizes = (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[arg-type]
    return all(s == 1 for s in sizes)


def adaptive_pool_output(node: fx.Node, modules: dict[str, nn.Module]) -> object | None:
    """The output size of an adaptive average pool node (an ``AdaptiveAvgPool2d`` module or an
    ``F.adaptive_avg_pool2d`` call); None for any other node, or a call that gives none."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return module.output_size if isinstance(module, nn.AdaptiveAvgPool2d) else None
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
    return None


def replace_adaptive_pools(gm: fx.GraphModule) -> list[str]:
    """Adaptive average pools to anything but 1x1 -> :class:`AnySizeAdaptiveAvgPool2d`."""
    replaced = []
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        size = adaptive_pool_output(node, modules)
        if size is None or is_one_by_one(size):
            continue
        if node.op == "call_module":
            parent, _, attr = str(node.target).rpartition(".")
            owner = gm.get_submodule(parent) if parent else gm
            setattr(owner, attr, AnySizeAdaptiveAvgPool2d(size))
            replaced.append(str(node.target))
        else:
            name = f"{node.name}_anysize"
            gm.add_submodule(name, AnySizeAdaptiveAvgPool2d(size))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (node.args[0],))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            replaced.append(name)
    return replaced


def weight_like_parameters(gm: nn.Module, graph: fx.Graph | None = None) -> dict[str, str]:
    """Parameters the traced graph reads directly (``get_attr``) and uses other than elementwise
    or in a normalisation -- ``F.linear``, ``F.conv2d``, matmul, an opaque function -- mapped to
    the name of that use. Such a weight is not a Conv/Linear module call, so it is not quantized.
    ``graph``: a trace whose targets name ``gm``'s attributes (default: ``gm``'s own graph)."""
    params = dict(gm.named_parameters())
    found: dict[str, str] = {}
    for node in (graph if graph is not None else gm.graph).nodes:
        if node.op != "get_attr" or str(node.target) not in params:
            continue
        for user in node.users:
            ok = (user.op == "call_function" and user.target in FLOAT_PARAM_FUNCTIONS) or (
                user.op == "call_method" and user.target in FLOAT_PARAM_METHODS
            )
            if not ok:
                found[str(node.target)] = getattr(user.target, "__name__", str(user.target))
                break
    return found


def float_parameters(gm: fx.GraphModule) -> dict[str, str]:
    """Every parameter the traced graph reads directly (all stay float), with why: used
    elementwise / by a normalisation, or used as a weight through a function (not quantized:
    the search lists those as unsupported and stops unless told to keep them in float)."""
    params = dict(gm.named_parameters())
    weights = weight_like_parameters(gm)
    out = {}
    for node in gm.graph.nodes:
        name = str(node.target)
        if node.op == "get_attr" and name in params:
            out[name] = (f"parameter used as a weight through {weights[name]}: float, NOT "
                         "quantized" if name in weights else "parameter used elementwise: float")
    return out
