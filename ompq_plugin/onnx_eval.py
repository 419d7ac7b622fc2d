"""Top-1 accuracy of an exported ONNX classifier on CIFAR-10 images.

QCDQ and plain ONNX graphs run in onnxruntime; QONNX graphs (Quant / BipolarQuant / Trunc
nodes, which onnxruntime does not know) run in qonnx's executor. Both run batches: the graph's
fixed batch dimension (1 in our exports) is made symbolic (onnxruntime) or the batch size (qonnx,
whose executor needs every shape). The normalisation comes from the file's ``ompq.norm``
metadata if present, else the input record of its ``ompq.bitconfig``, else the registry model
named there, else the CIFAR ResNets' ImageNet mean/std, and is reported with the result.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ompq_plugin.errors import OmpqError

QONNX_OPS = frozenset({"Quant", "BipolarQuant", "Trunc", "FloatQuant", "MultiThreshold"})


@dataclass(frozen=True)
class OnnxAccuracy:
    top1: float
    images: int
    runtime: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    norm_source: str


def _load(path: str | os.PathLike[str]) -> Any:
    import onnx

    if not os.path.isfile(path):
        raise OmpqError(f"ONNX file {path} not found: check the path")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise many types
        raise OmpqError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}); export "
            "it again with `ompq export`"
        ) from None


def _norm_of(model: Any) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    from ompq_plugin.models import CIFAR_IMAGENET_MEAN, CIFAR_IMAGENET_STD, MODELS

    meta = {p.key: p.value for p in model.metadata_props}
    if "ompq.norm" in meta:
        mean, std = json.loads(meta["ompq.norm"])
        return tuple(mean), tuple(std), "the file's ompq.norm"
    bitconfig = json.loads(meta.get("ompq.bitconfig", "{}"))
    record = bitconfig.get("input")
    if record:  # what the search recorded (and quantize / export reused)
        return tuple(record["mean"]), tuple(record["std"]), "the input recorded in the file"
    name = bitconfig.get("model")
    if name in MODELS:
        return MODELS[name].mean, MODELS[name].std, f"model {name}"
    return CIFAR_IMAGENET_MEAN, CIFAR_IMAGENET_STD, "default ImageNet mean/std"


def _batched(model: Any, batch: int | None) -> Any:
    """A copy whose batch dimension is ``batch`` (None: symbolic), inner shapes re-inferred."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            if batch is None:
                dims[0].dim_param = "N"
            else:
                dims[0].dim_value = batch
    del model.graph.value_info[:]
    if batch is not None:  # qonnx's executor needs every shape
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.transformation.infer_shapes import InferShapes

        model = ModelWrapper(model).transform(InferShapes()).model
    return model


def _image_layout(model: Any, path: str | os.PathLike[str]) -> bool:
    """True for NHWC input; refuses inputs that are not 3 x 32 x 32 images."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim] if inputs else []
    if len(inputs) == 1 and dims[1:] == [3, 32, 32]:
        return False
    if len(inputs) == 1 and dims[1:] == [32, 32, 3]:
        return True
    raise OmpqError(
        f"{path} takes input {dims or 'of unknown shape'}; `ompq eval` measures "
        "CIFAR-10 classifiers (one N x 3 x 32 x 32 input): evaluate this model with "
        "its own data and onnxruntime / qonnx"
    )


def _runner(model: Any, qonnx: bool) -> Any:
    if qonnx:
        import qonnx.core.onnx_exec as oxe
        from qonnx.core.modelwrapper import ModelWrapper

        wrapper = ModelWrapper(model)
        iname, oname = wrapper.graph.input[0].name, wrapper.graph.output[0].name
        return lambda x: oxe.execute_onnx(wrapper, {iname: x})[oname]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise OmpqError(
            f"onnxruntime cannot load the graph ({str(exc)[:160]}); check it with `ompq inspect`"
        ) from None
    iname = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {iname: x})[0]


def evaluate_onnx(
    path: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray, batch_size: int = 128
) -> OnnxAccuracy:
    """Top-1 (%) of the ONNX classifier at ``path`` on uint8 NCHW ``images``."""
    model = _load(path)
    nhwc = _image_layout(model, path)
    qonnx = any(node.op_type in QONNX_OPS for node in model.graph.node)
    mean, std, source = _norm_of(model)
    run = _runner(_batched(model, batch_size if qonnx else None), qonnx)
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = (np.asarray(images[start : start + batch_size], dtype=np.float32) / 255.0 - m) / s
        if nhwc:
            x = x.transpose(0, 2, 3, 1)
        n = len(x)
        if qonnx and n < batch_size:  # the graph's batch is fixed: pad the last batch
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
        try:
            logits = np.asarray(run(np.ascontiguousarray(x, dtype=np.float32)))[:n]
        except OmpqError:
            raise
        except Exception as exc:  # noqa: BLE001 - the runtimes raise many types
            raise OmpqError(
                f"running {path} failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160]}); check it with `ompq inspect`"
            ) from None
        predicted = logits.reshape(n, -1).argmax(1)
        correct += int((predicted == np.asarray(labels[start : start + batch_size])).sum())
    return OnnxAccuracy(
        100.0 * correct / max(len(labels), 1),
        len(labels),
        "qonnx" if qonnx else "onnxruntime",
        tuple(mean),
        tuple(std),
        source,
    )
