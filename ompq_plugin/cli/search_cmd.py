"""``ompq search``: choose per-layer bits and write a BitConfig."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from ompq_plugin.budgets import Budgets
from ompq_plugin.cli.common import add_model_options
from ompq_plugin.errors import OmpqError
from ompq_plugin.methods import (
    DEFAULT_ACT_WEIGHT,
    DEFAULT_BETA,
    DEFAULT_METHOD,
    HAWQ_IMAGES,
    METHOD_HELP,
    METHODS,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="choose per-layer bit widths with OMPQ and write a BitConfig JSON",
        description="Float model + N real images + hardware profile -> per-layer bits.",
    )
    add_model_options(p)
    p.add_argument("--profile", default="generic", help="profile name or .toml path")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--weight-memory-kib", type=float, help="total weight memory budget")
    mem.add_argument("--avg-weight-bits", type=float, help="weight memory as average bits/param")
    p.add_argument("--bops-g", type=float, help="BOPs budget in G (MACs x w x a)")
    p.add_argument("--act-buffer-kib", type=float, help="largest activation buffer budget")
    add_sampling_options(p)
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                   help="allocation method (default %(default)s): "
                   + "; ".join(f"{m}: {h}" for m, h in METHOD_HELP.items()))
    p.add_argument("--hessian-images", type=int, default=HAWQ_IMAGES,
                   help="labelled training images for --method hawq (default %(default)s)")
    add_choice_options(p)
    p.add_argument("--time-limit", type=float, default=60.0, help="solver time limit (s)")
    p.add_argument("-o", "--output", required=True, help="BitConfig JSON to write")
    p.add_argument("--json", action="store_true", help="print the BitConfig JSON, not tables")
    p.add_argument("--orm-plot", metavar="PNG",
                   help="also save the ORM matrix as a heat map, with the chosen bits per layer "
                   "(.png, .svg or .pdf)")
    p.add_argument("--bits-plot", metavar="PNG",
                   help="also save a per-layer chart of the chosen bits (.png, .svg or .pdf)")
    p.set_defaults(func=run)


def add_choice_options(p: argparse.ArgumentParser) -> None:
    """What the search may choose and how it ranks layers, shared by `ompq search` and
    `ompq pareto`: --weight-bits, --act-bits, --orm-form, --importance, --pin,
    --no-pin-first-last, --allow-unsupported."""
    p.add_argument("--weight-bits", type=_bit_list, metavar="LIST",
                   help="narrow the profile's weight bits for free layers, e.g. 3,4,5,6,8")
    p.add_argument("--act-bits", type=_bit_list, metavar="LIST",
                   help="narrow the profile's activation bits for free layers, e.g. 8")
    p.add_argument("--orm-form", default="centred", choices=["centred", "uncentred"],
                   help="centred Grams (linear CKA, the authors' code) or the paper's Eq. 6")
    p.add_argument(
        "--importance", default="exp", choices=["exp", "neglog", "neg", "negcube", "negexp"],
        help="importance function of gamma: exp(-beta g) or the paper's alternatives",
    )
    p.add_argument("--pin", action="append", default=[], metavar="NAME=W/A",
                   help="fix a layer's bits (repeatable; * leaves one side free)")
    p.add_argument("--no-pin-first-last", action="store_true",
                   help="let the solver choose the first and last layer's bits too")
    p.add_argument("--allow-unsupported", action="store_true",
                   help="keep unsupported layer types in float instead of stopping")


def choice_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run_search keywords of :func:`add_choice_options`' flags (pins parsed: bad input
    fails before any work)."""
    from ompq_plugin.layer_choices import parse_pin

    return {
        "weight_bits": args.weight_bits,
        "act_bits": args.act_bits,
        "orm_form": args.orm_form,
        "importance_fn": args.importance,
        "pins": dict(parse_pin(text) for text in args.pin),
        "pin_first_last": not args.no_pin_first_last,
        "allow_unsupported": args.allow_unsupported,
    }


# the budget flags of `ompq search` and `ompq pareto` (argparse dests)
BUDGET_FLAGS = ("avg_weight_bits", "weight_memory_kib", "bops_g", "act_buffer_kib")


