"""Run a torch.fx graph of a model node by node, handing chosen nodes' values to a callback.

Contract: :func:`run_graph` computes what ``torch.fx.Interpreter(model, graph=graph).run(*inputs)``
computes (the same calls on the same values, in the same order; tested bit-identical on
ResNets and torchvision models), calls ``tap(node_name, value)`` right after each node named in
``taps`` has run, and frees every value after its last use, so peak memory is that of the plain
forward pass. Graphs with ``*args`` placeholders are refused (``ValueError``); no traced model of
ours has them.

Why not ``torch.fx.Interpreter``: per node it enters a context manager, walks the arguments with
``map_aggregate``, resolves a call_module target through its dotted path and dispatches by name.
Resolving every module once and reading flat argument tuples directly cut ResNet-20's tapped
pass (N = 64, one thread) from 35.3 ms to 30.7 ms and ResNet-56's from 100.5 ms to 90.2 ms
(minimum of 15, interleaved; the plain forward 34.7 / 96.3 ms; 2026-12-07, ad-hoc script).
Untapped, on ResNet-20 later that day: median of 30 runs 31.6 / 32.1 ms against the plain
forward's 44.3 / 42.4 ms (minima 31.2 / 31.1 against 31.5 / 32.8; ad hoc): the plain forward's
rounds flipped between ~33 and ~48 ms, page faults in part (with glibc's mmap and trim
thresholds raised its median was a steady 39 ms). Whole default searches on either pass were
level on ResNet-20 / -56 (``bench/results/untapped_pass.json``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch.fx
from torch import nn
from torch.fx.node import Node, map_arg

_SCALARS = (int, float, bool, str, type(None))
_MISSING = object()


def _attribute(model: nn.Module, target: str) -> Any:  # noqa: ANN401 - any attribute
    obj: Any = model
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _last_uses(graph: torch.fx.Graph) -> dict[Node, list[Node]]:
    """Node -> the nodes whose value nobody reads after it (each input freed once)."""
    seen: set[Node] = set()
    out: dict[Node, list[Node]] = {}
    for node in reversed(graph.nodes):
        for used in node.all_input_nodes:
            if used not in seen:
                seen.add(used)
                out.setdefault(node, []).append(used)
    return out


def run_graph(
    model: nn.Module,
    graph: torch.fx.Graph,
    inputs: tuple[object, ...],
    taps: Collection[str] = (),
    tap: Callable[[str, object], None] | None = None,
) -> object:
    """The graph's output on ``inputs``; ``tap(name, value)`` after every node in ``taps``."""
    modules = dict(model.named_modules())
    last = _last_uses(graph)
    env: dict[Node, object] = {}
    supplied = iter(inputs)
    for node in graph.nodes:
        op = node.op
        if op == "placeholder":
            if str(node.target).startswith("*"):
                raise ValueError(f"placeholder {node.target} takes *args; not supported")
            value = next(supplied, _MISSING)
            if value is _MISSING:
                if not node.args:
                    raise ValueError(f"no input for the graph's parameter {node.target}")
                value = node.args[0]  # its default
        elif op == "get_attr":
            value = _attribute(model, str(node.target))
        elif op == "output":
            value = map_arg(node.args[0], env.__getitem__)
            if tap is not None and node.name in taps:
                tap(node.name, value)
            return value
        else:
            if all(isinstance(a, (Node, *_SCALARS)) for a in node.args):
                args = tuple(env[a] if isinstance(a, Node) else a for a in node.args)
            else:
                args = map_arg(node.args, env.__getitem__)
            kwargs = map_arg(node.kwargs, env.__getitem__) if node.kwargs else {}
            if op == "call_module":
                value = modules[str(node.target)](*args, **kwargs)
            elif op == "call_function":
                value = node.target(*args, **kwargs)  # type: ignore[operator]
            elif op == "call_method":
                value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            else:
                raise ValueError(f"unknown fx op {op!r} at node {node.name}")
        env[node] = value
        if tap is not None and node.name in taps:
            tap(node.name, value)
        for dead in last.get(node, ()):
            del env[dead]
    return None
