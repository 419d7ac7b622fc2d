"""Options shared by several sub-commands (model, weights, data)."""

from __future__ import annotations

import argparse


def add_model_options(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--model",
        default=None if required else "resnet20",
        required=required,
        help="registry name (resnet20/32/44/56, mobilenetv2_cifar, mobilenetv2, resnet18, "
        "resnet50) or path/to/file.py:factory (default: %(default)s)",
    )
    p.add_argument("--weights", help="checkpoint (state dict or {'state_dict': ...})")
    p.add_argument("--data", help="data folder (default: $OMPQ_DATA_DIR)")
