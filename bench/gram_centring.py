"""Centring a Gram before or after its float32 product: time and ORM error, per model.

``features.centred_gram`` multiplies the raw features and centres the N x N product
(``H G H``), falling back to centring the columns first when the features' mean dominates their
energy (``tr(G) / tr(H G H)`` above ``features._MAX_MEAN_SHARE``). This measures, on the search's
own pass (``collect_grams``, centred, one thread) of ResNet-20 / -56 (pretrained, N = 64 real
CIFAR-10 training images), MobileNetV2 (N = 32) and ResNet-50 (N = 64, both 224x224,
random-init: their speed and error only), for

* ``centre_first``: every slice's columns centred before the product (the code before),
* ``centre_after``: ``centred_gram`` as it is,

the pass's Gram time (median over the rounds, the two interleaved, order swapped every round)
and the largest ORM difference from float64 Grams of the raw features; and per model the
largest and median ``tr(G) / tr(H G H)`` over the layers and how many layers fall back.

Writes bench/results/gram_centring.json (a row per model as it finishes). Run:
``OMPQ_DATA_DIR=../shared/data OPENBLAS_NUM_THREADS=1 python bench/gram_centring.py``
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import numpy as np
import torch
from run_record import measure_models

RESULTS = Path(__file__).resolve().parent / "results" / "gram_centring.json"
MODELS = [("resnet20", 64, 9), ("resnet56", 64, 9), ("mobilenetv2", 32, 3), ("resnet50", 64, 2)]


def centre_first(features_: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``centred_gram`` before this change (commit 696fba4), CPU path: every slice's columns
    centred, then multiplied."""
    from ompq_plugin import features

    y = features_.detach().reshape(features_.shape[0], -1).float().numpy()
    n, d = y.shape
    step = max(1, min(features._CHUNK_ELEMENTS // max(n, 1), features._ONEDNN_MAX_COLUMNS))  # noqa: SLF001
    g = np.zeros((n, n), dtype=np.float64)
    all_zero = True
    for start in range(0, d, step):
        block = y[:, start : start + step]
        mean = block.mean(axis=0)
        all_zero = all_zero and not mean.any()
        g += features._float32_gram(torch.from_numpy(block - mean))  # noqa: SLF001
    return torch.from_numpy(g), all_zero and not np.diagonal(g).any()


def measure(model_name: str, n: int, rounds: int) -> dict:
    from ompq_plugin import features
    from ompq_plugin.data import resolve_data_dir, search_samples
    from ompq_plugin.layers import discover_layers
    from ompq_plugin.models import build_model
    from ompq_plugin.orm import center, orm_matrix

    data_dir = resolve_data_dir(None)
    model, spec = build_model(model_name, data_dir=data_dir)
    model.eval()
    x = search_samples(data_dir, spec, n, seed=0)
    layers = discover_layers(model, x[:2])
    reference = features.collect_grams(model, layers, x, centred=False).grams
    shares = [float(np.trace(g.numpy()) / np.trace(center(g).numpy())) for g in reference]
    reference_orm = orm_matrix(reference)
    after = features.centred_gram
    variants = {"centre_first": centre_first, "centre_after": after}
    seen: dict[str, list[float]] = {k: [] for k in variants}
    errors: dict[str, float] = {}
    try:
        for r in range(rounds):
            for name in (tuple(variants) if r % 2 == 0 else tuple(reversed(variants))):
                features.centred_gram = variants[name]
                result = features.collect_grams(model, layers, x, centred=True)
                seen[name].append(result.gram_s)
                errors[name] = float(np.abs(orm_matrix(result.grams) - reference_orm).max())
    finally:
        features.centred_gram = after
    row = {
        "model": model_name,
        "pretrained": spec.pretrained,
        "input": list(x.shape),
        "layers": len(reference),
        "rounds": rounds,
        "mean_share_max": max(shares),
        "mean_share_median": statistics.median(shares),
        "layers_centred_first": sum(s > features._MAX_MEAN_SHARE for s in shares),  # noqa: SLF001
        "load_average_1min": os.getloadavg()[0],
    }
    for name, times in seen.items():
        row[name] = {"gram_ms_median": statistics.median(times) * 1e3,
                     "orm_max_abs_diff_vs_float64": errors[name]}
    row["time_saved_fraction"] = 1 - row["centre_after"]["gram_ms_median"] / row[
        "centre_first"]["gram_ms_median"]
    return row


def main() -> None:
    machine = {"processor": platform.processor() or platform.machine(), "numpy": np.__version__,
               "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS")}
    measure_models(RESULTS, machine, MODELS, measure)


if __name__ == "__main__":
    main()
