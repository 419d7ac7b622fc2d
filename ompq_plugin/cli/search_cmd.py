"""``ompq search``: choose per-layer bits and write a BitConfig."""

from __future__ import annotations

import argparse
import json
import sys

from ompq_plugin.budgets import Budgets
from ompq_plugin.cli.common import add_model_options
from ompq_plugin.errors import OmpqError


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
    p.add_argument("--weight-bits", type=_bit_list, metavar="LIST",
                   help="narrow the profile's weight bits for free layers, e.g. 3,4,5,6,8")
    p.add_argument("--act-bits", type=_bit_list, metavar="LIST",
                   help="narrow the profile's activation bits for free layers, e.g. 8")
    p.add_argument("--beta", type=float, default=None, help="importance spread (default 1.0)")
    p.add_argument("--samples", type=int, help="N search images (default: 64 ResNet, 32 MobileNet)")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of search images")
    p.add_argument("--method", default="ompq", choices=["ompq"], help="allocation method")
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
    p.add_argument("--time-limit", type=float, default=60.0, help="solver time limit (s)")
    p.add_argument("-o", "--output", required=True, help="BitConfig JSON to write")
    p.add_argument("--json", action="store_true", help="print the BitConfig JSON, not tables")
    p.add_argument("--orm-plot", metavar="PNG", help="also save the ORM matrix as a heat map")
    p.set_defaults(func=run)


def _bit_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of bits, e.g. 4,8") from None


def run(args: argparse.Namespace) -> int:
    from ompq_plugin.cli.common import build_for_cli, open_source
    from ompq_plugin.data import search_samples
    from ompq_plugin.hw_profiles import load_profile
    from ompq_plugin.layers import QUANTIZABLE_TYPES
    from ompq_plugin.searcher import DEFAULT_BETA, parse_pin, run_search

    for name in ("weight_memory_kib", "avg_weight_bits", "bops_g", "act_buffer_kib", "samples"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise OmpqError(f"--{name.replace('_', '-')} must be positive, got {value}")
    pins = dict(parse_pin(text) for text in args.pin)  # bad input fails before any work
    profile = load_profile(args.profile)
    source = open_source(args)
    model, spec, _ = build_for_cli(args, args.model, source, weights=args.weights)
    samples = search_samples(source, spec, args.samples, seed=args.seed)
    total_params = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, QUANTIZABLE_TYPES)
    )
    budgets = Budgets.from_user(
        weight_memory_kib=args.weight_memory_kib,
        bops_g=args.bops_g,
        act_buffer_kib=args.act_buffer_kib,
        avg_weight_bits=args.avg_weight_bits,
        total_params=total_params,
    )
    result = run_search(
        model,
        samples,
        profile,
        budgets,
        beta=DEFAULT_BETA if args.beta is None else args.beta,
        method=args.method,
        orm_form=args.orm_form,
        importance_fn=args.importance,
        pins=pins,
        pin_first_last=not args.no_pin_first_last,
        model_name=spec.name,
        seed=args.seed,
        allow_unsupported=args.allow_unsupported,
        time_limit_s=args.time_limit,
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
    )
    config = result.config.with_model_info(spec)
    if not spec.pretrained:
        print(f"ompq: note: {spec.name} has random weights (no checkpoint loaded)", file=sys.stderr)
    config.save(args.output)
    if args.orm_plot:
        from ompq_plugin.report import plot_orm

        plot_orm(result.orm, result.layers.names, args.orm_plot,
                 f"ORM of {spec.name} ({config.orm_form}, N={config.samples})")
    if args.json:
        print(json.dumps(config.to_json(), indent=2))
    else:
        from ompq_plugin.report import print_config

        print_config(config)
        print(f"wrote {args.output}")
    return 0
