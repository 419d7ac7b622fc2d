"""quantize(): exact bits, integer-only structure, accuracy floor, errors, float model untouched."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from ompq_plugin.hw_profiles.loader import load_profile
from torch import nn

from ompq_plugin.errors import OmpqError
from ompq_plugin.models.cifar_resnet import ShortcutA, resnet20
from ompq_plugin.quantizer import FixedShortcutConv, quant_layers, quantize, uniform_bitconfig

X = torch.zeros(1, 3, 32, 32)


def _mixed_bits(model: nn.Module):
    bits = uniform_bitconfig(model, X, 8, 8, "resnet20")
    choices = [2, 3, 4, 5, 6, 8]
    layers = [
        replace(lb, weight_bits=choices[i % len(choices)]) for i, lb in enumerate(bits.layers)
    ]
    return replace(bits, layers=layers)


def _is_pow2(t: torch.Tensor) -> bool:
    e = torch.log2(t.detach().flatten())
    return bool(torch.all(e == torch.round(e)))


@pytest.mark.parametrize("profile_name", ["generic", "hls4ml"])
def test_every_layer_has_the_bitconfig_bits(profile_name: str) -> None:
    torch.manual_seed(0)
    model = resnet20().eval()
    bits = _mixed_bits(model)
    profile = load_profile(profile_name)
    q = quantize(model, bits, profile)
    layers = quant_layers(q)
    for lb in bits.layers:
        qw = layers[lb.name].quant_weight()
        assert int(qw.bit_width) == lb.weight_bits, lb.name
        assert _is_pow2(qw.scale) == profile.power_of_two_scales or not profile.power_of_two_scales
        per_channel = qw.scale.numel() > 1
        assert per_channel == profile.per_channel_weights, lb.name
        assert type(layers[lb.name].bias_quant).__name__ and layers[lb.name].bias is not None
    # option-A shortcuts became frozen 0/1 1x1 stride-2 convs, quantized too
    shortcuts = [n for n in ("layer2.0.shortcut", "layer3.0.shortcut")]
    for name in shortcuts:
        sc = layers[name]
        assert sc.kernel_size == (1, 1) and sc.stride == (2, 2) and not sc.weight.requires_grad
        assert set(sc.weight.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(sc.quant_weight().value, sc.weight)  # exact at its 2-bit width
    assert not any(isinstance(m, ShortcutA) for m in q.modules())
    code = q.code
    assert "pad" not in code and "getitem" not in code
    # one quantizer per input activation group, with that group's bits
    for lb in bits.layers:
        assert lb.act_bits == 8
    report = q.ompq_report
    assert len(report.shared_add_quantizers) == 9  # one per residual add
    assert set(report.act_quantizers.values()) == {8}


def test_residual_add_uses_one_shared_quantizer() -> None:
    q = quantize(resnet20().eval(), uniform_bitconfig(resnet20(), X, 8, 6), load_profile("generic"))
    calls = [n for n in q.graph.nodes if n.op == "call_module" and n.target.endswith("add_quant")]
    assert len(calls) == 18  # two inputs x nine adds, nine modules
    assert len({n.target for n in calls}) == 9
    assert all(q.get_submodule(n.target).act_quant.bit_width() == 6 for n in calls)


def test_shortcut_conv_is_exact() -> None:
    x = torch.randn(2, 16, 8, 8)
    a = ShortcutA(16, 32)
    c = FixedShortcutConv(16, 32, a.pad_before)
    assert torch.equal(a(x), c(x))


def test_float_model_untouched() -> None:
    model = resnet20().eval()
    before = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    quantize(model, uniform_bitconfig(model, X, 4, 4), load_profile("generic"))
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("profile_name", "floor_db"), [("generic", 25.0), ("hls4ml", 22.0)])
def test_w8a8_sqnr_on_real_images(data_dir, profile_name: str, floor_db: float) -> None:
    from ompq_plugin.data import load_cifar10, normalise
    from ompq_plugin.models import build_model
    from ompq_plugin.ptq import calibrate

    model, spec = build_model("resnet20", data_dir / "weights" / "resnet20.th")
    model.eval()
    test = load_cifar10(data_dir / "cifar10-exact", "test")
    train = load_cifar10(data_dir / "cifar10-exact", "train")
    x = normalise(test.images[:64], spec.mean, spec.std)
    q = quantize(model, uniform_bitconfig(model, x, 8, 8), load_profile(profile_name))
    calibrate(q, normalise(train.images[:64], spec.mean, spec.std))
    with torch.no_grad():
        ref, out = model(x), q(x)
    sqnr = 10 * math.log10(float((ref**2).sum() / ((ref - out) ** 2).sum()))
    assert sqnr > floor_db, f"{profile_name}: SQNR {sqnr:.1f} dB"
    assert (ref.argmax(1) == out.argmax(1)).float().mean() > 0.95


class _Mobile(nn.Module):
    """Depthwise + pointwise, functional ReLU6, linear bottleneck residual (no ReLU after add)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv1d(8, 4, 1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.stem(x)))
        y = F.relu6(self.bn1(self.dw(x)))
        x = x + self.bn2(self.pw(y))
        x = F.max_pool2d(x, 2).flatten(2)
        x = F.relu(self.head(x))
        return self.fc(x.mean(2))


def test_depthwise_functional_and_linear_bottleneck() -> None:
    from ompq_plugin.ptq import calibrate

    torch.manual_seed(0)
    model = _Mobile().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(16, 3, 16, 16)
    bits = uniform_bitconfig(model, x, 8, 8)
    bits = replace(bits, layers=[replace(lb, weight_bits=6 if lb.name == "dw" else 8)
                                 for lb in bits.layers])
    q = quantize(model, bits, load_profile("generic"))
    assert int(quant_layers(q)["dw"].quant_weight().bit_width) == 6
    assert quant_layers(q)["dw"].groups == 8
    calibrate(q, x)
    with torch.no_grad():
        ref, out = model(x), q(x)
    sqnr = 10 * math.log10(float((ref**2).sum() / ((ref - out) ** 2).sum()))
    assert sqnr > 20, sqnr
    assert len(q.ompq_report.shared_add_quantizers) == 1


@pytest.mark.parametrize("bad", [nn.ConvTranspose2d(4, 4, 2), nn.LSTM(4, 4)])
def test_unsupported_layer_is_named(bad: nn.Module) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), bad)
    bits = uniform_bitconfig(nn.Sequential(nn.Conv2d(3, 4, 3)), X, 8, 8)
    with pytest.raises(OmpqError, match=rf"layer 2 \({type(bad).__name__}\)"):
        quantize(model, bits, load_profile("generic"))


def test_bitconfig_names_must_match_the_model() -> None:
    model = resnet20().eval()
    bits = uniform_bitconfig(model, X, 8, 8)
    wrong = replace(bits, layers=[*bits.layers[:-1], replace(bits.layers[-1], name="fc9")])
    with pytest.raises(OmpqError, match="fc9") as err:
        quantize(model, wrong, load_profile("generic"))
    assert "\n" not in str(err.value)
