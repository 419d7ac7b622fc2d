"""``ompq pareto``: one ORM measurement, then the proven optimum at many budgets (a front)."""

from __future__ import annotations

import argparse
import json
import sys

from ompq_plugin.budgets import Budgets
from ompq_plugin.cli.common import add_model_options
from ompq_plugin.cli.search_cmd import add_sampling_options
from ompq_plugin.errors import OmpqError
from ompq_plugin.methods import DEFAULT_METHOD, METHODS


def _span(text: str) -> tuple[float, float]:
    """``LO:HI`` (a swept budget) or ``X`` (fixed: both ends X)."""
    try:
        parts = [float(x) for x in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give LO:HI or one number") from None
    if len(parts) not in (1, 2) or not all(x > 0 for x in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give LO:HI or one positive number")
    return parts[0], parts[-1]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pareto",
        help="sweep budgets (one ORM measurement) and write the optimal front as JSON",
        description="Search once, then solve the same integer program at --points budgets "
        "evenly spaced between the LO and HI ends of each swept budget (LO:HI).",
    )
    add_model_options(p)
    p.add_argument("--profile", default="generic", help="profile name or .toml path")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--avg-weight-bits", type=_span, metavar="LO:HI",
                     help="average weight bits swept from LO to HI (or one fixed value)")
    mem.add_argument("--weight-memory-kib", type=_span, metavar="LO:HI",
                     help="weight memory in KiB swept from LO to HI (or one fixed value)")
    p.add_argument("--bops-g", type=_span, metavar="LO:HI", help="BOPs in G (MACs x w x a)")
    p.add_argument("--act-buffer-kib", type=_span, metavar="LO:HI",
                   help="largest activation buffer in KiB, swept from LO to HI (or fixed)")
    p.add_argument("--points", type=int, default=100, help="budgets on the line")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                   help="allocation method (see `ompq search --help`)")
    add_sampling_options(p)
    p.add_argument("--time-limit", type=float, default=60.0, help="solver time limit per point")
    p.add_argument("-o", "--output", required=True, help="front JSON to write")
    p.add_argument("--json", action="store_true", help="print the front JSON, not a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ompq_plugin.cli.common import build_for_cli, open_source
    from ompq_plugin.data import search_samples
    from ompq_plugin.fileio import check_writable
    from ompq_plugin.pareto import pareto_front

    if args.points < 2:
        raise OmpqError(f"--points must be at least 2, got {args.points}")
    if args.method == "hawq":
        raise OmpqError("ompq pareto does not run --method hawq (it needs labelled images); "
                        "use `ompq search --method hawq` per budget")
    check_writable(args.output)
    source = open_source(args)
    model, spec, _ = build_for_cli(args, args.model, source, weights=args.weights)
    samples = search_samples(source, spec, args.samples, seed=args.seed)

    def end(k: int) -> Budgets:
        pick = lambda span: None if span is None else span[k]  # noqa: E731
        return Budgets.from_user(  # --avg-weight-bits: resolved by the search's own discovery
            weight_memory_kib=pick(args.weight_memory_kib),
            bops_g=pick(args.bops_g),
            act_buffer_kib=pick(args.act_buffer_kib),
        )

    front = pareto_front(
        model,
        samples,
        args.profile,
        end(0),
        end(1),
        args.points,
        time_limit_s=args.time_limit,
        avg_weight_bits=args.avg_weight_bits,
        beta=args.beta,
        method=args.method,
        act_weight=args.act_weight,
        model_name=spec.name,
        seed=args.seed,
        device=args.device,
    )
    front.save(args.output)
    if args.json:
        print(json.dumps(front.to_json(), indent=1))
        return 0
    print(f"{'point':>5} {'avg w bits':>10} {'GBOPs':>10} {'objective':>12} solver")
    for i, p in enumerate(front.points):
        a = p.allocation
        print(
            f"{i:>5} {a.weight_memory_bits / max(front.total_params, 1):>10.3f} "
            f"{a.bops / 1e9:>10.3f} {a.objective:>12.6g} {a.solver}"
        )
    print(f"{len(front.points)} points solved in {front.sweep_s:.2f} s; wrote {args.output}")
    if not spec.pretrained:
        print(f"ompq: note: {spec.name} has random weights (no checkpoint loaded)", file=sys.stderr)
    return 0
