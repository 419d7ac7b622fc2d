"""HAWQ-V2/V3 sensitivity: Hutchinson estimates of per-layer Hessian traces.

``Tr(H) = E[v^T H v]`` for Rademacher ``v``; one Hessian-vector product (double backprop) per
iteration gives every block's ``v_i^T (H v)_i`` at once, i.e. an unbiased estimate of the trace of
each diagonal block (one block per layer's weights, one per layer input). Iterations stop after
``max_iter`` or when the running means change by less than ``tol`` (relative, as PyHessian).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ompq_plugin.errors import OmpqError

MAX_ITER = 100
TOL = 1e-3


@dataclass(frozen=True)
class TraceResult:
    traces: list[float]  # one per block, in the order given
    iterations: int
    seconds: float


def hutchinson_traces(
    hvp: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
    shapes: Sequence[torch.Size],
    max_iter: int = MAX_ITER,
    tol: float = TOL,
    seed: int = 0,
) -> TraceResult:
    """Trace of each diagonal block of the Hessian behind ``hvp`` (a function v -> H v)."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(shapes), dtype=torch.float64)
    previous: torch.Tensor | None = None
    it = 0
    for it in range(1, max_iter + 1):
        vs = [torch.randint(0, 2, tuple(s), generator=gen).double().mul_(2).sub_(1) for s in shapes]
        hv = hvp([v.float() for v in vs])
        total += torch.tensor(
            [float((v * h.double().cpu()).sum()) for v, h in zip(vs, hv, strict=True)]
        )
        mean = total / it
        if previous is not None:
            change = float((mean - previous).norm()) / (float(mean.norm()) + 1e-12)
            if change < tol:
                break
        previous = mean
    return TraceResult((total / it).tolist(), it, time.perf_counter() - start)


@dataclass(frozen=True)
class HawqTraces:
    weight_traces: list[float]  # Tr(H) of each layer's weight block
    input_traces: list[float]  # Tr(H) of each layer's input block (shared inputs: same value)
    inputs: list[torch.Tensor]  # each layer's input on the Hessian images (detached)
    iterations: int
    seconds: float


def layer_traces(
    model: nn.Module,
    layer_names: Sequence[str],
    images: torch.Tensor,
    labels: torch.Tensor,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
    seed: int = 0,
) -> HawqTraces:
    """Hessian traces of the cross-entropy loss on (images, labels) for each layer's weights
    and input activation. The model is used in eval mode and left unchanged."""
    modules = dict(model.named_modules())
    missing = [n for n in layer_names if n not in modules]
    if missing:
        raise OmpqError(f"hawq: layers {missing} are not modules of the model")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    captured: dict[str, torch.Tensor] = {}
    handles = [
        modules[n].register_forward_pre_hook(lambda _m, args, n=n: captured.setdefault(n, args[0]))
        for n in layer_names
    ]
    x = images.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), labels)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    weights = [modules[n].weight for n in layer_names]
    tensors: list[torch.Tensor] = []
    slot: list[int] = []
    for n in layer_names:  # one block per distinct input tensor
        t = captured[n]
        found = next((k for k, u in enumerate(tensors) if u is t), None)
        if found is None:
            tensors.append(t)
            found = len(tensors) - 1
        slot.append(found)
    blocks = weights + tensors
    grads = torch.autograd.grad(loss, blocks, create_graph=True)

    def hvp(vs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        moved = [v.to(b.device) for v, b in zip(vs, blocks, strict=True)]
        return torch.autograd.grad(grads, blocks, grad_outputs=moved, retain_graph=True)

    result = hutchinson_traces(hvp, [b.shape for b in blocks], max_iter, tol, seed)
    n_w = len(weights)
    return HawqTraces(
        weight_traces=result.traces[:n_w],
        input_traces=[result.traces[n_w + k] for k in slot],
        inputs=[tensors[k].detach() for k in slot],
        iterations=result.iterations,
        seconds=time.perf_counter() - start,
    )
