"""Post-training quantization of a model from :func:`ompq_plugin.quantizer.quantize`.

``calibrate`` sets the activation scales from statistics of real samples (Brevitas
``calibration_mode``); ``bias_correction`` removes the mean output shift that weight quantization
causes (Brevitas ``bias_correction_mode``); ``gptq`` rounds weights layer by layer to compensate
quantization error (Brevitas ``gptq_mode``).

Caveat for GPTQ with statistics-based weight scales (every quantizer used here): the scale of a
layer is recomputed from its weights, and GPTQ moves the weights, so the scale seen by GPTQ while
it rounds can differ slightly from the final one. The frozen 0/1 shortcut convs are restored after
GPTQ so that they stay exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ompq_plugin.errors import OmpqError


def _batches(
    samples: torch.Tensor | Iterable[torch.Tensor], batch_size: int
) -> Iterator[torch.Tensor]:
    if isinstance(samples, torch.Tensor):
        if samples.dim() < 2 or samples.shape[0] == 0:
            raise OmpqError("calibration needs a non-empty batch of samples (N x C x H x W)")
        for start in range(0, samples.shape[0], batch_size):
            yield samples[start : start + batch_size]
    else:
        for item in samples:
            yield item[0] if isinstance(item, (tuple, list)) else item


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _frozen_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def calibrate(
    qmodel: nn.Module,
    samples: torch.Tensor | Iterable[torch.Tensor],
    batch_size: int = 64,
    bias_correction: bool = False,
    gptq: bool = False,
    gptq_act_order: bool = False,
) -> nn.Module:
    """Calibrate activation scales on ``samples`` (normalised float images), in place.

    Optionally follow with bias correction and/or GPTQ on the same samples. Returns ``qmodel``
    in eval mode, after one quantized forward pass of the first batch (:func:`check_forward`).
    """
    from brevitas.graph.calibrate import calibration_mode

    device = _device(qmodel)
    batches = [b.to(device) for b in _batches(samples, batch_size)]
    qmodel.eval()
    with torch.no_grad(), calibration_mode(qmodel):
        for x in batches:
            qmodel(x)
    if gptq:
        apply_gptq(qmodel, batches, act_order=gptq_act_order)
    if bias_correction:
        apply_bias_correction(qmodel, batches)
    qmodel.eval()
    check_forward(qmodel, batches[0])
    return qmodel


def check_forward(qmodel: nn.Module, x: torch.Tensor) -> None:
    """One quantized (eval) forward pass of ``x``; raise an OmpqError if it fails, so that no
    file is written for a model that cannot run (calibration runs with quantization off)."""
    try:
        with torch.no_grad():
            qmodel(x)
    except Exception as exc:  # Brevitas / torch raise many types
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise OmpqError(
            f"the quantized model fails at its first forward pass ({type(exc).__name__}: "
            f"{first}); this architecture is not supported by `ompq quantize` yet"
        ) from None


def apply_bias_correction(qmodel: nn.Module, batches: list[torch.Tensor]) -> None:
    """Brevitas bias correction: add the mean float-vs-quant output error to each bias."""
    from brevitas.graph.calibrate import bias_correction_mode

    qmodel.eval()
    # skip_if_no_bias: adding a bias would change the state_dict layout (and the frozen
    # shortcut convs, which have none, must stay exact); BN-folded layers all have a bias.
    with torch.no_grad(), bias_correction_mode(qmodel, skip_if_no_bias=True):
        for x in batches:
            qmodel(x)


def apply_gptq(qmodel: nn.Module, batches: list[torch.Tensor], act_order: bool = False) -> None:
    """Brevitas GPTQ, one layer at a time (sequentially, with quantized activations)."""
    from brevitas.graph.gptq import gptq_mode

    saved = _frozen_params(qmodel)
    qmodel.eval()
    with torch.no_grad():
        # create_weight_orig=False: no float copy of every weight left behind, which would also
        # change the state_dict layout and stop the saved file from reloading
        with gptq_mode(qmodel, act_order=act_order, use_quant_activations=True,
                       create_weight_orig=False) as g:
            model = g.model
            for _ in range(g.num_layers):
                for x in batches:
                    model(x)
                g.update()
    _restore(qmodel, saved)
