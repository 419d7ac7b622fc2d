"""Model registry: built-in architectures, their input conventions and pretrained weights.

Only the CIFAR-10 ResNets have real pretrained weights (../shared/data/weights); the other
architectures are randomly initialised and serve structure and scale (layer counts, MACs,
search speed), never accuracy claims.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ompq_plugin.errors import OmpqError
from ompq_plugin.models import cifar_resnet

CIFAR_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # akamaster's trainer.py normalises CIFAR with these
CIFAR_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and feed it: input shape (C, H, W), normalisation, defaults."""

    name: str
    factory: Callable[[], nn.Module]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_samples: int  # N images for the search (paper: 64 for ResNets, 32 for MobileNetV2)
    weights_file: str | None = None  # relative to the data folder, if real weights exist


MODELS: dict[str, ModelSpec] = {
    f"resnet{depth}": ModelSpec(
        name=f"resnet{depth}",
        factory=getattr(cifar_resnet, f"resnet{depth}"),
        input_size=(3, 32, 32),
        mean=CIFAR_IMAGENET_MEAN,
        std=CIFAR_IMAGENET_STD,
        default_samples=64,
        weights_file=None if depth == 44 else f"weights/resnet{depth}.th",
    )
    for depth in (20, 32, 44, 56)
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise OmpqError(
            f"unknown model {name!r}: choose one of {known}, or pass path/to/file.py:factory"
        ) from None
