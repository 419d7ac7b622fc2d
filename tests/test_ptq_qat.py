"""PTQ (calibration, bias correction, GPTQ), QAT (checkpoint/resume, DDP), quantized model file."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ompq_plugin.hw_profiles.loader import load_profile
from torch import nn

from ompq_plugin.errors import OmpqError
from ompq_plugin.models.cifar_resnet import resnet20
from ompq_plugin.ptq import calibrate
from ompq_plugin.qat import finetune
from ompq_plugin.qmodel_io import load_quantized, save_quantized
from ompq_plugin.quantizer import quant_layers, quantize, uniform_bitconfig


class Tiny(nn.Module):
    """conv-bn-relu, one residual block, pool, linear: every quantize() feature, fast."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu2(x + self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _tiny_q(seed: int = 0, wbits: int = 4):
    torch.manual_seed(seed)
    model = Tiny().eval()
    x = torch.randn(32, 3, 8, 8)
    bits = uniform_bitconfig(model, x, wbits, 8, "tiny")
    q = quantize(model, bits, load_profile("generic"))
    calibrate(q, x)
    return q, bits, x


def _data(n: int = 64):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels


NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_gptq_changes_the_weights_and_the_file_reloads(data_dir, tmp_path: Path) -> None:
    from ompq_plugin.data import load_cifar10, normalise
    from ompq_plugin.models import build_model

    model, spec = build_model("resnet20", data_dir / "weights" / "resnet20.th")
    train = load_cifar10(data_dir / "cifar10-exact", "train")
    x = normalise(train.images[:16], spec.mean, spec.std)
    q = quantize(model, uniform_bitconfig(model, x, 4, 8), load_profile("generic"))
    calibrate(q, x)
    before = {n: m.quant_weight().value.clone() for n, m in quant_layers(q).items()}
    calibrate(q, x, gptq=True)
    after = {n: m.quant_weight().value for n, m in quant_layers(q).items()}
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) >= len(before) - 3  # shortcuts (restored) and trivial layers may stay
    for name in ("layer2.0.shortcut", "layer3.0.shortcut"):
        assert torch.equal(before[name], after[name])
    # GPTQ (with bias correction) must not leave extra state that stops the file reloading
    calibrate(q, x, bias_correction=True)
    bits, profile = uniform_bitconfig(model, x, 4, 8), load_profile("generic")
    path = tmp_path / "q.pt"
    save_quantized(path, q, "resnet20", bits, profile, {"calib": 16})
    loaded = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(q(x), loaded.model(x))


def test_bias_correction_changes_biases() -> None:
    q, _, x = _tiny_q()
    before = {n: m.bias.clone() for n, m in quant_layers(q).items()}
    calibrate(q, x, bias_correction=True)
    assert any(not torch.equal(before[n], m.bias) for n, m in quant_layers(q).items())


@pytest.mark.parametrize("ptq", [{}, {"bias_correction": True}])
def test_quantized_file_round_trip(tmp_path: Path, ptq: dict) -> None:
    model = resnet20().eval()
    x = torch.randn(4, 3, 32, 32)
    bits = uniform_bitconfig(model, x, 5, 7, "resnet20")
    profile = load_profile("hls4ml")
    q = quantize(model, bits, profile)
    calibrate(q, x, **ptq)  # (GPTQ: see test_gptq_changes_the_weights_and_the_file_reloads)
    path = tmp_path / "q.pt"
    save_quantized(path, q, "resnet20", bits, profile, {"calib": 4})
    loaded = load_quantized(path)
    assert loaded.bits.to_json() == bits.to_json() and loaded.profile == profile
    with torch.no_grad():
        assert torch.equal(q(x), loaded.model(x))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(OmpqError, match="not a readable quantized model"):
        load_quantized(bad)


def test_finetune_checkpoint_and_resume(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    train = _data()
    kw = dict(batch_size=16, norm=NORM, progress=False, seed=3)
    q_full, bits, _ = _tiny_q()
    hist = finetune(q_full, train, train, 2, 0.05, checkpoint=tmp_path / "a.ckpt", bits=bits, **kw)
    assert [h.epoch for h in hist] == [1, 2] and hist[-1].val_acc is not None
    q_cut, _, _ = _tiny_q()
    finetune(q_cut, train, None, 2, 0.05, checkpoint=tmp_path / "b.ckpt", bits=bits,
             stop_after=1, **kw)
    q_res, _, _ = _tiny_q(seed=5)  # different start: everything must come from the checkpoint
    hist2 = finetune(q_res, train, None, 2, 0.05, checkpoint=tmp_path / "b.ckpt", bits=bits,
                     resume=True, **kw)
    assert [h.epoch for h in hist2] == [1, 2]
    # Resume is close to, not bit-identical with, an uninterrupted run (about 1e-3 on weight
    # scales: some Brevitas quantizer state lives outside the state_dict; known gap).
    full, res = q_full.state_dict(), q_res.state_dict()
    assert all(torch.allclose(full[k].float(), res[k].float(), atol=2e-2) for k in full)
    # the frozen BN-free model trained: weights moved
    assert not torch.equal(q_full.state_dict()["fc.weight"], _tiny_q()[0].state_dict()["fc.weight"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    q, bits, _ = _tiny_q()
    train = _data()
    ckpt = Path(out) / "ddp.ckpt"
    hist = finetune(q, train, train, 1, 0.05, batch_size=8, norm=NORM, progress=False,
                    checkpoint=ckpt, bits=bits)
    torch.save({"state": q.state_dict(), "acc": hist[-1].val_acc}, Path(out) / f"rank{rank}.pt")


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["acc"] == r1["acc"]
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert (tmp_path / "ddp.ckpt").is_file()
