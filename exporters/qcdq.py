"""Verified QCDQ export (QuantizeLinear / Clip / DequantizeLinear ONNX) for onnxruntime-style
runtimes. Same annotations and checks as :mod:`exporters.qonnx`, executed in onnxruntime.

QCDQ carries at most 8-bit activations and weights (int8 / uint8 with a Clip for narrower
ranges); 32-bit biases use int32 DequantizeLinear. Bits are read back from the Clip bounds.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ompq_plugin.errors import OmpqError
from ompq_plugin.rounding import rounds_half_up

from .export_report import DEFAULT_TOL, ExportReport
from .qonnx import annotate, brevitas_export, map_layers, save_atomic, write_metadata
from .qonnx_verify import verify_qonnx
from .torch_side import as_images, expected_bits, find_bitconfig

if TYPE_CHECKING:
    from torch import nn

    from ompq_plugin.bitconfig import BitConfig

MAX_QCDQ_BITS = 8


def export_qcdq(
    qmodel: nn.Module,
    path: str | os.PathLike[str],
    example_input: Any,
    bits: BitConfig | None = None,
    *,
    tol: float = DEFAULT_TOL,
    exact: bool | None = None,
) -> ExportReport:
    """Export ``qmodel`` as QCDQ ONNX, verified in onnxruntime on ``example_input`` (N real
    images) against torch before the file is written."""
    t0 = time.perf_counter()
    images = as_images(example_input, qmodel)
    was_training = qmodel.training
    qmodel.eval()
    bits = find_bitconfig(qmodel, bits)
    try:
        expected = expected_bits(qmodel, bits)
        too_wide = [(n, e) for n, e in expected.items()
                    if e.weight_bits > MAX_QCDQ_BITS or (e.act_bits or 0) > MAX_QCDQ_BITS]
        if too_wide:
            name, e = too_wide[0]
            raise OmpqError(
                f"layer {name} has {e.weight_bits}-bit weights / {e.act_bits}-bit activations; "
                f"QCDQ carries at most {MAX_QCDQ_BITS} bits: use --format qonnx for this model"
            )
        if rounds_half_up(qmodel):
            raise OmpqError(
                "this model's activation quantizers round ties up (profile act_rounding = "
                "half-up, FINN); QCDQ's QuantizeLinear rounds half to even: use --format qonnx"
            )
        with tempfile.TemporaryDirectory(prefix="ompq-export-") as tmp:
            from brevitas.export import export_onnx_qcdq

            model = brevitas_export(  # (Brevitas's QCDQ manager returns no model: a file)
                export_onnx_qcdq, qmodel, images[:1], Path(tmp) / "raw.onnx",
                input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        t_export = time.perf_counter()
        annotate(model, map_layers(model, qmodel, images[:1]), expected)
        ver = verify_qonnx(model, qmodel, images, bits, tol=tol, exact=exact)
        t_verify = time.perf_counter()
        node_map = write_metadata(model, "qcdq", bits, ver)
        target = save_atomic(model, path)
    finally:
        qmodel.train(was_training)
    return ExportReport(
        path=target, format="qcdq", layers=ver.layers, node_map=node_map,
        runtime=ver.runtime, verified=True, **ver.report_fields(),
        seconds={"export": t_export - t0, "verify": t_verify - t_export,
                 "total": time.perf_counter() - t0},
    )
