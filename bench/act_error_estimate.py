"""How close the search's activation-error estimate is to the exact error, on real features.

For every quantizable layer input of the pretrained ResNet-20 and ResNet-56 on N = 64 search
images, the relative error ``||Q_b(x) - x||^2 / ||x||^2`` at widths 2-8, per-tensor float and
power-of-two scales, as the search estimates it (``act_stats.input_errors``: exact top values,
a spread sample of the rest) against the exact value (every element scored). Also the time of
both. Writes bench/results/act_error_estimate.json.

    OMPQ_DATA_DIR=../shared/data python bench/act_error_estimate.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ompq_plugin.data import resolve_data_dir, search_samples  # noqa: E402
from ompq_plugin.fileio import write_text_atomic  # noqa: E402
from ompq_plugin.layers import QUANTIZABLE_TYPES  # noqa: E402
from ompq_plugin.methods import act_stats  # noqa: E402
from ompq_plugin.models import build_model  # noqa: E402

WIDTHS = (2, 3, 4, 5, 6, 7, 8)


def layer_inputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every quantizable layer's input on ``x`` (copies)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda _m, args, name=name: seen.setdefault(name, args[0].detach().clone())
        )
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZABLE_TYPES)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def main() -> int:
    torch.set_num_threads(1)
    data_dir = resolve_data_dir(None)
    out: dict[str, object] = {"measured": time.strftime("%Y-%m-%d %H:%M"), "models": {}}
    for name in ("resnet20", "resnet56"):
        model, spec = build_model(name, data_dir=data_dir)
        x = search_samples(data_dir, spec, 64, seed=0)
        worst = {}
        times = {"estimate_s": 0.0, "exact_s": 0.0}
        for po2 in (False, True):
            rel = []
            for layer, t in layer_inputs(model, x).items():
                start = time.perf_counter()
                est = act_stats.input_errors(t, WIDTHS, po2)
                times["estimate_s"] += time.perf_counter() - start
                start = time.perf_counter()
                ref = act_stats.input_errors(t, WIDTHS, po2, sample=t.numel())
                times["exact_s"] += time.perf_counter() - start
                rel += [(abs(est[b] - ref[b]) / ref[b], layer, b) for b in WIDTHS if ref[b] > 0]
            dev, layer, width = max(rel)
            worst["power_of_two" if po2 else "float"] = {
                "max_relative_deviation": dev,
                "at": f"{layer} input, {width} bits",
                "median_relative_deviation": sorted(r for r, _, _ in rel)[len(rel) // 2],
                "values": len(rel),
            }
            print(name, "po2" if po2 else "float", f"max {dev:.4f} at {layer} {width}b", flush=True)
        out["models"][name] = {**worst, **times}  # type: ignore[index]
    out["sample"] = act_stats.SAMPLE
    out["load_average_1min"] = os.getloadavg()[0]
    path = ROOT / "bench/results/act_error_estimate.json"
    write_text_atomic(str(path), json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
