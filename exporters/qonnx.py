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
import copy
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from ompq_plugin.errors import OmpqError
from ompq_plugin.fileio import atomic_path, write_error, write_text_atomic
from ompq_plugin.rounding import HALF_UP, rounds_half_up

from . import forced_check as F
from . import graph_session as GS
from . import targets as T
from . import verify as V

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ompq_plugin.bitconfig import BitConfig

DEFAULT_TOL = 1e-5


@dataclass
class LayerExport:
    """One quantized layer in the written file."""

    name: str  # PyTorch module name
    node: str  # ONNX node (Conv / Gemm / MatMul) in the written file
    op: str
    weight_bits: int | None  # read back from the file
    act_bits: int | None  # read back from the file (input activation)
    expected_weight_bits: int | None
    expected_act_bits: int | None
    source: str  # where the expectation came from: "BitConfig" or "model"
    weight_quant_node: str | None = None
    act_quant_node: str | None = None


@dataclass
class ExportReport:
    """What was written and how it was verified."""

    path: Path
    format: str  # "qonnx" or "qcdq"
    layers: list[LayerExport]
    node_map: dict[str, str]  # torch layer name -> ONNX node name in the written file
    n_images: int
    max_abs_diff: float
    exact: bool  # True: outputs had to be bit-identical (power-of-two scales)
    tolerance: float
    runtime: str  # "qonnx" or "onnxruntime"
    verified: bool
    seconds: dict[str, float] = field(default_factory=dict)
    hls4ml: Any = None  # exporters.hls4ml_check.Hls4mlReport when the check ran
    # float scales: one-LSB rounding-boundary flips accepted by the layer-by-layer check
    boundary_flips: int = 0
    flip_layers: list[str] = field(default_factory=list)
    forced_images: int = 0  # images checked layer by layer from torch's inputs
    max_forced_diff: float = 0.0  # largest other |diff| in that check
    top1_agree: int | None = None  # images whose top-1 class is the same in torch and the graph
    target: str = "generic"  # the compiler the graph was shaped for (exporters.targets)
    hls4ml_config: Path | None = None  # hls4ml config entries written beside the file

    @property
    def bits(self) -> dict[str, tuple[int | None, int | None]]:
        """Per layer (weight bits, act bits) as read back from the file."""
        return {lx.name: (lx.weight_bits, lx.act_bits) for lx in self.layers}

    def summary(self) -> str:
        lines = [
            f"wrote {self.path} ({self.format}, {len(self.layers)} quantized layers)",
            f"verified with {self.runtime} on {self.n_images} images against torch: "
            f"{self._criterion()}: {'PASS' if self.verified else 'FAIL'}",
            f"bits read back from the file match the {self._sources()} for every layer",
        ]
        if self.hls4ml_config is not None:
            lines.append(f"wrote {self.hls4ml_config} (hls4ml config entries for this file; "
                         "see README: hls4ml)")
        if self.hls4ml is not None:
            lines.append(self.hls4ml.summary())
        return "\n".join(lines)

    def _criterion(self) -> str:
        diff = f"max |diff| = {self.max_abs_diff:.3g}"
        top1 = (f"; top-1 identical on {self.top1_agree}/{self.n_images} images"
                if self.top1_agree is not None else "")
        if self.exact:
            return f"{diff} (bit-exact){top1}"
        if not self.forced_images:
            return f"{diff} (tolerance {self.tolerance:g}){top1}"
        n, k = self.boundary_flips, len(self.flip_layers)
        flips = (f" except {n} rounding-boundary flip{'s' if n != 1 else ''} (1 LSB) after "
                 f"{k} layer{'s' if k != 1 else ''} ({', '.join(self.flip_layers)})" if n else "")
        return (f"{diff} end to end; each layer computed from torch's own inputs agrees within "
                f"{self.tolerance:g} (max {self.max_forced_diff:.3g}){flips}{top1}")

    def _sources(self) -> str:
        return " / ".join(sorted({lx.source for lx in self.layers})) or "model"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["hls4ml_config"] = str(self.hls4ml_config) if self.hls4ml_config else None
        data["hls4ml"] = self.hls4ml.to_json() if self.hls4ml is not None else None
        return data


