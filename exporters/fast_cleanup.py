"""qonnx's ``cleanup_model``, the same transformations in the same order, in linear time.

Contract: for a graph qonnx's own :func:`qonnx.util.cleanup.cleanup_model` accepts, the result
has the same nodes (order, names, inputs, outputs, attributes), the same initializers, value
infos, graph inputs and outputs (tests/test_export_speedups.py compares the two on exported
models). qonnx's versions of some steps are quadratic in the graph size: they look every tensor
up by scanning the graph and convert a weight to numpy to ask whether it is one
(``GiveUniqueParameterTensors``, ``SortGraph``, ``GiveReadableTensorNames``,
``RemoveStaticGraphInputs``, ``SortCommutativeInputsInitializerLast``, most of them run after
every step by ``ModelWrapper.cleanup``; ``ModelWrapper``'s constructor; ``FoldConstants`` when
there is nothing left to fold). On ResNet-50 at 64x64 qonnx's cleanup took 20.5 CPU-s and this
one 1.1 (bench/results/export_speed_compare.json). Those steps are rewritten here with name
indexes; the others are qonnx's own. A graph where the rewrite could differ from qonnx (an empty
tensor name on a node, a readable name already taken) is cleaned by qonnx.
"""

from __future__ import annotations

import copy
from typing import Any

import onnx
from onnx import numpy_helper

from .light_shapes import attach, data_detached

QONNX_CUSTOM_OPS = ("Quant", "Trunc", "BipolarQuant")
PRESERVED_OPS = ["Quant", "BipolarQuant", "QuantizeLinear", "DequantizeLinear"]
COMMUTATIVE_OPS = {"Add", "Mul", "And", "Or", "Xor", "Sum"}


class _Unsupported(Exception):
    """The graph has a feature for which only qonnx's own implementation is the reference."""


def cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    """The cleaned copy of ``model`` (see module doc)."""
    from qonnx.core.modelwrapper import ModelWrapper

    try:
        return _cleanup_model(_wrap(model)).model
    except _Unsupported:
        from qonnx.util.cleanup import cleanup_model

        return cleanup_model(ModelWrapper(model)).model


def _wrap(model: onnx.ModelProto) -> Any:
    """``ModelWrapper(model)``: its constructor adds a value info for every initializer that
    lacks one (here with a name index; qonnx scans all value infos per tensor)."""
    from qonnx.core.modelwrapper import ModelWrapper

    wrapped = ModelWrapper(model, fix_missing_initializer_valueinfo=False)
    graph = wrapped.graph
    have = {v.name for c in (graph.input, graph.output, graph.value_info) for v in c}
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        for name in [*(i for i in node.input if i), *node.output]:
            if name not in have and name in inits:
                t = inits[name]
                graph.value_info.append(
                    onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims))
                )
                have.add(name)
    return wrapped


def _infer_shapes(model: Any) -> Any:
    """qonnx ``InferShapes`` (custom ops hidden from ONNX's shape inference, then restored), on
    a copy; the weights' data is neither copied twice nor serialized around ONNX's shape
    inference (:mod:`exporters.light_shapes`)."""
    import onnx.shape_inference as si
    from qonnx.transformation.infer_shapes import _hide_finn_ops, _restore_finn_ops

    names = [t.name for t in model.graph.initializer]
    with data_detached(model.model) as data:
        model = copy.deepcopy(model)
    hidden = _hide_finn_ops(model)
    inferred = si.infer_shapes(model.model)
    attach(inferred, data, names)
    model = _wrap(inferred)
    _restore_finn_ops(model, hidden)
    return model


def _fold_constants(model: Any) -> Any:
    """qonnx ``FoldConstants`` (quantizers excluded); run only when some node qualifies:
    :func:`exporters.prefold.prefold_constants` has usually folded them all already, and qonnx
    converts every weight to numpy for each node it looks at."""
    from qonnx.transformation.fold_constants import FoldConstants

    inits = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in PRESERVED_OPS:
            continue
        if not node.input or node.op_type == "Shape" or all(i in inits for i in node.input):
            fold = FoldConstants(exclude_op_types=PRESERVED_OPS)
            return model.transform(fold, cleanup=False, make_deepcopy=False)
    return model


def _cleanup_model(model: Any) -> Any:
    from qonnx.transformation.general import GiveUniqueNodeNames, RemoveUnusedTensors
    from qonnx.transformation.quant_constant_folding import FoldTransposeIntoQuantInit

    if any("" in n.output or "" in n.input for n in model.graph.node):
        raise _Unsupported("empty tensor name")
    for node in model.graph.node:  # qonnx's "temporary fix for QONNX op domains"
        if node.op_type in QONNX_CUSTOM_OPS:
            node.domain = "qonnx.custom_op.general"
    steps = [
        _infer_shapes,
        _unique_parameter_tensors,
        _fold_constants,
        FoldTransposeIntoQuantInit(),
        RemoveUnusedTensors(),
        _remove_static_graph_inputs,
        GiveUniqueNodeNames(),
        _readable_tensor_names,
    ]
    for step in steps:  # the first (shape inference) copies the model: the rest work in place
        if hasattr(step, "apply"):
            model = model.transform(step, cleanup=False, make_deepcopy=False)
        else:
            model = step(model) or model
        _after_step(model)
    return model


