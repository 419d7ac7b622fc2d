"""`ompq inspect` on quantized ONNX files written by other projects (../shared/interop).

The expected figures were written from the files themselves, not from our inspect: total MACs are
qonnx's ``inference_cost(..., preprocess=True, discount_sparsity=False)`` ``total_macs`` (run by
hand on qonnx 1.0.0; for em_separable_conv_model_ch_last it never finishes, there the MACs are
out_h x out_w x C_out x C_in/group x k x k from the shapes recorded in the file); weight /
activation bits are the bitwidth initialisers of the Quant / BipolarQuant / FloatQuant nodes in
front of each layer (inference_cost's ``op_mac_<act>_<weight>`` keys say the same), None where
the input is float (graph input, after Div / BatchNormalization / Selu)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ompq_plugin.exporters import inspect_onnx

from ompq_plugin.errors import OmpqError

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# ../shared/interop sits beside the data folder (../shared/data)
INTEROP = Path(os.environ.get("OMPQ_INTEROP_DIR")
               or Path(os.environ.get("OMPQ_DATA_DIR") or DEFAULT_DATA).parent / "interop")

# file: (weight bits per layer, act bits per layer, total MACs)
EXPECTED = {
    "TFC_2W2A.onnx": ([2, 2, 2, 2], [2, 2, 2, 2], 59008),
    "kwsmlp_w3a3.onnx": ([3, 3, 3, 3], [8, 3, 3, 3], 125440 + 134144),
    "unsw_nb15-mlp-w2a2.onnx": ([2, 2, 2, 2], [None, 8, 2, 2], 38400 + 4096 + 4160),
    "qkeras_jettagging.onnx": ([6, 6, 6, 6], [None, 6, 6, 6], 1024 + 3232),
    "espcn_nnresize_quant.onnx": ([8, 4, 4, 8], [8, 4, 4, 8], 135266304 + 905969664),
    "eltwise_chanlast_testcase.onnx": ([None], [None], 10645344),
    "qonnx_act_weight_fp8.onnx": ([8], [8], 48),
    "em_bnn_model_fc_1layer.onnx": ([1], [1], 12),
    "em_conv2d_small_mp_keras.onnx": ([None] * 4, [None] * 4, 20085),
    "em_separable_conv_model_ch_last.onnx": (
        [4, 4, 4, 4], [4, 4, 4, 4],
        # four 3x3 / 1x1 convs on 128x128 / 64x64 maps, from the file's value_info shapes
        7077888 + 12582912 + 37748736 + 67108864),
}


def _file(name: str) -> Path:
    path = INTEROP / name
    if not path.is_file():
        pytest.fail(f"interop file {path} missing: set OMPQ_INTEROP_DIR to ../shared/interop",
                    pytrace=False)
    return path


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_interop_bits_and_macs(name):
    wbits, abits, macs = EXPECTED[name]
    table = inspect_onnx(_file(name))
    assert [r.weight_bits for r in table.layers] == wbits
    assert [r.act_bits for r in table.layers] == abits
    assert table.totals["macs"] == macs


def test_interop_floatquant_and_unnamed_nodes():
    fp8 = inspect_onnx(_file("qonnx_act_weight_fp8.onnx")).layers[0]
    assert fp8.weight_format == "fp8" and fp8.act_note == "fp8"
    keras = inspect_onnx(_file("em_conv2d_small_mp_keras.onnx")).layers
    assert [r.macs > 0 for r in keras] == [True] * 4  # Gemm nodes without names count too
    assert keras[1].act_note == "after BatchNormalization"


def test_interop_finn_hardware_graph_refused_in_one_line():
    with pytest.raises(OmpqError) as err:
        inspect_onnx(_file("finn_residual_testcase.onnx"))
    msg = str(err.value)
    assert "FINN hardware graph" in msg and "DuplicateStreams_Batch" in msg and "\n" not in msg
