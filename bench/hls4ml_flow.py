"""hls4ml's documented QONNX flow on the exported ResNet-20 (hls4ml profile, mixed 3-8 bit
weights, real weights, 128 calibration images), compared with qonnx on N real test images.

    OMPQ_DATA_DIR=../shared/data python bench/hls4ml_flow.py --images 64

Writes bench/results/hls4ml_flow.json (``run``: commit, library versions, load average, wall and
CPU seconds, see run_record.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def main() -> None:
    from ompq_plugin.exporters import export_qonnx
    from ompq_plugin.exporters.hls4ml_check import check_hls4ml
    from run_record import RunRecord
    from test_export import quantized_resnet20, real_images

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = Path(os.environ.get("OMPQ_DATA_DIR", HERE.parent.parent / "shared" / "data"))
    run = RunRecord(extra=("hls4ml",))
    t0 = time.perf_counter()
    q, bc = quantized_resnet20(data)
    images = real_images(data, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        report = export_qonnx(q, Path(tmp) / "r20.onnx", images[:8], bc, target="hls4ml")
        result = check_hls4ml(report.path, images)
    out = {
        "command": f"python bench/hls4ml_flow.py --images {args.images}",
        "model": "resnet20, hls4ml profile, weights 8/4/5/6/3 cycle, act 8 bit",
        "export": report.summary(),
        "hls4ml": result.to_json(),
        "summary": result.summary(),
        "seconds_total": time.perf_counter() - t0,
        "machine": "2 CPU cores shared with other jobs (busy)",
        "run": run.to_json(),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "hls4ml_flow.json").write_text(json.dumps(out, indent=2) + "\n")
    print(result.summary())


if __name__ == "__main__":
    main()
