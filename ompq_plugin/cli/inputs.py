"""Which kind of file the user passed, so a wrong kind gets a message about the kind, not about
a failed unpickling: ``ompq eval model.onnx`` evaluates it, ``ompq export model.onnx`` says that
export takes the quantized model file (.pt) and where that file comes from."""

from __future__ import annotations

import os
from pathlib import Path

from ompq_plugin.errors import OmpqError

QUANT_OPS = frozenset({"Quant", "BipolarQuant", "Trunc", "QuantizeLinear", "DequantizeLinear"})


def file_kind(path: str | os.PathLike[str]) -> str:
    """'torch' (zip or pickle), 'onnx' (by extension), or 'other'; OmpqError if missing."""
    p = Path(path)
    if not p.exists():
        raise OmpqError(f"{p} not found: check the path")
    if p.is_dir():
        raise OmpqError(f"{p} is a folder; pass a file")
    with open(p, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    return "onnx" if p.suffix.lower() == ".onnx" else "other"


def quantized_layer_count(path: str | os.PathLike[str]) -> int:
    """Number of quantization nodes (QONNX Quant, QCDQ QuantizeLinear, ...) in an ONNX file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others
        raise OmpqError(
            f"{path} ends in .onnx but is not a readable ONNX model "
            f"({type(exc).__name__}); export it again with `ompq export`"
        ) from None
    return sum(node.op_type in QUANT_OPS for node in model.graph.node)


def require_quantized_model_file(path: str | os.PathLike[str], command: str) -> None:
    """Refuse an ONNX file where a quantized model file (.pt) is needed, saying what to do."""
    if file_kind(path) != "onnx":
        return  # torch files and anything else: qmodel_io names what is wrong with them
    takes = (
        f"`ompq {command}` takes a quantized model file (.pt) written by `ompq quantize` "
        "or `ompq train`"
    )
    if quantized_layer_count(path) == 0:
        raise OmpqError(
            f"{path} is an ONNX file with no quantized layer (no Quant or QuantizeLinear node); "
            f"{takes}: run `ompq search` and `ompq quantize` on the float model first"
        )
    raise OmpqError(
        f"{path} is already an exported ONNX file; {takes}. For this file use "
        f"`ompq eval {path}` (top-1) or `ompq inspect {path}` (per-layer bits)"
    )
