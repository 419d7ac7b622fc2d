"""A user's model and data through the CLI: input size and mean/std recorded by search and reused
by quantize, eval and export; weights recorded by path and sha256; random weights refused."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ompq_plugin.cli import build_parser, main
from ompq_plugin.data import prepare
from ompq_plugin.qmodel_io import load_quantized

# Flatten + Linear: the model runs only at 24x24, so any step that used another size would fail.
MODEL = """
from torch import nn

def make():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 12 * 12, 4))
"""
MEAN, STD = (0.25, 0.5, 0.75), (0.5, 0.25, 0.125)


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """model.py, trained-looking weights w.pt and data.npz (16x16 pixels, 4 classes)."""
    (tmp_path / "model.py").write_text(MODEL)
    torch.manual_seed(0)
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("user_model_for_test", tmp_path / "model.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.make().state_dict(), tmp_path / "w.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz",
             x_train=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
             y_train=rng.integers(0, 4, 40), x_test=rng.integers(0, 256, (24, 16, 16, 3),
                                                                  dtype=np.uint8),
             y_test=rng.integers(0, 4, 24))
    return tmp_path


def _search(project: Path, *extra: str) -> list[str]:
    return ["search", "--model", "model.py:make", "--data", "data.npz", "--samples", "16",
            "--avg-weight-bits", "6", "--weight-bits", "4,6,8", "--act-bits", "8",
            "--no-pin-first-last",
            "-o", "bits.json", *extra]


def test_size_and_normalisation_round_trip(project: Path, tmp_path_factory, monkeypatch,
                                           capsys) -> None:
    monkeypatch.chdir(project)
    rc = main(_search(project, "--weights", "w.pt", "--input-size", "24x24",
                      "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))))
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "input 3x24x24, mean 0.25, 0.5, 0.75, std 0.5, 0.25, 0.125" in printed.out
    bits = json.loads((project / "bits.json").read_text())
    assert bits["input"] == {"size": [3, 24, 24], "mean": list(MEAN), "std": list(STD)}
    assert bits["model"] == f"{project.resolve() / 'model.py'}:make"  # absolute
    assert bits["weights"]["path"] == str((project / "w.pt").resolve())
    assert len(bits["weights"]["sha256"]) == 64

    elsewhere = tmp_path_factory.mktemp("elsewhere")  # every later step from another folder
    monkeypatch.chdir(elsewhere)
    data = str(project / "data.npz")
    rc = main(["quantize", "--bits", str(project / "bits.json"), "--data", data,
               "--calib", "16", "-o", "q.pt"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "input 3x24x24, mean 0.25" in printed.out and "warning" not in printed.err
    loaded = load_quantized(elsewhere / "q.pt")
    assert loaded.meta["input"] == bits["input"]
    assert loaded.meta["float_weights"] == bits["weights"]["path"]

    # labels = the quantized model's own answers under the recorded size and mean/std: eval
    # reaches 100 % only if it prepares the images exactly that way
    test = np.load(project / "data.npz")
    x = torch.from_numpy(test["x_test"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = loaded.model(prepare(x, MEAN, STD, (24, 24)))
    answers = getattr(logits, "value", logits).argmax(1).numpy()
    with torch.no_grad():
        plain = loaded.model(prepare(x, None, None, (24, 24)))
    assert (getattr(plain, "value", plain).argmax(1).numpy() != answers).any()  # it matters
    np.savez(elsewhere / "own.npz", x_train=test["x_train"], y_train=test["y_train"],
             x_test=test["x_test"], y_test=answers)
    rc = main(["eval", "q.pt", "--data", "own.npz"])
    assert rc == 0
    assert "top-1 100.00% on 24 test images" in capsys.readouterr().out

    rc = main(["export", "q.pt", "--data", data, "--images", "4", "-o", "q.onnx"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "PASS" in printed.out and (elsewhere / "q.onnx").is_file()


def test_user_model_without_normalisation_gets_none(project: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(project)
    np.save(project / "imgs.npy", np.load(project / "data.npz")["x_train"])
    # unlabelled .npy images are enough for the search; the size comes from --input-size
    args = _search(project, "--weights", "w.pt", "--input-size", "24")
    rc = main([a if a != "data.npz" else "imgs.npy" for a in args])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "no normalisation" in printed.out and "array file" in printed.out
    bits = json.loads((project / "bits.json").read_text())
    assert bits["input"] == {"size": [3, 24, 24], "mean": [0.0] * 3, "std": [1.0] * 3}
    rc = main(["eval", "--model", "model.py:make", "--weights", "w.pt", "--data", "imgs.npy",
               "--input-size", "24"])
    assert rc == 1 and "no labels" in capsys.readouterr().err


def test_changed_weights_warn_and_random_weights_are_refused(project: Path, monkeypatch,
                                                             capsys) -> None:
    monkeypatch.chdir(project)
    assert main(_search(project, "--weights", "w.pt", "--input-size", "24")) == 0
    state = torch.load(project / "w.pt")
    state["0.weight"] += 0.01
    torch.save(state, project / "w.pt")  # "retrained" after the search
    capsys.readouterr()
    assert main(["quantize", "--bits", "bits.json", "--data", "data.npz", "--calib", "8",
                 "-o", "q.pt"]) == 0
    assert "w.pt changed since the search (sha256" in capsys.readouterr().err

    os.remove(project / "q.pt")
    assert main(_search(project, "--input-size", "24")) == 0  # no weights: a note, not an error
    assert "random weights" in capsys.readouterr().out
    rc = main(["quantize", "--bits", "bits.json", "--data", "data.npz", "--calib", "8",
               "-o", "q.pt"])
    err = capsys.readouterr().err
    assert rc == 1 and "--random-weights" in err and not (project / "q.pt").exists()
    assert main(["quantize", "--bits", "bits.json", "--data", "data.npz", "--calib", "8",
                 "--random-weights", "-o", "q.pt"]) == 0


def test_every_option_explains_itself_and_its_default() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"ompq {name} {action.option_strings[0]} has no help"
            shown = formatter._expand_help(action)  # the text --help prints for it
            if action.nargs != 0 and not action.required:
                assert "default" in shown, (name, action.option_strings[-1], shown)
    search = sub.choices["search"].format_help()
    assert "(default: 0)" in search and "(default: none)" in search  # --seed, a budget
