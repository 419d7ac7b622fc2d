"""hls4ml check (extra ``hls4ml``): hls4ml's documented QONNX flow on the exported file, as a
user runs it, and its C++ emulation (``compile()``, g++, no Vivado/Vitis) compared with qonnx bit
for bit on real images. Nothing is rewritten here; the calls are exactly those in the README:

qonnx ``cleanup_model`` -> ``ConvertToChannelsLastAndClean(make_input_channels_last=True)`` ->
``GemmToMatMul`` -> ``cleanup_model``; ``config_from_onnx_model(granularity='name',
backend='Vitis')`` updated with the file's own entries (``<stem>.hls4ml.json`` beside it, also in
its ``ompq.hls4ml_config`` metadata: the input precision, see :mod:`exporters.targets`);
``convert_from_onnx_model(io_type='io_stream', backend='Vitis')``; ``compile()``; ``predict()``
on channels-last float32 images.

What makes the file hls4ml-ready is done at export (``target='hls4ml'``): the global average
pool as a depthwise conv, 1-element bias quantizer parameters. On a mismatch the conversion is
repeated with hls4ml's layer tracing to name the first differing layer.

Bit-exactness needs power-of-two, per-tensor scales with zero offset (hls4ml maps those to
ap_fixed); other scales make hls4ml insert ApplyAlpha rescaling, which is not exact, so they are
refused up front with the fix (quantize with the hls4ml profile).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ompq_plugin.errors import OmpqError

from . import verify as V


@dataclass
class Hls4mlReport:
    n_images: int
    bit_exact: bool
    max_abs_diff: float
    first_diverging: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    output_dir: str | None = None

    def summary(self) -> str:
        s = (f"hls4ml (Vitis, io_stream, g++ emulation) vs qonnx on {self.n_images} images: "
             f"max |diff| = {self.max_abs_diff:.3g}: {'BIT-EXACT' if self.bit_exact else 'FAIL'}"
             f" (convert {self.seconds.get('convert', 0):.1f} s, "
             f"compile {self.seconds.get('compile', 0):.1f} s)")
        if self.first_diverging:
            s += f"; first differing layer {self.first_diverging}"
        return s

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def available() -> bool:
    try:
        import hls4ml  # noqa: F401
    except ImportError:
        return False
    return True


def _require() -> Any:
    try:
        import hls4ml
    except ImportError:
        raise OmpqError("hls4ml is not installed: pip install 'ompq-plugin[hls4ml]'") from None
    return hls4ml


def check_scales(model: onnx.ModelProto) -> None:
    """Refuse scales hls4ml cannot represent exactly (non power of two, per channel, offset)."""
    g = V.Graph(model)
    for node in g.graph.node:
        if node.op_type != "Quant":
            continue
        scale, zp = g.const(node.input[1]), g.const(node.input[2])
        where = V.node_meta(node).get("layer") or V.node_meta(node).get("feeds") or node.name
        if scale is None or np.asarray(scale).size != 1:
            raise OmpqError(f"{where}: per-channel scales (node {node.name}) are not bit-exact in "
                            "hls4ml; quantize with the hls4ml profile (per-tensor scales)")
        s = float(np.asarray(scale).ravel()[0])
        if s <= 0 or math.log2(s) != round(math.log2(s)):
            raise OmpqError(f"{where}: scale {s:g} (node {node.name}) is not a power of two; "
                            "quantize with the hls4ml profile (power-of-two scales)")
        if zp is None or np.any(np.asarray(zp) != 0):
            raise OmpqError(f"{where}: non-zero zero point (node {node.name}); quantize with the "
                            "hls4ml profile (symmetric quantizers)")


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Channels-last, MatMul form of the graph (qonnx-executable)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    w = cleanup_model(ModelWrapper(copy.deepcopy(model)))
    w = w.transform(ConvertToChannelsLastAndClean(make_input_channels_last=True))
    w = w.transform(GemmToMatMul())
    return cleanup_model(w).model


def _qonnx_ctx(model: onnx.ModelProto, image: np.ndarray) -> dict[str, np.ndarray]:
    import qonnx.core.onnx_exec as oxe
    from qonnx.core.modelwrapper import ModelWrapper

    w = ModelWrapper(model)
    return oxe.execute_onnx(w, {w.graph.input[0].name: image}, return_full_exec_context=True)


def _first_diverging(hm: Any, cl: onnx.ModelProto, image: np.ndarray) -> str | None:
    """Trace every hls4ml layer on one image and name the first whose output differs."""
    _, trace = hm.trace(np.ascontiguousarray(image))
    ctx = _qonnx_ctx(cl, image)
    g = V.Graph(cl)
    for name, layer in hm.graph.items():
        if name not in trace or not layer.outputs:
            continue
        tensor = layer.outputs[0]
        # hls4ml merges a following Quant into its producer: compare with the Quant's output
        cons = g.consumers.get(tensor, [])
        if len(cons) == 1 and cons[0].op_type == "Quant" and cons[0].name not in hm.graph:
            tensor = cons[0].output[0]
        ref = ctx.get(tensor)
        got = trace[name]
        if ref is None or np.asarray(ref).size != got.size:
            continue
        if np.any(np.asarray(ref).reshape(got.shape) != got):
            node = g.producer.get(tensor)
            torch_name = V.node_meta(node).get("layer") if node is not None else None
            return f"{name} ({torch_name})" if torch_name else name
    return None


def config_entries(model: onnx.ModelProto) -> dict[str, Any]:
    """The file's own hls4ml config entries (``ompq.hls4ml_config``), else computed from it."""
    from . import targets

    meta = V.model_meta(model).get("ompq.hls4ml_config")
    return json.loads(meta) if meta else targets.hls4ml_config(model)


