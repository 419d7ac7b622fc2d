"""MobileNetV2 (Sandler et al. 2018) in torchvision's layout, with a CIFAR and an ImageNet stem.

Parameter names follow ``torchvision.models.mobilenet_v2`` (``features.{i}.conv.{j}``,
``classifier.1``), so a torchvision-style state dict loads. Differences that leave the function
unchanged: every ReLU6 is its own (not in-place) module, so forward hooks and torch.fx see each
activation separately, and the final pooling is ``AdaptiveAvgPool2d(1)`` + ``torch.flatten``.

``stem="imagenet"``: 224x224 input, first conv stride 2 (the paper / torchvision network).
``stem="cifar"``: 32x32 input, first conv stride 1 and the first 24-channel stage stride 1
(the common CIFAR variants, e.g. kuangliu/pytorch-cifar and chenyaofo/pytorch-cifar-models), so
the feature maps go 32 -> 16 -> 8 -> 4 instead of collapsing to 1x1.

Random initialisation only (torchvision's scheme); no pretrained weights are provided.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

# t (expansion), c (output channels), n (repeats), s (stride of the first repeat)
IMAGENET_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
CIFAR_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1)) + IMAGENET_SETTINGS[2:]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` without losing more than 10 % (torchvision)."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU6; ``groups=in_ch`` makes it depthwise."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    """1x1 expand (if t > 1) -> 3x3 depthwise -> 1x1 linear projection (+ identity if it fits)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_ch, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:  # fixed at construction: no data-dependent control flow
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        stem: Literal["cifar", "imagenet"] = "imagenet",
        dropout: float = 0.2,
        round_nearest: int = 8,
    ) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        settings = CIFAR_SETTINGS if stem == "cifar" else IMAGENET_SETTINGS
        in_ch = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [
            ConvBNReLU6(3, in_ch, stride=1 if stem == "cifar" else 2)
        ]
        for t, c, n, s in settings:
            out_ch = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(ConvBNReLU6(in_ch, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenetv2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    """ImageNet MobileNetV2 (224x224 input)."""
    return MobileNetV2(num_classes, width_mult, stem="imagenet")


def mobilenetv2_cifar(num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV2:
    """CIFAR MobileNetV2 (32x32 input, stride-1 stem)."""
    return MobileNetV2(num_classes, width_mult, stem="cifar")
