"""What a consumer-flow bench (hls4ml_flow.py, finn_flow.py) records about its own run, so that
the times of two runs can be compared: the commit, the versions of the libraries the flow runs
through, the load average before and after, and CPU seconds beside wall seconds (children
included: hls4ml's g++ runs as a child process).

Contract: :meth:`RunRecord.to_json` never raises for a missing library (its version reads
``"not installed"``) and can be called at any time; ``load_average_after`` and the seconds are
those at the call.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from architectures import code_version

LIBRARIES = ("onnx", "onnxruntime", "qonnx", "torch", "brevitas", "numpy")


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed distribution version of each name (``"not installed"`` when absent)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class RunRecord:
    """Started at construction; ``extra`` names libraries beyond :data:`LIBRARIES`."""

    def __init__(self, extra: tuple[str, ...] = ()) -> None:
        self.commit = code_version()
        self.versions = library_versions((*extra, *LIBRARIES))
        self.load_before = [round(x, 2) for x in os.getloadavg()]
        self.wall0, self.cpu0 = time.perf_counter(), _cpu_seconds()

    def to_json(self) -> dict[str, Any]:
        return {
            "commit": self.commit,
            "versions": self.versions,
            "load_average_before": self.load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "wall_seconds": round(time.perf_counter() - self.wall0, 1),
            "cpu_seconds": round(_cpu_seconds() - self.cpu0, 1),
        }


def measure_models(
    path: Path, machine: dict[str, Any], models: list[tuple[Any, ...]],
    measure: Callable[..., dict[str, Any]],
) -> None:
    """``measure(*spec)`` for each spec of ``models``, one thread; ``path`` (re)written after
    each row (``measured``, ``code``, ``machine``, ``models``: the rows so far)."""
    import torch

    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "code": code_version(),
        "machine": {"cpu_threads": 1, "torch": torch.__version__} | machine,
        "models": [],
    }
    for spec in models:
        results["models"].append(measure(*spec))
        print(json.dumps(results["models"][-1]), flush=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
