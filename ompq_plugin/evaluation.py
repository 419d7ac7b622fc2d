"""Top-1 accuracy of any classifier (float or quantized ``nn.Module``) on labelled images."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn

from ompq_plugin.data import CifarSplit, prepare
from ompq_plugin.errors import OmpqError

if TYPE_CHECKING:
    from ompq_plugin.models import ModelSpec

def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _norm_of(norm: object) -> tuple[tuple[float, ...], tuple[float, ...], tuple[int, int] | None]:
    if hasattr(norm, "mean") and hasattr(norm, "std"):  # a ModelSpec or an InputRecord
        size = getattr(norm, "input_size", None) or getattr(norm, "size", None)
        hw = (int(size[1]), int(size[2])) if size else None
        return tuple(norm.mean), tuple(norm.std), hw
    if isinstance(norm, (tuple, list)) and len(norm) == 2:
        return tuple(norm[0]), tuple(norm[1]), None
    raise TypeError("norm must be a ModelSpec or a (mean, std) pair")


def count_correct(
    model: nn.Module,
    data: CifarSplit | torch.Tensor,
    labels: torch.Tensor | None = None,
    norm: ModelSpec | tuple[Sequence[float], Sequence[float]] | None = None,
    batch_size: int = 500,
    progress: bool = False,
) -> tuple[int, int]:
    """(correct, total) top-1 over ``data``; see :func:`evaluate` for the arguments."""
    if isinstance(data, CifarSplit):
        images, labels = data.images, data.labels if labels is None else labels
    else:
        images = data
    if labels is None:
        raise ValueError("labels are required when images are passed as a tensor")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    if images.dtype == torch.uint8 and norm is None:
        raise OmpqError("uint8 images need a normalisation: pass the model's spec or "
                        "(mean, std)")
    prep = None if norm is None else _norm_of(norm)

    device = _model_device(model)
    was_training = model.training
    model.eval()
    correct, total = 0, int(images.shape[0])
    bar = _progress(progress)
    try:
        with torch.no_grad(), bar as p:
            task = p.add_task("evaluating", total=total) if p is not None else None
            for start in range(0, total, batch_size):
                x = images[start:start + batch_size]
                if prep is not None:
                    x = prepare(x, *prep)
                y = labels[start:start + batch_size].to(device)
                out = model(x.to(device))
                logits = out.value if hasattr(out, "value") else out  # Brevitas QuantTensor
                correct += int((logits.argmax(dim=1) == y).sum())
                if p is not None:
                    p.advance(task, x.shape[0])
    finally:
        model.train(was_training)
    return correct, total


def evaluate(
    model: nn.Module,
    data: CifarSplit | torch.Tensor,
    labels: torch.Tensor | None = None,
    norm: ModelSpec | tuple[Sequence[float], Sequence[float]] | None = None,
    batch_size: int = 500,
    progress: bool = False,
) -> float:
    """Top-1 accuracy in percent.

    ``data`` is a :class:`CifarSplit` (its labels are used) or an image tensor with ``labels``.
    With ``norm`` (a ModelSpec or InputRecord, whose input size also sets the resolution, or a
    ``(mean, std)`` pair) images are prepared batch by batch: uint8 pixels scaled to 0..1, then
    ``(x - mean) / std``, then resized; without it floating-point images are used as given
    (uint8 images need ``norm``). Runs under ``torch.no_grad`` in eval mode on the model's
    device and restores the model's train/eval mode afterwards. ``progress=True`` shows a rich
    progress bar.
    """
    correct, total = count_correct(model, data, labels, norm, batch_size, progress)
    if total == 0:
        raise OmpqError("no images to evaluate: pass a non-empty data set")
    return 100.0 * correct / total


def _progress(enabled: bool):  # noqa: ANN202
    if not enabled:
        return nullcontext(None)
    try:
        from rich.progress import Progress
    except ImportError:  # rich is a dependency, but stay usable without it
        return nullcontext(None)
    return Progress(transient=True)