# ------------------------------------------------------------------------------------------------
# torch side: which layers, which bits


def quant_layers(qmodel: nn.Module) -> dict[str, nn.Module]:
    """Name -> Brevitas weight layer (QuantConv*/QuantLinear), in module order."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    return {n: m for n, m in qmodel.named_modules()
            if isinstance(m, QuantWeightBiasInputOutputLayer)}


def module_weight_bits(module: nn.Module) -> int:
    return int(round(float(module.weight_quant.bit_width())))


def find_bitconfig(qmodel: nn.Module, bits: BitConfig | None) -> BitConfig | None:
    if bits is not None:
        return bits
    for attr in ("ompq_bitconfig", "bitconfig", "bit_config"):
        found = getattr(qmodel, attr, None)
        if found is not None and hasattr(found, "layers"):
            return found
    return None


def expected_bits(qmodel: nn.Module, bits: BitConfig | None) -> dict[str, V.Expected]:
    """Per torch layer the bits the file must carry: the BitConfig's where it names the layer,
    else the module's own weight quantizer (e.g. the fixed shortcut convs)."""
    layers = quant_layers(qmodel)
    if not layers:
        raise OmpqError("the model has no Brevitas quantized layers: run `ompq quantize` first")
    expected = {n: V.Expected(module_weight_bits(m), None, "model") for n, m in layers.items()}
    if bits is not None:
        for lb in bits.layers:
            expected[lb.name] = V.Expected(lb.weight_bits, lb.act_bits, "BitConfig")
    return expected


def forward_order(qmodel: nn.Module, image: torch.Tensor) -> list[str]:
    """Quantized layers in the order the forward pass calls them."""
    order: list[str] = []
    V.forward_with_hooks(qmodel, image, [
        (m, lambda *_a, n=n: order.append(n)) for n, m in quant_layers(qmodel).items()
    ])
    return order


