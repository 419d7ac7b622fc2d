"""Options shared by several sub-commands (model, weights, data, input size and normalisation),
and the helpers that turn them into a model, images and notes for the user."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ompq_plugin.errors import OmpqError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ompq_plugin.bitconfig import BitConfig, InputRecord
    from ompq_plugin.data import CifarSplit
    from ompq_plugin.datasets import DataSource
    from ompq_plugin.models import ModelSpec

DATA_HELP = (
    "images: a data folder (cifar10-exact/, cifar10-jpeg/, weights/), a CIFAR-10 batch folder, "
    "a folder of images in class sub-folders (optionally train/ and test/), an .npy/.npz file, "
    "or file.py:function returning tensors or a torch Dataset (default: $OMPQ_DATA_DIR, else "
    "the embedded 500+500 CIFAR-10 images)"
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already names its default,
    the option is a flag or required; an option without a default reads "(default: none)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" in text.lower() or action.required or action.nargs == 0
                or action.default is argparse.SUPPRESS or not action.option_strings):
            return text
        if action.default is None or action.default == []:
            return f"{text} (default: none)".strip()
        return f"{text} (default: %(default)s)".strip()


# ---------------------------------------------------------------------------- option parsing


def parse_input_size(text: str) -> tuple[int, ...]:
    """``64`` (square), ``64x48`` (H x W) or ``3x64x48`` (C x H x W); ``,`` also separates."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: use 64, 64x64 or 3x64x64") from None
    if len(values) not in (1, 2, 3) or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use 64, 64x64 or 3x64x64")
    return values * 2 if len(values) == 1 else values


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of numbers, e.g. 0.485,0.456,0.406") from None


def add_data_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help=DATA_HELP)


def add_input_options(
    p: argparse.ArgumentParser, what: str = "the model", bitconfig: bool = True
) -> None:
    """``--input-size`` / ``--mean`` / ``--std``; ``bitconfig``: the command reads a BitConfig,
    whose recorded input comes first among the defaults."""
    first = "the BitConfig's, else " if bitconfig else ""
    p.add_argument("--input-size", type=parse_input_size, metavar="[Cx]HxW",
                   help=f"input size of {what}; images are resized (bilinear) to it (default: "
                   f"{first}the registry model's, else the images' own size)")
    p.add_argument("--mean", type=parse_floats, metavar="M1,M2,...",
                   help="per-channel mean, applied to pixels scaled to 0..1 (default: "
                   f"{first}the registry model's, else none)")
    p.add_argument("--std", type=parse_floats, metavar="S1,S2,...",
                   help="per-channel std (default: as --mean; none means 1)")


def add_model_options(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--model",
        default=None if required else "resnet20",
        required=required,
        help="registry name (resnet20/32/44/56, mobilenetv2_cifar, mobilenetv2, resnet18, "
        "resnet50) or path/to/file.py:factory (default: %(default)s)",
    )
    p.add_argument("--weights", help="float checkpoint: a state dict or {'state_dict': ...} "
                   "(default: the data folder's weights/ for a registry model, the embedded "
                   "ResNet-20 without a data folder, else random weights)")
    add_data_option(p)
    add_input_options(p, bitconfig=False)  # search and pareto read no BitConfig


# ---------------------------------------------------------------------------- messages


def note(text: str, json_output: bool = False) -> None:
    """One line for the user on stdout, or on stderr when stdout carries JSON."""
    if json_output:
        print(f"ompq: {text}", file=sys.stderr, flush=True)
    else:
        print(text, flush=True)


def warn(text: str) -> None:
    print(f"ompq: warning: {text}", file=sys.stderr, flush=True)


