"""What a tired user meets: each bad input or accident as a real `ompq` subprocess.

Every case checks the exit code, that the message names the bad value and the fix, that there is
no traceback, and that the folder holds exactly what it held before (earlier outputs
byte-identical, no partial or temporary file). A tiny model file keeps the runs short.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import (
    assert_clean_failure,
    make_files,
    no_temporary_files,
    run_ompq,
    snapshot,
)


@pytest.fixture(scope="module")
def made(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("made")
    make_files(root, data_dir)
    return root


@pytest.fixture()
def work(made: Path, tmp_path: Path) -> Path:
    """A fresh folder with copies of the made files (a failing run must leave it as it was)."""
    for p in made.iterdir():
        shutil.copy2(p, tmp_path / p.name)
    return tmp_path


def _unchanged(work: Path, before: dict[str, bytes]) -> None:
    assert no_temporary_files(work) == []
    assert snapshot(work) == before


def test_contradictory_export_flags_refused_before_any_work(data_dir: Path, work: Path) -> None:
    (work / "x.onnx").write_bytes(b"earlier file")
    before = snapshot(work)
    proc = run_ompq(data_dir, "export", "q.pt", "--format", "qcdq", "--check", "hls4ml",
                    "-o", "x.onnx", cwd=work)
    assert_clean_failure(proc, 1, "--check hls4ml needs --format qonnx", "pass --format qonnx")
    _unchanged(work, before)


def test_mistyped_flag_shows_the_subcommand_usage_and_the_close_match(
    data_dir: Path, work: Path
) -> None:
    before = snapshot(work)
    proc = run_ompq(data_dir, "search", "--avg-bits", "4", "-o", "b.json", cwd=work)
    assert_clean_failure(proc, 2, "usage: ompq search", "--avg-bits",
                         "did you mean --avg-weight-bits")
    proc = run_ompq(data_dir, "export", "q.pt", "--format", "qonx", "-o", "y.onnx", cwd=work)
    assert_clean_failure(proc, 2, "usage: ompq export", "did you mean 'qonnx'")
    _unchanged(work, before)


def test_eval_evaluates_exported_onnx_files(data_dir: Path, work: Path) -> None:
    runs = {name: run_ompq(data_dir, "eval", name, cwd=work)
            for name in ("q.pt", "q.onnx", "q_qdq.onnx")}
    for name, proc in runs.items():
        assert proc.returncode == 0 and "on 1017 test images" in proc.stdout, (name, proc.stderr)
    assert "(qonnx): top-1" in runs["q.onnx"].stdout
    assert "(onnxruntime): top-1" in runs["q_qdq.onnx"].stdout
    top1 = {n: float(p.stdout.split("top-1 ")[1].split("%")[0]) for n, p in runs.items()}
    assert top1["q.onnx"] == top1["q.pt"]  # QONNX is verified equal to torch
    assert abs(top1["q_qdq.onnx"] - top1["q.pt"]) <= 1.0  # QCDQ rounds slightly differently


def test_export_of_an_onnx_file_without_quantized_layer(data_dir: Path, work: Path) -> None:
    float_onnx = data_dir.parent / "interop" / "em_conv2d_small_mp_keras.onnx"
    assert float_onnx.is_file(), "the shared interop folder sits beside the data folder"
    before = snapshot(work)
    proc = run_ompq(data_dir, "export", float_onnx, "--check", "hls4ml", "-o", "y.onnx", cwd=work)
    assert_clean_failure(proc, 1, str(float_onnx), "no quantized layer", "ompq quantize")
    proc = run_ompq(data_dir, "export", "q.onnx", "-o", "y.onnx", cwd=work)
    assert_clean_failure(proc, 1, "q.onnx is already an exported ONNX file", "ompq eval q.onnx")
    _unchanged(work, before)


def test_nan_and_inf_weights(data_dir: Path, work: Path) -> None:
    sd = torch.load(work / "q.pt", weights_only=True)
    state = sd["state_dict"]
    key = next(k for k in state if k.endswith("conv2.weight"))
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("inf")
    torch.save(sd, work / "q_inf.pt")
    from ompq_plugin.models import build_model

    net, _ = build_model(f"{work / 'tiny.py'}:make")
    float_sd = net.state_dict()
    float_sd["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(float_sd, work / "nan.pt")
    before = snapshot(work)
    proc = run_ompq(data_dir, "search", "--model", f"{work / 'tiny.py'}:make",
                    "--weights", "nan.pt", "-o", "b.json", cwd=work)
    assert_clean_failure(proc, 1, "nan.pt", "conv1.weight", "NaN or Inf")
    proc = run_ompq(data_dir, "export", "q_inf.pt", "-o", "y.onnx", cwd=work)
    assert_clean_failure(proc, 1, "q_inf.pt", key, "NaN or Inf")
    _unchanged(work, before)


def test_model_with_no_quantizable_layer(data_dir: Path, work: Path) -> None:
    before = snapshot(work)
    proc = run_ompq(data_dir, "search", "--model", f"{work / 'tiny.py'}:no_layer",
                    "-o", "b.json", "--orm-plot", "orm.png", cwd=work)
    assert_clean_failure(proc, 1, "NoLayer has no Conv1d/Conv2d/Linear layer", "nothing to")
    _unchanged(work, before)


def test_files_from_a_newer_schema_version(data_dir: Path, work: Path) -> None:
    payload = torch.load(work / "q.pt", weights_only=True)
    payload["version"] = 99
    torch.save(payload, work / "q_new.pt")
    bits = json.loads((work / "bits.json").read_text())
    bits["schema_version"] = 99
    (work / "new.json").write_text(json.dumps(bits))
    before = snapshot(work)
    proc = run_ompq(data_dir, "eval", "q_new.pt", cwd=work)
    assert_clean_failure(proc, 1, "q_new.pt", "version 99", "newer", "upgrade")
    proc = run_ompq(data_dir, "quantize", "--bits", "new.json", "-o", "q2.pt", cwd=work)
    assert_clean_failure(proc, 1, "new.json", "schema_version 99", "newer", "upgrade")
    _unchanged(work, before)


def test_output_paths_that_cannot_be_written(data_dir: Path, work: Path) -> None:
    (work / "afile").write_text("not a folder")
    (work / "adir").mkdir()
    before = snapshot(work)
    proc = run_ompq(data_dir, "export", "q.pt", "-o", "afile/x.onnx", cwd=work)
    assert_clean_failure(proc, 1, "afile is a file, not a folder")
    proc = run_ompq(data_dir, "export", "q.pt", "-o", "adir", cwd=work)
    assert_clean_failure(proc, 1, "-o adir is a folder", "file name")
    proc = run_ompq(data_dir, "search", "--model", f"{work / 'tiny.py'}:make", "-o", "b.json",
                    "--orm-plot", "orm.bmp", cwd=work)
    assert_clean_failure(proc, 1, "orm.bmp", ".png")
    proc = run_ompq(data_dir, "quantize", "--bits", "bits.json", "-o", "nowhere/q.pt", cwd=work)
    assert_clean_failure(proc, 1, "nowhere does not exist", "create it")
    _unchanged(work, before)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(data_dir: Path, work: Path) -> None:
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        before = snapshot(work)
        proc = run_ompq(data_dir, "export", "q.pt", "-o", "ro/x.onnx", cwd=work)
        assert_clean_failure(proc, 1, "ro/x.onnx", "not writable", "choose another")
        _unchanged(work, before)
    finally:
        ro.chmod(0o755)


def _read_only_mount() -> Path | None:
    for candidate in ("/proc/sys", "/sys", "/usr"):
        path = Path(candidate)
        if path.is_dir() and os.statvfs(path).f_flag & os.ST_RDONLY:
            return path
    return None


@pytest.mark.skipif(_read_only_mount() is None, reason="no read-only mount on this machine")
def test_read_only_mount(data_dir: Path, work: Path) -> None:
    mount = _read_only_mount()
    assert mount is not None
    before = snapshot(work)
    proc = run_ompq(data_dir, "export", "q.pt", "-o", mount / "x.onnx", cwd=work)
    assert_clean_failure(proc, 1, str(mount / "x.onnx"), "choose another path")
    _unchanged(work, before)


def _file_size_limit(limit: int):  # noqa: ANN202
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("command", ["quantize", "export", "search"])
def test_full_disk(data_dir: Path, work: Path, command: str) -> None:
    """A file-size limit below the output's size: the write fails, the old outputs stay. The
    search's bits.json would fit: it must not appear without the picture (all or none)."""
    out = {"quantize": "q2.pt", "export": "x.onnx", "search": "b.json"}[command]
    (work / out).write_bytes(b"earlier output")
    before = snapshot(work)
    args = {
        "quantize": ["quantize", "--bits", "bits.json", "--calib", "8", "--random-weights",
                     "-o", out],
        "export": ["export", "q.pt", "--images", "2", "-o", out],
        "search": ["search", "--model", f"{work / 'tiny.py'}:make", "--samples", "16",
                   "-o", out, "--orm-plot", "orm.png"],
    }[command]
    proc = run_ompq(data_dir, *args, cwd=work, preexec=_file_size_limit(4096))
    # (QONNX: Brevitas's raw graph stays in memory, the first write is the output itself)
    assert_clean_failure(proc, 1, "could not write", "file-size limit", "nothing was written")
    _unchanged(work, before)
