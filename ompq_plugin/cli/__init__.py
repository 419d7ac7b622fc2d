"""The ``ompq`` command: a thin layer over the public API.

Each sub-command lives in its own module with ``add_parser(subparsers)``; the parser's
``func`` runs it. Exit codes: 0 success, 1 user error (one line on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from ompq_plugin.errors import OmpqError


def build_parser() -> argparse.ArgumentParser:
    from ompq_plugin.cli import demo_cmd, export_cmd, profiles_cmd, quant_cmd, search_cmd
    from ompq_plugin.cli.common import HelpFormatter

    parser = argparse.ArgumentParser(prog="ompq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (demo_cmd, profiles_cmd, search_cmd, quant_cmd, export_cmd):
        module.add_parser(sub)
    for command in sub.choices.values():  # every --help shows each option's default
        command.formatter_class = HelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Brevitas announces optional kernels and its own deprecations on import; not the user's issue.
    warnings.filterwarnings("ignore", message=".*fast_hadamard_transform.*")
    warnings.filterwarnings("ignore", message=".*brevitas.fx is deprecated.*")
    warnings.filterwarnings("ignore", message=".*GemmToMatMul transformation only offers.*")
    try:  # qonnx runs single nodes as opset-1 models; onnxruntime warns about each one
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:
        pass
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OmpqError as exc:
        print(f"ompq: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ompq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
