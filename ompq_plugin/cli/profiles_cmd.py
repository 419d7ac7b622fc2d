"""``ompq profiles [show NAME]``: the registry of deployment targets."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from ompq_plugin.cli.output import console


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profiles", help="list hardware profiles, or show one")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?", help="profile name or .toml path (for show)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ompq_plugin.errors import OmpqError
    from ompq_plugin.hw_profiles import describe_profile, list_profiles, load_profile

    if args.action == "show":
        if not args.name:
            raise OmpqError("`ompq profiles show` needs a NAME; see `ompq profiles` for the list")
        rows = describe_profile(load_profile(args.name))
        if args.json:
            print(json.dumps(dict(rows), indent=2))
            return 0
        table = Table(show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        for row in rows:
            table.add_row(*row)
        console().print(table)
        return 0
    profiles = list_profiles()
    if args.json:
        print(json.dumps([dict(describe_profile(p)) for p in profiles], indent=2))
        return 0
    table = Table(title="hardware profiles (ompq profiles show NAME for details)")
    for col in ("name", "weight bits", "act bits", "po2 scales", "description"):
        table.add_column(col)
    for p in profiles:
        table.add_row(
            p.name,
            ",".join(map(str, p.default_bits.weight)),
            ",".join(map(str, p.default_bits.activation)),
            "yes" if p.power_of_two_scales else "no",
            p.description,
        )
    console().print(table)
    return 0
