"""The default search's pass: the traced graph (``run_graph``) or the model's own forward.

Without Grams (the default method, beta 0) the search's one pass only needs the activation
statistics' hooks, so it could call ``model(samples)``; it runs the traced graph untapped
instead (``features.discover_and_stream``), which frees each value after its last use. This
measures both in one process, interleaved (the order swapped every round), each default search
right after a plain forward pass of its own: the median, fastest and slowest (search / forward)
ratio per variant. ``plain`` swaps the untapped ``run_graph`` call for ``model(*inputs)``; the
tapped pass of ORM methods is unchanged in both.

Writes bench/results/untapped_pass.json (a row per model as it finishes). Run:
``OMPQ_DATA_DIR=../shared/data python bench/untapped_pass.py``
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
from run_record import measure_models

RESULTS = Path(__file__).resolve().parent / "results" / "untapped_pass.json"
MODELS = [("resnet20", 64, 40), ("resnet56", 64, 20), ("mobilenetv2", 32, 8)]


def measure(model_name: str, n: int, rounds: int) -> dict:
    from ompq_plugin import features
    from ompq_plugin.data import resolve_data_dir, search_samples
    from ompq_plugin.models import build_model
    from ompq_plugin.searcher import run_search

    data_dir = resolve_data_dir(None)
    model, spec = build_model(model_name, data_dir=data_dir)
    x = search_samples(data_dir, spec, n, seed=0)
    traced = features.run_graph

    def plain(model, graph, inputs, taps=(), tap=None):  # noqa: ANN001, ANN202
        return model(*inputs) if not taps else traced(model, graph, inputs, taps, tap)

    variants = {"run_graph": traced, "plain": plain}
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for fn in variants.values():  # warm-up
            features.run_graph = fn
            run_search(model, x, "generic")
        for r in range(rounds):
            for name in (tuple(variants) if r % 2 == 0 else tuple(reversed(variants))):
                features.run_graph = variants[name]
                start = time.perf_counter()
                with torch.no_grad():
                    model(x)
                forward = time.perf_counter() - start
                start = time.perf_counter()
                run_search(model, x, "generic")
                ratios[name].append((time.perf_counter() - start) / forward)
    finally:
        features.run_graph = traced
    return {
        "model": model_name, "pretrained": spec.pretrained, "input": list(x.shape),
        "rounds": rounds, "load_average_1min": os.getloadavg()[0],
    } | {
        name: {"ratio_median": statistics.median(v), "ratio_min": min(v), "ratio_max": max(v)}
        for name, v in ratios.items()
    }


def main() -> None:
    measure_models(RESULTS, {}, MODELS, measure)


if __name__ == "__main__":
    main()
