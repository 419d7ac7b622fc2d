"""torchvision classification models through search -> quantize -> verified QONNX export.

Each model (random init, eval mode) goes through the public API the way the CLI does it:
``search`` (generic profile, average 7-bit weights, N search images), ``quantize`` + ``calibrate``
(which ends with one quantized forward pass), ``export_qonnx`` verified on 8 images. Images are
real CIFAR-10 test/train images upsampled to the model's input size (64x64; inception_v3 needs
at least 75x75 and runs at 80x80), ImageNet mean/std. One row per model is appended to
bench/results/architectures.json as soon as it is done: pass/fail, the one-line error of a refused
model and the step that refused it, wall and CPU seconds of each step.

Run (torchvision must import beside torch: a separate venv, see README "Architectures")::

    nice -n 10 /work/tvenv/bin/python bench/architectures.py [--models resnet18,vgg11] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2",
    "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s",
    "mnasnet0_5", "squeezenet1_0", "squeezenet1_1", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
    "googlenet", "inception_v3", "densenet121", "alexnet", "vgg11", "vgg11_bn", "regnet_x_400mf",
    "regnet_y_400mf", "convnext_tiny", "swin_t", "maxvit_t",
]  # fmt: skip
EXTRA = ["vit_b_16"]  # run after the 25 when asked for with --models
SIZES = {"inception_v3": 80, "maxvit_t": 224}  # inception >= 75x75; maxvit: multiples of 224
KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
          "inception_v3": {"aux_logits": False, "init_weights": True}}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OUT = Path(__file__).parent / "results" / "architectures.json"


def images(data_dir: Path, batch: str, n: int, size: int) -> torch.Tensor:
    with open(data_dir / "cifar10-exact" / batch, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    x = torch.from_numpy(d[b"data"][:n].reshape(n, 3, 32, 32).astype(np.float32) / 255)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return (x - mean) / std


class Step:
    def __init__(self, row: dict, name: str) -> None:
        self.row, self.name = row, name

    def __enter__(self) -> Step:
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.row["seconds"][self.name] = round(time.perf_counter() - self.t, 2)
        self.row["cpu_seconds"][self.name] = round(time.process_time() - self.c, 2)


def code_version() -> str:
    """The commit the run measured (``+dirty`` when code had uncommitted changes)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!bench/results", ":!README.md"],
                               cwd=root, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


