"""onnxruntime sessions of ONNX graphs whose large initializers are handed over as arrays.

A VGG's 530 MB of weights would otherwise be serialized into the model bytes onnxruntime parses
(and, for the weights the export computes, into the model first). Here every initializer of
4 KiB or more becomes an external-data initializer without data (:func:`mark_external`) and its
value is handed to onnxruntime with ``SessionOptions.add_external_initializers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ompq_plugin.errors import OmpqError


def dataless(name: str, value: np.ndarray) -> onnx.TensorProto:
    """An initializer with ``value``'s name, type and shape and no data (see
    :func:`mark_external`)."""
    t = onnx.TensorProto(name=name)
    mark_external(t, value)
    return t


def ort_session(
    model: onnx.ModelProto,
    outputs: Sequence[str],
    arrays: dict[str, np.ndarray] | None = None,
) -> Any:
    """An onnxruntime session (graph optimisations off) whose outputs are ``outputs``.

    Initializers of 4 KiB or more (and every data-less one, whose value is in ``arrays``) are
    handed to onnxruntime as arrays (``SessionOptions.add_external_initializers``) instead of
    inside the serialized model: a VGG's 500 MB of weights are then not serialized and parsed."""
    return session_of(model, outputs, external_arrays(model, arrays or {}))


def external_arrays(
    model: onnx.ModelProto, arrays: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every initializer of ``model`` of 4 KiB or more, and every data-less one (whose value is
    in ``arrays``), made external in place (:func:`mark_external`); their values, contiguous."""
    out = {}
    for t in model.graph.initializer:
        value = arrays.get(t.name)
        if value is None:
            value = large_array(t)
        if value is not None:
            value = np.ascontiguousarray(value)
            mark_external(t, value)
            out[t.name] = value
    return out


def large_array(t: onnx.TensorProto) -> np.ndarray | None:
    """The value of an initializer of 4 KiB or more that onnxruntime can take as an array (of
    its own type: not int4, which ``to_array`` unpacks), else None."""
    if nbytes(t) < 4096:
        return None
    value = numpy_helper.to_array(t)
    return value if onnx.helper.np_dtype_to_tensor_dtype(value.dtype) == t.data_type else None


def session_of(
    model: onnx.ModelProto, outputs: Sequence[str], external: dict[str, np.ndarray]
) -> Any:
    """The session of ``model`` (its external initializers' values in ``external``, see
    :func:`external_arrays`) whose outputs are those of ``outputs`` it has; sets the model's
    graph outputs to them."""
    import onnxruntime as ort

    produced = {o for n in model.graph.node for o in n.output}
    produced |= {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    del model.graph.output[:]  # (qonnx's cleanup can leave extra outputs unconnected)
    model.graph.output.extend(onnx.ValueInfoProto(name=o) for o in outputs if o in produced)
    opts = ort.SessionOptions()
    if external:
        opts.add_external_initializers(
            list(external), [ort.OrtValue.ortvalue_from_numpy(v) for v in external.values()]
        )
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise OmpqError(f"onnxruntime cannot load the exported graph ({str(exc)[:400]})") from None
    return session


def mark_external(t: onnx.TensorProto, value: np.ndarray) -> None:
    """Make ``t`` an external-data initializer of ``value``'s type and shape, whose data
    onnxruntime then takes from ``SessionOptions.add_external_initializers`` (copied in)."""
    name = t.name
    t.Clear()
    t.name, t.data_type = name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    t.dims.extend(value.shape)
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, val in (
        ("location", "ompq-in-memory"),
        ("offset", "0"),
        ("length", str(value.nbytes)),
    ):
        t.external_data.add(key=key, value=val)


def nbytes(t: onnx.TensorProto) -> int:
    """Size of an initializer's values in bytes (0 for strings and unknown types)."""
    if t.data_type == onnx.TensorProto.STRING:
        return 0
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize
