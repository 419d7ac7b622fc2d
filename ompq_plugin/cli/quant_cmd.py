"""ompq quantize / train / eval: BitConfig -> quantized model file, fine-tuning, top-1."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ompq_plugin.cli.common import (
    add_data_option,
    add_input_options,
    add_weights_guard,
    build_for_cli,
    input_of,
    note,
    open_source,
    prepared,
    progress_step,
    recorded_input,
    recorded_weights,
    refuse_random,
)
from ompq_plugin.errors import OmpqError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("quantize", help="build the integer-only Brevitas model of a BitConfig")
    p.add_argument("--model", help="registry name or path/to/file.py:factory "
                   "(default: the model named in the BitConfig)")
    p.add_argument("--weights", help="float checkpoint (default: the one the BitConfig records, "
                   "checked against its sha256; else the data folder's for a registry model)")
    add_weights_guard(p)
    p.add_argument("--bits", required=True, help="BitConfig JSON from `ompq search`")
    p.add_argument("--profile", help="profile name or TOML path (default: the BitConfig's)")
    add_data_option(p)
    add_input_options(p)
    p.add_argument("--calib", type=int, default=256, help="calibration images (training split)")
    p.add_argument("--bias-correction", action="store_true",
                   help="correct each layer's bias for the mean quantization error")
    p.add_argument("--gptq", action="store_true", help="GPTQ weight rounding (slower, better)")
    p.add_argument("-o", "--output", required=True, help="quantized model file to write")
    p.set_defaults(func=run_quantize)

    t = sub.add_parser("train", help="quantization-aware fine-tuning of a quantized model file")
    t.add_argument("qmodel", help="file written by `ompq quantize`")
    add_data_option(t)
    t.add_argument("--epochs", type=int, required=True, help="epochs over the training images")
    t.add_argument("--lr", type=float, default=0.002,
                   help="fine-tuning rate (default %(default)s: bench/accuracy.py measured it)")
    t.add_argument("--batch-size", type=int, default=128, help="per process under torchrun")
    t.add_argument("--train-variant", choices=("jpeg", "exact"), default="exact",
                   help="training images: 5,085 exact-pixel (default) or 50,000 JPEG "
                   "round-tripped (more images, but they pull the model towards JPEG pixels)")
    t.add_argument("--train-subset", type=int, help="use only the first N training images")
    t.add_argument("--seed", type=int, default=0, help="seed of the shuffling and augmentation")
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT.ckpt")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("-o", "--output", required=True, help="quantized model file to write")
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="top-1 accuracy of a float or quantized model")
    e.add_argument("qmodel", nargs="?", help="file written by `ompq quantize` / `ompq train`")
    e.add_argument("--model", help="float model: registry name or path/to/file.py:factory")
    e.add_argument("--weights", help="float checkpoint (default: the data folder's for a "
                   "registry model, else random weights)")
    add_data_option(e)
    add_input_options(e, "a float --model (a quantized file uses its recorded input)")
    e.add_argument("--variant", choices=("exact", "jpeg"), default="exact",
                   help="test images: 1,017 exact (default) or 10,000 JPEG")
    e.set_defaults(func=run_eval)


def run_quantize(args: argparse.Namespace) -> int:
    from ompq_plugin.bitconfig import BitConfig
    from ompq_plugin.data import choose_samples
    from ompq_plugin.hw_profiles.loader import load_profile
    from ompq_plugin.models import absolute_target, file_sha256
    from ompq_plugin.ptq import calibrate
    from ompq_plugin.qmodel_io import save_quantized
    from ompq_plugin.quantizer import quantize

    if args.calib < 1:
        raise OmpqError(f"--calib must be at least 1, got {args.calib}")
    bits = BitConfig.load(args.bits)
    profile = load_profile(args.profile or bits.profile)
    model_name = absolute_target(args.model or bits.model)
    weights = recorded_weights(args.weights, bits)
    source = open_source(args)
    model, spec, train = build_for_cli(args, model_name, source, "train", bits.input, weights)
    refuse_random(spec, args.random_weights)
    record = input_of(spec)
    samples = prepared(train.images[choose_samples(train, args.calib, seed=0)], record)
    qmodel = quantize(model, bits, profile)
    what = " + ".join(["calibration"] + (["GPTQ"] if args.gptq else [])
                      + (["bias correction"] if args.bias_correction else []))
    with progress_step(f"{what} on {len(samples)} training images"):
        calibrate(qmodel, samples, bias_correction=args.bias_correction, gptq=args.gptq)
    meta = {"norm": [list(spec.mean), list(spec.std)], "input": record.to_json(),
            "calib": args.calib, "bias_correction": args.bias_correction, "gptq": args.gptq,
            "float_weights": spec.weights_path,
            "float_weights_sha256": file_sha256(spec.weights_path) if spec.weights_path else None}
    save_quantized(args.output, qmodel, model_name, bits, profile, meta)
    print(f"wrote {args.output}: {len(bits.layers)} layers, average weight bits "
          f"{bits.average_weight_bits:.2f}, profile {profile.name}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ompq_plugin.qat import finetune
    from ompq_plugin.qmodel_io import load_quantized, save_quantized

    loaded = load_quantized(args.qmodel)
    record = recorded_input(loaded.meta, loaded.bits)
    note(record.describe() + f" (recorded in {args.qmodel})")
    source = open_source(args)
    size = record.size[1:]
    train = source.split("train", args.train_variant, size=size)
    images, labels = train.images, train.labels
    if labels is None:
        raise OmpqError(f"{train.source} has no labels: training needs labelled images")
    if args.train_subset is not None:
        if not 1 <= args.train_subset <= len(labels):
            raise OmpqError(f"--train-subset must be 1..{len(labels)}, got {args.train_subset}")
        images, labels = images[: args.train_subset], labels[: args.train_subset]
    val = source.split("test", "exact", size=size)
    norm: Any = (record.mean, record.std)
    val_images = val.images
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != record.size:
        images, val_images, norm = prepared(images, record), prepared(val.images, record), None
    validation = (val_images, val.labels) if val.labels is not None else None
    history = finetune(
        loaded.model, (images, labels), validation, args.epochs, args.lr,
        batch_size=args.batch_size, norm=norm, seed=args.seed,
        checkpoint=Path(f"{args.output}.ckpt"), resume=args.resume, bits=loaded.bits,
        progress=not args.no_progress,
    )
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        meta = dict(loaded.meta)
        meta["input"] = record.to_json()
        meta["qat"] = {"epochs": args.epochs, "lr": args.lr, "train_variant": args.train_variant,
                       "train_images": len(labels),
                       "history": [h.__dict__ for h in history]}
        save_quantized(args.output, loaded.model, loaded.model_name, loaded.bits,
                       loaded.profile, meta)
        print(f"wrote {args.output}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ompq_plugin.evaluation import evaluate
    from ompq_plugin.qmodel_io import load_quantized

    if (args.qmodel is None) == (args.model is None):
        raise OmpqError("pass either a quantized model file or --model (with optional --weights)")
    source = open_source(args)
    if args.qmodel is not None:
        loaded = load_quantized(args.qmodel)
        model: torch.nn.Module = loaded.model
        record = recorded_input(loaded.meta, loaded.bits)
        note(record.describe() + f" (recorded in {args.qmodel})")
        test = source.split("test", args.variant, size=record.size[1:])
        what = f"{args.qmodel} ({loaded.model_name}, {loaded.bits.average_weight_bits:.2f}-bit avg)"
    else:
        model, spec, test = build_for_cli(args, args.model, source, "test", None, args.weights)
        record = input_of(spec)
        what = f"{args.model} (float{'' if spec.pretrained else ', random weights'})"
    if test.labels is None:
        raise OmpqError(f"{test.source} has no labels: evaluation needs labelled images")
    with progress_step(f"evaluating on {len(test)} test images"):
        acc = evaluate(model, test, norm=record)
    print(f"{what}: top-1 {acc:.2f}% on {len(test)} test images of {source.description}")
    return 0