def _after_step(model: Any) -> None:
    """``ModelWrapper.cleanup``: what qonnx runs after every transformation."""
    from qonnx.transformation.general import RemoveUnusedTensors

    model.transform(RemoveUnusedTensors(), cleanup=False, make_deepcopy=False)
    _remove_static_graph_inputs(model)
    _sort_graph(model)
    _commutative_initializers_last(model)
    _unique_parameter_tensors(model)


def _remove_static_graph_inputs(model: Any) -> None:
    """qonnx ``RemoveStaticGraphInputs``: graph inputs that have an initializer become value
    infos."""
    inits = {t.name for t in model.graph.initializer}
    for inp in [i for i in model.graph.input if i.name in inits]:
        model.graph.value_info.append(inp)
        model.graph.input.remove(inp)


def _commutative_initializers_last(model: Any) -> None:
    """qonnx ``SortCommutativeInputsInitializerLast``: the inputs of Add, Mul, And, Or, Xor and
    Sum nodes reordered, dynamic ones first, initializers last (each group in its order)."""
    inits = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in COMMUTATIVE_OPS:
            names = list(node.input)
            ordered = [i for i in names if i not in inits] + [i for i in names if i in inits]
            if ordered != names:
                del node.input[:]
                node.input.extend(ordered)


def _unique_parameter_tensors(model: Any) -> None:
    """qonnx ``GiveUniqueParameterTensors``: a second use of an initializer reads its own copy
    (same value; a fresh random name with a value info and its QONNX data type, as qonnx's
    ``set_initializer`` and ``set_tensor_datatype`` add them)."""
    from qonnx.util.basic import random_string

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    seen: set[str] = set()
    names: set[str] | None = None
    for node in graph.node:
        for k, name in enumerate(list(node.input)):
            if name not in inits:
                continue
            if name not in seen:
                seen.add(name)
                continue
            if names is None:
                names = {v.name for c in (graph.input, graph.output, graph.value_info) for v in c}
                datatypes = _datatypes(graph)
            datatype = datatypes.get(name, "FLOAT32")
            new = random_string()
            while new in names:
                new = random_string()
            names.add(new)
            t = numpy_helper.from_array(numpy_helper.to_array(inits[name]), new)
            graph.initializer.append(t)
            graph.value_info.append(
                onnx.helper.make_tensor_value_info(new, t.data_type, list(t.dims))
            )
            qa = graph.quantization_annotation.add(tensor_name=new)
            qa.quant_parameter_tensor_names.add(key="finn_datatype", value=datatype)
            node.input[k] = new


def _datatypes(graph: onnx.GraphProto) -> dict[str, str]:
    """qonnx ``get_tensor_datatype`` of every tensor that has one other than FLOAT32: the
    ``finn_datatype`` annotation, else FLOAT16 for a float16 value info (or initializer)."""
    out: dict[str, str] = {}
    for t in graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT16:
            out[t.name] = "FLOAT16"
    for v in (*graph.input, *graph.output, *graph.value_info):
        out.pop(v.name, None)
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            out[v.name] = "FLOAT16"
    for qa in graph.quantization_annotation:
        for entry in qa.quant_parameter_tensor_names:
            if entry.key == "finn_datatype":
                out[qa.tensor_name] = entry.value
                break
    return out


def _sort_graph(model: Any) -> None:
    """qonnx ``SortGraph``: the nodes in qonnx's topological order (``toposort_flatten`` over
    the same dependency sets); a node with no producer and no graph input or initializer among
    its inputs is dropped, as qonnx drops it, unless another node reads it."""
    from toposort import toposort_flatten

    graph = model.graph
    nodes = list(graph.node)
    if len(nodes) == 1:
        return
    producer: dict[str, int] = {}
    for idx, node in enumerate(nodes):
        for out in node.output:
            producer.setdefault(out, idx)
    sources = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    deps: dict[int, set[int]] = {}
    for idx, node in enumerate(nodes):
        preds = {producer[i] for i in node.input if i in producer}
        if preds:
            deps[idx] = preds
        elif any(i in sources for i in node.input):
            deps[idx] = set()
    order = toposort_flatten(deps)
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _readable_tensor_names(model: Any) -> None:
    """qonnx ``GiveReadableTensorNames``: node outputs ``<node>_out<k>``, initializer inputs
    ``<node>_param<k>``, the graph's inputs ``global_in[_k]`` and outputs ``global_out[_k]``."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    new: dict[str, str] = {}
    for node in graph.node:
        for k, out in enumerate(node.output):
            new[out] = f"{node.name}_out{k}"
        params = [i for i in node.input if i in inits]
        for k, name in enumerate(params):
            new[name] = f"{node.name}_param{k}"
    for k, inp in enumerate(graph.input):
        new[inp.name] = "global_in" if k == 0 else f"global_in_{k}"
    for k, out in enumerate(graph.output):
        new[out.name] = "global_out" if k == 0 else f"global_out_{k}"
    taken = set(new.values())
    if len(taken) != len(new) or any(o in taken and o not in new for o in _all_names(graph)):
        raise _Unsupported("a readable name is taken")
    for container in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in container:
            item.name = new.get(item.name, item.name)
    for qa in graph.quantization_annotation:
        qa.tensor_name = new.get(qa.tensor_name, qa.tensor_name)
    for node in graph.node:
        for k, name in enumerate(node.input):
            node.input[k] = new.get(name, name)
        for k, name in enumerate(node.output):
            node.output[k] = new.get(name, name)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {
        x.name for c in (graph.input, graph.output, graph.value_info, graph.initializer) for x in c
    }
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names
