"""``ompq pareto``: one search, then the proven optimum at many budgets (a front)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING

from ompq_plugin.budgets import KIB_BITS, Budgets
from ompq_plugin.cli.common import add_model_options
from ompq_plugin.cli.search_cmd import (
    BUDGET_FLAGS,
    add_choice_options,
    add_sampling_options,
    check_positive,
    choice_options,
)
from ompq_plugin.errors import OmpqError
from ompq_plugin.methods import DEFAULT_METHOD, METHODS

if TYPE_CHECKING:
    from ompq_plugin.pareto import ParetoFront


def _span(flag: str, text: str) -> tuple[float, float]:
    """``LO:HI`` (a swept budget) or ``X`` (fixed: both ends X), positive and finite."""
    try:
        parts = [float(x) for x in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or not all(math.isfinite(x) and x > 0 for x in parts):
        raise OmpqError(f"{flag} {text}: give LO:HI or one number, positive and finite, e.g. "
                        f"{flag} 3:8 (leave {flag} out for no limit)")
    if parts[0] > parts[-1]:
        raise OmpqError(f"{flag} {text}: the low end comes first, e.g. {flag} "
                        f"{parts[-1]:g}:{parts[0]:g}")
    return parts[0], parts[-1]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pareto",
        help="sweep budgets (one search) and write the optimal front as JSON",
        description="Search once, then solve the same integer program at --points budgets "
        "evenly spaced between the LO and HI ends of each swept budget (LO:HI). Each point "
        "is proven optimal; --bits-dir also writes each point as a BitConfig for "
        "`ompq quantize`.",
    )
    add_model_options(p)
    p.add_argument("--profile", default="generic", help="profile name or .toml path")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--avg-weight-bits", metavar="LO:HI",
                     help="average weight bits swept from LO to HI (or one fixed value)")
    mem.add_argument("--weight-memory-kib", metavar="LO:HI",
                     help="weight memory in KiB swept from LO to HI (or one fixed value)")
    p.add_argument("--bops-g", metavar="LO:HI",
                   help="BOPs in G (MACs x w x a), swept from LO to HI (or one fixed value)")
    p.add_argument("--act-buffer-kib", metavar="LO:HI",
                   help="largest activation buffer in KiB, swept from LO to HI (or fixed)")
    p.add_argument("--points", type=int, default=100,
                   help="budgets on the line, at least 2 (default %(default)s)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                   help="allocation method (see `ompq search --help`)")
    add_sampling_options(p)
    add_choice_options(p)
    p.add_argument("--time-limit", type=float, default=60.0, help="solver time limit per point")
    p.add_argument("-o", "--output", required=True, help="front JSON to write")
    p.add_argument("--bits-dir", metavar="DIR",
                   help="also write each point as a BitConfig, DIR/point_NNN.json (for "
                   "`ompq quantize --bits`)")
    p.add_argument("--json", action="store_true", help="print the front JSON, not a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ompq_plugin.cli.common import build_for_cli, open_source
    from ompq_plugin.data import search_samples
    from ompq_plugin.fileio import check_writable
    from ompq_plugin.pareto import pareto_front

    if args.points < 2:
        raise OmpqError(f"--points must be at least 2, got {args.points}; e.g. --points 100")
    if args.method == "hawq":
        raise OmpqError("ompq pareto does not run --method hawq (it needs labelled images); "
                        "use `ompq search --method hawq` per budget")
    for name in BUDGET_FLAGS:  # LO:HI text -> (lo, hi)
        text = getattr(args, name)
        if text is not None:
            setattr(args, name, _span("--" + name.replace("_", "-"), text))
    spans = [getattr(args, name) for name in BUDGET_FLAGS if getattr(args, name) is not None]
    if not any(lo < hi for lo, hi in spans):
        raise OmpqError("no budget to sweep; give --avg-weight-bits (or --weight-memory-kib), "
                        "--bops-g or --act-buffer-kib as a range LO:HI with LO < HI (one budget "
                        "alone: `ompq search`)")
    check_positive(args, ("samples", "time_limit"))
    choices = choice_options(args)  # bad pins fail before any work
    check_writable(args.output)
    if args.bits_dir is not None:
        _check_bits_dir(args.bits_dir)
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
        **choices,
    ).with_model_info(spec)
    _save(front, args)
    if args.json:
        print(json.dumps(front.to_json(), indent=1))
    else:
        print(f"{'point':>5} {'avg w bits':>10} {'weight KiB':>10} {'GBOPs':>10} "
              f"{'objective':>12} status   solver")
        for i, p in enumerate(front.points):
            a = p.allocation
            print(
                f"{i:>5} {front.average_weight_bits(i):>10.3f} "
                f"{a.weight_memory_bits / KIB_BITS:>10.2f} {a.bops / 1e9:>10.3f} "
                f"{a.objective:>12.6g} {a.status:<8} {a.solver}"
            )
        written = args.output + (f" and {len(front.points)} BitConfigs in {args.bits_dir}"
                                 if args.bits_dir else "")
        print(f"{len(front.points)} points solved in {front.sweep_s:.2f} s; wrote {written}")
    for note in front.slack_notes():
        print(f"ompq: note: {note}", file=sys.stderr)
    if not spec.pretrained:
        print(f"ompq: note: {spec.name} has random weights (no checkpoint loaded)", file=sys.stderr)
    return 0


def _check_bits_dir(path: str) -> None:
    """--bits-dir is a folder (made if missing) holding no point file yet (an old front's
    point_NNN.json beside the new ones would pass for part of it)."""
    from pathlib import Path

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OmpqError(f"--bits-dir {path} is a file; give a folder")
    old = sorted(folder.glob("point_*.json")) if folder.is_dir() else []
    if old:
        raise OmpqError(f"--bits-dir {path} already holds point files ({old[0].name}, ...); "
                        "give a new folder or remove them")


def _save(front: ParetoFront, args: argparse.Namespace) -> None:
    """The front JSON and, with --bits-dir, one BitConfig per point: all files appear, or
    none."""
    from pathlib import Path

    from ompq_plugin.fileio import atomic_paths

    paths = [args.output]
    configs = []
    if args.bits_dir is not None:
        Path(args.bits_dir).mkdir(parents=True, exist_ok=True)
        configs = [front.config_at(i) for i in range(len(front.points))]
        paths += [str(Path(args.bits_dir) / f"point_{i:03d}.json") for i in range(len(configs))]
    with atomic_paths(*paths) as (front_tmp, *config_tmps):
        front.save(front_tmp)
        for config, tmp in zip(configs, config_tmps, strict=True):
            config.save(tmp)
