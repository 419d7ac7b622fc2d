"""Float model + BitConfig + HardwareProfile -> integer-only Brevitas model.

The conversion works on the torch.fx graph of *any* traceable model (no per-architecture code):

1. deep-copy the float model (it is never modified) and switch it to eval mode;
2. replace option-A ``ShortcutA`` modules (subsample + zero channel pad) by an exactly equivalent
   frozen 1x1 stride-2 convolution with 0/1 weights, so the graph exports without Slice or Pad;
3. trace with torch.fx and fold every BatchNorm into the Conv/Linear that feeds it; a
   BatchNorm that follows no layer (pre-activation, DenseNet) and every LayerNorm / GroupNorm
   stay float ops (listed in ``ompq_report.float_ops``), as do parameters used elementwise
   (a layer scale); ``F.avg_pool2d`` keyword calls and non-dividing adaptive pools are
   rewritten (see :mod:`ompq_plugin.graph_ops`);
4. replace Conv1d / Conv2d (grouped and depthwise included) / Linear by QuantConv1d /
   QuantConv2d / QuantLinear with the BitConfig's weight bits and a 32-bit bias quantizer
   (bias scale = input scale x weight scale, so inference is integer-only);
5. insert activation quantizers (QuantIdentity, returning QuantTensors): on the model input, after
   every ReLU / ReLU6 (module, function or method), after any other tensor a quantized layer reads,
   and ONE shared quantizer on both inputs of every residual add and on every input of each
   ``torch.cat`` (same instance, so all operands have the same scale; a concatenation is then on
   that grid and gets no quantizer of its own). A quantizer's bits are the ``act_bits`` of the
   layers that read its tensor, found by walking forward through pooling / flatten / reshape /
   dropout / zero-pad.

Scales are powers of two (fixed-point quantizers) when ``profile.power_of_two_scales``, float
otherwise; weights are per output channel when ``profile.per_channel_weights``. With
``profile.act_rounding == "half-up"`` (FINN) activation quantizers round ties up and a layer output
read by a signed quantizer gets a quarter-LSB offset that keeps it off ties
(:mod:`ompq_plugin.rounding`). Activation scales
are initialised from statistics: run :func:`ompq_plugin.ptq.calibrate` before using the model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import fx, nn

from ompq_plugin.bitconfig import BitConfig
from ompq_plugin.errors import OmpqError
from ompq_plugin.fixed_layers import shortcut_weight_bits
from ompq_plugin.graph_ops import (
    FLOAT_MODULES,
    dequant,
    float_parameters,
    is_cat,
    normalise_avg_pool,
    replace_adaptive_pools,
)
from ompq_plugin.hw_profiles.profile import HardwareProfile
from ompq_plugin.quant_graph import (  # noqa: F401 - FOLDABLE_NORMS, SUPPORTED_LAYERS, FixedShortcutConv re-exported
    FOLDABLE_NORMS,
    SUPPORTED_LAYERS,
    FixedShortcutConv,
    fold_batchnorms,
    is_leaf_type,
    is_non_tensor_use,
    is_relu,
    is_residual_add,
    module_of,
    owner_path,
    set_submodule,
    source_of,
    trace_model,
    unique_name,
)
from ompq_plugin.quantize_report import QuantizeReport
from ompq_plugin.rounding import TieOffset, half_up

# Tensor methods a Brevitas QuantTensor has; any other method gets a plain tensor (see _dequant).
_QUANT_TENSOR_METHODS = {
    "view", "reshape", "flatten", "transpose", "permute", "size", "dim", "contiguous", "detach",
    "to", "cpu", "cuda", "relu", "relu_", "add", "add_",
}


# --------------------------------------------------------------------------------------------
# quantizer choice


def _quantizers(profile: HardwareProfile) -> dict[str, type]:
    from brevitas.inject.enum import ScalingImplType
    from brevitas.quant import (
        Int8ActPerTensorFixedPoint,
        Int8ActPerTensorFloat,
        Int8WeightPerChannelFloat,
        Int8WeightPerTensorFixedPoint,
        Int8WeightPerTensorFloat,
        Int32Bias,
        Uint8ActPerTensorFixedPoint,
        Uint8ActPerTensorFloat,
    )
    from brevitas.quant.fixed_point import Int8WeightPerChannelFixedPoint

    # Weight scales are parameters initialised from the weights' max (not recomputed from the
    # weights at every call): GPTQ quantizes column slices, and a statistics-based scale would be
    # recomputed from each slice (zero error, so GPTQ would do nothing); QAT also learns them.
    def param(q: type) -> type:
        return q.let(scaling_impl_type=ScalingImplType.PARAMETER_FROM_STATS)

    # the frozen 0/1 shortcut convs: constant scale 1 (= 2^0), exact at any width >= 2
    shortcut = Int8WeightPerTensorFloat.let(
        scaling_impl_type=ScalingImplType.CONST, scaling_const=1.0
    )

    if profile.power_of_two_scales:
        return {
            "weight": param(Int8WeightPerChannelFixedPoint)
            if profile.per_channel_weights
            else param(Int8WeightPerTensorFixedPoint),
            "weight_fixed": shortcut,
            "act_signed": Int8ActPerTensorFixedPoint,
            "act_unsigned": Uint8ActPerTensorFixedPoint,
            "bias": Int32Bias,
        }
    return {
        "weight": param(Int8WeightPerChannelFloat)
        if profile.per_channel_weights
        else param(Int8WeightPerTensorFloat),
        "weight_fixed": shortcut,
        "act_signed": Int8ActPerTensorFloat,
        "act_unsigned": Uint8ActPerTensorFloat,
        "bias": Int32Bias,
    }


def _act_quantizer(quants: dict[str, type], bits: int, signed: bool) -> nn.Module:
    from brevitas.nn import QuantIdentity

    act_quant = quants["act_signed" if signed else "act_unsigned"]
    return QuantIdentity(act_quant=act_quant, bit_width=bits, return_quant_tensor=True)


def _tie_offset(gm: fx.GraphModule, node: fx.Node, fixed: set[str]) -> fx.Node:
    """Insert a :class:`TieOffset` after the output of quantized layer ``node`` (with a bias,
    not a fixed shortcut conv) and return it; anything else is returned as it is."""
    layer = module_of(gm, node)
    if layer is None or str(node.target) in fixed or getattr(layer, "bias", None) is None:
        return node
    if not hasattr(layer, "return_quant_tensor"):
        return node
    layer.return_quant_tensor = True  # TieOffset reads the accumulator scale, returns a tensor
    name = unique_name(gm, f"{node.target}_tie_offset")
    gm.add_submodule(name, TieOffset())
    with gm.graph.inserting_after(node):
        offset = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(offset, delete_user_cb=lambda user: user is not offset)
    return offset


def _quant_layer(module: nn.Module, bits: int, quants: dict[str, type], fixed: bool) -> nn.Module:
    from brevitas.nn import QuantConv1d, QuantConv2d, QuantLinear

    weight_quant = quants["weight_fixed" if fixed else "weight"]
    common = dict(
        bias=module.bias is not None,
        weight_quant=weight_quant,
        weight_bit_width=bits,
        bias_quant=quants["bias"],
        return_quant_tensor=False,
    )
    if isinstance(module, nn.Linear):
        q: nn.Module = QuantLinear(module.in_features, module.out_features, **common)
    else:
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantConv1d
        if module.padding_mode != "zeros":
            raise OmpqError(
                f"padding_mode={module.padding_mode!r} is not supported; use zero padding"
            )
        q = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            **common,
        )
    with torch.no_grad():
        q.weight.copy_(module.weight)
        if module.bias is not None:
            q.bias.copy_(module.bias)
    if fixed:
        q.weight.requires_grad_(False)
    q.train(False)
    return q


# --------------------------------------------------------------------------------------------
# steps


def check_supported(model: nn.Module) -> None:
    """Raise OmpqError naming the first layer that quantize() cannot convert."""
    for name, module in model.named_modules():
        if isinstance(module, FLOAT_MODULES):
            continue
        if isinstance(module, SUPPORTED_LAYERS + FOLDABLE_NORMS + (FixedShortcutConv,)):
            if isinstance(module, nn.Conv2d | nn.Conv1d) and module.padding_mode != "zeros":
                raise OmpqError(
                    f"layer {name} ({type(module).__name__}) uses padding_mode="
                    f"{module.padding_mode!r}; only zero padding can be quantized"
                )
            continue
        if type(module).__name__ == "ShortcutA":
            continue
        # a module holding parameters of its own is checked on the traced graph (elementwise
        # uses stay float, weight-like uses are refused: graph_ops.float_parameters)
        own_params = any(True for _ in module.parameters(recurse=False))
        if (is_leaf_type(module) and own_params) or isinstance(
            module, nn.RNNBase | nn.MultiheadAttention | nn.modules.conv._ConvTransposeNd
        ):
            raise OmpqError(
                f"layer {name or '<root>'} ({type(module).__name__}) cannot be quantized: "
                "only Conv1d, Conv2d (incl. grouped/depthwise), Linear, BatchNorm and LayerNorm "
                "are supported; replace or remove it"
            )


def _replace_shortcuts(model: nn.Module) -> list[str]:
    from ompq_plugin.models.cifar_resnet import ShortcutA

    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, ShortcutA):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, FixedShortcutConv(module.in_planes, module.planes,
                                                    module.pad_before))
            names.append(name)
    return names


def _match_names(layer_names: Iterable[str], bits: BitConfig) -> None:
    found = set(layer_names)
    configured = {lb.name for lb in bits.layers}
    unknown = sorted(configured - found)
    missing = sorted(found - configured)
    if unknown:
        raise OmpqError(
            f"BitConfig layers not in the model: {', '.join(unknown)}; the model has "
            f"{', '.join(sorted(found))}: re-run `ompq search` for this model"
        )
    if missing:
        raise OmpqError(
            f"model layers missing from the BitConfig: {', '.join(missing)}; "
            "re-run `ompq search` for this model"
        )


def quantize(
    model: nn.Module, bits: BitConfig, profile: HardwareProfile
) -> nn.Module:
    """Return a new integer-only Brevitas model with exactly ``bits``; ``model`` is not changed.

    The result is an ``torch.fx.GraphModule`` whose quantized layers keep the float model's
    module names (``qmodel.get_submodule(name)``); ``qmodel.ompq_report`` says what was done.
    Calibrate it (:func:`ompq_plugin.ptq.calibrate`) before inference.
    """
    quants = _quantizers(profile)
    ties_up = profile.act_rounding == "half-up"  # FINN's thresholds (ompq_plugin.rounding)
    if ties_up:
        quants = {**quants, **{k: half_up(quants[k]) for k in ("act_signed", "act_unsigned")}}
    check_supported(model)
    for lb in bits.layers:
        if lb.weight_bits < 2 or lb.act_bits < 2:
            raise OmpqError(
                f"layer {lb.name}: {lb.weight_bits}-bit weights / {lb.act_bits}-bit activations "
                "are not supported; use 2 bits or more"
            )
    work = copy.deepcopy(model).eval()
    report = QuantizeReport()
    report.fixed_layers = _replace_shortcuts(work)
    gm = trace_model(work)
    report.folded_norms = fold_batchnorms(gm, report.float_ops)
    for name, module in gm.named_modules():
        if isinstance(module, FLOAT_MODULES) and not isinstance(module, FOLDABLE_NORMS):
            report.float_ops[name] = f"{type(module).__name__}: float"
    report.float_ops.update(float_parameters(gm))
    normalise_avg_pool(gm)
    report.rewritten_pools = replace_adaptive_pools(gm)
    graph = gm.graph

    layer_nodes = [
        n for n in graph.nodes if isinstance(module_of(gm, n), SUPPORTED_LAYERS)
    ]
    fixed = set(report.fixed_layers)
    _match_names({str(n.target) for n in layer_nodes if str(n.target) not in fixed}, bits)
    by_name = bits.by_name()
    fixed_by_name = {lb.name: lb for lb in bits.fixed_layers}
    report.uncounted_fixed = [n for n in report.fixed_layers if n not in fixed_by_name]

    # 1. layers -> quant layers
    for node in layer_nodes:
        name = str(node.target)
        if isinstance(module_of(gm, node), nn.Module) and name in fixed:
            # the width the search counted, else the target's narrowest (an older BitConfig)
            fixed_bits = fixed_by_name[name].weight_bits if name in fixed_by_name else (
                shortcut_weight_bits(profile))
            qlayer = _quant_layer(gm.get_submodule(name), fixed_bits, quants, True)
            report.weight_bits[name] = fixed_bits
        else:
            wb = by_name[name].weight_bits
            qlayer = _quant_layer(gm.get_submodule(name), wb, quants, False)
            report.weight_bits[name] = wb
        set_submodule(gm, name, qlayer)

    # 2. which tensors get a quantizer, and with how many bits
    need: dict[fx.Node, list[int]] = {}
    for node in layer_nodes:
        if not node.args or not isinstance(node.args[0], fx.Node):
            raise OmpqError(f"layer {node.target} is called without a tensor input")
        src = source_of(gm, node.args[0])
        contrib = need.setdefault(src, [])
        if str(node.target) not in fixed:
            contrib.append(by_name[str(node.target)].act_bits)
    relus = [n for n in graph.nodes if is_relu(gm, n)]
    for r in relus:
        need.setdefault(r, [])
    adds = [n for n in graph.nodes if is_residual_add(n)]
    cats = [n for n in graph.nodes if is_cat(n)]
    default_bits = profile.pinned_act_bits

    def bits_for(node: fx.Node) -> int:
        found = need.get(node) or []
        if found:
            return max(found)
        # an add feeding a ReLU takes the ReLU's bits
        users = [u for u in node.users if not is_non_tensor_use(u)]
        if len(users) == 1 and users[0] in need and need[users[0]]:
            return max(need[users[0]])
        return default_bits

    def only_into_cats(node: fx.Node) -> bool:
        users = [u for u in node.users if not is_non_tensor_use(u)]
        return not need.get(node) and bool(users) and all(is_cat(u) for u in users)

    # 3. insert quantizers after each source (before adds, so adds see quantized operands); a
    # concatenation is quantized on its inputs (step 4b), and so is a ReLU that only feeds one
    for src in [n for n in graph.nodes if n in need]:
        if is_cat(src) or only_into_cats(src):
            continue
        nbits = bits_for(src)
        signed = not is_relu(gm, src)
        if src.op == "placeholder":
            base = "input_quant"
        elif src.op == "call_module":
            base = f"{src.target}_quant"
        else:
            owner = owner_path(src)
            base = f"{owner}.{src.name}_quant" if owner else f"{src.name}_quant"
        qname = unique_name(gm, base)
        gm.add_submodule(qname, _act_quantizer(quants, nbits, signed))
        report.act_quantizers[qname] = nbits
        if signed and ties_up:
            src = _tie_offset(gm, src, fixed)
        with graph.inserting_after(src):
            qnode = graph.call_module(qname, (src,))
        src.replace_all_uses_with(qnode, delete_user_cb=lambda user, q=qnode: user is not q)

    # 4. one shared quantizer on both inputs of each residual add
    for add in adds:
        nbits = bits_for(add)
        owner = owner_path(add)
        base = f"{owner}.add_quant" if owner else f"{add.name}_quant"
        qname = unique_name(gm, base)
        gm.add_submodule(qname, _act_quantizer(quants, nbits, signed=True))
        report.act_quantizers[qname] = nbits
        report.shared_add_quantizers.append(qname)
        if ties_up:
            for arg in add.args[:2]:
                _tie_offset(gm, arg, fixed)
        new_args = list(add.args)
        for i in (0, 1):
            with graph.inserting_before(add):
                new_args[i] = graph.call_module(qname, (add.args[i],))
        add.args = tuple(new_args)

    # 4b. one shared quantizer on every input of each concatenation (the layers reading the
    # concatenation read that quantizer's grid: it takes their bits)
    for cat in cats:
        parts = list(cat.args[0])
        signed = not all(is_relu(gm, p) for p in parts)
        owner = owner_path(cat)
        base = f"{owner}.cat_quant" if owner else f"{cat.name}_quant"
        qname = unique_name(gm, base)
        nbits = bits_for(cat)
        gm.add_submodule(qname, _act_quantizer(quants, nbits, signed=signed))
        report.act_quantizers[qname] = nbits
        report.shared_cat_quantizers.append(qname)
        with graph.inserting_before(cat):
            quantized = [graph.call_module(qname, (p,)) for p in parts]
        cat.args = (quantized, *cat.args[1:])

    # 5. tensor methods a QuantTensor lacks (mean, sum, ...) get the plain float tensor
    for node in list(graph.nodes):
        if node.op == "call_method" and node.target not in _QUANT_TENSOR_METHODS and node.args:
            with graph.inserting_before(node):
                plain = graph.call_function(dequant, (node.args[0],))
            node.args = (plain, *node.args[1:])

    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    with torch.no_grad():  # initialise the weight scales from the (folded) float weights
        for layer in quant_layers(gm).values():
            layer.quant_weight()
    gm.ompq_report = report  # type: ignore[assignment]
    return gm


def quant_layers(qmodel: nn.Module) -> dict[str, nn.Module]:
    """Name -> Brevitas weight layer (QuantConv1d/2d, QuantLinear) of a quantized model."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    return {
        n: m for n, m in qmodel.named_modules() if isinstance(m, QuantWeightBiasInputOutputLayer)
    }


def uniform_bitconfig(
    model: nn.Module,
    example_input: torch.Tensor,
    weight_bits: int,
    act_bits: int,
    model_name: str = "model",
    profile_name: str = "generic",
) -> BitConfig:
    """A BitConfig with the same bits for every layer the layer discovery finds (and the fixed
    layers :func:`quantize` and the profile's export add, see :mod:`ompq_plugin.fixed_layers`)."""
    from ompq_plugin.bitconfig import LayerBits
    from ompq_plugin.fixed_layers import added_layers
    from ompq_plugin.hw_profiles import load_profile
    from ompq_plugin.layers import discover_layers

    found = discover_layers(model, example_input[:1])
    fixed = [f.layer_bits(act_bits)
             for f in added_layers(model, found, load_profile(profile_name)).layers]
    layers = [
        LayerBits(
            name=li.name,
            kind=li.kind,
            weight_bits=weight_bits,
            act_bits=act_bits,
            params=li.params,
            macs=li.macs,
            input_numel=li.input_numel,
            act_group=li.act_group,
        )
        for li in found.layers
    ]
    return BitConfig(model=model_name, profile=profile_name, method="uniform", layers=layers,
                     fixed_layers=fixed)
