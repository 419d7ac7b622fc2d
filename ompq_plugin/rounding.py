"""Activation rounding that FINN's thresholds compute, and layer outputs that never sit on a tie.

FINN turns every activation ``Quant`` into a MultiThreshold whose thresholds lie at
``(k + 1/2) * scale``; a value on a threshold counts as above it, so FINN computes
``floor(x / s + 1/2)`` (ties up) whatever the node's ``rounding_mode`` says. The QONNX ``Quant``
rounds as its ``rounding_mode`` says (Brevitas writes ``ROUND``, half to even), and qonnx 1.0 has
no mode equal to ``floor(x + 1/2)`` for both signs (``HALF_UP`` rounds ties away from zero).
With power-of-two scales many values sit exactly on ties (a finer grid re-quantized onto a
coarser one), so the two disagree unless:

* every activation quantizer rounds ``HALF_UP`` (:class:`RoundHalfUpSte`, exported as
  ``rounding_mode="HALF_UP"``): equal to FINN's rounding for
  every value >= 0 (after a ReLU, the identity branch of a ResNet block);
* a layer output that a *signed* quantizer reads (a ResNet block's second conv, before the
  residual add) is never on a tie: :class:`TieOffset` adds a quarter of the layer's accumulator
  LSB ``a`` (input scale x weight scale). With power-of-two scales the layer output is
  ``n * a``; with the offset it is ``(n + 1/4) a``. A tie of a quantizer with scale ``2^m a``
  is ``(k + 1/2) 2^m a``: a multiple of ``a`` for ``m >= 1``, ``(k + 1/2) a`` for ``m = 0``,
  and for ``m <= -2`` a multiple of ``a / 2^(|m|+1)`` that is odd in those units, never
  ``(n + 1/4) a``. Only ``m = -1`` (a quantizer grid half the accumulator's, finer than the
  values it quantizes) can meet it (:func:`offset_is_tie_free`). The offset is 1/4 of an
  accumulator LSB: far below one activation LSB. It is a separate constant ``Add`` in the
  graph, not part of the bias (a bias ``Quant`` with a non-zero zero point stops FINN's
  ``FoldQuantWeights``); FINN's streamlining absorbs it into the next thresholds. The export
  does not check the ``m = -1`` case; :func:`ompq_plugin.exporters.targets.count_ties` shows
  it on real images.

The input quantizer reads float images: a tie there needs an exactly representable half-LSB
value, which :func:`ompq_plugin.exporters.targets.count_ties` counts on real images.

Used by :mod:`ompq_plugin.quantizer` when a profile says ``act_rounding = "half-up"`` (the
``finn`` profile).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

TIE_OFFSET = 0.25  # of the accumulator LSB (input scale x weight scale)
HALF_UP = "HALF_UP"


class RoundHalfUpSte(nn.Module):
    """``sign(x) * floor(|x| + 1/2)`` (QONNX ``HALF_UP``) with a straight-through gradient."""

    def __init__(self) -> None:  # Brevitas' injector needs an explicit signature
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sign(x) * torch.floor(torch.abs(x) + 0.5)
        return x + (y - x).detach()


def half_up(act_quant: type) -> type:
    """The Brevitas activation quantizer ``act_quant`` rounding half up."""
    return act_quant.let(float_to_int_impl=RoundHalfUpSte)


def rounds_half_up(module: nn.Module) -> bool:
    """True when a model (or module) has an activation quantizer built by :func:`half_up`.
    Brevitas' QONNX export writes such a quantizer as ``rounding_mode="ROUND"`` (its export op
    knows only its own enum): :func:`ompq_plugin.exporters.targets.set_act_rounding` fixes it."""
    return any(isinstance(m, RoundHalfUpSte) for m in module.modules())


class TieOffset(nn.Module):
    """``y + TIE_OFFSET * scale`` for a layer output ``y`` (a Brevitas QuantTensor whose scale
    is the accumulator LSB); returns a plain tensor."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, y: Any) -> Any:
        scale = getattr(y, "scale", None)
        value = getattr(y, "value", y)
        if scale is None:
            return value
        return value + TIE_OFFSET * scale


def offset_is_tie_free(act_scale: float, acc_scale: float) -> bool:
    """True when an output ``(n + 1/4) * acc_scale`` can never be a rounding tie of a quantizer
    with scale ``act_scale`` (both powers of two; see the module docstring)."""
    return act_scale != acc_scale / 2
