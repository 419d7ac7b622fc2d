"""``ompq demo``: the whole flow on the embedded default, with real data and real weights.

Pretrained CIFAR-10 ResNet-20 -> OMPQ search (64 real training images, 4-bit average weights
from 3..8-bit layers, 8-bit activations, generic integer target) -> Brevitas quantization ->
PTQ (calibration, bias correction, GPTQ) -> top-1 on the 1017 exact-pixel test images ->
verified QONNX file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ompq_plugin.errors import OmpqError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="search -> quantize -> PTQ -> evaluate -> export on ResNet-20",
                       description=__doc__)
    p.add_argument("--data", help="data folder (default: $OMPQ_DATA_DIR)")
    p.add_argument("--profile", default="generic", help="profile name or .toml path")
    p.add_argument("--avg-weight-bits", type=float, default=4.0)
    p.add_argument("--weight-bits", default="3,4,5,6,7,8",
                   help="weight widths the free layers may use (2-bit layers cost ~9 points "
                   "after PTQ on ResNet-20: bench/results/accuracy.json)")
    p.add_argument("--no-gptq", action="store_true", help="skip GPTQ (faster, less accurate)")
    p.add_argument("-o", "--output-dir", default="ompq-demo", help="folder for the three files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ompq_plugin.budgets import Budgets
    from ompq_plugin.data import (
        choose_samples,
        cifar_folder,
        load_cifar10,
        normalise,
        resolve_data_dir,
        search_samples,
    )
    from ompq_plugin.evaluation import evaluate
    from ompq_plugin.exporters import export_qonnx
    from ompq_plugin.hw_profiles import load_profile
    from ompq_plugin.models import build_model
    from ompq_plugin.ptq import calibrate
    from ompq_plugin.qmodel_io import save_quantized
    from ompq_plugin.quantizer import quantize
    from ompq_plugin.report import print_config
    from ompq_plugin.searcher import search

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise OmpqError(f"{out} exists and is not a folder; pass another -o")
    data_dir = resolve_data_dir(args.data)
    profile = load_profile(args.profile)
    model, spec = build_model("resnet20", data_dir=data_dir)
    test = load_cifar10(cifar_folder(data_dir, "exact"), "test")
    train = load_cifar10(cifar_folder(data_dir, "exact"), "train")
    out.mkdir(parents=True, exist_ok=True)

    def step(text: str) -> float:
        print(f"== {text}", flush=True)
        return time.perf_counter()

    t = step("float ResNet-20 (pretrained) on the 1017 exact CIFAR-10 test images")
    float_top1 = evaluate(model, test, norm=spec)
    print(f"top-1 {float_top1:.2f}%  ({time.perf_counter() - t:.1f} s)")

    weight_bits = [int(b) for b in args.weight_bits.split(",")]
    t = step(f"OMPQ search: {args.avg_weight_bits:g}-bit average weights from "
             f"{args.weight_bits}-bit layers, 8-bit activations, profile {profile.name}")
    samples = search_samples(data_dir, spec, 64, seed=0)
    total_params = sum(p.numel() for n, p in model.named_parameters()
                       if n.endswith("weight") and p.dim() > 1)
    bits = search(model, samples, profile,
                  Budgets(weight_memory_bits=args.avg_weight_bits * total_params),
                  weight_bits=weight_bits, act_bits=[8], model_name="resnet20", seed=0)
    print_config(bits)
    bits.save(out / "bits.json")

    t = step("quantize (Brevitas, integer-only) and PTQ on 256 training images"
             + ("" if args.no_gptq else " with GPTQ"))
    calib = normalise(train.images[choose_samples(train, 256, seed=0)], spec.mean, spec.std)
    qmodel = quantize(model, bits, profile)
    calibrate(qmodel, calib, bias_correction=True, gptq=not args.no_gptq)
    q_top1 = evaluate(qmodel, test, norm=spec)
    print(f"quantized top-1 {q_top1:.2f}% (float {float_top1:.2f}%, "
          f"{32 / bits.average_weight_bits:.1f}x smaller weights)  "
          f"({time.perf_counter() - t:.1f} s)")
    meta = {"norm": [list(spec.mean), list(spec.std)], "calib": 256, "bias_correction": True,
            "gptq": not args.no_gptq, "float_weights": spec.weights_path}
    save_quantized(out / "resnet20_q.pt", qmodel, "resnet20", bits, profile, meta)

    t = step("export QONNX, verified against torch on 8 real test images before writing")
    images = normalise(test.images[:8], spec.mean, spec.std)
    report = export_qonnx(qmodel, out / "resnet20.onnx", images, bits)
    print(report.summary())
    print(f"\nwrote {out / 'bits.json'}, {out / 'resnet20_q.pt'}, {out / 'resnet20.onnx'}")
    print(f"next: ompq inspect {out / 'resnet20.onnx'}")
    return 0
