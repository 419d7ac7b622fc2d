"""hls4ml check: QONNX -> hls4ml (Vitis, io_stream) -> g++ C++ emulation, bit-exact vs qonnx."""

from __future__ import annotations

import pytest
from ompq_plugin.exporters import export_qonnx
from test_export import make_small, quantized_resnet20, real_images, small_bitconfig

from ompq_plugin.errors import OmpqError

hls4ml = pytest.importorskip("hls4ml", reason="hls4ml not installed (pip install '.[hls4ml]')")

from ompq_plugin.exporters.hls4ml_check import check_hls4ml  # noqa: E402


def test_small_model_bit_exact(data_dir, tmp_path):
    images = real_images(data_dir, 8)
    report = export_qonnx(make_small(data_dir), tmp_path / "s.onnx", images, small_bitconfig())
    result = check_hls4ml(report.path, images)
    assert result.bit_exact and result.max_abs_diff == 0.0, result.summary()
    assert result.n_images == 8 and result.first_diverging is None


def test_float_scales_refused(data_dir, tmp_path):
    images = real_images(data_dir, 2)
    report = export_qonnx(make_small(data_dir, po2=False), tmp_path / "f.onnx", images)
    with pytest.raises(OmpqError, match="not a power of two.*hls4ml profile"):
        check_hls4ml(report.path, images)


@pytest.mark.slow
def test_resnet20_bit_exact(data_dir, tmp_path):
    """ResNet-20, real weights, mixed bits, hls4ml profile: about a minute on 2 cores."""
    q, bc = quantized_resnet20(data_dir)
    images = real_images(data_dir, 4)
    report = export_qonnx(q, tmp_path / "r20.onnx", images, bc)
    result = check_hls4ml(report.path, images)
    assert result.bit_exact, result.summary()
