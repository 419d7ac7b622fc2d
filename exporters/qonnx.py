"""Verified QONNX export of a Brevitas integer-only model, with per-layer bit annotations.

Flow of :func:`export_qonnx`:

1. Brevitas QONNX export (TorchScript path) of the model on one example image;
2. map every Conv/Gemm node to its PyTorch layer (weight initializer ``<layer>.weight``, else
   forward order + weight shape) and annotate it, its weight / bias / input ``Quant`` nodes with
   ``ompq.*`` ``metadata_props`` (and a ``doc_string``) *before* qonnx cleanup renames nodes;
3. qonnx cleanup; graph ``metadata_props``: ``ompq.bitconfig`` (BitConfig JSON), ``ompq.node_map``
   (torch name -> ONNX node names), ``ompq.verification``;
4. verify: bits read back from each layer's Quant nodes == BitConfig, and the graph executed with
   qonnx on every example image == the torch quantized model (bit-exact with power-of-two scales,
   within ``tol`` otherwise); on a mismatch an :class:`OmpqError` names the first diverging layer;
5. only then write the file (atomically: complete or absent).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from ompq_plugin.errors import OmpqError
from ompq_plugin.fileio import atomic_path, write_error, write_text_atomic
from ompq_plugin.rounding import HALF_UP, rounds_half_up

from . import targets as T
from . import verify as V
from .export_report import DEFAULT_TOL, ExportReport
from .qonnx_verify import Verification, verify_qonnx
from .torch_side import (
    as_images,
    expected_bits,
    find_bitconfig,
    forward_order,
    one_torch_thread,
    quant_layers,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ompq_plugin.bitconfig import BitConfig

# ------------------------------------------------------------------------------------------------
# graph side


def map_layers(
    model: onnx.ModelProto, qmodel: nn.Module, image: torch.Tensor
) -> dict[str, str]:
    """ONNX layer node name -> torch layer name for the freshly exported graph.

    A node whose weight initializer is named ``<module>.weight`` (TorchScript export keeps
    parameter names) maps to that module, quantized or not (e.g. a traced-through float conv);
    the remaining nodes map to the remaining quantized layers in forward order, checked by weight
    shape."""
    layers = quant_layers(qmodel)
    params = {n for n, _ in qmodel.named_parameters()} | {n for n, _ in qmodel.named_buffers()}
    g = V.Graph(model)
    nodes = [n for n in g.graph.node if V.is_weight_layer(g, n)]
    mapping: dict[str, str] = {}
    for node in nodes:
        _, wname = V.weight_quant(g, node)
        if wname and wname.endswith(".weight") and wname in params:
            mapping[node.name] = wname[: -len(".weight")]
    rest_nodes = [n for n in nodes if n.name not in mapping]
    if rest_nodes:
        done = set(mapping.values())
        rest = [n for n in forward_order(qmodel, image) if n not in done]
        if len(rest) != len(rest_nodes):
            raise OmpqError(
                f"cannot match {len(rest_nodes)} weight layers of the exported graph to "
                f"{len(rest)} quantized layers of the model; export a model without shared "
                "or unused layers"
            )
        for node, name in zip(rest_nodes, rest, strict=True):
            _, wname = V.weight_quant(g, node)
            shape = g.shape(wname) if wname else None
            want = list(layers[name].weight.shape)
            if shape is not None and sorted(shape) != sorted(want):
                raise OmpqError(
                    f"cannot match ONNX node {node.name} (weight {shape}) to layer {name} "
                    f"(weight {want}); export with the TorchScript exporter (dynamo=False)"
                )
            mapping[node.name] = name
    unmapped = [n for n in layers if n not in mapping.values()]
    if unmapped:
        raise OmpqError(f"quantized layer {unmapped[0]} is not in the exported graph; export a "
                        "model whose quantized layers all run in forward()")
    return mapping


def annotate(
    model: onnx.ModelProto, mapping: dict[str, str], expected: dict[str, V.Expected]
) -> None:
    """Write ``ompq.*`` metadata on every layer node and its weight / bias / input quantizers."""
    g = V.Graph(model)
    by_name = {n.name: n for n in g.graph.node}
    feeds: dict[str, list[str]] = {}
    for node_name, torch_name in mapping.items():
        node = by_name[node_name]
        exp = expected.get(torch_name)
        wq, _ = V.weight_quant(g, node)
        aq = V.act_quant(g, node)
        wbits = V.quant_info(g, wq).bits if wq is not None and V.quant_info(g, wq) else None
        abits = V.quant_info(g, aq).bits if aq is not None and V.quant_info(g, aq) else None
        common = dict(layer=torch_name, export_name=node.name)
        V.set_node_meta(node, role="layer", weight_bits=wbits, act_bits=abits,
                        expected_weight_bits=exp.weight_bits if exp else None,
                        expected_act_bits=exp.act_bits if exp else None, **common)
        if wq is not None:
            V.set_node_meta(wq, role="weight", bits=wbits, layer=torch_name,
                            export_name=wq.name)
        if len(node.input) > 2 and node.input[2] in g.producer:
            bq = g.producer[node.input[2]]
            info = V.quant_info(g, bq)
            V.set_node_meta(bq, role="bias", bits=info.bits if info else None,
                            layer=torch_name, export_name=bq.name)
        if aq is not None:
            feeds.setdefault(aq.name, []).append(torch_name)
    for qname, names in feeds.items():
        q = by_name[qname]
        info = V.quant_info(g, q)
        V.set_node_meta(q, role="act", bits=info.bits if info else None, feeds=",".join(names),
                        export_name=q.name)


def node_map_of(model: onnx.ModelProto) -> dict[str, dict[str, str | None]]:
    """torch name -> {node, weight_quant, act_quant} from the annotations of a (cleaned) graph."""
    out: dict[str, dict[str, str | None]] = {}
    for rb in V.read_layers(model):
        if rb.layer:
            out[rb.layer] = {"node": rb.node, "weight_quant": rb.weight_quant_node,
                             "act_quant": rb.act_quant_node}
    return out


def qonnx_cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    """qonnx's ``cleanup_model`` (same graph, in linear time: :mod:`exporters.fast_cleanup`)."""
    from .fast_cleanup import cleanup
    from .prefold import prefold_constants

    # qonnx folds one node per pass with whole-model shape inference in between: fold first
    return cleanup(prefold_constants(model))


