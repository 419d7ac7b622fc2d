"""ompq search: placeholder, filled in below."""


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("search", help="choose per-layer bits (OMPQ)")
    p.set_defaults(func=lambda args: 0)
