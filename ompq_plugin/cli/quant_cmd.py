"""ompq quantize / train / eval: BitConfig -> quantized model file, fine-tuning, top-1."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ompq_plugin.errors import OmpqError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("quantize", help="build the integer-only Brevitas model of a BitConfig")
    p.add_argument("--model", help="registry name or path/to/file.py:factory "
                   "(default: the model named in the BitConfig)")
    p.add_argument("--weights", help="float checkpoint (default: the data folder's, if any)")
    p.add_argument("--bits", required=True, help="BitConfig JSON from `ompq search`")
    p.add_argument("--profile", help="profile name or TOML path (default: the BitConfig's)")
    p.add_argument("--data", help="data folder (default $OMPQ_DATA_DIR)")
    p.add_argument("--calib", type=int, default=256, help="calibration images (training split)")
    p.add_argument("--bias-correction", action="store_true")
    p.add_argument("--gptq", action="store_true")
    p.add_argument("-o", "--output", required=True, help="quantized model file to write")
    p.set_defaults(func=run_quantize)

    t = sub.add_parser("train", help="quantization-aware fine-tuning of a quantized model file")
    t.add_argument("qmodel", help="file written by `ompq quantize`")
    t.add_argument("--data", help="data folder (default $OMPQ_DATA_DIR)")
    t.add_argument("--epochs", type=int, required=True)
    t.add_argument("--lr", type=float, default=0.002,
                   help="fine-tuning rate (default %(default)s: bench/accuracy.py measured it)")
    t.add_argument("--batch-size", type=int, default=128, help="per process under torchrun")
    t.add_argument("--train-variant", choices=("jpeg", "exact"), default="exact",
                   help="training images: 5,085 exact-pixel (default) or 50,000 JPEG "
                   "round-tripped (more images, but they pull the model towards JPEG pixels)")
    t.add_argument("--train-subset", type=int, help="use only the first N training images")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT.ckpt")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("-o", "--output", required=True, help="quantized model file to write")
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="top-1 accuracy of a float or quantized model")
    e.add_argument("qmodel", nargs="?", help="file written by `ompq quantize` / `ompq train`")
    e.add_argument("--model", help="float model: registry name or path/to/file.py:factory")
    e.add_argument("--weights", help="float checkpoint (default: the data folder's, if any)")
    e.add_argument("--data", help="data folder (default $OMPQ_DATA_DIR)")
    e.add_argument("--variant", choices=("exact", "jpeg"), default="exact",
                   help="test images: 1,017 exact (default) or 10,000 JPEG")
    e.set_defaults(func=run_eval)


def _norm(spec: Any) -> list[list[float]]:
    return [list(spec.mean), list(spec.std)]


def run_quantize(args: argparse.Namespace) -> int:
    from ompq_plugin.bitconfig import BitConfig
    from ompq_plugin.data import (
        choose_samples,
        cifar_folder,
        load_cifar10,
        normalise,
        resolve_data_dir,
    )
    from ompq_plugin.hw_profiles.loader import load_profile
    from ompq_plugin.models import build_model
    from ompq_plugin.ptq import calibrate
    from ompq_plugin.qmodel_io import save_quantized
    from ompq_plugin.quantizer import quantize

    if args.calib < 1:
        raise OmpqError(f"--calib must be at least 1, got {args.calib}")
    data_dir = resolve_data_dir(args.data)
    bits = BitConfig.load(args.bits)
    profile = load_profile(args.profile or bits.profile)
    model_name = args.model or bits.model
    model, spec = build_model(model_name, args.weights, data_dir)
    train = load_cifar10(cifar_folder(data_dir, "exact"), "train")
    idx = choose_samples(train, args.calib, seed=0)
    samples = normalise(train.images[idx], spec.mean, spec.std)
    qmodel = quantize(model, bits, profile)
    calibrate(qmodel, samples, bias_correction=args.bias_correction, gptq=args.gptq)
    meta = {"norm": _norm(spec), "calib": args.calib, "bias_correction": args.bias_correction,
            "gptq": args.gptq, "float_weights": spec.weights_path}
    save_quantized(args.output, qmodel, model_name, bits, profile, meta)
    for note in qmodel.ompq_report.notes():
        print(f"ompq: note: {note}", file=sys.stderr)
    print(f"wrote {args.output}: {len(bits.layers)} layers, average weight bits "
          f"{bits.average_weight_bits:.2f}, profile {profile.name}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ompq_plugin.data import cifar_folder, load_cifar10, resolve_data_dir
    from ompq_plugin.qat import finetune
    from ompq_plugin.qmodel_io import load_quantized, save_quantized

    data_dir = resolve_data_dir(args.data)
    loaded = load_quantized(args.qmodel)
    norm = loaded.meta.get("norm")
    if norm is None:
        raise OmpqError(f"{args.qmodel} has no normalisation stored; re-create it with "
                        "`ompq quantize`")
    train = load_cifar10(cifar_folder(data_dir, args.train_variant), "train")
    images, labels = train.images, train.labels
    if args.train_subset is not None:
        if not 1 <= args.train_subset <= len(labels):
            raise OmpqError(f"--train-subset must be 1..{len(labels)}, got {args.train_subset}")
        images, labels = images[: args.train_subset], labels[: args.train_subset]
    val = load_cifar10(cifar_folder(data_dir, "exact"), "test")
    history = finetune(
        loaded.model, (images, labels), (val.images, val.labels), args.epochs, args.lr,
        batch_size=args.batch_size, norm=(tuple(norm[0]), tuple(norm[1])), seed=args.seed,
        checkpoint=Path(f"{args.output}.ckpt"), resume=args.resume, bits=loaded.bits,
        progress=not args.no_progress,
    )
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        meta = dict(loaded.meta)
        meta["qat"] = {"epochs": args.epochs, "lr": args.lr, "train_variant": args.train_variant,
                       "train_images": len(labels),
                       "history": [h.__dict__ for h in history]}
        save_quantized(args.output, loaded.model, loaded.model_name, loaded.bits,
                       loaded.profile, meta)
        print(f"wrote {args.output}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ompq_plugin.data import cifar_folder, load_cifar10, resolve_data_dir
    from ompq_plugin.evaluation import evaluate
    from ompq_plugin.models import build_model
    from ompq_plugin.qmodel_io import load_quantized

    if (args.qmodel is None) == (args.model is None):
        raise OmpqError("pass either a quantized model file or --model (with optional --weights)")
    data_dir = resolve_data_dir(args.data)
    test = load_cifar10(cifar_folder(data_dir, args.variant), "test")
    if args.qmodel is not None:
        loaded = load_quantized(args.qmodel)
        model: torch.nn.Module = loaded.model
        norm = loaded.meta.get("norm")
        if norm is None:
            raise OmpqError(f"{args.qmodel} has no normalisation stored; re-create it")
        what = f"{args.qmodel} ({loaded.model_name}, {loaded.bits.average_weight_bits:.2f}-bit avg)"
        mean_std: Any = (tuple(norm[0]), tuple(norm[1]))
    else:
        model, spec = build_model(args.model, args.weights, data_dir)
        mean_std = spec
        what = f"{args.model} (float{'' if spec.pretrained else ', random weights'})"
    acc = evaluate(model, test, norm=mean_std)
    print(f"{what}: top-1 {acc:.2f}% on {len(test.labels)} {args.variant} test images")
    return 0
