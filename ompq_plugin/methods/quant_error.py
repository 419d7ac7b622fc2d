"""Quantization error of weights and activations under a profile's own quantizer rules.

Emulates, in plain torch, the Brevitas quantizers that :mod:`ompq_plugin.quantizer` builds
(checked against Brevitas in the tests):

* weights: symmetric, narrow range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, scale from the absolute
  maximum per output channel or per tensor; float scale ``max / (2^(b-1) - 1)``, power-of-two
  scale ``2^ceil(log2 max) / 2^(b-1)`` (Brevitas' fixed-point quantizers);
* activations: per tensor, signed ``[-2^(b-1), 2^(b-1) - 1]`` or unsigned ``[0, 2^b - 1]``
  (after a ReLU), threshold = the 99.999th percentile of ``|x|`` (Brevitas' calibration
  statistic); float scale ``threshold / 2^(b-1)`` signed or ``/ (2^b - 1)`` unsigned,
  power-of-two scale ``2^ceil(log2 threshold) / 2^(b-1)`` signed or ``/ 2^b`` unsigned.

The error measure is relative: ``||Q_b(x) - x||^2 / ||x||^2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

ACT_PERCENTILE = 99.999  # Brevitas ParamFromRuntimePercentileScaling.high_percentile_q
_MIN_SCALE = 1e-10  # Brevitas scaling_min_val
_BLOCK_ELEMENTS = 1 << 19  # elements of one block: 2 MiB, cache-sized (larger blocks ran slower)


@dataclass(frozen=True)
class QuantRule:
    """How a profile quantizes: scales restricted to powers of two, weights per channel."""

    power_of_two: bool
    per_channel: bool


def _po2_ceil(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(x.clamp_min(_MIN_SCALE))))


def weight_scale(weight: torch.Tensor, bits: int, rule: QuantRule) -> torch.Tensor:
    """Scale of ``weight`` at ``bits`` (shape broadcastable to the weight)."""
    w = weight.detach().double()
    if rule.per_channel:
        peak = w.abs().reshape(w.shape[0], -1).amax(dim=1)
        peak = peak.reshape(-1, *([1] * (w.dim() - 1)))
    else:
        peak = w.abs().max()
    if rule.power_of_two:
        return _po2_ceil(peak) / 2 ** (bits - 1)
    return (peak / (2 ** (bits - 1) - 1)).clamp_min(_MIN_SCALE)


def quantize_weight(weight: torch.Tensor, bits: int, rule: QuantRule) -> torch.Tensor:
    """``Q_b(weight)`` in float64: what the quantized layer computes with."""
    if bits < 2:
        raise ValueError(f"bits must be at least 2, got {bits}")
    w = weight.detach().double()
    scale = weight_scale(w, bits, rule)
    top = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w / scale), -top, top) * scale


def weight_error(weight: torch.Tensor, bits: int, rule: QuantRule) -> float:
    """Relative error ``||Q_b(W) - W||^2 / ||W||^2``."""
    w = weight.detach().double()
    energy = float((w * w).sum())
    if energy == 0.0:
        return 0.0
    return float(((quantize_weight(w, bits, rule) - w) ** 2).sum()) / energy


def weight_errors(weight: torch.Tensor, bits: Iterable[int], rule: QuantRule) -> dict[int, float]:
    """:func:`weight_error` at every width of ``bits``, in float32 as the quantized layer itself
    (within ~1e-6 relative of the float64 reference; half its cost); see
    :func:`many_weight_errors`."""
    return many_weight_errors([weight], [tuple(bits)], rule)[0]


def many_weight_errors(
    weights: Sequence[torch.Tensor], bits: Sequence[Sequence[int]], rule: QuantRule
) -> list[dict[int, float]]:
    """:func:`weight_errors` of each weight at its widths. Weights of one shape scored at the
    same widths (a ResNet's repeated blocks) are stacked and quantized together at every width
    on one widths x layers x weight block: a few element-wise passes over it, a fixed number of
    torch calls whatever the number of layers and widths (as many as keep the block under
    ``_BLOCK_ELEMENTS``). The sums are float32 (torch's cascade summation: within 1e-6 relative
    of float64 sums on the real ResNet-20 / -56 weights, at three quarters of their cost)."""
    out: list[dict[int, float]] = [{} for _ in weights]
    batches: dict[tuple[object, ...], list[int]] = {}
    for i, (w, widths) in enumerate(zip(weights, bits, strict=True)):
        if any(b < 2 for b in widths):
            raise ValueError(f"bits must be at least 2, got {min(widths)}")
        batches.setdefault((tuple(w.shape), tuple(widths)), []).append(i)
    for (shape, widths), members in batches.items():
        per_batch = max(1, _BLOCK_ELEMENTS // max(math.prod(shape) * len(widths), 1))
        for first in range(0, len(members), per_batch):
            chunk = members[first : first + per_batch]
            errors = _stacked_errors([weights[i] for i in chunk], list(widths), rule)
            for i, e in zip(chunk, errors, strict=True):
                out[i] = e
    return out


def _stacked_errors(
    weights: Sequence[torch.Tensor], widths: list[int], rule: QuantRule
) -> list[dict[int, float]]:
    """Relative errors of same-shape weights at ``widths`` (widths blocked by size)."""
    w = torch.stack([x.detach().float() for x in weights])  # layers x weight
    n = len(weights)
    energy = (w * w).reshape(n, -1).sum(dim=1).tolist()
    ones = [1] * (w.dim() - 2)
    if rule.per_channel:
        peak = w.abs().reshape(n, w.shape[1], -1).amax(dim=2).reshape(n, -1, *ones)
    else:
        peak = w.abs().reshape(n, -1).amax(dim=1).reshape(n, 1, *ones)
    if rule.power_of_two:
        po2 = _po2_ceil(peak)
        scales = [po2 / 2 ** (b - 1) for b in widths]
    else:
        scales = [(peak / (2 ** (b - 1) - 1)).clamp_min(_MIN_SCALE) for b in widths]
    per_block = max(1, _BLOCK_ELEMENTS // max(w.numel(), 1))
    sums: list[list[float]] = []  # per width, per layer
    for first in range(0, len(widths), per_block):
        group = widths[first : first + per_block]
        scale = torch.stack(scales[first : first + per_block])  # widths x layers x peak
        q = w / scale
        q.round_()
        if rule.power_of_two:  # |w| / scale reaches top + 1; a float scale stops at top
            top = torch.tensor([2 ** (b - 1) - 1 for b in group], dtype=w.dtype, device=w.device)
            top = top.reshape(-1, 1, 1, *ones)
            torch.minimum(q, top, out=q)
            torch.maximum(q, -top, out=q)
        q.mul_(scale).sub_(w).square_()
        sums += q.reshape(len(group), n, -1).sum(dim=2).tolist()
    return [
        {b: row[k] / energy[k] if energy[k] else 0.0 for b, row in zip(widths, sums, strict=True)}
        for k in range(n)
    ]


def weight_sq_error(weight: torch.Tensor, bits: int, rule: QuantRule) -> float:
    """Absolute error ``||Q_b(W) - W||^2`` (HAWQ's perturbation)."""
    w = weight.detach().double()
    return float(((quantize_weight(w, bits, rule) - w) ** 2).sum())


def act_threshold(x: torch.Tensor, signed: bool) -> float:
    """The calibration threshold: the 99.999th percentile of ``|x|`` (of ``x`` if unsigned),
    read off the few largest values (``topk``), which is much cheaper than a full selection."""
    flat = x.detach().reshape(-1).float()
    flat = flat.abs() if signed else flat.clamp_min(0)
    n = flat.numel()
    k = max(1, min(n, int(round(ACT_PERCENTILE / 100 * n))))  # k-th smallest value
    return float(flat.topk(n - k + 1).values[-1])


def quantize_act(
    x: torch.Tensor, bits: int, signed: bool, threshold: float, power_of_two: bool
) -> torch.Tensor:
    """Per-tensor ``Q_b(x)`` with the calibration threshold (float32, like the forward)."""
    if bits < 2:
        raise ValueError(f"bits must be at least 2, got {bits}")
    thr = torch.tensor(max(threshold, _MIN_SCALE), dtype=torch.float64)
    if signed:  # Brevitas scales a signed, non-narrow range by 2^(b-1)
        half = 2 ** (bits - 1)
        lo, hi, levels, float_div = -half, half - 1, half, half
    else:
        lo, hi, levels, float_div = 0, 2**bits - 1, 2**bits, 2**bits - 1
    if power_of_two:
        scale = float(_po2_ceil(thr) / levels)
    else:
        scale = float(thr / float_div)
    return torch.clamp(torch.round(x / scale), lo, hi) * scale


def act_errors(
    x: torch.Tensor, bits: Iterable[int], power_of_two: bool, relative: bool = True
) -> dict[int, float]:
    """Error of quantizing activation ``x`` at each width: relative, or the absolute
    ``||Q_b(x) - x||^2`` when ``relative`` is false. Signed if ``x`` has negative values (the
    quantizer after a ReLU is unsigned)."""
    x = x.detach().float()
    signed = bool((x < 0).any())
    thr = act_threshold(x, signed)
    energy = float((x.double() ** 2).sum())
    out: dict[int, float] = {}
    for b in bits:
        if energy == 0.0:
            out[b] = 0.0
            continue
        diff = (quantize_act(x, b, signed, thr, power_of_two) - x).double()
        out[b] = float((diff * diff).sum()) / (energy if relative else 1.0)
    return out
