"""Every allocation method through the CLI on the real ResNet-20, and search -> quantize on the
finn profile's full range."""

from __future__ import annotations

import functools
import json

import pytest
from ompq_plugin.hw_profiles import load_profile

from ompq_plugin.bitconfig import BitConfig
from ompq_plugin.cli import main
from ompq_plugin.methods import METHODS, hawq


@pytest.mark.parametrize("method", METHODS)
def test_cli_search_round_trip_per_method(
    method: str, data_dir, tmp_path, capsys, monkeypatch
) -> None:
    out = tmp_path / "bits.json"
    args = [
        "search",
        "--data",
        str(data_dir),
        "--method",
        method,
        "--avg-weight-bits",
        "3",
        "--samples",
        "16",
        "-o",
        str(out),
        "--json",
    ]
    if method == "hawq":  # a real Hessian, but 3 Hutchinson iterations instead of up to 100
        args += ["--hessian-images", "20"]
        monkeypatch.setattr(hawq, "layer_traces", functools.partial(hawq.layer_traces, max_iter=3))
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    config = BitConfig.load(out)
    assert printed.pop("range_ends") is not None and printed == config.to_json()
    assert config.method == method and config.average_weight_bits <= 3
    free = config.layers[1:-1]
    assert {lb.weight_bits for lb in free} <= set(range(2, 9))
    if method == "uniform":  # W3 with 8-bit ends would not fit 3 bits: every layer at 3
        assert {lb.weight_bits for lb in config.layers} == {3}
    if method in ("ompq", "ompq-noise"):
        assert all(lb.theta is not None for lb in free)


def test_cli_random_is_seeded(data_dir, tmp_path, capsys) -> None:
    bits = []
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        out = tmp_path / f"{name}.json"
        assert (
            main(
                [
                    "search",
                    "--data",
                    str(data_dir),
                    "--method",
                    "random",
                    "--seed",
                    str(seed),
                    "--avg-weight-bits",
                    "4",
                    "--samples",
                    "16",
                    "-o",
                    str(out),
                ]
            )
            == 0
        )
        bits.append([lb.weight_bits for lb in BitConfig.load(out).layers])
    capsys.readouterr()
    assert bits[0] == bits[1] and bits[0] != bits[2]


def test_finn_full_range_search_then_quantize(data_dir, tmp_path, capsys) -> None:
    """The finn profile's whole range: whatever the search picks, quantize builds it."""
    from ompq_plugin.qmodel_io import load_quantized

    profile = load_profile("finn")
    assert min(profile.default_bits.weight) >= 2 and min(profile.default_bits.activation) >= 2
    bits_path, qpath = tmp_path / "bits.json", tmp_path / "q.pt"
    assert (
        main(
            [
                "search",
                "--data",
                str(data_dir),
                "--profile",
                "finn",
                "--avg-weight-bits",
                "2.5",
                "--bops-g",
                "0.5",
                "--samples",
                "16",
                "-o",
                str(bits_path),
            ]
        )
        == 0
    )
    config = BitConfig.load(bits_path)
    assert min(lb.weight_bits for lb in config.layers) == 2  # the bottom of the range is used
    assert (
        main(
            [
                "quantize",
                "--data",
                str(data_dir),
                "--bits",
                str(bits_path),
                "--calib",
                "16",
                "--no-gptq",
                "-o",
                str(qpath),
            ]
        )
        == 0
    )
    capsys.readouterr()
    loaded = load_quantized(qpath)
    report = loaded.model.ompq_report
    for lb in config.layers:
        assert report.weight_bits[lb.name] == lb.weight_bits


def test_profile_offering_one_bit_is_refused_before_any_work() -> None:
    """A width quantize cannot build is never searched: a user profile with 1 bit stops early."""
    from dataclasses import replace

    import torch
    from ompq_plugin.hw_profiles.profile import BitChoices
    from torch import nn

    from ompq_plugin.errors import OmpqError
    from ompq_plugin.searcher import run_search

    finn = load_profile("finn")
    one_bit = replace(finn, default_bits=BitChoices((1, 2, 4), (2, 4)))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with pytest.raises(OmpqError, match=r"\[1\]-bit widths.*cannot build"):
        run_search(model, torch.randn(4, 3, 8, 8), one_bit)