def run_qonnx(model: onnx.ModelProto, images: np.ndarray, full: bool = False) -> Any:
    """Execute the graph with qonnx one image at a time; ``full``: the first image's context."""
    import qonnx.core.onnx_exec as oxe
    from qonnx.core.modelwrapper import ModelWrapper

    w = ModelWrapper(model)
    iname, oname = w.graph.input[0].name, w.graph.output[0].name
    if full:
        return oxe.execute_onnx(w, {iname: images[:1]}, return_full_exec_context=True)
    return np.concatenate(
        [oxe.execute_onnx(w, {iname: images[i : i + 1]})[oname] for i in range(len(images))]
    )


def run_qonnx_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Every tensor of one qonnx execution with the given graph inputs."""
    import qonnx.core.onnx_exec as oxe
    from qonnx.core.modelwrapper import ModelWrapper

    return oxe.execute_onnx(ModelWrapper(model), feeds, return_full_exec_context=True)


@contextlib.contextmanager
def _without_torchscript_lint() -> Iterator[None]:
    """torch.onnx's TorchScript exporter runs ``torch._C._jit_pass_lint`` ten times between its
    graph passes: an internal consistency check of torch's own passes, which changes nothing in
    the graph and costs more than linearly in its size (DenseNet-121 at 64x64: the export took
    143 CPU seconds with it, 125 without, one run each on a busy machine). It is skipped for
    the duration of our export call only (the exported graph is then verified end to end
    against the torch model)."""
    import torch

    original = getattr(torch._C, "_jit_pass_lint", None)
    if original is None:
        yield
        return
    torch._C._jit_pass_lint = lambda graph: None
    try:
        yield
    finally:
        torch._C._jit_pass_lint = original


def brevitas_export(fn: Callable[..., Any], qmodel: nn.Module, image: torch.Tensor,
                    path: Path | None = None, **options: Any) -> onnx.ModelProto:
    """Brevitas TorchScript-path export; ``options`` go to ``torch.onnx.export``. Without
    ``path`` in memory (``export_path=None``: the QONNX manager returns the model it would have
    saved, no file is written and read back; Brevitas's QCDQ manager returns nothing and needs
    a ``path``)."""
    try:
        with warnings.catch_warnings(), _without_torchscript_lint(), one_torch_thread():
            warnings.simplefilter("ignore")
            model = fn(qmodel, args=image, export_path=None if path is None else str(path),
                       dynamo=False, **options)
    except OmpqError:
        raise
    except OSError as exc:  # disk full or a file-size limit while writing the raw graph
        if path is None:
            raise
        raise write_error(path, exc) from None
    except Exception as exc:  # Brevitas / torch.onnx raise many types
        raise OmpqError(
            f"Brevitas export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "export a model built by `ompq quantize` (Brevitas layers, calibrated)"
        ) from None
    if path is not None:
        return onnx.load(str(path))
    if not isinstance(model, onnx.ModelProto):
        raise OmpqError(f"Brevitas export returned no model ({fn.__name__}); report this bug")
    return model


def write_metadata(model: onnx.ModelProto, fmt: str, bits: BitConfig | None,
                   ver: Verification) -> dict[str, str]:
    node_map = node_map_of(model)
    meta = {
        "ompq.format": fmt,
        "ompq.node_map": json.dumps(node_map, sort_keys=True),
        "ompq.verification": json.dumps(ver.report_fields()),
    }
    if bits is not None:
        meta["ompq.bitconfig"] = json.dumps(bits.to_json(), sort_keys=True)
    V.set_model_meta(model, meta)
    return {k: v["node"] or "" for k, v in node_map.items()}


def hls4ml_config_path(path: str | os.PathLike[str]) -> Path:
    """``model.onnx`` -> ``model.hls4ml.json`` (the hls4ml config entries written beside it)."""
    p = Path(path)
    return p.with_name(p.stem + ".hls4ml.json")


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike[str],
                serialized: bytes | None = None) -> Path:
    """Write ``model`` atomically; ``serialized``: its ``SerializeToString()`` already made (the
    bytes ``onnx.save`` writes for a model without external data)."""
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_bytes(model.SerializeToString() if serialized is None else serialized)
    return target


# ------------------------------------------------------------------------------------------------
# public API


def export_qonnx(
    qmodel: nn.Module,
    path: str | os.PathLike[str],
    example_input: Any,
    bits: BitConfig | None = None,
    *,
    tol: float = DEFAULT_TOL,
    exact: bool | None = None,
    target: str | None = None,
) -> ExportReport:
    """Export ``qmodel`` to QONNX at ``path``, verified on ``example_input`` (N real images)
    before the file is written. ``bits`` defaults to the model's attached BitConfig if any.

    ``target`` (``generic`` / ``hls4ml`` / ``finn``; default: the BitConfig's profile) shapes the
    graph so that compiler's documented flow takes it unchanged (:mod:`exporters.targets`); for
    ``hls4ml`` the hls4ml config entries it needs are written beside it as ``<stem>.hls4ml.json``.
    """
    t0 = time.perf_counter()
    images = as_images(example_input, qmodel)
    was_training = qmodel.training
    qmodel.eval()
    bits = find_bitconfig(qmodel, bits)
    try:
        expected = expected_bits(qmodel, bits)
        from brevitas.export import export_qonnx as brevitas_qonnx

        raw = brevitas_export(brevitas_qonnx, qmodel, images[:1])
        t_export = time.perf_counter()
        annotate(raw, map_layers(raw, qmodel, images[:1]), expected)
        T.name_global_pools(raw)
        target = target or T.target_for_profile(bits.profile if bits is not None else None)
        if target not in T.TARGETS:
            raise OmpqError(f"unknown export target {target!r}; use one of "
                            f"{', '.join(T.TARGETS)}")
        model = qonnx_cleanup(raw)
        prepared = T.prepare_for_target(model, target)
        if rounds_half_up(qmodel):  # an attribute change: needs no cleanup
            prepared["act_rounding"] = HALF_UP
            prepared["act_quants_half_up"] = T.set_act_rounding(model, HALF_UP)
        # shapes and names for nodes the target step added (a 0-d bias scale made (1,) needs
        # none, and a second cleanup costs as much as the first on a torchvision-size model)
        quiet = ("target", "bias_params_vectorised", "act_rounding", "act_quants_half_up")
        if any(v for k, v in prepared.items() if k not in quiet):
            model = qonnx_cleanup(model)
        counted = {lb.name: lb.params for lb in bits.fixed_layers} if bits is not None else {}
        pools = T.pool_convs(model, counted)
        t_clean = time.perf_counter()
        ver = verify_qonnx(model, qmodel, images, bits, tol=tol, exact=exact)
        t_verify = time.perf_counter()
        node_map = write_metadata(model, "qonnx", bits, ver)
        hls_config = T.hls4ml_config(model) if target == "hls4ml" else None
        V.set_model_meta(model, {"ompq.target": json.dumps(prepared)} | (
            {"ompq.hls4ml_config": json.dumps(hls_config)} if hls_config is not None else {}))
        # the annotations must survive a save / load round trip before the file counts
        serialized = model.SerializeToString()  # (once: a VGG's is 530 MB)
        reloaded = onnx.load_from_string(serialized)
        if V.model_meta(reloaded).get("ompq.node_map") != V.model_meta(model)["ompq.node_map"]:
            raise OmpqError("annotations did not survive serialisation; report this bug")
        written = save_atomic(model, path, serialized)
        config_path = None
        if hls_config is not None:
            config_path = hls4ml_config_path(path)
            write_text_atomic(config_path, json.dumps({"LayerName": hls_config}, indent=2) + "\n")
    finally:
        qmodel.train(was_training)
    return ExportReport(
        path=written, format="qonnx", layers=ver.layers, node_map=node_map,
        target=target, hls4ml_config=config_path, pool_convs=pools,
        runtime=ver.runtime, verified=True, **ver.report_fields(),
        seconds={"export": t_export - t0, "cleanup": t_clean - t_export,
                 "verify": t_verify - t_clean, "total": time.perf_counter() - t0},
    )