def as_images(example_input: Any, qmodel: nn.Module | None = None) -> torch.Tensor:
    """The example input as a float batch; a single 3-D image (C x H x W) gets a batch dimension
    only for a model whose first layer is a 2-D convolution (3-D input of a Conv1d model is
    already N x C x L)."""
    import torch

    x = example_input
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise OmpqError("example_input must be a tensor of images (N x C x H x W)")
    first = next(iter(quant_layers(qmodel).values()), None) if qmodel is not None else None
    if x.dim() == 3 and (first is None or type(first).__name__ == "QuantConv2d"):
        x = x.unsqueeze(0)
    if x.shape[0] == 0:
        raise OmpqError("example_input is empty: pass a few real images (N x C x H x W)")
    return x.float()


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
    the graph and is quadratic in its size (DenseNet-121 at 64x64: about 90 of the export's 143
    CPU seconds; bench/results/export_speed.json). It is skipped for the duration of our export
    call only (the exported graph is then verified end to end against the torch model)."""
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
                    path: Path, **options: Any) -> onnx.ModelProto:
    """Brevitas TorchScript-path export; ``options`` go to ``torch.onnx.export``."""
    try:
        with warnings.catch_warnings(), _without_torchscript_lint():
            warnings.simplefilter("ignore")
            fn(qmodel, args=image, export_path=str(path), dynamo=False, **options)
    except OmpqError:
        raise
    except OSError as exc:  # disk full or a file-size limit while writing the raw graph
        raise write_error(path, exc) from None
    except Exception as exc:  # Brevitas / torch.onnx raise many types
        raise OmpqError(
            f"Brevitas export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "export a model built by `ompq quantize` (Brevitas layers, calibrated)"
        ) from None
    return onnx.load(str(path))


# ------------------------------------------------------------------------------------------------
# verification (shared by the export and usable on any graph, e.g. a tampered one)


@dataclass
class Verification:
    layers: list[LayerExport]
    max_abs_diff: float
    exact: bool
    tolerance: float
    n_images: int
    boundary_flips: int = 0
    flip_layers: list[str] = field(default_factory=list)
    forced_images: int = 0
    max_forced_diff: float = 0.0
    top1_agree: int | None = None
    runtime: str = "onnxruntime"  # what executed the graph (see graph_session.GraphSession)

    def report_fields(self) -> dict[str, Any]:
        """The figures ExportReport carries."""
        return dict(n_images=self.n_images, max_abs_diff=self.max_abs_diff, exact=self.exact,
                    tolerance=self.tolerance, boundary_flips=self.boundary_flips,
                    flip_layers=list(self.flip_layers), forced_images=self.forced_images,
                    max_forced_diff=self.max_forced_diff, top1_agree=self.top1_agree)


def verify_qonnx(
    model: onnx.ModelProto,
    qmodel: nn.Module,
    example_input: Any,
    bits: BitConfig | None = None,
    tol: float = DEFAULT_TOL,
    exact: bool | None = None,
    session_factory: Callable[[onnx.ModelProto], Any] = GS.GraphSession,
) -> Verification:
    """Check an exported, annotated graph against the torch model; raise naming the first
    diverging layer. ``exact`` None: bit-exact iff every scale is a power of two.

    Power-of-two scales: the outputs must be bit-identical. Float scales: every image is checked
    layer by layer from torch's own inputs (every activation
    quantizer's output replaced by torch's, see :func:`forced_check.teacher_forced_check`), which
    accepts only isolated exact one-LSB flips of values on a rounding boundary (float
    accumulation order) and within ``tol`` everywhere else.

    The graph runs in one onnxruntime session (:class:`graph_session.GraphSession`: QONNX ops
    lowered to the standard ops computing the same values); torch runs the images as one batch,
    and an image that disagrees is checked again from a one-image torch pass (as the graph runs)
    before anything is refused."""
    images = as_images(example_input, qmodel)
    qmodel.eval()
    bits = find_bitconfig(qmodel, bits)
    expected = expected_bits(qmodel, bits)
    readback = V.read_layers(model)
    names = {rb.node: rb.layer for rb in readback if rb.layer}
    if not names:
        raise OmpqError("the graph carries no ompq layer annotations: export it with ompq export")
    V.check_bits(readback, names, expected)
    if exact is None:
        exact = V.all_scales_power_of_two(model)
    x = images.detach().cpu().numpy().astype(np.float32)
    n = len(x)
    sessions = GS.Sessions(model, session_factory)
    iname, oname = model.graph.input[0].name, model.graph.output[0].name
    if exact:
        ref, calls = V.torch_outputs(qmodel, images, batch=n), []
    else:  # outputs and every quantizer's values from one batched pass
        ref, calls = F.torch_outputs_and_act_calls(qmodel, images)
    stats = F.FlipCheck()
    outs = []
    for i in range(n):
        feeds = {iname: x[i : i + 1]}
        ctx = sessions.plain.run(feeds)
        got_i = np.asarray(ctx[oname]).reshape(ref[i : i + 1].shape)
        if exact and not V.within(V.compare(ref[i : i + 1], got_i), exact, tol):
            ref[i : i + 1] = V.torch_outputs(qmodel, images[i : i + 1])  # as the graph runs
        if not exact:
            # float scales: every image layer by layer from torch's own inputs, which tells
            # rounding-boundary flips from export bugs (even bugs that the logits happen to hide)
            trial = copy.deepcopy(stats)
            try:
                F.teacher_forced_check(model, calls[i], ref[i : i + 1], ctx, sessions, feeds,
                                       tol, trial)
            except OmpqError:  # again from a one-image torch pass before refusing
                one = images[i : i + 1]
                ref[i : i + 1] = V.torch_outputs(qmodel, one)
                trial = copy.deepcopy(stats)
                F.teacher_forced_check(model, F.torch_act_calls(qmodel, one), ref[i : i + 1],
                                       ctx, sessions, feeds, tol, trial)
            stats = trial
        outs.append(got_i)
        del ctx
    got = np.concatenate(outs)
    diff = V.compare(ref, got)
    top1 = None
    if ref.ndim == 2 and ref.shape[1] > 1:
        top1 = int((ref.argmax(axis=1) == got.argmax(axis=1)).sum())
    if exact and not V.within(diff, exact, tol):
        per_image = np.abs(ref.reshape(n, -1) - got.reshape(n, -1)).max(axis=1)
        bad = int(np.argmax(per_image > (0 if exact else tol)))
        ctx = sessions.plain.run({iname: x[bad : bad + 1]})
        order = [(rb.layer, _layer_output(model, rb.node)) for rb in readback if rb.layer]
        torch_out = V.torch_layer_outputs(qmodel, images[bad : bad + 1], [n for n, _ in order])
        first = V.first_diverging_layer(order, torch_out, ctx, exact, tol)
        where = (f"first diverging layer {first[0]} (max |diff| {first[1]:.3g})" if first
                 else "the layers agree, the difference is after the last layer")
        crit = "bit-exact" if exact else f"within {tol:g}"
        raise OmpqError(
            f"{sessions.plain.engine} output differs from torch on image {bad} (max |diff| "
            f"{diff:.3g}, required {crit}): {where}; re-export from the same quantized model"
        )
    layers = []
    for rb in readback:
        if not rb.layer:
            continue
        exp = expected.get(rb.layer)
        layers.append(LayerExport(
            name=rb.layer, node=rb.node, op=rb.op, weight_bits=rb.weight_bits,
            act_bits=rb.act_bits, expected_weight_bits=exp.weight_bits if exp else None,
            expected_act_bits=exp.act_bits if exp else None,
            source=exp.source if exp else "model", weight_quant_node=rb.weight_quant_node,
            act_quant_node=rb.act_quant_node))
    order = [rb.layer for rb in readback if rb.layer]
    flip_layers = sorted(stats.layers, key=lambda n: order.index(n) if n in order else len(order))
    return Verification(layers, diff, exact, tol, n, boundary_flips=stats.flips,
                        flip_layers=flip_layers, forced_images=stats.n_images,
                        max_forced_diff=stats.max_forced_diff, top1_agree=top1,
                        runtime=sessions.plain.engine)


def _layer_output(model: onnx.ModelProto, node_name: str) -> str:
    """Output tensor of a layer node; for MatMul + bias Add, the Add's output."""
    g = V.Graph(model)
    node = next(n for n in g.graph.node if n.name == node_name)
    out = node.output[0]
    if node.op_type == "MatMul":
        adds = [c for c in g.consumers.get(out, []) if c.op_type == "Add"]
        if len(adds) == 1:
            return adds[0].output[0]
    return out


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


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    with atomic_path(target) as tmp:
        onnx.save(model, str(tmp))
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
        with tempfile.TemporaryDirectory(prefix="ompq-export-") as tmp:
            from brevitas.export import export_qonnx as brevitas_qonnx

            raw = brevitas_export(brevitas_qonnx, qmodel, images[:1], Path(tmp) / "raw.onnx")
        t_export = time.perf_counter()
        annotate(raw, map_layers(raw, qmodel, images[:1]), expected)
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
        t_clean = time.perf_counter()
        ver = verify_qonnx(model, qmodel, images, bits, tol=tol, exact=exact)
        t_verify = time.perf_counter()
        node_map = write_metadata(model, "qonnx", bits, ver)
        hls_config = T.hls4ml_config(model) if target == "hls4ml" else None
        V.set_model_meta(model, {"ompq.target": json.dumps(prepared)} | (
            {"ompq.hls4ml_config": json.dumps(hls_config)} if hls_config is not None else {}))
        # the annotations must survive a save / load round trip before the file counts
        reloaded = onnx.load_from_string(model.SerializeToString())
        if V.model_meta(reloaded).get("ompq.node_map") != V.model_meta(model)["ompq.node_map"]:
            raise OmpqError("annotations did not survive serialisation; report this bug")
        written = save_atomic(model, path)
        config_path = None
        if hls_config is not None:
            config_path = hls4ml_config_path(path)
            write_text_atomic(config_path, json.dumps({"LayerName": hls_config}, indent=2) + "\n")
    finally:
        qmodel.train(was_training)
    return ExportReport(
        path=written, format="qonnx", layers=ver.layers, node_map=node_map,
        target=target, hls4ml_config=config_path,
        runtime=ver.runtime, verified=True, **ver.report_fields(),
        seconds={"export": t_export - t0, "cleanup": t_clean - t_export,
                 "verify": t_verify - t_clean, "total": time.perf_counter() - t0},
    )
