"""onnxruntime speed of the QCDQ export against the float ONNX model, ResNet-20 on 256 real
CIFAR-10 test images (uniform W8A8, generic profile: float per-channel weight scales, 128
calibration images), CPU execution provider, 1 and 2 intra-op threads, batch 256 and batch 1.
Both files come from the same TorchScript exporter (dynamo=False), both with a dynamic batch axis.

    OMPQ_DATA_DIR=../shared/data python bench/ort_speed.py

Writes bench/results/ort_speed.json. Times are the best of --repeats runs, measured in one
process, alternating float and QCDQ, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def session(path: Path, threads: int):  # noqa: ANN201
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def timed(sess, x: np.ndarray, batch: int) -> float:  # noqa: ANN001
    name = sess.get_inputs()[0].name
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        sess.run(None, {name: x[i : i + batch]})
    return time.perf_counter() - t0


def main() -> None:
    from ompq_plugin.exporters import export_qcdq
    from ompq_plugin.hw_profiles.loader import load_profile
    from test_export import real_images

    from ompq_plugin import quantizer as quantize
    from ompq_plugin.models import build_model
    from ompq_plugin.ptq import calibrate

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = Path(os.environ.get("OMPQ_DATA_DIR", HERE.parent.parent / "shared" / "data"))
    net, _ = build_model("resnet20", data_dir=data)
    net.eval()
    images = real_images(data, args.images)
    x = images.numpy()
    bc = quantize.uniform_bitconfig(net, images[:1], 8, 8, "resnet20", "generic")
    q = quantize.quantize(net, bc, load_profile("generic"))
    calibrate(q, real_images(data, 128, "data_batch_1"))
    results: dict[str, object] = {
        "command": f"python bench/ort_speed.py --images {args.images} --repeats {args.repeats}",
        "model": "resnet20 (akamaster weights), uniform W8A8, generic profile",
        "machine": "2 CPU cores shared with other engineers' jobs (busy); ratios measured "
                   "in one process, float and QCDQ alternating",
    }
    with tempfile.TemporaryDirectory() as tmp:
        fp = Path(tmp) / "float.onnx"
        torch.onnx.export(net, images[:1], str(fp), dynamo=False, input_names=["input"],
                          output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        qp = Path(tmp) / "qcdq.onnx"
        report = export_qcdq(q, qp, images[:64], bc)
        results["export"] = report.summary()
        ops = sorted({n.op_type for n in onnx.load(str(qp)).graph.node})
        results["qcdq_ops"] = ops
        runs = []
        for threads in (1, 2):
            sf, sq = session(fp, threads), session(qp, threads)
            for batch in (args.images, 1):
                timed(sf, x[:batch], batch)
                timed(sq, x[:batch], batch)  # warm-up
                tf, tq = [], []
                for _ in range(args.repeats):
                    tf.append(timed(sf, x, batch))
                    tq.append(timed(sq, x, batch))
                row = {"threads": threads, "batch": batch, "float_s": min(tf), "qcdq_s": min(tq),
                       "speedup": min(tf) / min(tq)}
                runs.append(row)
                print(row, flush=True)
        results["runs"] = runs
        out_f = sf.run(None, {"input": x})[0]
        out_q = sq.run(None, {"input": x})[0]
        results["top1_agree_float_vs_qcdq"] = int((out_f.argmax(1) == out_q.argmax(1)).sum())
        results["n_images"] = len(x)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "ort_speed.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
