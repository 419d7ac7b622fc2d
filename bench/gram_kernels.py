"""Which float32 product forms the search's centred Grams: numpy (OpenBLAS syrk) or oneDNN.

Two measurements, one thread, in one process:

1. Kernels alone, on every distinct feature shape of ResNet-20 / -56 (N = 64), MobileNetV2
   (N = 32, 224) and ResNet-50 (N = 64, 224): the centred feature's Gram by numpy's ``b @ b.T``
   (a symmetric rank-k update), by ``features._float32_gram`` (oneDNN convolution, two halves),
   and by torch's ``mm`` (MKL); the median of 15 calls each, and each one's largest difference
   from the float64 Gram of the same float32 values (relative to the Gram's largest entry).
   ``onednn_*`` is oneDNN's product at any size (it falls off a cliff past 393,216 columns),
   ``project_ms`` what the search calls (``used``: oneDNN only where it was measured faster,
   in slices of at most 2^17 columns as ``centred_gram`` cuts them).
   Values: a post-ReLU-like draw (max(0, N(0.5, 1))); only the shapes come from the models.
2. Inside the search: ``--method ompq`` on the pretrained ResNet-20 and ResNet-56 with each
   kernel in turn (interleaved, the order swapped every round), each search right after a
   forward pass of its own; the median ratio to that forward, the Gram time, and the rest of
   the pass. (Measured before the switch: the pass's own convolutions ran slower after numpy's
   products than after oneDNN's, so the whole search, not the kernel, decides.)

Writes bench/results/gram_kernels.json. Run:
``OMPQ_DATA_DIR=../shared/data OPENBLAS_NUM_THREADS=1 python bench/gram_kernels.py``
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from architectures import code_version

RESULTS = Path(__file__).resolve().parent / "results" / "gram_kernels.json"
SHAPE_MODELS = [("resnet20", 64, 32), ("resnet56", 64, 32), ("mobilenetv2", 32, 224),
                ("resnet50", 64, 224)]


def _median_ms(fn, repeats: int = 15) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def feature_shapes(model_name: str, n: int, side: int) -> dict[int, int]:
    """Feature width D -> how many layers have it (every Conv/Linear output, one image)."""
    from ompq_plugin.layers import QUANTIZABLE_TYPES
    from ompq_plugin.models import build_model

    model, _ = build_model(model_name)  # random weights: only the shapes count
    widths: dict[int, int] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out: widths.__setitem__(
        out[0].numel(), widths.get(out[0].numel(), 0) + 1))
        for m in model.modules() if isinstance(m, QUANTIZABLE_TYPES)]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, side, side))
    for h in hooks:
        h.remove()
    return widths


def kernels() -> list[dict]:
    from ompq_plugin import features

    rng = np.random.default_rng(0)
    rows = []
    for model_name, n, side in SHAPE_MODELS:
        for d, count in sorted(feature_shapes(model_name, n, side).items()):
            y = np.maximum(rng.standard_normal((n, d), dtype=np.float32) + 0.5, 0)
            block = y - y.mean(axis=0)
            t = torch.from_numpy(block)
            exact = block.astype(np.float64) @ block.astype(np.float64).T

            def error(g: np.ndarray) -> float:
                return float(np.abs(g - exact).max() / np.abs(exact).max())  # noqa: B023

            raw = features._onednn_gram  # noqa: SLF001
            step = min(features._CHUNK_ELEMENTS // n, features._ONEDNN_MAX_COLUMNS)  # noqa: SLF001

            def project(t: torch.Tensor, step: int = step) -> np.ndarray:  # centred_gram's slices
                return sum(features._float32_gram(t[:, s : s + step].contiguous())  # noqa: SLF001
                           for s in range(0, t.shape[1], step))

            # past the cliff (> 393,216 columns) oneDNN takes ~1 s a call: 3 calls there
            repeats = 3 if d > 1 << 19 else 15
            rows.append({
                "model": model_name, "n": n, "d": d, "layers": count,
                "used": "onednn" if features._onednn_applies(n, min(d, step)) else "numpy",  # noqa: SLF001
                "numpy_syrk_ms": _median_ms(lambda: block @ block.T),  # noqa: B023
                "onednn_ms": _median_ms(lambda: raw(t), repeats),  # noqa: B023
                "project_ms": _median_ms(lambda: project(t)),  # noqa: B023
                "torch_mm_ms": _median_ms(lambda: t @ t.T),  # noqa: B023
                "numpy_error": error(block @ block.T),
                "onednn_error": error(raw(t)),
                "torch_mm_error": error((t @ t.T).numpy()),
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def in_search(model_name: str, rounds: int) -> dict:
    from ompq_plugin import features
    from ompq_plugin.data import resolve_data_dir, search_samples
    from ompq_plugin.models import build_model
    from ompq_plugin.searcher import run_search

    data_dir = resolve_data_dir(None)
    model, spec = build_model(model_name, data_dir=data_dir)
    x = search_samples(data_dir, spec, 64, seed=0)
    onednn = features._float32_gram  # noqa: SLF001

    def numpy_gram(block: torch.Tensor) -> np.ndarray:
        b = block.numpy()
        return (b @ b.T).astype(np.float64)

    chosen = {"onednn": onednn, "numpy": numpy_gram}
    seen: dict[str, list[tuple[float, float, float]]] = {k: [] for k in chosen}
    for _ in range(2):
        run_search(model, x, "generic", method="ompq")
    try:
        for r in range(rounds):
            for name in (("onednn", "numpy") if r % 2 else ("numpy", "onednn")):
                features._float32_gram = chosen[name]  # noqa: SLF001
                start = time.perf_counter()
                with torch.no_grad():
                    model(x)
                forward = time.perf_counter() - start
                timings = run_search(model, x, "generic", method="ompq").config.timings
                seen[name].append((timings["total_s"] / forward, timings["orm_s"] * 1e3,
                                   timings["features_s"] * 1e3))
    finally:
        features._float32_gram = onednn  # noqa: SLF001
    return {
        name: {
            "ratio_to_forward_median": statistics.median(r[0] for r in rows),
            "orm_ms_median": statistics.median(r[1] for r in rows),
            "pass_without_grams_ms_median": statistics.median(r[2] for r in rows),
        }
        for name, rows in seen.items()
    } | {"model": model_name, "rounds": rounds, "load_average_1min": os.getloadavg()[0]}


def main() -> None:
    torch.set_num_threads(1)
    results = {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "code": code_version(),
        "machine": {"cpu_threads": 1, "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "numpy": np.__version__,
                    "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS")},
        "kernels": kernels(),
        "in_search": [in_search("resnet20", 16), in_search("resnet56", 8)],
    }
    for row in results["in_search"]:
        print(json.dumps(row), flush=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
