"""Export time of torchvision-size models (issue 10: at most 60 s on 2 cores at 64x64).

Each model (random init, eval mode, the input sizes of bench/architectures.py) gets uniform
W6A8 bits (the export's cost does not depend on the bits; no search, to keep the run short),
``quantize`` + ``calibrate`` on 16 real images, then ``export_qonnx`` verified on 8 real images,
exactly as ``ompq export`` runs it. Per model: wall and CPU seconds of the export and the
export's own split (Brevitas export, cleanup, verification). ``--compare`` also times qonnx's own
``cleanup_model`` and the Brevitas export with torch's TorchScript lint on the same model (the
measurements behind exporters/fast_cleanup.py and the lint skip in exporters/qonnx.py).

Run (torchvision must import beside torch: a separate venv, see README "Architectures")::

    OMPQ_DATA_DIR=../shared/data /work/tvenv/bin/python bench/export_speed.py \\
        [--models resnet50,densenet121] [--compare] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import KWARGS, MODELS, SIZES, code_version, images  # noqa: E402

OUT = Path(__file__).parent / "results" / "export_speed.json"
REFUSED = ("swin_t", "maxvit_t")  # refused at the search (bench/architectures.py)


def timed(fn, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN201
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    return out, round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)


def compare(qmodel: torch.nn.Module, image: torch.Tensor) -> dict:
    """qonnx's own cleanup and the linted Brevitas export, timed on this model."""
    from brevitas.export import export_qonnx
    from ompq_plugin.exporters.fast_cleanup import cleanup
    from ompq_plugin.exporters.prefold import prefold_constants
    from ompq_plugin.exporters.qonnx import brevitas_export
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    row = {}
    with tempfile.TemporaryDirectory() as tmp:
        raw, row["export_no_lint_s"], row["export_no_lint_cpu_s"] = timed(
            brevitas_export, export_qonnx, qmodel, image
        )
        _, row["export_lint_s"], row["export_lint_cpu_s"] = timed(
            export_qonnx, qmodel, args=image, export_path=str(Path(tmp) / "b.onnx"), dynamo=False
        )
    folded = prefold_constants(raw)
    _, row["fast_cleanup_s"], row["fast_cleanup_cpu_s"] = timed(cleanup, copy.deepcopy(folded))
    _, row["qonnx_cleanup_s"], row["qonnx_cleanup_cpu_s"] = timed(
        cleanup_model, ModelWrapper(copy.deepcopy(folded))
    )
    return row


def run_one(name: str, data: Path, args: argparse.Namespace) -> dict:
    import torchvision

    from ompq_plugin import calibrate, export_qonnx, load_profile, quantize
    from ompq_plugin.quantizer import uniform_bitconfig

    size = SIZES.get(name, 64)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {})).eval()
    calib = images(data, "data_batch_1", 16, size)
    verify = images(data, "test_batch", 8, size)
    bits = uniform_bitconfig(model, calib[:1], 6, 8, model_name=name)
    qmodel = quantize(model, bits, load_profile("generic"))
    calibrate(qmodel, calib)
    row = {"model": name, "input_size": size, "commit": args.commit,
           "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        report, row["export_s"], row["export_cpu_s"] = timed(
            export_qonnx, qmodel, Path(tmp) / f"{name}.onnx", verify, bits
        )
    row["steps_s"] = {k: round(v, 2) for k, v in report.seconds.items()}
    row["verified"] = {"exact": report.exact, "max_abs_diff": report.max_abs_diff,
                       "top1_agree": report.top1_agree, "n_images": report.n_images}
    if args.compare:
        row["compare"] = compare(qmodel, verify[:1])
    row["load_average_after"] = os.getloadavg()[0]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated subset (default: the 23 that pass)")
    p.add_argument("--data", default=os.environ.get("OMPQ_DATA_DIR", "../shared/data"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare", action="store_true",
                   help="also time qonnx's cleanup_model and the linted Brevitas export")
    p.add_argument("--output", default=str(OUT))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.commit = code_version()
    out = Path(args.output)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    names = args.models.split(",") if args.models else [m for m in MODELS if m not in REFUSED]
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        row = run_one(name, Path(args.data), args)
        rows = [r for r in rows if r["model"] != name] + [row]
        meta = {"command": "OMPQ_DATA_DIR=../shared/data /work/tvenv/bin/python "
                           "bench/export_speed.py [--models ...] [--compare]",
                "torch": torch.__version__, "threads": args.threads,
                "note": "export_cpu_s is this process's CPU time (all threads); on a busy "
                        "machine the wall time is inflated (load averages in each row)"}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        tmp.replace(out)
        print(f"  export {row['export_s']} s wall, {row['export_cpu_s']} s CPU "
              f"{row['steps_s']} {row.get('compare', '')}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