def hls4ml_config(hls4ml: Any, prepared: onnx.ModelProto, entries: dict[str, Any],
                  trace: bool) -> dict[str, Any]:
    """``config_from_onnx_model(granularity='name', backend='Vitis')`` + the file's entries."""
    config = hls4ml.utils.config.config_from_onnx_model(prepared, granularity="name",
                                                        backend="Vitis")
    for name, entry in entries.items():
        config["LayerName"].setdefault(name, {}).update(entry)
    if trace:
        for layer_cfg in config["LayerName"].values():
            layer_cfg["Trace"] = True
    return config


def _convert(hls4ml: Any, prepared: onnx.ModelProto, entries: dict[str, Any], folder: Path,
             trace: bool, log: io.StringIO) -> tuple[Any, float, float]:
    with contextlib.redirect_stdout(log):
        config = hls4ml_config(hls4ml, prepared, entries, trace)
        t0 = time.perf_counter()
        hm = hls4ml.converters.convert_from_onnx_model(
            prepared, output_dir=str(folder), io_type="io_stream", backend="Vitis",
            hls_config=config)
        t1 = time.perf_counter()
        hm.compile()
    return hm, t1 - t0, time.perf_counter() - t1


def check_hls4ml(
    model: onnx.ModelProto | str | os.PathLike[str],
    images: Any,
    output_dir: str | os.PathLike[str] | None = None,
    trace_on_mismatch: bool = True,
) -> Hls4mlReport:
    """Run hls4ml's documented flow on the file and compare its C++ emulation with qonnx on
    ``images`` (N x C x H x W, NCHW like the exported file). Raises if hls4ml is missing or the
    scales cannot be exact; returns a report (``bit_exact``) otherwise."""
    hls4ml = _require()
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    x = np.asarray(getattr(images, "numpy", lambda: images)(), dtype=np.float32)
    check_scales(model)
    t0 = time.perf_counter()
    cl = prepare(model)
    entries = config_entries(model)
    xcl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    from .qonnx import run_qonnx

    ref = run_qonnx(cl, xcl)
    t1 = time.perf_counter()
    tmp = None
    if output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ompq-hls4ml-")
        output_dir = tmp.name
    log = io.StringIO()  # hls4ml prints its whole topology: keep it off the user's stdout
    try:
        try:
            hm, t_convert, t_compile = _convert(hls4ml, cl, entries,
                                                Path(output_dir) / "hls4ml_prj", False, log)
            t3 = time.perf_counter()
            got = np.asarray(hm.predict(xcl)).reshape(ref.shape)
        except Exception as exc:  # noqa: BLE001 - hls4ml/g++ failures become one line
            tail = " | ".join(log.getvalue().strip().splitlines()[-3:])
            raise OmpqError(
                f"hls4ml could not convert/compile the graph ({type(exc).__name__}: "
                f"{str(exc)[:200]}); hls4ml said: {tail or 'nothing'}"
            ) from None
        t_predict = time.perf_counter() - t3
        diff = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
        first = None
        if diff != 0.0 and trace_on_mismatch:
            bad = int(np.argmax(np.abs(got - ref).reshape(len(ref), -1).max(axis=1)))
            traced, _, _ = _convert(hls4ml, cl, entries, Path(output_dir) / "hls4ml_trace",
                                    True, log)
            first = _first_diverging(traced, cl, xcl[bad : bad + 1])
    finally:
        if tmp is not None:
            tmp.cleanup()
    return Hls4mlReport(
        n_images=len(x), bit_exact=diff == 0.0, max_abs_diff=diff, first_diverging=first,
        seconds={"prepare": t1 - t0, "convert": t_convert, "compile": t_compile,
                 "predict": t_predict},
        output_dir=None if tmp is not None else str(output_dir))
