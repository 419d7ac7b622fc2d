"""The torch side of an export: which layers are quantized, which bits the file must carry, the
example images as a batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ompq_plugin.errors import OmpqError

from . import verify as V

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ompq_plugin.bitconfig import BitConfig


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
    else the module's own weight quantizer (e.g. the fixed shortcut convs). Brevitas reads a
    weight quantizer's bit width by quantizing the whole weight (a VGG-11: 2.5 s), so only the
    layers the BitConfig does not name are asked."""
    layers = quant_layers(qmodel)
    if not layers:
        raise OmpqError("the model has no Brevitas quantized layers: run `ompq quantize` first")
    named = {lb.name: lb for lb in bits.layers} if bits is not None else {}
    expected: dict[str, V.Expected] = {}
    for name in [*layers, *(n for n in named if n not in layers)]:  # the order checks report
        lb = named.get(name)
        expected[name] = (V.Expected(lb.weight_bits, lb.act_bits, "BitConfig") if lb is not None
                          else V.Expected(module_weight_bits(layers[name]), None, "model"))
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


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch runs single-threaded inside (its thread count restored after; a no-op when it is
    already one). For the Brevitas export (:func:`exporters.qonnx.brevitas_export`).

    The Brevitas export traces one image: thousands of small tensor ops (each weight quantized
    several times, the trace, torch.onnx's passes), none of which gains from intra-op threads.
    With two threads every op is an OpenMP parallel region whose threads spin-wait for each
    other; on cores shared with other processes (load above the core count) a region then
    costs milliseconds of spinning: a 37k-element ``torch.where`` took 0.08 ms on one thread
    and 31 ms on two (2 cores, load 4); DenseNet-121's Brevitas export took 52.8 s on two
    threads (load 3.6) and 19.8 s on one (load 5.2). The graph does not depend on it
    (elementwise ops and max reductions; the benchmark's graphs were byte-identical both ways,
    tests/test_export_speedups.py compares).
    Not for the verification's torch reference: a convolution or matrix product sums in an
    order that depends on the thread count (ResNet-50's rounding-boundary flips went from 8 to
    12 on one thread), so its figures would change."""
    import torch

    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
