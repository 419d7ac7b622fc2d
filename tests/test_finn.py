"""FINN hand-off without FINN: the rounding FINN's thresholds compute, and a finn-profile export on
which qonnx's Quant and those thresholds cannot disagree (no activation on a tie they round
differently). FINN itself (finn-plus) cannot be installed beside torch 2.13.0: bench/finn_flow.py
runs FINN's own steps on ResNet-20 in a separate environment (README: FINN)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from ompq_plugin.exporters import export_qcdq, export_qonnx
from ompq_plugin.exporters import targets as T
from ompq_plugin.exporters import verify as V
from test_export import real_images
from torch import nn

from ompq_plugin.errors import OmpqError
from ompq_plugin.rounding import TIE_OFFSET, RoundHalfUpSte, offset_is_tie_free


def finn_thresholds(scale: float, bits: int, signed: bool) -> np.ndarray:
    """Thresholds of the MultiThreshold FINN's ConvertQONNXtoFINN makes of an activation Quant
    (finn/transformation/qonnx/qonnx_activation_handlers.py: ``min_threshold + step * t``)."""
    n = 2**bits - 1
    step = abs(scale)
    first = step / 2 if not signed else -step / 2 - step * (n // 2 - 1) - step
    return (first + step * np.arange(n, dtype=np.float64)).astype(np.float32)[None, :]


@pytest.mark.parametrize("signed", [False, True])
def test_half_up_is_finn_rounding_for_non_negative_values(signed):
    """qonnx's MultiThreshold with FINN's thresholds == Quant(HALF_UP) on every value >= 0, and
    on negative values off ties; on negative ties they differ (why signed outputs get the offset).
    ROUND (half to even, Brevitas' default) differs on non-negative ties already."""
    from qonnx.custom_op.general.multithreshold import multithreshold
    from qonnx.custom_op.general.quant import quant

    bits, scale = 4, 0.25
    lo = -(2 ** (bits - 1)) if signed else 0
    grid = np.arange(lo * 8, (2**bits) * 8, dtype=np.float32) / 32  # ties and non-ties
    x = grid.reshape(1, 1, -1)
    bias = float(lo)
    finn = (multithreshold(x, finn_thresholds(scale, bits, signed)) + bias) * scale

    def q(mode):
        return quant(x, np.float32(scale), np.float32(0), np.float32(bits), signed, False, mode)

    tie = (x / scale - np.floor(x / scale)) == 0.5
    np.testing.assert_array_equal(finn[x >= 0], q("HALF_UP")[x >= 0])
    np.testing.assert_array_equal(finn[~tie], q("HALF_UP")[~tie])
    assert (finn[tie & (x >= 0)] != q("ROUND")[tie & (x >= 0)]).any()
    if signed:
        assert (finn[tie & (x < 0)] != q("HALF_UP")[tie & (x < 0)]).all()


def test_round_half_up_ste_is_qonnx_half_up():
    from qonnx.custom_op.general.quant import resolve_rounding_mode

    x = torch.arange(-40, 41, dtype=torch.float32) / 8
    want = resolve_rounding_mode("HALF_UP")(x.numpy())
    np.testing.assert_array_equal(RoundHalfUpSte()(x).numpy(), want)
    y = x.clone().requires_grad_(True)
    RoundHalfUpSte()(y).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))  # straight-through


def test_quarter_lsb_offset_is_never_a_tie_except_half_grid():
    """(n + 1/4) a vs the ties (k + 1/2) 2^m a, exactly (powers of two are exact in float64)."""
    n = np.arange(-4096, 4096, dtype=np.float64)
    for m in range(-5, 9):
        y = (n + TIE_OFFSET) / 2.0**m
        on_tie = bool(((y - np.floor(y)) == 0.5).any())
        assert on_tie == (not offset_is_tie_free(2.0**m, 1.0)), m
        assert on_tie == (m == -1)


class TinyResNet(nn.Module):
    """conv-bn-relu, one basic block (conv-bn-relu-conv-bn + identity, relu), pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.linear = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(x)))))
        x = torch.relu(x + y)
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _quantized(profile_name, data_dir):
    from ompq_plugin.hw_profiles.loader import load_profile

    from ompq_plugin import quantizer as Q
    from ompq_plugin.ptq import calibrate

    torch.manual_seed(0)
    net = TinyResNet().eval()
    for bn in (net.bn1, net.bn2, net.bn3):  # non-trivial folded biases
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.bias.data.uniform_(-0.2, 0.2)
    x = real_images(data_dir, 8)
    bc = Q.uniform_bitconfig(net, x, 4, 4, "tiny", profile_name)
    bc.layers = [
        dataclasses.replace(lb, act_bits=8) if i == 0 else lb for i, lb in enumerate(bc.layers)
    ]
    q = Q.quantize(net, bc, load_profile(profile_name))
    calibrate(q, real_images(data_dir, 16, "data_batch_1"))
    return q, bc, x


def _exported(profile_name, data_dir, tmp_path):
    q, bc, x = _quantized(profile_name, data_dir)
    rep = export_qonnx(q, tmp_path / f"{profile_name}.onnx", x[:2], bc, target="finn")
    return onnx.load(str(rep.path)), x.numpy(), rep, q


def test_finn_profile_export_has_no_tie_finn_rounds_differently(data_dir, tmp_path):
    model, x, rep, q = _exported("finn", data_dir, tmp_path)
    assert rep.exact and rep.max_abs_diff == 0  # torch == graph, bit for bit
    g = V.Graph(model)
    acts = [n for n in g.graph.node if n.op_type == "Quant" and g.const(n.input[0]) is None]
    modes = {a.s.decode() for n in acts for a in n.attribute if a.name == "rounding_mode"}
    assert modes == {"HALF_UP"}
    # one reader per activation Quant (the trunk Quant and its Relu are copied per reader), so
    # no scale Mul of FINN's sits on a fork; the block input has two readers: conv2 and the add
    assert all(len(g.consumers.get(n.output[0], [])) == 1 for n in acts)
    relus = [n for n in g.graph.node if n.op_type == "Relu"]
    assert len(relus) == 4 and all(len(g.consumers[r.output[0]]) == 1 for r in relus)
    # the block's second conv feeds the signed residual-add quantizer through the offset Add
    offsets = [
        n
        for n in g.graph.node
        if n.op_type == "Add"
        and g.producer.get(n.input[0]) is not None
        and g.producer[n.input[0]].op_type == "Conv"
    ]
    assert len(offsets) == 1
    ties = T.count_ties(model, x)
    assert ties.values > 0 and ties.positive > 0  # ties happen; HALF_UP rounds them as FINN
    assert ties.negative == 0 and ties.disagreeing() == 0
    with pytest.raises(OmpqError, match="half-up"):  # QuantizeLinear rounds half to even
        export_qcdq(q, tmp_path / "finn_qdq.onnx", x[:2])


def test_half_even_profile_export_has_ties_finn_rounds_differently(data_dir, tmp_path):
    """The same network under a half-even profile: the counter finds the disagreements."""
    model, x, _, _ = _exported("hls4ml", data_dir, tmp_path)
    ties = T.count_ties(model, x)
    assert ties.negative > 0 and ties.disagreeing() > 0
