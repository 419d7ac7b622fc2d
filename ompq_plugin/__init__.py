"""ompq-plugin: OMPQ mixed-precision bit allocation, Brevitas quantization and QONNX export.

Public API (the ``ompq`` command does the same things)::

    from ompq_plugin import search, quantize, calibrate, finetune, evaluate, export_qonnx
    bits = search(model, samples, "hls4ml", Budgets(weight_memory_bits=...), beta=1.0)
    qmodel = quantize(model, bits, load_profile("hls4ml"))

Names are imported lazily so that ``import ompq_plugin`` stays light (no Brevitas or ONNX
until a quantization or export function is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BitConfig": "ompq_plugin.bitconfig",
    "LayerBits": "ompq_plugin.bitconfig",
    "Budgets": "ompq_plugin.budgets",
    "OmpqError": "ompq_plugin.errors",
    "InfeasibleBudgetError": "ompq_plugin.errors",
    "search": "ompq_plugin.searcher",
    "run_search": "ompq_plugin.searcher",
    "discover_layers": "ompq_plugin.layers",
    "load_profile": "ompq_plugin.hw_profiles",
    "list_profiles": "ompq_plugin.hw_profiles",
    "build_model": "ompq_plugin.models",
    "open_data": "ompq_plugin.datasets",
    "prepare": "ompq_plugin.data",
    "search_samples": "ompq_plugin.data",
    "evaluate": "ompq_plugin.evaluation",
    "quantize": "ompq_plugin.quantizer",
    "calibrate": "ompq_plugin.ptq",
    "finetune": "ompq_plugin.qat",
    "export_qonnx": "ompq_plugin.exporters",
    "export_qcdq": "ompq_plugin.exporters",
    "inspect_onnx": "ompq_plugin.exporters",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ompq_plugin' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
