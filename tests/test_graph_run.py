"""graph_run.run_graph against torch.fx.Interpreter: the same output, bit for bit, and every
tapped node's value exactly the interpreter's, on graphs with module calls, functions with
keyword arguments, methods, nested list arguments (torch.cat), attributes read directly, a
parameter with a default, and a value used twice."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ompq_plugin.graph_run import run_graph
from ompq_plugin.models import build_model


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor, bias: float = 0.25) -> torch.Tensor:
        a = F.relu(self.bn(self.conv(x)), inplace=False)
        b = self.other(x) * self.scale + bias
        y = torch.cat([a, b], dim=1)  # a nested list argument
        y = F.adaptive_avg_pool2d(y, (4, 4)) + a.mean()  # ``a`` used twice
        return self.fc(y.flatten(1))  # a method call


def _interpreted(model: nn.Module, graph: torch.fx.Graph, x: torch.Tensor):
    seen: dict[str, torch.Tensor] = {}

    class Recording(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> object:
            value = super().run_node(node)
            if isinstance(value, torch.Tensor):
                seen[node.name] = value.clone()
            return value

    return Recording(model, graph=graph).run(x), seen


@pytest.mark.parametrize("name", ["mixed", "resnet20", "mobilenetv2"])
def test_same_output_and_taps_as_the_interpreter(name: str) -> None:
    torch.manual_seed(0)
    if name == "mixed":
        model, x = _Mixed().eval(), torch.randn(2, 3, 8, 8)
    else:
        model = build_model(name)[0].eval()
        x = torch.randn(2, 3, 32, 32) if name == "resnet20" else torch.randn(1, 3, 64, 64)
    graph = torch.fx.Tracer().trace(model)
    with torch.no_grad():
        expected, seen = _interpreted(model, graph, x)
        wanted = [n.name for n in graph.nodes if n.name in seen]
        tapped: dict[str, torch.Tensor] = {}
        got = run_graph(model, graph, (x,), set(wanted), lambda k, v: tapped.setdefault(k, v))
    assert torch.equal(got, expected)
    assert list(tapped) == wanted  # in execution order, each once
    for k in wanted:
        assert torch.equal(tapped[k], seen[k]), k


def test_a_parameter_without_input_takes_its_default_and_none_is_an_error() -> None:
    model = _Mixed().eval()
    graph = torch.fx.Tracer().trace(model)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(run_graph(model, graph, (x,)), model(x))
        assert torch.equal(run_graph(model, graph, (x, 1.0)), model(x, 1.0))
        with pytest.raises(ValueError, match="no input"):
            run_graph(model, graph, ())


def test_values_are_freed_after_their_last_use() -> None:
    """As in the plain forward pass: the conv's output (read only by the BatchNorm) is gone by
    the time the classifier runs."""
    import weakref

    model = _Mixed().eval()
    graph = torch.fx.Tracer().trace(model)
    refs: dict[str, weakref.ref] = {}
    alive_at_fc: list[bool] = []

    def tap(name: str, value: object) -> None:
        if name == "conv":
            refs[name] = weakref.ref(value)
        else:
            alive_at_fc.append(refs["conv"]() is not None)

    with torch.no_grad():
        run_graph(model, graph, (torch.randn(1, 3, 8, 8),), {"conv", "fc"}, tap)
    assert alive_at_fc == [False]
