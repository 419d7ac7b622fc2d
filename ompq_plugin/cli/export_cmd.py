"""``ompq export`` (verified QONNX / QCDQ file, optional hls4ml check) and ``ompq inspect``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ompq_plugin.errors import OmpqError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="write a verified QONNX or QCDQ ONNX file")
    p.add_argument("qmodel", help="quantized model file (from `ompq quantize` / `ompq train`)")
    p.add_argument("--format", choices=("qonnx", "qcdq"), default="qonnx")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--target", choices=("generic", "hls4ml", "finn"), default=None,
                   help="compiler the QONNX graph is shaped for (default: the model's profile)")
    p.add_argument("--check", choices=("hls4ml",), action="append", default=[],
                   help="also convert with hls4ml and compare its C++ emulation bit for bit")
    p.add_argument("--images", type=int, default=8, help="real test images used to verify")
    p.add_argument("--data", default=None, help="data folder (default $OMPQ_DATA_DIR)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_export)

    q = sub.add_parser("inspect", help="per-layer bits, params, MACs, size, BOPs of an ONNX file")
    q.add_argument("model", help="ONNX file (ours or any QONNX / QCDQ graph)")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=run_inspect)


def _images(norm: tuple[list[float], list[float]] | None, data_dir: str | None, n: int) -> Any:
    """First ``n`` images of the exact CIFAR test split, normalised as the model was."""
    from ompq_plugin import data
    from ompq_plugin.models import CIFAR_IMAGENET_MEAN, CIFAR_IMAGENET_STD

    if n < 1:
        raise OmpqError("--images must be at least 1")
    folder = data.cifar_folder(data.resolve_data_dir(data_dir), "exact")
    split = data.load_cifar10(folder, "test")
    mean, std = norm if norm else (CIFAR_IMAGENET_MEAN, CIFAR_IMAGENET_STD)
    return data.normalise(split.images[:n], tuple(mean), tuple(std))


def run_export(args: argparse.Namespace) -> int:
    from ompq_plugin.exporters import export_qcdq, export_qonnx
    from ompq_plugin.qmodel_io import load_quantized

    loaded = load_quantized(args.qmodel)
    qmodel, bits = loaded.model, loaded.bits
    images = _images(loaded.meta.get("norm"), args.data, args.images)
    if "hls4ml" in args.check:
        if args.format != "qonnx":
            raise OmpqError("--check hls4ml needs --format qonnx")
        if args.target not in (None, "hls4ml"):
            raise OmpqError("--check hls4ml needs --target hls4ml (or no --target)")
        args.target = "hls4ml"
    if args.format == "qonnx":
        report = export_qonnx(qmodel, Path(args.output), images, bits, target=args.target)
    else:
        report = export_qcdq(qmodel, Path(args.output), images, bits)
    if "hls4ml" in args.check:
        from ompq_plugin.exporters.hls4ml_check import check_hls4ml

        report.hls4ml = check_hls4ml(report.path, images)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print(report.summary())
    if report.hls4ml is not None and not report.hls4ml.bit_exact:
        print(f"ompq: error: hls4ml emulation differs from qonnx "
              f"({report.hls4ml.first_diverging or 'final output'}); the ONNX file is valid "
              "but not bit-exact in hls4ml", file=sys.stderr)
        return 1
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from ompq_plugin.exporters.inspect import inspect_onnx

    table = inspect_onnx(args.model)
    print(json.dumps(table.to_json(), indent=2) if args.json else table.format_table())
    return 0
