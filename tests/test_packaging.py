"""The wheel (what `pip install .` installs) holds every package and the embedded default, and
its `ompq` runs from a fresh virtual environment."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "ompq_plugin", "exporters", "hw_profiles")
MAX_WHEEL_BYTES = 6 * 1024 * 1024


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel from a copy of the sources (the checkout stays clean)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    wheels = list(dist.glob("ompq_plugin-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_wheel_holds_every_package_and_the_embedded_files(wheel: Path) -> None:
    assert wheel.stat().st_size < MAX_WHEEL_BYTES
    names = set(zipfile.ZipFile(wheel).namelist())
    expected_from_checkout = (
        {
            f"ompq_plugin/{p.relative_to(ROOT / 'ompq_plugin').as_posix()}"
            for p in (ROOT / "ompq_plugin").rglob("*.py")
        }
        | {f"ompq_plugin/exporters/{p.name}" for p in (ROOT / "exporters").glob("*.py")}
        | {f"ompq_plugin/hw_profiles/{p.name}" for p in (ROOT / "hw_profiles").glob("*.toml")}
    )
    assert expected_from_checkout <= names, sorted(expected_from_checkout - names)
    for name in (
        "cifar10_sample.npz",
        "resnet20.th",
        "PROVENANCE.md",
        "LICENSE.akamaster-pytorch_resnet_cifar10",
    ):
        assert f"ompq_plugin/embedded/{name}" in names
    assert "ompq_plugin/cli/__init__.py" in names  # the package the old list left out


def test_wheel_installs_and_runs_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
        timeout=120,
    )
    python = venv / "bin" / "python"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    ompq = venv / "bin" / "ompq"
    helped = subprocess.run(
        [str(ompq), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert helped.returncode == 0, helped.stderr
    assert "demo" in helped.stdout and "quantize" in helped.stdout
    # the installed copy (not the checkout) is imported, and it finds its package data
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import ompq_plugin.cli as c, ompq_plugin.hw_profiles as h; "
            "from ompq_plugin.datasets import embedded_source; "
            "s = embedded_source().split('test'); print(c.__file__); "
            "print(len(s), [p.name for p in h.list_profiles()][:1])",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    module_file, summary = probe.stdout.strip().splitlines()
    assert Path(module_file).resolve().is_relative_to(venv.resolve())
    assert summary.startswith("500 [")
