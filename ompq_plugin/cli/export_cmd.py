"""``ompq export`` (verified QONNX / QCDQ file, optional hls4ml check) and ``ompq inspect``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ompq_plugin.cli.common import add_data_option
from ompq_plugin.errors import OmpqError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="write a verified QONNX or QCDQ ONNX file")
    p.add_argument("qmodel", help="quantized model file (from `ompq quantize` / `ompq train`)")
    p.add_argument("--format", choices=("qonnx", "qcdq"), default="qonnx",
                   help="QONNX (Quant nodes, bit widths kept) or QCDQ (QuantizeLinear/"
                   "DequantizeLinear, runs in onnxruntime)")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--target", choices=("generic", "hls4ml", "finn"), default=None,
                   help="compiler the QONNX graph is shaped for (default: the model's profile)")
    p.add_argument("--check", choices=("hls4ml",), action="append", default=[],
                   help="also convert with hls4ml and compare its C++ emulation bit for bit")
    p.add_argument("--images", type=int, default=8, help="real test images used to verify")
    add_data_option(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_export)

    q = sub.add_parser("inspect", help="per-layer bits, params, MACs, size, BOPs of an ONNX file")
    q.add_argument("model", help="ONNX file (ours or any QONNX / QCDQ graph)")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=run_inspect)


def _images(args: argparse.Namespace, meta: dict[str, Any], bits: Any) -> Any:
    """The first ``--images`` test images, sized and normalised as the model was."""
    from ompq_plugin.cli.common import note, open_source, prepared, recorded_input

    if args.images < 1:
        raise OmpqError("--images must be at least 1")
    record = recorded_input(meta, bits)
    note(record.describe() + f" (recorded in {args.qmodel})", args.json)
    test = open_source(args).split("test", "exact", size=record.size[1:])
    return prepared(test.images[: args.images], record)


def _check_export_args(args: argparse.Namespace) -> Path:
    """Every check that needs no model: contradictory flags, inputs, the output path."""
    from ompq_plugin.cli.inputs import require_quantized_model_file
    from ompq_plugin.fileio import check_writable

    if "hls4ml" in args.check and args.format != "qonnx":
        raise OmpqError(f"--check hls4ml needs --format qonnx (hls4ml reads QONNX, not "
                        f"{args.format}); drop --check hls4ml or pass --format qonnx")
    if "hls4ml" in args.check and args.target not in (None, "hls4ml"):
        raise OmpqError(f"--check hls4ml needs --target hls4ml (or no --target), got "
                        f"--target {args.target}; drop one of them")
    if args.images < 1:
        raise OmpqError(f"--images must be at least 1, got {args.images}; e.g. --images 8")
    require_quantized_model_file(args.qmodel, "export")
    output = check_writable(args.output)
    if output.exists() and output.resolve() == Path(args.qmodel).resolve():
        raise OmpqError(f"-o {output} is the input model file; pass another output path")
    return output


def run_export(args: argparse.Namespace) -> int:
    output = _check_export_args(args)  # before the heavy imports: a refusal takes a moment

    from ompq_plugin.cli.common import progress_step
    from ompq_plugin.exporters import export_qcdq, export_qonnx
    from ompq_plugin.exporters.qonnx import hls4ml_config_path
    from ompq_plugin.fileio import atomic_path
    from ompq_plugin.qmodel_io import load_quantized

    loaded = load_quantized(args.qmodel)
    qmodel, bits = loaded.model, loaded.bits
    images = _images(args, loaded.meta, bits)
    if "hls4ml" in args.check:
        args.target = "hls4ml"
    # The file appears only when every requested check has passed.
    with atomic_path(output) as tmp:
        try:
            with progress_step(
                f"export {args.format.upper()} and verify it on {len(images)} images", args.json
            ):
                if args.format == "qonnx":
                    report = export_qonnx(qmodel, tmp, images, bits, target=args.target)
                else:
                    report = export_qcdq(qmodel, tmp, images, bits)
            if "hls4ml" in args.check:
                from ompq_plugin.exporters.hls4ml_check import check_hls4ml

                with progress_step("hls4ml conversion and C++ emulation", args.json):
                    report.hls4ml = check_hls4ml(tmp, images)
            if report.hls4ml is not None and not report.hls4ml.bit_exact:
                print(report.hls4ml.summary())
                raise OmpqError(
                    f"hls4ml emulation differs from qonnx "
                    f"({report.hls4ml.first_diverging or 'final output'}), so {output} was not "
                    "written; export without --check hls4ml to get the qonnx-verified file anyway"
                )
        except BaseException:
            hls4ml_config_path(tmp).unlink(missing_ok=True)  # written beside the temporary file
            raise
    report.path = output
    if report.hls4ml_config is not None:  # beside the output, under the output's name
        report.hls4ml_config = hls4ml_config_path(output)
        os.replace(hls4ml_config_path(tmp), report.hls4ml_config)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
        written = [output] + ([report.hls4ml_config] if report.hls4ml_config else [])
        print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)  # stdout: pure JSON
    else:
        print(report.summary())
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from ompq_plugin.exporters.inspect import inspect_onnx

    table = inspect_onnx(args.model)
    print(json.dumps(table.to_json(), indent=2) if args.json else table.format_table())
    return 0
