"""Activation quantization errors measured on the search's own forward pass.

A forward pre-hook on each layer sees the layer's input on the N search samples while the ORM
features stream past (the hook runs inside the same single pass) and keeps only the relative
error at each candidate width -- a handful of floats per layer, never the tensor.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from ompq_plugin.methods.quant_error import act_errors


@dataclass
class ActErrorStats:
    """Relative input-quantization error per layer and width, filled by :func:`record`."""

    errors: dict[str, dict[int, float]] = field(default_factory=dict)
    seconds: float = 0.0


@contextmanager
def record(
    model: nn.Module,
    widths: Mapping[str, Sequence[int]],
    power_of_two: bool,
) -> Iterator[ActErrorStats]:
    """While active, every forward of ``model`` measures the inputs of the layers in ``widths``
    (layer name -> activation widths to score). The first call of each layer counts."""
    stats = ActErrorStats()
    modules = dict(model.named_modules())

    def hook(name: str) -> object:
        def run(_module: nn.Module, args: tuple[object, ...]) -> None:
            if name in stats.errors or not args:
                return
            start = time.perf_counter()
            stats.errors[name] = act_errors(args[0], widths[name], power_of_two)  # type: ignore[arg-type]
            stats.seconds += time.perf_counter() - start

        return run

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in widths if n in modules]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
