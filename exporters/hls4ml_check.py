"""hls4ml check (extra ``hls4ml``): convert an exported QONNX file with hls4ml, build the C++
emulation with g++ (``compile()``, no Vivado/Vitis needed) and compare its predictions with qonnx
bit for bit on real images.

Preparation of the graph (on a copy; the written file is not changed):
qonnx cleanup -> ``ConvertToChannelsLastAndClean(make_input_channels_last=True)`` ->
``GemmToMatMul`` -> cleanup -> config (``granularity='name'``, Vitis backend, ``io_stream``).

Two pitfalls found and worked around here:

* **GlobalAveragePool layout**: qonnx has no channels-last GlobalAveragePool, so it leaves
  ``Transpose(NHWC->NCHW) -> GlobalAveragePool``; hls4ml parses that pool as channels-last with
  (C, H, W) taken from the NCHW shape, and its io_stream Transpose really transposes the data,
  so the pool averages the wrong elements. We replace the pair by a channels-last
  ``AveragePool`` with kernel = stride = (H, W) (hls4ml turns it into a global pool).
* **Pool precision**: hls4ml gives the average the *input* precision ('auto'), which drops the
  fractional bits of the mean; we set the pool's accumulator / result to the exact fixed-point
  type (input bits + log2(H*W) fractional bits).

Bit-exactness needs power-of-two, per-tensor scales with zero offset (hls4ml maps those to
ap_fixed); other scales make hls4ml insert ApplyAlpha rescaling, which is not exact, so they are
refused up front with the fix (quantize with the hls4ml profile).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from ompq_plugin.errors import OmpqError

from . import verify as V

DEFAULT_PRECISION = "fixed<32,16>"


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


def _fixed(bits: int, int_bits: int, signed: bool) -> str:
    return f"{'fixed' if signed else 'ufixed'}<{bits},{int_bits}>"


def fix_global_pools(model: onnx.ModelProto) -> dict[str, dict[str, str]]:
    """Replace Transpose(0,3,1,2) -> GlobalAveragePool by a channels-last AveragePool, in place.
    Returns the hls4ml precision to set per pool layer name."""
    from qonnx.core.modelwrapper import ModelWrapper

    w = ModelWrapper(model)
    g = w.graph
    precisions: dict[str, dict[str, str]] = {}
    for gap in [n for n in g.node if n.op_type == "GlobalAveragePool"]:
        prod = w.find_producer(gap.input[0])
        if prod is None or prod.op_type != "Transpose":
            continue
        perm = next((list(a.ints) for a in prod.attribute if a.name == "perm"), None)
        if perm != [0, 3, 1, 2]:
            continue
        src = prod.input[0]
        n, h, wd, c = w.get_tensor_shape(src)
        new_out = gap.output[0] + "_cl"
        pool = helper.make_node("AveragePool", [src], [new_out], name=gap.name,
                                domain="qonnx.custom_op.channels_last",
                                kernel_shape=[h, wd], strides=[h, wd], pads=[0, 0, 0, 0])
        idx = list(g.node).index(gap)
        g.node.insert(idx, pool)
        g.node.remove(gap)
        g.value_info.append(helper.make_tensor_value_info(new_out, TensorProto.FLOAT,
                                                          [n, 1, 1, c]))
        for cons in w.find_consumers(gap.output[0]) or []:
            for i, name in enumerate(cons.input):
                if name == gap.output[0]:
                    cons.input[i] = new_out
        if not w.find_consumers(prod.output[0]):
            g.node.remove(prod)
        # exact precision of the mean of H*W values of the input quantizer's grid
        q = w.find_producer(src)
        info = V.quant_info(V.Graph(model), q) if q is not None else None
        if info is not None and info.scale is not None and np.asarray(info.scale).size == 1:
            f = -round(math.log2(float(np.asarray(info.scale).ravel()[0])))
            k = math.ceil(math.log2(h * wd))
            extra = 0 if (h * wd) == 2**k else 8  # not a power of two: not exact anyway
            signed = bool(info.signed)
            int_bits = info.bits - f
            precisions[gap.name] = {
                "accum": _fixed(info.bits + 2 * k + extra, int_bits + k, signed),
                "result": _fixed(info.bits + k + extra, int_bits, signed),
            }
    return precisions


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


def check_hls4ml(
    model: onnx.ModelProto | str | os.PathLike[str],
    images: Any,
    output_dir: str | os.PathLike[str] | None = None,
    trace_on_mismatch: bool = True,
) -> Hls4mlReport:
    """Convert with hls4ml, compile the C++ emulation, compare with qonnx on ``images``
    (N x C x H x W, NCHW like the exported file). Raises if hls4ml is missing or the scales
    cannot be exact; returns a report (``bit_exact``) otherwise."""
    hls4ml = _require()
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    x = np.asarray(getattr(images, "numpy", lambda: images)(), dtype=np.float32)
    check_scales(model)
    t0 = time.perf_counter()
    cl = prepare(model)
    xcl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    from .qonnx import run_qonnx

    ref = run_qonnx(cl, xcl)
    for_hls = copy.deepcopy(cl)
    precisions = fix_global_pools(for_hls)
    log = io.StringIO()  # hls4ml prints its whole topology: keep it off the user's stdout
    with contextlib.redirect_stdout(log):
        config = hls4ml.utils.config.config_from_onnx_model(
            for_hls, granularity="name", backend="Vitis", default_precision=DEFAULT_PRECISION)
    for name, prec in precisions.items():
        config["LayerName"].setdefault(name, {})["Precision"] = dict(prec)
    t1 = time.perf_counter()
    tmp = None
    if output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ompq-hls4ml-")
        output_dir = tmp.name
    try:
        if trace_on_mismatch:
            for layer_cfg in config["LayerName"].values():
                layer_cfg["Trace"] = True
        try:
            with contextlib.redirect_stdout(log):
                hm = hls4ml.converters.convert_from_onnx_model(
                    for_hls, output_dir=str(Path(output_dir) / "hls4ml_prj"),
                    io_type="io_stream", backend="Vitis", hls_config=config)
                t2 = time.perf_counter()
                hm.compile()
                t3 = time.perf_counter()
                got = np.asarray(hm.predict(xcl)).reshape(ref.shape)
        except Exception as exc:  # noqa: BLE001 - hls4ml/g++ failures become one line
            tail = " | ".join(log.getvalue().strip().splitlines()[-3:])
            raise OmpqError(
                f"hls4ml could not convert/compile the graph ({type(exc).__name__}: "
                f"{str(exc)[:200]}); hls4ml said: {tail or 'nothing'}"
            ) from None
        diff = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
        first = None
        if diff != 0.0 and trace_on_mismatch:
            bad = int(np.argmax(np.abs(got - ref).reshape(len(ref), -1).max(axis=1)))
            first = _first_diverging(hm, cl, xcl[bad : bad + 1])
    finally:
        if tmp is not None:
            tmp.cleanup()
    return Hls4mlReport(
        n_images=len(x), bit_exact=diff == 0.0, max_abs_diff=diff, first_diverging=first,
        seconds={"prepare": t1 - t0, "convert": t2 - t1, "compile": t3 - t2,
                 "predict": time.perf_counter() - t3},
        output_dir=None if tmp is not None else str(output_dir))
