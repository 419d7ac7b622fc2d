"""``ompq pareto``: one ORM measurement, then the proven optimum at many budgets (a front)."""

from __future__ import annotations

import argparse
import json
import sys

from ompq_plugin.budgets import Budgets
from ompq_plugin.cli.common import add_model_options
from ompq_plugin.errors import OmpqError


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
    mem.add_argument("--avg-weight-bits", type=_span, metavar="LO:HI")
    mem.add_argument("--weight-memory-kib", type=_span, metavar="LO:HI")
    p.add_argument("--bops-g", type=_span, metavar="LO:HI", help="BOPs in G (MACs x w x a)")
    p.add_argument("--act-buffer-kib", type=_span, metavar="LO:HI")
    p.add_argument("--points", type=int, default=100, help="budgets on the line (default 100)")
    p.add_argument("--beta", type=float, default=None, help="importance spread (default 1.0)")
    p.add_argument("--samples", type=int, help="N search images (default: 64 ResNet, 32 MobileNet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=60.0, help="solver time limit per point")
    p.add_argument("-o", "--output", required=True, help="front JSON to write")
    p.add_argument("--json", action="store_true", help="print the front JSON, not a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ompq_plugin.data import resolve_data_dir, search_samples
    from ompq_plugin.layers import QUANTIZABLE_TYPES
    from ompq_plugin.models import build_model
    from ompq_plugin.pareto import pareto_front
    from ompq_plugin.searcher import DEFAULT_BETA

    if args.points < 2:
        raise OmpqError(f"--points must be at least 2, got {args.points}")
    data_dir = resolve_data_dir(args.data)
    model, spec = build_model(args.model, args.weights, data_dir)
    samples = search_samples(data_dir, spec, args.samples, seed=args.seed)
    total_params = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, QUANTIZABLE_TYPES)
    )

    def end(k: int) -> Budgets:
        pick = lambda span: None if span is None else span[k]  # noqa: E731
        return Budgets.from_user(
            weight_memory_kib=pick(args.weight_memory_kib),
            bops_g=pick(args.bops_g),
            act_buffer_kib=pick(args.act_buffer_kib),
            avg_weight_bits=pick(args.avg_weight_bits),
            total_params=total_params,
        )

    front = pareto_front(
        model,
        samples,
        args.profile,
        end(0),
        end(1),
        args.points,
        time_limit_s=args.time_limit,
        beta=DEFAULT_BETA if args.beta is None else args.beta,
        model_name=spec.name,
        seed=args.seed,
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
