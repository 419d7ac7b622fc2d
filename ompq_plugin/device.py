"""Where the search runs its forward pass: ``--device cpu`` (the default) or ``cuda``.

The forward pass, the Grams and the activation / weight error tables run on the device; the
integer program and the ORM matrix (N x N per layer) stay on the CPU. The model is moved for
the search and moved back afterwards, so a caller's model is left where it was.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ompq_plugin.errors import OmpqError

DEVICES = ("cpu", "cuda")


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` checked: None (leave the model where it is), ``cpu``, ``cuda`` or ``cuda:K``
    with a GPU that torch can see."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OmpqError(f"--device {device!r} is not a device; use cpu or cuda") from None
    if dev.type not in DEVICES:
        raise OmpqError(f"--device {device!r} is not supported; use cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OmpqError(
                f"--device {device!r}: torch sees no CUDA GPU on this machine (CPU-only torch "
                "build or no driver); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OmpqError(
                f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                "device(s); use cuda:0"
            )
    return dev


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def on_device(model: nn.Module, device: torch.device | None) -> Iterator[torch.device]:
    """Run a block with ``model`` on ``device`` (None: where it is); yields the device and
    moves the model back where it was when the block ends."""
    home = model_device(model)
    target = device if device is not None else home
    if target != home:
        model.to(target)
    try:
        yield target
    finally:
        if target != home:
            model.to(home)
