"""Load and validate hardware profiles (one TOML file per target; see ``schema.md``).

Every problem with a file is an ``OmpqError`` whose one-line message names the file, the field
(a dotted path such as ``bits.depthwise.weight``), the bad value and the fix.
"""

from __future__ import annotations

import functools
import math
import os
import tomllib
from pathlib import Path
from typing import Any

from ompq_plugin.budgets import Budgets
from ompq_plugin.errors import OmpqError

from .profile import LAYER_KINDS, BitChoices, HardwareProfile

PROFILE_DIR = Path(__file__).resolve().parent
MIN_BITS, MAX_BITS = 1, 16
SCHEMA_HINT = "see hw_profiles/schema.md"

TOP_KEYS = {
    "name": "required",
    "description": "required",
    "sources": "required",
    "power_of_two_scales": "optional",
    "per_channel_weights": "optional",
    "act_rounding": "optional",
    "bits": "required",
    "excluded_pairs": "optional",
    "pinned": "optional",
    "budgets": "optional",
}
ACT_ROUNDINGS = ("half-even", "half-up")
BITS_KEYS = ("weight", "activation")
PINNED_KEYS = ("weight", "activation")
BUDGET_KEYS = ("weight_memory_kib", "bops_g", "act_buffer_kib")


# ----------------------------------------------------------------------------- errors


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Ctx:
    """Where we are: the file, for messages."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, value: Any, problem: str, fix: str) -> OmpqError:
        return OmpqError(f"{self.path}: {field} = {_show(value)}: {problem}; {fix}")

    def missing(self, field: str, fix: str) -> OmpqError:
        return OmpqError(f"{self.path}: {field} is missing; {fix}")

    def unknown(self, field: str, value: Any, allowed: list[str]) -> OmpqError:
        return self.fail(
            field, value, "unknown key", f"remove it or use one of: {', '.join(allowed)}"
        )


# ----------------------------------------------------------------------------- field checks


def _table(ctx: _Ctx, data: Any, field: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ctx.fail(field, data, "must be a table", f"write it as [{field}] ({SCHEMA_HINT})")
    return data


def _string(ctx: _Ctx, value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ctx.fail(field, value, "must be a non-empty string", 'write it as "text"')
    return value


def _bool(ctx: _Ctx, value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ctx.fail(field, value, "must be true or false", "write true or false (no quotes)")
    return value


def _act_rounding(ctx: _Ctx, value: Any) -> str:
    if value not in ACT_ROUNDINGS:
        raise ctx.fail("act_rounding", value, f"must be one of {', '.join(ACT_ROUNDINGS)}",
                       'write "half-even" (Brevitas, QONNX ROUND) or "half-up" (FINN)')
    return str(value)


def _bit(ctx: _Ctx, value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.fail(field, value, "bit width must be an integer", "write e.g. 8")
    if not MIN_BITS <= value <= MAX_BITS:
        raise ctx.fail(
            field,
            value,
            f"bit width out of range {MIN_BITS}..{MAX_BITS}",
            f"use an integer from {MIN_BITS} to {MAX_BITS}",
        )
    return value


def _bit_list(ctx: _Ctx, value: Any, field: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ctx.fail(field, value, "must be a list of bit widths", "write e.g. [4, 8]")
    if not value:
        raise ctx.fail(field, value, "empty list", "list at least one bit width, e.g. [8]")
    bits = [_bit(ctx, v, f"{field}[{i}]") for i, v in enumerate(value)]
    dupes = sorted({b for b in bits if bits.count(b) > 1})
    if dupes:
        raise ctx.fail(field, value, f"duplicate bit width {dupes[0]}", "list each width once")
    return tuple(sorted(bits))


def _positive_number(ctx: _Ctx, value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ctx.fail(field, value, "must be a number", "write a positive number, e.g. 512")
    if not math.isfinite(value) or value <= 0:
        raise ctx.fail(
            field,
            value,
            "budget must be a positive finite number",
            "write a value > 0, or remove the key for no limit",
        )
    return float(value)


def _check_keys(ctx: _Ctx, data: dict[str, Any], prefix: str, allowed: list[str]) -> None:
    for key, value in data.items():
        if key not in allowed:
            raise ctx.unknown(f"{prefix}{key}", value, allowed)


# ----------------------------------------------------------------------------- sections


def _bit_choices(
    ctx: _Ctx, data: dict[str, Any], field: str, default: BitChoices | None
) -> BitChoices:
    """``weight`` and ``activation`` lists; in a kind override a missing one inherits."""
    values: dict[str, tuple[int, ...]] = {}
    for key in BITS_KEYS:
        if key in data:
            values[key] = _bit_list(ctx, data[key], f"{field}.{key}")
        elif default is None:
            raise ctx.missing(f"{field}.{key}", f"add e.g. {key} = [4, 8] under [{field}]")
        else:
            values[key] = getattr(default, key)
    return BitChoices(weight=values["weight"], activation=values["activation"])


def _parse_bits(ctx: _Ctx, data: Any) -> tuple[BitChoices, dict[str, BitChoices]]:
    table = _table(ctx, data, "bits")
    plain = {k: v for k, v in table.items() if not isinstance(v, dict)}
    kinds = {k: v for k, v in table.items() if isinstance(v, dict)}
    for key, value in plain.items():
        if key not in BITS_KEYS:
            raise ctx.fail(
                f"bits.{key}",
                value,
                "unknown key",
                f"use weight, activation or a [bits.<kind>] table ({', '.join(LAYER_KINDS)})",
            )
    default = _bit_choices(ctx, plain, "bits", None)
    overrides: dict[str, BitChoices] = {}
    for kind, sub in kinds.items():
        if kind not in LAYER_KINDS:
            raise ctx.fail(
                f"bits.{kind}",
                sub,
                f"unknown layer kind {kind!r}",
                f"use one of: {', '.join(LAYER_KINDS)}",
            )
        _check_keys(ctx, sub, f"bits.{kind}.", list(BITS_KEYS))
        if not sub:
            raise ctx.fail(f"bits.{kind}", sub, "empty table", "add weight and/or activation")
        overrides[kind] = _bit_choices(ctx, sub, f"bits.{kind}", default)
    return default, overrides


def _parse_pairs(ctx: _Ctx, value: Any) -> tuple[tuple[int, int], ...]:
    field = "excluded_pairs"
    if not isinstance(value, list):
        raise ctx.fail(
            field, value, "must be a list of [weight, activation] pairs", "write e.g. [[4, 16]]"
        )
    pairs: list[tuple[int, int]] = []
    for i, item in enumerate(value):
        if not isinstance(item, list) or len(item) != 2:
            raise ctx.fail(
                f"{field}[{i}]", item, "must be a [weight, activation] pair", "write e.g. [4, 16]"
            )
        pair = (_bit(ctx, item[0], f"{field}[{i}][0]"), _bit(ctx, item[1], f"{field}[{i}][1]"))
        if pair in pairs:
            raise ctx.fail(f"{field}[{i}]", item, "duplicate pair", "list each pair once")
        pairs.append(pair)
    return tuple(pairs)


def _parse_pinned(ctx: _Ctx, data: Any) -> tuple[int, int]:
    table = _table(ctx, data, "pinned")
    _check_keys(ctx, table, "pinned.", list(PINNED_KEYS))
    weight = _bit(ctx, table["weight"], "pinned.weight") if "weight" in table else 8
    act = _bit(ctx, table["activation"], "pinned.activation") if "activation" in table else 8
    return weight, act


def _parse_budgets(ctx: _Ctx, data: Any) -> Budgets:
    table = _table(ctx, data, "budgets")
    _check_keys(ctx, table, "budgets.", list(BUDGET_KEYS))
    values = {k: _positive_number(ctx, v, f"budgets.{k}") for k, v in table.items()}
    return Budgets.from_user(**values)


# ----------------------------------------------------------------------------- consistency


def _check_consistency(ctx: _Ctx, profile: HardwareProfile) -> None:
    """Pinned widths must be runnable; every kind must keep at least one allowed pair."""
    w, a = profile.pinned_weight_bits, profile.pinned_act_bits
    for key, bits, allowed in (
        ("weight", w, profile.default_bits.weight),
        ("activation", a, profile.default_bits.activation),
    ):
        if bits not in allowed:
            raise ctx.fail(
                f"pinned.{key}",
                bits,
                f"not in bits.{key} {list(allowed)}",
                f"add it to bits.{key} or pin a listed width",
            )
    if not profile.pair_allowed(w, a):
        raise ctx.fail(
            "excluded_pairs",
            [w, a],
            "excludes the pinned first/last-layer pair",
            "remove that pair or change [pinned]",
        )
    kinds = {"bits": profile.default_bits} | {f"bits.{k}": c for k, c in profile.kind_bits.items()}
    for field, choice in kinds.items():
        if not any(profile.pair_allowed(x, y) for x in choice.weight for y in choice.activation):
            raise ctx.fail(
                field,
                [list(choice.weight), list(choice.activation)],
                "excluded_pairs leaves no allowed (weight, activation) combination",
                "remove pairs from excluded_pairs or widen the bit lists",
            )


# ----------------------------------------------------------------------------- entry points


def _read_toml(path: Path) -> dict[str, Any]:
    ctx = _Ctx(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise OmpqError(f"{path}: profile file not found; check the path") from None
    except OSError as exc:
        raise OmpqError(f"{path}: cannot read profile ({exc.strerror}); check the path") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ctx.fail(
            "<file>", "<binary>", "not UTF-8 text", "save the profile as UTF-8 TOML"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise OmpqError(
            f"{path}: invalid TOML syntax ({exc}); fix the syntax, {SCHEMA_HINT}"
        ) from None


def parse_profile(data: dict[str, Any], path: Path) -> HardwareProfile:
    """Validate the parsed TOML ``data`` of ``path`` into a ``HardwareProfile``."""
    ctx = _Ctx(path)
    _check_keys(ctx, data, "", list(TOP_KEYS))
    for key, need in TOP_KEYS.items():
        if need == "required" and key not in data:
            raise ctx.missing(key, f"add the key '{key}' ({SCHEMA_HINT})")
    sources = data["sources"]
    if not isinstance(sources, list) or not sources:
        raise ctx.fail(
            "sources",
            sources,
            "must be a non-empty list of strings",
            'write e.g. ["<url> - what it says about bit widths"]',
        )
    default, overrides = _parse_bits(ctx, data["bits"])
    pinned_w, pinned_a = _parse_pinned(ctx, data.get("pinned", {}))
    profile = HardwareProfile(
        name=_string(ctx, data["name"], "name"),
        description=_string(ctx, data["description"], "description"),
        sources=tuple(_string(ctx, s, f"sources[{i}]") for i, s in enumerate(sources)),
        default_bits=default,
        kind_bits=overrides,
        power_of_two_scales=_bool(
            ctx, data.get("power_of_two_scales", False), "power_of_two_scales"
        ),
        per_channel_weights=_bool(
            ctx, data.get("per_channel_weights", True), "per_channel_weights"
        ),
        act_rounding=_act_rounding(ctx, data.get("act_rounding", "half-even")),
        pinned_weight_bits=pinned_w,
        pinned_act_bits=pinned_a,
        budgets=_parse_budgets(ctx, data.get("budgets", {})),
        path=str(path),
        excluded_pairs=_parse_pairs(ctx, data.get("excluded_pairs", [])),
    )
    _check_consistency(ctx, profile)
    return profile


def load_profile_file(path: str | os.PathLike[str]) -> HardwareProfile:
    """Load one profile from a TOML file."""
    file = Path(path).expanduser()
    return parse_profile(_read_toml(file), file)


def shipped_paths() -> dict[str, Path]:
    """Profiles shipped with the package, by name (the file stem)."""
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.toml"))}


def profile_names() -> list[str]:
    return list(shipped_paths())


def looks_like_path(name_or_path: str | os.PathLike[str]) -> bool:
    text = os.fspath(name_or_path)
    return (
        not isinstance(name_or_path, str)
        or text.endswith(".toml")
        or "/" in text
        or os.sep in text
        or bool(os.altsep and os.altsep in text)
    )


def load_profile(name_or_path: str | os.PathLike[str]) -> HardwareProfile:
    """A shipped profile by name (``hls4ml``), or a user's file by path (``./my.toml``)."""
    if looks_like_path(name_or_path):
        return load_profile_file(name_or_path)
    name = str(name_or_path).strip().lower().replace("_", "-")
    paths = shipped_paths()
    if name not in paths:
        raise OmpqError(
            f"unknown hardware profile {str(name_or_path)!r}; use one of: "
            f"{', '.join(paths)}, or pass the path of your own .toml file"
        )
    return _shipped_profile(paths[name], paths[name].stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _shipped_profile(path: Path, mtime_ns: int) -> HardwareProfile:  # noqa: ARG001 - cache key
    """A shipped profile parsed once per process (per file version: ``mtime_ns`` is the key)."""
    return load_profile_file(path)


def list_profiles() -> list[HardwareProfile]:
    """Every shipped profile, loaded and validated, sorted by name."""
    return [load_profile_file(p) for p in shipped_paths().values()]


# ----------------------------------------------------------------------------- display


def _bits_text(bits: tuple[int, ...]) -> str:
    return ", ".join(str(b) for b in bits)


def _budget_text(value: float, unit: float, suffix: str) -> str:
    return "none" if math.isinf(value) else f"{value / unit:g} {suffix}"


def describe_profile(p: HardwareProfile) -> list[tuple[str, str]]:
    """(field, value) rows for a two-column 'show' table."""
    from ompq_plugin.budgets import KIB_BITS

    rows = [
        ("name", p.name),
        ("description", p.description),
        ("file", p.path or "-"),
        ("weight bits", _bits_text(p.default_bits.weight)),
        ("activation bits", _bits_text(p.default_bits.activation)),
    ]
    for kind in LAYER_KINDS:
        if kind in p.kind_bits:
            rows.append((f"{kind} weight bits", _bits_text(p.kind_bits[kind].weight)))
            rows.append((f"{kind} activation bits", _bits_text(p.kind_bits[kind].activation)))
    excluded = ", ".join(f"w{w}/a{a}" for w, a in p.excluded_pairs) or "none"
    rows += [
        ("excluded pairs", excluded),
        ("power-of-two scales", "yes" if p.power_of_two_scales else "no"),
        ("per-channel weights", "yes" if p.per_channel_weights else "no"),
        ("activation rounding", p.act_rounding),
        ("pinned first/last (w/a)", f"{p.pinned_weight_bits}/{p.pinned_act_bits}"),
        ("weight memory budget", _budget_text(p.budgets.weight_memory_bits, KIB_BITS, "KiB")),
        ("BOPs budget", _budget_text(p.budgets.bops, 1e9, "GBOPs")),
        ("activation buffer budget", _budget_text(p.budgets.act_buffer_bits, KIB_BITS, "KiB")),
    ]
    rows += [(f"source {i}", s) for i, s in enumerate(p.sources, start=1)]
    return rows