def run_one(name: str, data_dir: Path, args: argparse.Namespace) -> dict:
    import torchvision

    from ompq_plugin import Budgets, OmpqError, calibrate, export_qonnx, load_profile, quantize
    from ompq_plugin.layers import discover_layers
    from ompq_plugin.searcher import run_search

    size = SIZES.get(name, 64)
    row: dict = {"model": name, "commit": args.commit, "input_size": size,
                 "samples": args.samples, "calib": args.calib,
                 "status": "fail", "step": None, "error": None, "seconds": {}, "cpu_seconds": {}}
    step = "build"
    try:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {})).eval()
        samples = images(data_dir, "test_batch", args.samples, size)
        calib = images(data_dir, "data_batch_1", args.calib, size)
        verify = images(data_dir, "test_batch", 8, size)
        step = "search"
        with Step(row, "search"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = discover_layers(model, samples[:1])  # as the CLI does for --avg-weight-bits
            budgets = Budgets.from_user(avg_weight_bits=args.avg_bits,
                                        total_params=found.total_params)
            result = run_search(model, samples, "generic", budgets, model_name=name,
                                time_limit_s=60.0)
        row["warnings"] = sorted({str(w.message).split(";")[0] for w in caught
                                  if "feature is the same" in str(w.message)})
        bits = result.config
        row.update(layers=len(bits.layers), params=found.total_params,
                   unsupported=[u.name for u in found.unsupported],
                   average_weight_bits=round(bits.average_weight_bits, 3))
        step = "quantize"
        with Step(row, "quantize"):
            qmodel = quantize(model, bits, load_profile("generic"))
            calibrate(qmodel, calib)
        row["float_ops"] = len(qmodel.ompq_report.float_ops)
        row["notes"] = qmodel.ompq_report.notes()
        step = "export"
        with Step(row, "export"), tempfile.TemporaryDirectory() as tmp:
            report = export_qonnx(qmodel, Path(tmp) / f"{name}.onnx", verify, bits)
        row["export_seconds"] = {k: round(v, 2) for k, v in report.seconds.items()}
        row["verification"] = {"runtime": report.runtime, "exact": report.exact,
                               "max_abs_diff": report.max_abs_diff,
                               "boundary_flips": report.boundary_flips,
                               "top1_agree": report.top1_agree, "n_images": report.n_images}
        row["status"] = "pass"
    except OmpqError as exc:
        row.update(status="refused", step=step, error=str(exc).splitlines()[0][:300])
    except Exception as exc:  # noqa: BLE001 - a crash is a finding, recorded in one line
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        row.update(status="crash", step=step, error=f"{type(exc).__name__}: {first}")
    return row


def save(out: Path, rows: list[dict], new: dict, threads: int) -> list[dict]:
    """Replace ``new``'s model row and write the file atomically, rows in the table's order."""
    rows = [r for r in rows if r["model"] != new["model"]] + [new]
    order = {n: i for i, n in enumerate(MODELS + EXTRA)}
    rows.sort(key=lambda r: order.get(r["model"], len(order)))
    meta = {"command": "OMPQ_DATA_DIR=../shared/data nice -n 5 /work/tvenv/bin/python "
                       "bench/architectures.py [--models ...] (each row: its own samples/calib)",
            "torch": torch.__version__, "threads": threads,
            "note": "2-core machine shared with other jobs: wall seconds are inflated; "
                    "cpu_seconds is this process's CPU time (all threads)"}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tmp.replace(out)
    return rows


def table(rows: list[dict]) -> str:
    """The README's markdown table of ``rows``: CPU seconds per step, export wall seconds."""
    head = ["model", "input", "images search/calib", "result", "search s", "quantize s",
            "export s (CPU)", "export wall s", "layers", "float ops", "verification / reason"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cpu = r["cpu_seconds"]
        if r["status"] == "pass":
            v = r["verification"]
            result = "pass"
            note = (f"top-1 {v['top1_agree']}/{v['n_images']}, {v['boundary_flips']} "
                    f"rounding-boundary flips, max abs diff {v['max_abs_diff']:.2g}")
        else:
            result = f"{r['status']} at {r['step']}"
            note = (r["error"] or "").replace("|", "/")
        images = f"{r.get('samples', '?')}/{r.get('calib', '?')}"
        cells = [r["model"], str(r["input_size"]), images, result,
                 *(f"{cpu[k]:.1f}" if k in cpu else "-" for k in ("search", "quantize", "export")),
                 f"{r['seconds']['export']:.0f}" if "export" in r["seconds"] else "-",
                 str(r.get("layers", "-")), str(r.get("float_ops", "-")), note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated subset (default: the 25)")
    p.add_argument("--data", default=os.environ.get("OMPQ_DATA_DIR", "../shared/data"))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--avg-bits", type=float, default=7.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=str(OUT))
    p.add_argument("--table", action="store_true",
                   help="only print --output's rows as the README's markdown table")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="only merge the rows of these files (parallel runs) into --output")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.commit = code_version()  # of the code this process loaded
    out = Path(args.output)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    if args.table:
        print(table(rows))
        return 0
    if args.merge:
        for f in args.merge:
            for row in json.loads(Path(f).read_text())["rows"]:
                rows = save(out, rows, row, args.threads)
    for name in [] if args.merge else args.models.split(",") if args.models else MODELS:
        print(f"{name} ...", file=sys.stderr, flush=True)
        row = run_one(name, Path(args.data), args)
        rows = save(out, rows, row, args.threads)
        print(f"  {row['status']} {row.get('step') or ''} {row.get('error') or ''} "
              f"cpu {row['cpu_seconds']}", file=sys.stderr, flush=True)
    passed = sum(r["status"] == "pass" for r in rows if r["model"] in MODELS)
    print(f"{passed} of {len(MODELS)} pass", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