def check_positive(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Each named flag, when given, is a positive finite number (an infinite budget is no
    budget: the flag is left out)."""
    for name in names:
        value = getattr(args, name, None)
        if value is None or (math.isfinite(value) and value > 0):
            continue
        flag = "--" + name.replace("_", "-")
        fix = (f"give a positive value, or leave {flag} out for no limit"
               if name in BUDGET_FLAGS else "give a positive number")
        kind = "positive number" if isinstance(value, int) else "positive finite number"
        raise OmpqError(f"{flag} must be a {kind}, got {value}; {fix}")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """--beta, --samples, --seed and --device, shared by `ompq search` and `ompq pareto`."""
    p.add_argument("--beta", type=float, default=None,
                   help="importance spread for the ORM methods (default: the method's, "
                   + ", ".join(f"{m} {b}" for m, b in DEFAULT_BETA.items()) + ")")
    p.add_argument("--act-weight", type=float, default=DEFAULT_ACT_WEIGHT,
                   help="ompq-noise: weight of the activation errors against the weight errors "
                   "(default: %(default)s, chosen on a validation split)")
    p.add_argument("--samples", type=int, help="N search images (default: 64 ResNet, 32 MobileNet)")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of search images")
    p.add_argument("--device", default="cpu",
                   help="where the search's forward pass runs: cpu or cuda (default: %(default)s; "
                   "the solver always runs on the CPU)")


def _bit_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of bits, e.g. 4,8") from None


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path is usable (and distinct) before any work."""
    from ompq_plugin.fileio import check_writable
    from ompq_plugin.report import check_plot_path

    check_writable(args.output)
    paths = {args.output: "-o"}
    for flag, path in (("--orm-plot", args.orm_plot), ("--bits-plot", args.bits_plot)):
        if path is None:
            continue
        check_plot_path(path, flag)
        if path in paths:
            raise OmpqError(f"{flag} {path} is also {paths[path]}; give each output its own name")
        paths[path] = flag


def run(args: argparse.Namespace) -> int:
    from ompq_plugin.cli.common import build_for_cli, open_source
    from ompq_plugin.data import search_samples
    from ompq_plugin.hw_profiles import load_profile
    from ompq_plugin.searcher import run_search

    check_positive(args, (*BUDGET_FLAGS, "samples", "hessian_images", "time_limit"))
    choices = choice_options(args)  # bad pins fail before any work
    _check_outputs(args)
    profile = load_profile(args.profile)
    source = open_source(args)
    model, spec, _ = build_for_cli(args, args.model, source, weights=args.weights)
    samples = search_samples(source, spec, args.samples, seed=args.seed)
    labelled = (_hessian_images(source, spec, args.hessian_images, args.seed)
                if args.method == "hawq" else None)
    budgets = Budgets.from_user(  # --avg-weight-bits: over the layers the search discovers
        weight_memory_kib=args.weight_memory_kib,
        bops_g=args.bops_g,
        act_buffer_kib=args.act_buffer_kib,
    )
    result = run_search(
        model,
        samples,
        profile,
        budgets,
        beta=args.beta,
        method=args.method,
        act_weight=args.act_weight,
        model_name=spec.name,
        seed=args.seed,
        time_limit_s=args.time_limit,
        labelled=labelled,
        **choices,
        avg_weight_bits=args.avg_weight_bits,
        orm=args.orm_plot is not None,
        device=args.device,
    )
    config = result.config.with_model_info(spec)
    if not spec.pretrained:
        print(f"ompq: note: {spec.name} has random weights (no checkpoint loaded)", file=sys.stderr)
    figures = {}  # drawn first: a failure there leaves no file at all
    if args.orm_plot:
        from ompq_plugin.report import orm_figure

        figures[args.orm_plot] = orm_figure(
            result.orm, result.layers.names,
            f"ORM of {spec.name} ({config.orm_form}, N={config.samples})", config)
    if args.bits_plot:
        from ompq_plugin.report import bits_figure

        figures[args.bits_plot] = bits_figure(config)
    from ompq_plugin.fileio import atomic_paths
    from ompq_plugin.report import save_figure

    ends = result.range_ends
    written = [args.output, *figures]
    with atomic_paths(*written) as (bits_tmp, *figure_tmps):  # all files appear, or none
        config.save(bits_tmp)
        for (path, fig), tmp in zip(figures.items(), figure_tmps, strict=True):
            save_figure(fig, tmp, fmt=path.rsplit(".", 1)[-1].lower())
    if args.json:
        print(json.dumps({**config.to_json(), "range_ends": ends}, indent=2))
        print(f"wrote {', '.join(written)}", file=sys.stderr)  # stdout stays pure JSON
    else:
        from ompq_plugin.report import print_config

        print_config(config)
        if result.orm is None and config.orm_form is not None:
            print(f"note: ORM {config.orm_form}: {config.method} weights every layer equally at "
                  "this beta, so the Grams were skipped (--beta > 0 or --orm-plot computes it)")
        released = _released_end_pins(config, profile, choices)
        if released:
            print(f"note: uniform released the first/last-layer pins ({released}): its widest "
                  "width fits the budget only without them (--method ompq-noise keeps them)")
        if ends:
            lows = sum(1 for v in ends.values() if v == "min")
            layers = "free layer sits" if len(ends) == 1 else "free layers sit"
            print(f"note: {len(ends)} {layers} at an end of their allowed range "
                  f"({lows} at the lowest width, {len(ends) - lows} at the highest): "
                  + ", ".join(f"{n}={v}" for n, v in ends.items()))
        print(f"wrote {', '.join(written)}")
    return 0


def _released_end_pins(config: Any, profile: Any, choices: dict[str, Any]) -> str:
    """The first/last layers a ``uniform`` search moved off the profile's pinned bits (it
    releases those pins when a uniform width cannot fit with them), as ``name W/A`` text;
    ``choices``: the search's :func:`choice_options` (its pins parsed)."""
    if config.method != "uniform" or not choices["pin_first_last"] or len(config.layers) < 2:
        return ""
    pinned = (profile.pinned_weight_bits, profile.pinned_act_bits)
    moved = [lb for lb in (config.layers[0], config.layers[-1])
             if lb.name not in choices["pins"] and (lb.weight_bits, lb.act_bits) != pinned]
    return ", ".join(f"{lb.name} {lb.weight_bits}/{lb.act_bits}" for lb in moved)


def _hessian_images(source: Any, spec: Any, n: int, seed: int) -> tuple[Any, Any]:
    """HAWQ's labelled images: ``n`` training images, class-balanced, prepared as the model's."""
    from ompq_plugin.data import choose_samples, prepare

    train = source.split("train", "exact", size=spec.input_size[1:])
    if train.labels is None:
        raise OmpqError(f"--method hawq needs labelled training images; {train.source} has no "
                        "labels: pass --data with labels or choose another --method")
    idx = choose_samples(train, n, seed=seed + 1, balanced=True)
    x = prepare(train.images[idx], spec.mean, spec.std, spec.input_size[1:])
    return x.contiguous(), train.labels[idx]
