"""The ``ompq`` command: a thin layer over the public API.

Each sub-command lives in its own module with ``add_parser(subparsers)``; the parser's
``func`` runs it. Exit codes: 0 success, 1 user error (one line on stderr), 2 bad usage,
130 / 143 interrupted by SIGINT / SIGTERM (files already reported as written stay complete, no
partial or temporary file is left, and the message says how to continue).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import re
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from ompq_plugin.errors import Interrupted, OmpqError


class _Parser(argparse.ArgumentParser):
    """argparse with difflib suggestions (``suggest_on_error`` only exists from Python 3.14)."""

    def error(self, message: str) -> NoReturn:
        if "invalid choice:" in message:
            message += _suggest_choice(message)
        super().error(message)


def _suggest_choice(message: str) -> str:
    # argparse's text: "argument X: invalid choice: 'val' (choose from 'a', 'b')"
    try:
        bad = message.split("invalid choice: ", 1)[1].split(" (choose from ", 1)
        value = bad[0].strip("'\"")
        choices = [c.strip(" '\")") for c in bad[1].split(",")]
    except IndexError:
        return ""
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings]


def close_options(flag: str, options: Sequence[str], n: int = 3) -> list[str]:
    """Options ``flag`` may have meant: those holding all its words (``--avg-bits`` ->
    ``--avg-weight-bits``) first, then difflib's closest spellings."""
    words = set(flag.lstrip("-").split("-"))
    holding = [o for o in options if o.startswith("--") and words <= set(o[2:].split("-"))]
    spelled = difflib.get_close_matches(flag, options, n=n, cutoff=0.6)
    return [*holding, *(o for o in spelled if o not in holding)][:n]


def unrecognized_message(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """'unrecognized arguments: ...' plus the closest options for each mistyped flag."""
    hints = []
    options = _option_strings(parser)
    for extra in extras:
        if not extra.startswith("-"):
            continue
        flag = extra.split("=", 1)[0]
        close = close_options(flag, options)
        if close:
            others = f" (or {', '.join(close[1:])})" if close[1:] else ""
            hints.append(f"did you mean {close[0]}{others} instead of {flag}?")
    tail = " ".join(hints) if hints else f"see `{parser.prog} --help` for the options"
    return f"unrecognized arguments: {' '.join(extras)}; {tail}"


def build_parser() -> argparse.ArgumentParser:
    from ompq_plugin.cli import demo_cmd, export_cmd, profiles_cmd, quant_cmd, search_cmd
    from ompq_plugin.cli.common import HelpFormatter

    parser = _Parser(
        prog="ompq",
        description="Per-layer bit widths for a CNN on a hardware target (OMPQ search), "
        "Brevitas quantization with PTQ or QAT, and verified QONNX / Q-DQ ONNX exports. "
        "Start with `ompq demo`; `ompq <command> -h` explains each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (demo_cmd, profiles_cmd, search_cmd, quant_cmd, export_cmd):
        module.add_parser(sub)
    importlib.import_module("ompq_plugin.cli.pareto_cmd").add_parser(sub)
    for command in sub.choices.values():  # every --help shows each option's default
        command.formatter_class = HelpFormatter
    return parser


def _sub_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser


_NEGATIVE_RANGE = re.compile(r"^-[\d.]+:")  # e.g. -1:8, which argparse takes for a flag


def _attach_negative_ranges(argv: Sequence[str]) -> list[str]:
    """``--flag -1:8`` -> ``--flag=-1:8``, so the flag's own check names the bad value instead
    of argparse reporting a missing argument."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_RANGE.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag is reported with the sub-command's own usage."""
    args, extras = parser.parse_known_args(_attach_negative_ranges(argv))
    if extras:
        sub = _sub_parser(parser, args.command)
        sub.error(unrecognized_message(sub, extras))
    args.command_line = ["ompq", *argv]
    return args


@contextlib.contextmanager
def _signals_raise_interrupted() -> Iterator[None]:
    """SIGINT / SIGTERM raise :class:`Interrupted` (so every ``finally`` and temporary-file
    clean-up runs); a file-size limit makes writes fail with EFBIG instead of killing us."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    wanted = {signal.SIGINT: interrupt, signal.SIGTERM: interrupt, signal.SIGXFSZ: signal.SIG_IGN}
    old = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _quiet_libraries() -> None:
    # Brevitas announces optional kernels and its own deprecations on import; not the user's issue.
    warnings.filterwarnings("ignore", message=".*fast_hadamard_transform.*")
    warnings.filterwarnings("ignore", message=".*brevitas.fx is deprecated.*")
    warnings.filterwarnings("ignore", message=".*GemmToMatMul transformation only offers.*")


def interrupt_message(exc: KeyboardInterrupt, command_line: list[str]) -> tuple[str, int]:
    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
    hint = exc.hint if isinstance(exc, Interrupted) else ""
    if not hint:
        hint = (
            "every output is either complete or untouched (no partial or temporary file); "
            f"to finish, run again: {shlex.join(command_line)}"
        )
    name = signal.Signals(signum).name
    return f"ompq: interrupted ({name}); {hint}", 128 + int(signum)


_LIGHT_COMMANDS = ("profiles", "inspect")  # these never import torch / Brevitas
# these need torch only: importing Brevitas' export and ONNX took 2.3 of `ompq search`'s 3.5 s
_TORCH_COMMANDS = ("search", "pareto")


def _import_model_stack(command: str) -> None:
    """Import what ``command`` runs on (torch; Brevitas and ONNX too, but for search and pareto)
    with Ctrl-C held: an interrupt in the middle of an import leaves half-initialised modules
    behind, and the next import of them fails with an AttributeError instead of a clean
    "interrupted". The signal is delivered right after."""
    from ompq_plugin.fileio import signals_held

    with signals_held():
        import torch  # noqa: F401

        if command in _TORCH_COMMANDS:
            return
        import brevitas.export  # noqa: F401  (pulls torch._dynamo)
        import brevitas.nn  # noqa: F401
        import onnx  # noqa: F401

        try:  # qonnx runs single nodes as opset-1 models; onnxruntime warns about each one
            import onnxruntime

            onnxruntime.set_default_logger_severity(3)
        except ImportError:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with _signals_raise_interrupted():
        try:
            _quiet_libraries()
            args = parse(build_parser(), argv)
            if args.command not in _LIGHT_COMMANDS:
                _import_model_stack(args.command)
            return int(args.func(args) or 0)
        except OmpqError as exc:
            print(f"ompq: error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # one not foreseen closer to the cause
            where = f" {exc.filename}" if exc.filename else ""
            print(
                f"ompq: error: cannot access{where} ({exc.strerror or exc}); check the path, "
                "its permissions and the free disk space",
                file=sys.stderr,
            )
            return 1
        except KeyboardInterrupt as exc:
            message, code = interrupt_message(exc, ["ompq", *argv])
            print(message, file=sys.stderr)
            return code


if __name__ == "__main__":
    sys.exit(main())
