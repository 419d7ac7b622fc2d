"""ompq quantize / train / eval: BitConfig -> quantized model file, fine-tuning, top-1."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

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
from ompq_plugin.errors import Interrupted, OmpqError

DEFAULT_LR = 0.002


def add_parser(sub: Any) -> None:
    p = sub.add_parser("quantize", help="build the integer-only Brevitas model of a BitConfig")
    p.add_argument("--model", help="registry name or path/to/file.py:factory "
                   "(default: the model named in the BitConfig)")
    p.add_argument("--weights", help="float checkpoint (default: the one the BitConfig records, "
                   "checked against its sha256; else the data folder's for a registry model)")
    add_weights_guard(p)
    p.add_argument("--bits", required=True,
                   help="BitConfig JSON from `ompq search` (or a point from "
                   "`ompq pareto --bits-dir`)")
    p.add_argument("--profile", help="profile name or TOML path (default: the BitConfig's)")
    add_data_option(p)
    add_input_options(p)
    p.add_argument("--calib", type=int, default=256, help="calibration images (training split)")
    # default PTQ recipe: the one bench/allocation.py measured best on its validation split
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=True,
                   help="correct each layer's bias for the mean quantization error "
                   "(default: on)")
    p.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ weight rounding (slower, better; default: on)")
    p.add_argument("-o", "--output", required=True, help="quantized model file to write")
    p.set_defaults(func=run_quantize)

    t = sub.add_parser("train", help="quantization-aware fine-tuning of a quantized model file")
    t.add_argument("qmodel", help="file written by `ompq quantize`")
    add_data_option(t)
    t.add_argument("--epochs", type=int, required=True, help="epochs over the training images")
    t.add_argument("--lr", type=float, default=None,
                   help=f"fine-tuning rate (default {DEFAULT_LR}: bench/accuracy.py measured it; "
                   "with --resume: the checkpoint's)")
    t.add_argument("--batch-size", type=int, default=128, help="per process under torchrun")
    t.add_argument("--train-variant", choices=("jpeg", "exact"), default="exact",
                   help="training images: 5,085 exact-pixel (default) or 50,000 JPEG "
                   "round-tripped (more images, but they pull the model towards JPEG pixels)")
    t.add_argument("--train-subset", type=int, help="use only the first N training images")
    t.add_argument("--seed", type=int, default=0, help="seed of the shuffling and augmentation")
    t.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in OUTPUT.ckpt (with the same --epochs it "
                   "repeats an uninterrupted run; another --epochs re-plans the cosine from the "
                   "saved epoch down to 0, so the rate never rises)")
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bar: one line per epoch (for logs)")
    t.add_argument("-o", "--output", required=True, help="quantized model file to write")
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="top-1 accuracy of a float, quantized or exported model")
    e.add_argument("qmodel", nargs="?", help="file written by `ompq quantize` / `ompq train`, "
                   "or an ONNX file (QONNX runs in qonnx, QCDQ in onnxruntime)")
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
    from ompq_plugin.fileio import check_writable
    from ompq_plugin.hw_profiles.loader import load_profile
    from ompq_plugin.models import absolute_target, file_sha256
    from ompq_plugin.ptq import calibrate
    from ompq_plugin.qmodel_io import save_quantized
    from ompq_plugin.quantizer import quantize

    if args.calib < 1:
        raise OmpqError(f"--calib must be at least 1, got {args.calib}; pass e.g. --calib 256")
    check_writable(args.output)
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
    for text in qmodel.ompq_report.notes():
        print(f"ompq: note: {text}", file=sys.stderr)
    fixed = len(qmodel.ompq_report.fixed_layers)
    # fixed layers the BitConfig counts that quantize does not build: the export adds them
    later = [lb.name for lb in bits.fixed_layers if lb.name not in qmodel.ompq_report.fixed_layers]
    extra = ([f"+{fixed} frozen shortcut convs"] if fixed else []) + (
        [f"{', '.join(later)}: a conv in the {profile.name} export, counted"] if later else [])
    print(f"wrote {args.output}: {len(bits.layers)} layers"
          + (f" ({'; '.join(extra)})" if extra else "")
          + f", average weight bits {bits.average_weight_bits:.2f} (the model's layers), "
          f"profile {profile.name}")
    return 0


def _train_hint(args: argparse.Namespace, saved_epoch: int, ckpt: Path) -> str:
    """What is on disk after an interrupted `ompq train`, and the command that continues."""
    line = list(getattr(args, "command_line", ["ompq", "train"]))
    not_written = f"{args.output} was not written"
    if saved_epoch == 0:
        again = shlex.join([a for a in line if a != "--resume"])
        return f"no epoch finished, {not_written}; start again with: {again}"
    resume = shlex.join(line if "--resume" in line else [*line, "--resume"])
    return (f"{ckpt} holds epoch {saved_epoch} of {args.epochs}, {not_written}; "
            f"continue with: {resume}")


def _check_checkpoint(args: argparse.Namespace, ckpt: Path) -> Any:
    """The checkpoint to resume (or None), refusing what would lose or repeat work."""
    from ompq_plugin.qat import read_resume_point
    from ompq_plugin.qat_plan import check_epochs

    line = shlex.join(getattr(args, "command_line", ["ompq", "train"]))
    if not args.resume:
        if not ckpt.exists():
            return None
        point = read_resume_point(ckpt)
        if not point.finished:
            raise OmpqError(
                f"{ckpt} holds an unfinished run (epoch {point.epoch} of {point.plan.epochs}); "
                f"continue it with `{line} --resume`, or delete it to start again"
            )
        return None
    if not ckpt.exists():
        raise OmpqError(f"--resume: checkpoint {ckpt} not found (it is OUTPUT.ckpt, so -o must "
                        "name the same output as the run to continue); or drop --resume")
    point = read_resume_point(ckpt)
    check_epochs(point, args.epochs, where=f"checkpoint {ckpt}", output=args.output)
    if point.finished and Path(args.output).exists():
        raise OmpqError(
            f"checkpoint {ckpt} already finished all {point.plan.epochs} epochs and "
            f"{args.output} exists; nothing to run, nothing was written. To train further, "
            f"fine-tune it in a new run: `ompq train {args.output} --epochs N -o NEW`"
        )
    return point


def run_train(args: argparse.Namespace) -> int:
    from ompq_plugin.cli.inputs import require_quantized_model_file
    from ompq_plugin.fileio import check_writable

    if args.epochs < 1:
        raise OmpqError(f"--epochs must be at least 1, got {args.epochs}")
    if args.lr is not None and not args.lr > 0:
        raise OmpqError(f"--lr must be positive, got {args.lr}; e.g. --lr {DEFAULT_LR}")
    if args.batch_size < 1:
        raise OmpqError(f"--batch-size must be at least 1, got {args.batch_size}")
    require_quantized_model_file(args.qmodel, "train")
    check_writable(args.output)
    ckpt = check_writable(f"{args.output}.ckpt", flag="-o (its checkpoint OUTPUT.ckpt)")
    point = _check_checkpoint(args, ckpt)
    lr = args.lr if args.lr is not None else point.plan.lr if point else DEFAULT_LR

    import torch

    from ompq_plugin.qat import EpochStats, finetune
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
    if point is not None:
        planned = point.plan.epochs
        print(f"resuming {ckpt}: epoch {point.epoch} of {planned} done"
              + ("; all done, writing its model" if point.finished else
                 f"; continuing at epoch {point.epoch + 1} of {args.epochs}")
              + ("" if args.epochs == planned else
                 f" (cosine re-planned from the saved rate down to 0 at epoch {args.epochs}; "
                 f"the checkpoint planned {planned})"), flush=True)
    saved = {"epoch": point.epoch if point else 0}

    def on_epoch(stats: EpochStats) -> None:
        saved["epoch"] = stats.epoch
        if args.no_progress:
            val_text = "" if stats.val_acc is None else f", val acc {stats.val_acc:.2f}%"
            print(f"epoch {stats.epoch}/{args.epochs}: loss {stats.train_loss:.3f}, train acc "
                  f"{stats.train_acc:.2f}%{val_text}, lr {stats.lr:.3g} ({stats.seconds:.1f} s); "
                  f"checkpoint {ckpt}", flush=True)

    try:
        history = finetune(
            loaded.model, (images, labels), validation, args.epochs, lr,
            batch_size=args.batch_size, norm=norm, seed=args.seed,
            checkpoint=ckpt, resume=args.resume, bits=loaded.bits,
            progress=not args.no_progress, on_epoch=on_epoch,
        )
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            meta = dict(loaded.meta)
            meta["input"] = record.to_json()
            meta["qat"] = {"epochs": args.epochs, "lr": lr, "train_variant": args.train_variant,
                           "train_images": len(labels),
                           "history": [h.__dict__ for h in history]}
            save_quantized(args.output, loaded.model, loaded.model_name, loaded.bits,
                           loaded.profile, meta)
            last = history[-1] if history else None
            acc = "" if last is None or last.val_acc is None else (
                f" (val acc {last.val_acc:.2f}% after epoch {last.epoch})")
            print(f"wrote {args.output}{acc}, checkpoint {ckpt}")
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        raise Interrupted(signum, _train_hint(args, saved["epoch"], ckpt)) from None
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ompq_plugin.cli.inputs import file_kind
    from ompq_plugin.evaluation import evaluate
    from ompq_plugin.qmodel_io import load_quantized

    if (args.qmodel is None) == (args.model is None):
        raise OmpqError("pass either a model file (quantized .pt or exported .onnx) or --model "
                        "(with optional --weights), not both")
    source = open_source(args)
    if args.qmodel is not None and file_kind(args.qmodel) == "onnx":
        from ompq_plugin.onnx_eval import evaluate_onnx

        test = source.split("test", args.variant)
        if test.labels is None:
            raise OmpqError(f"{test.source} has no labels: evaluation needs labelled images")
        result = evaluate_onnx(args.qmodel, test.images.numpy(), test.labels.numpy())
        print(f"{args.qmodel} ({result.runtime}): top-1 {result.top1:.2f}% on {result.images} "
              f"test images of {source.description} (normalised with {result.norm_source})")
        return 0
    if args.qmodel is not None:
        loaded = load_quantized(args.qmodel)
        model: Any = loaded.model
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