@contextmanager
def progress_step(text: str, json_output: bool = False) -> Iterator[None]:
    """A live spinner with the elapsed time on stderr while a step runs (drawn only on a
    terminal), then one line with the time it took (see :func:`note`)."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    start = time.perf_counter()
    console = Console(stderr=True)
    if console.is_terminal:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            bar.add_task(text, total=None)
            yield
    else:
        yield
    note(f"{text}: {time.perf_counter() - start:.1f} s", json_output)


# ---------------------------------------------------------------------------- building


def open_source(args: argparse.Namespace) -> DataSource:
    from ompq_plugin.datasets import open_data

    source = open_data(getattr(args, "data", None))
    note(f"data: {source.description}", getattr(args, "json", False))
    return source


def _hw(size: tuple[int, ...] | None) -> tuple[int, int] | None:
    return None if size is None else (int(size[-2]), int(size[-1]))


def resolve_input(
    model_name: str,
    data_shape: tuple[int, int, int],
    flag_size: tuple[int, ...] | None,
    flag_mean: tuple[float, ...] | None,
    flag_std: tuple[float, ...] | None,
    recorded: InputRecord | None = None,
) -> tuple[tuple[int, int, int] | None, tuple[float, ...] | None, tuple[float, ...] | None]:
    """The (input_size, mean, std) overrides for :func:`build_model` (None: the spec's own).

    Precedence: the flags, then ``recorded`` (a BitConfig's), then the registry model's spec;
    a user's model without any takes the images' size and no normalisation.
    """
    from ompq_plugin.models import MODELS

    size: tuple[int, int, int] | None = None
    if flag_size is not None:
        c = flag_size[0] if len(flag_size) == 3 else (
            recorded.size[0] if recorded is not None else data_shape[0])
        size = (int(c), int(flag_size[-2]), int(flag_size[-1]))
    elif recorded is not None:
        size = recorded.size
    elif model_name not in MODELS:
        size = data_shape
    mean = flag_mean if flag_mean is not None else (recorded.mean if recorded else None)
    std = flag_std if flag_std is not None else (recorded.std if recorded else None)
    channels = size[0] if size is not None else None
    if channels is not None and model_name not in MODELS:
        mean = mean if mean is not None else (0.0,) * channels
        std = std if std is not None else (1.0,) * channels
    if (mean is None) != (std is None) and model_name in MODELS:
        from ompq_plugin.models import get_spec

        spec = get_spec(model_name)
        mean = mean if mean is not None else spec.mean
        std = std if std is not None else spec.std
    return size, mean, std


def build_for_cli(
    args: argparse.Namespace,
    model_name: str,
    source: DataSource,
    split: str = "train",
    recorded: InputRecord | None = None,
    weights: str | os.PathLike[str] | None = None,
) -> tuple[nn.Module, ModelSpec, CifarSplit]:
    """Model and images as the flags, the recorded input and the data say; prints what is used.

    Returns the built model, its spec (input size, mean/std, weights) and the ``split`` images
    (read at the spec's size when decoding image files).
    """
    from ompq_plugin.bitconfig import InputRecord
    from ompq_plugin.data import check_channels
    from ompq_plugin.models import build_model

    flag_size = getattr(args, "input_size", None)
    images = source.split(split, getattr(args, "variant", "exact"), size=_hw(flag_size or (
        recorded.size if recorded else None)))
    size, mean, std = resolve_input(model_name, images.image_shape, flag_size,
                                    getattr(args, "mean", None), getattr(args, "std", None),
                                    recorded)
    model, spec = build_model(model_name, weights, source, input_size=size, mean=mean, std=std)
    check_channels(images, spec.input_size)
    note(InputRecord(spec.input_size, spec.mean, spec.std).describe()
         + ("" if spec.pretrained else ", random weights"), getattr(args, "json", False))
    return model, spec, images


def prepared(images: torch.Tensor, record: InputRecord) -> torch.Tensor:
    """uint8 or float images as the model takes them (resized and normalised)."""
    from ompq_plugin.data import prepare

    return prepare(images, record.mean, record.std, record.size[1:]).contiguous()


def input_of(spec: ModelSpec) -> InputRecord:
    from ompq_plugin.bitconfig import InputRecord

    return InputRecord(tuple(spec.input_size), tuple(spec.mean), tuple(spec.std))


def recorded_input(meta: dict[str, Any], bits: BitConfig | None = None) -> InputRecord:
    """The input a quantized file was made for: its metadata, else its BitConfig's."""
    from ompq_plugin.bitconfig import InputRecord

    if meta.get("input"):
        return InputRecord.from_json(meta["input"])
    if bits is not None and bits.input is not None:
        return bits.input
    norm = meta.get("norm")
    if norm is None:
        raise OmpqError("the quantized file records no normalisation; re-create it with "
                        "`ompq quantize`")
    c = len(norm[0])
    return InputRecord((c, 32, 32), tuple(norm[0]), tuple(norm[1]))  # files from before 0.2


def add_weights_guard(p: argparse.ArgumentParser) -> None:
    p.add_argument("--random-weights", action="store_true",
                   help="allow a model with no trained weights (quantizing random weights gives "
                   "a chance-level model; meant for structure and speed tests)")


def recorded_weights(flag: str | None, bits: BitConfig) -> str | None:
    """The checkpoint to quantize: ``--weights``, else the one the BitConfig records.

    Warns when the file differs (sha256) from the one the search ran on; a recorded file that
    is gone is an error naming the fix.
    """
    from ompq_plugin.models import file_sha256

    record = bits.weights
    if flag is not None:
        path = flag
    elif record is not None:
        path = record.path
        if not os.path.isfile(path):
            raise OmpqError(f"the weights the search used, {path}, are gone: pass --weights PATH "
                            f"(the same checkpoint), or re-run `ompq search`")
    else:
        return None
    if record is not None and os.path.isfile(path):
        now = file_sha256(path)
        if now != record.sha256:
            same = os.path.abspath(path) == record.path
            how = "changed since the search" if same else "is not the file the search used"
            warn(f"{path} {how} (sha256 {record.sha256[:12]}... then, {now[:12]}... now): the "
                 f"bits were chosen for other weights; re-run `ompq search` for these")
    return path


def refuse_random(spec: ModelSpec, allowed: bool) -> None:
    if not spec.pretrained and not allowed:
        raise OmpqError(f"{spec.name} has no trained weights here (the BitConfig records none and "
                        f"no --weights was given), so it would be quantized with random weights: "
                        f"pass --weights CHECKPOINT, or --random-weights to do it on purpose")
