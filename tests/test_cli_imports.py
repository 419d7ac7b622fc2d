"""`ompq search` and `ompq pareto` run on torch alone: Brevitas' export and ONNX are not imported
(they took 2.3 of `ompq search`'s 3.5 s wall time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BLOCKED = (  # a blocked module's import raises ImportError
    "import sys\n"
    "for name in ('brevitas', 'onnx', 'onnxruntime', 'qonnx'):\n"
    "    sys.modules[name] = None\n"
)


@pytest.mark.parametrize("command", [["search"], ["pareto", "--avg-weight-bits", "3:5",
                                                   "--points", "2"]])
def test_search_and_pareto_need_no_brevitas_or_onnx(data_dir: Path, tmp_path: Path,
                                                     command: list[str]) -> None:
    argv = [*command, "--data", str(data_dir), "--samples", "8", "-o", str(tmp_path / "o.json")]
    code = BLOCKED + f"from ompq_plugin.cli import main\nsys.exit(main({argv!r}))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "o.json").is_file()
