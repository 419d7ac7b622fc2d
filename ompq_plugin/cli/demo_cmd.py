"""``ompq demo``: the whole flow on the embedded default, with real data and real weights.

Pretrained CIFAR-10 ResNet-20 -> OMPQ search (64 real training images, 4-bit average weights
from 3..8-bit layers, 8-bit activations, generic integer target) -> Brevitas quantization ->
PTQ (calibration, bias correction, GPTQ) -> top-1 on the exact-pixel test images (1017 with a
data folder, the 500 embedded ones without) -> verified QONNX file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ompq_plugin.errors import OmpqError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="search -> quantize -> PTQ -> evaluate -> export on ResNet-20",
                       description=__doc__)
    p.add_argument("--data", help="data folder holding cifar10-exact/ and weights/ (default: "
                   "$OMPQ_DATA_DIR, else the 500+500 CIFAR-10 images and the ResNet-20 "
                   "checkpoint embedded in the package)")
    p.add_argument("--profile", default="generic", help="profile name or .toml path")
    p.add_argument("--avg-weight-bits", type=float, default=4.0,
                   help="weight memory budget as average bits per weight")
    p.add_argument("--weight-bits", default=None,
                   help="weight widths the free layers may use, e.g. 3,4,5,6,7,8 (default: the "
                   "profile's full range; the default search method spreads the bits itself)")
    p.add_argument("--no-gptq", action="store_true", help="skip GPTQ (faster, less accurate)")
    p.add_argument("-o", "--output-dir", default="ompq-demo", help="folder for the three files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ompq_plugin.cli.common import input_of, note, progress_step
    from ompq_plugin.data import choose_samples, normalise, search_samples
    from ompq_plugin.datasets import open_data
    from ompq_plugin.evaluation import evaluate
    from ompq_plugin.exporters import export_qonnx
    from ompq_plugin.hw_profiles import load_profile
    from ompq_plugin.models import build_model, file_sha256
    from ompq_plugin.ptq import calibrate
    from ompq_plugin.qmodel_io import save_quantized
    from ompq_plugin.quantizer import quantize
    from ompq_plugin.report import print_config
    from ompq_plugin.searcher import search

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise OmpqError(f"{out} exists and is not a folder; pass another -o")
    source = open_data(args.data)
    note(f"data: {source.description}")
    profile = load_profile(args.profile)
    model, spec = build_model("resnet20", data_dir=source)
    test = source.split("test", "exact")
    train = source.split("train", "exact")
    out.mkdir(parents=True, exist_ok=True)

    def step(text: str) -> float:
        print(f"== {text}", flush=True)
        return time.perf_counter()

    t = step(f"float ResNet-20 (pretrained) on the {len(test)} exact CIFAR-10 test images")
    with progress_step("evaluating"):
        float_top1 = evaluate(model, test, norm=spec)
    print(f"top-1 {float_top1:.2f}%  ({time.perf_counter() - t:.1f} s)")

    from ompq_plugin.methods import DEFAULT_METHOD

    weight_bits = [int(b) for b in args.weight_bits.split(",")] if args.weight_bits else None
    widths = args.weight_bits or ",".join(map(str, profile.default_bits.weight))
    t = step(f"search ({DEFAULT_METHOD}): {args.avg_weight_bits:g}-bit average weights from "
             f"{widths}-bit layers, 8-bit activations, profile {profile.name}")
    samples = search_samples(source, spec, 64, seed=0)
    bits = search(model, samples, profile, avg_weight_bits=args.avg_weight_bits,
                  weight_bits=weight_bits, act_bits=[8], model_name="resnet20", seed=0)
    bits = bits.with_model_info(spec)
    print_config(bits)
    bits.save(out / "bits.json")

    t = step("quantize (Brevitas, integer-only) and PTQ on 256 training images"
             + ("" if args.no_gptq else " with GPTQ"))
    calib = normalise(train.images[choose_samples(train, 256, seed=0)], spec.mean, spec.std)
    qmodel = quantize(model, bits, profile)
    with progress_step("calibration, bias correction" + ("" if args.no_gptq else ", GPTQ")):
        calibrate(qmodel, calib, bias_correction=True, gptq=not args.no_gptq)
    with progress_step("evaluating"):
        q_top1 = evaluate(qmodel, test, norm=spec)
    print(f"quantized top-1 {q_top1:.2f}% (float {float_top1:.2f}%, "
          f"{32 / bits.average_weight_bits:.1f}x smaller weights)  "
          f"({time.perf_counter() - t:.1f} s)")
    meta = {"norm": [list(spec.mean), list(spec.std)], "input": input_of(spec).to_json(),
            "calib": 256, "bias_correction": True, "gptq": not args.no_gptq,
            "float_weights": spec.weights_path,
            "float_weights_sha256": file_sha256(spec.weights_path) if spec.weights_path else None}
    save_quantized(out / "resnet20_q.pt", qmodel, "resnet20", bits, profile, meta)

    t = step("export QONNX, verified against torch on 8 real test images before writing")
    images = normalise(test.images[:8], spec.mean, spec.std)
    with progress_step("export and verification"):
        report = export_qonnx(qmodel, out / "resnet20.onnx", images, bits)
    print(report.summary())
    print(f"\nwrote {out / 'bits.json'}, {out / 'resnet20_q.pt'}, {out / 'resnet20.onnx'}")
    print(f"next: ompq inspect {out / 'resnet20.onnx'}")
    return 0
