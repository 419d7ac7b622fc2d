"""Helpers for the CLI catalogue tests: a tiny CIFAR model file and `ompq` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

TINY_MODEL = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu2(x + self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class NoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return torch.flatten(self.pool(x), 1)


def make():
    torch.manual_seed(0)
    return Tiny()


def no_layer():
    return NoLayer()
'''

def make_files(root: Path, data_dir: Path) -> dict[str, float]:
    """tiny.py, bits.json, q.pt, q.onnx (QONNX), q_qdq.onnx (QCDQ) in ``root``, built
    in-process (fast); returns the seconds each step took."""
    import time

    from ompq_plugin.cli import main

    (root / "tiny.py").write_text(TINY_MODEL)
    model, d = f"{root / 'tiny.py'}:make", str(data_dir)
    steps = {
        "search": ["search", "--model", model, "--data", d, "--samples", "16",
                   "-o", str(root / "bits.json")],
        "quantize": ["quantize", "--model", model, "--data", d, "--bits", str(root / "bits.json"),
                     "--calib", "32", "--random-weights", "-o", str(root / "q.pt")],
        "export": ["export", str(root / "q.pt"), "--data", d, "--images", "2",
                   "-o", str(root / "q.onnx")],
        "export_qcdq": ["export", str(root / "q.pt"), "--data", d, "--images", "2",
                        "--format", "qcdq", "-o", str(root / "q_qdq.onnx")],
    }
    seconds = {}
    for name, argv in steps.items():
        t0 = time.perf_counter()
        assert main(argv) == 0, name
        seconds[name] = time.perf_counter() - t0
    return seconds


RUN_OMPQ = "import sys; from ompq_plugin.cli import main; sys.exit(main())"


def ompq_command(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-c", RUN_OMPQ, *map(str, args)]


def ompq_env(data_dir: Path) -> dict[str, str]:
    return {**os.environ, "OMPQ_DATA_DIR": str(data_dir), "COLUMNS": "160"}


def run_ompq(
    data_dir: Path,
    *args: str | os.PathLike[str],
    cwd: Path,
    preexec: Callable[[], None] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ompq_command(*args),
        cwd=cwd,
        env=ompq_env(data_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (names relative to it) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def assert_clean_failure(
    proc: subprocess.CompletedProcess[str], code: int, *needles: str
) -> None:
    """Exit ``code``, one ``ompq: error`` line holding every needle, no traceback."""
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err
    for needle in needles:
        assert needle in err, (needle, err)


def no_temporary_files(folder: Path) -> list[str]:
    """Names left by an atomic write that did not finish (should always be empty)."""
    return [p.name for p in folder.rglob(".*") if p.suffix in (".tmp", ".probe")]
