"""--device: checked up front, the model moved for the search and moved back, CPU unchanged.

No GPU runs these tests (CI has none): the CUDA path itself was not run here; what is checked is
the refusal on a machine without one and that naming the CPU changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ompq_plugin.cli import main
from ompq_plugin.device import model_device, on_device, resolve_device
from ompq_plugin.errors import OmpqError
from ompq_plugin.searcher import run_search


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()


def test_devices_are_checked_with_a_message_naming_the_value() -> None:
    assert resolve_device(None) is None
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "gpu0", "meta"):
        with pytest.raises(OmpqError, match=repr(bad)):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_in_one_line() -> None:
    with pytest.raises(OmpqError, match="no CUDA GPU.*--device cpu"):
        resolve_device("cuda")


def test_the_model_goes_back_where_it_was() -> None:
    model = _model().double()
    with on_device(model, torch.device("cpu")) as dev:
        assert dev == torch.device("cpu")
    assert model_device(model) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")


def test_naming_the_cpu_gives_the_same_bits() -> None:
    model, x = _model(), torch.rand(16, 3, 8, 8)
    plain = run_search(model, x, "generic", avg_weight_bits=4).config
    named = run_search(model, x, "generic", avg_weight_bits=4, device="cpu").config
    assert [(lay.weight_bits, lay.act_bits) for lay in plain.layers] == [
        (lay.weight_bits, lay.act_bits) for lay in named.layers
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_cli_refuses_cuda_on_a_machine_without_one(tmp_path, capsys, data_dir) -> None:
    out = tmp_path / "bits.json"
    code = main(["search", "--model", "resnet20", "--data", str(data_dir), "--samples", "8",
                 "--device", "cuda", "-o", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "error: --device 'cuda': torch sees no CUDA GPU" in err
    assert len(err.splitlines()) == 1
    assert not out.exists()
