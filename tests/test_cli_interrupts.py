"""Ctrl-C (SIGINT) or SIGTERM at a random moment of a real `ompq` process: every earlier file
stays valid and byte-identical, no temporary file is left, the message says how to continue,
and following it finishes the job."""

from __future__ import annotations

import random
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import (
    assert_clean_failure,
    make_files,
    no_temporary_files,
    ompq_command,
    ompq_env,
    run_ompq,
    snapshot,
)

STARTUP_S = 2.0  # Python start and the light CLI imports, before main() holds the signals


@pytest.fixture(scope="module")
def made(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("made")
    return root, make_files(root, data_dir)


@pytest.fixture()
def work(made: tuple[Path, dict], tmp_path: Path) -> Path:
    for p in made[0].iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    return tmp_path


def _start(data_dir: Path, work: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(ompq_command(*args), cwd=work, env=ompq_env(data_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _continue_command(stderr: str) -> list[str]:
    """The command the interrupt message says to run next, as subprocess arguments."""
    match = re.search(r"(?:continue with|run again|start again with): (ompq .*)$", stderr, re.M)
    assert match, stderr
    words = shlex.split(match.group(1))
    assert words[0] == "ompq"
    return words[1:]


def _history(path: Path) -> list[dict]:
    return torch.load(path, weights_only=True)["meta"]["qat"]["history"]


def test_train_interrupted_mid_epoch_then_resumed(data_dir: Path, work: Path) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    args = ["train", "q.pt", "--epochs", "4", "--train-subset", "64", "--batch-size", "8",
            "--no-progress", "-o", "t.pt"]
    proc = _start(data_dir, work, *args)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # after the data / input notes: "epoch 1/4: ... (S s); ..."
    while first and not first.startswith("epoch "):
        first = proc.stdout.readline()
    assert first.startswith("epoch 1/4"), (first, proc.stderr.read() if proc.stderr else "")
    epoch_s = float(re.search(r"\(([\d.]+) s\)", first).group(1))
    time.sleep(rng.uniform(0.05, 0.6) * epoch_s)  # somewhere inside epoch 2 (or its checkpoint)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    interrupted = subprocess.CompletedProcess(args, proc.returncode, first + out, err)
    assert_clean_failure(interrupted, 130, "interrupted (SIGINT)", "t.pt was not written",
                         "--resume")
    saved = int(re.search(r"t\.pt\.ckpt holds epoch (\d) of 4", err).group(1))
    assert saved >= 1, (seed, err)
    assert no_temporary_files(work) == [] and not (work / "t.pt").exists()
    from ompq_plugin.qat import read_resume_point

    assert read_resume_point(work / "t.pt.ckpt").epoch == saved  # the checkpoint is whole

    resumed = run_ompq(data_dir, *_continue_command(err), cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming t.pt.ckpt: epoch {saved} of 4 done; continuing at epoch {saved + 1}" in (
        resumed.stdout)
    assert f"epoch {saved + 1}/4" in resumed.stdout and "wrote t.pt" in resumed.stdout
    history = _history(work / "t.pt")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    lrs = [h["lr"] for h in history]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False)), lrs  # the rate never rises

    # A finished checkpoint: another --epochs has nothing to run and must not touch t.pt.
    before = snapshot(work)
    again = run_ompq(data_dir, *args, "--resume", "--epochs", "1", cwd=work)
    assert_clean_failure(again, 1, "finished all 4 epochs", "--epochs 1 has nothing to run",
                         "ompq train t.pt --epochs N -o NEW")
    assert snapshot(work) == before


@pytest.mark.parametrize(
    ("command", "sig"),
    [("export", signal.SIGINT), ("quantize", signal.SIGTERM), ("search", signal.SIGINT)],
    ids=["export-SIGINT", "quantize-SIGTERM", "search-SIGINT"],
)
def test_interrupt_at_a_random_point_leaves_earlier_files_whole(
    data_dir: Path, work: Path, made: tuple[Path, dict], command: str, sig: signal.Signals
) -> None:
    out = {"export": "x.onnx", "quantize": "q2.pt", "search": "b.json"}[command]
    args = {
        "export": ["export", "q.pt", "--images", "2", "-o", out],
        "quantize": ["quantize", "--bits", "bits.json", "--calib", "32", "--random-weights",
                     "-o", out],
        "search": ["search", "--model", str(work / "tiny.py") + ":make", "--samples", "16",
                   "-o", out, "--orm-plot", "orm.png"],
    }[command]
    (work / out).write_bytes(b"earlier output")
    before = snapshot(work)
    in_process_s = made[1][command]
    delay = STARTUP_S + random.uniform(0.0, 1.5) * in_process_s  # imports take about as long
    proc = _start(data_dir, work, *args)
    time.sleep(delay)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=600)
    if proc.returncode == 0:  # the command won the race: its outputs are whole
        assert no_temporary_files(work) == []
        assert (work / out).read_bytes() != b"earlier output"
        return
    result = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    assert_clean_failure(result, 128 + sig, f"interrupted ({sig.name})",
                         "no partial or temporary file", "run again: ompq")
    assert snapshot(work) == before  # the earlier output byte-identical, no temporary file
    if command == "export":
        rerun = run_ompq(data_dir, *_continue_command(stderr), cwd=work)
        assert rerun.returncode == 0, rerun.stderr
        assert f"wrote {out}" in rerun.stdout
        import onnx

        onnx.checker.check_model(onnx.load(str(work / out)))
