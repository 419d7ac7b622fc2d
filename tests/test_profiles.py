"""Hardware profiles: shipped files load, the validator names file, field and value."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from ompq_plugin.hw_profiles import (
    LAYER_KINDS,
    PROFILE_DIR,
    describe_profile,
    list_profiles,
    load_profile,
    profile_names,
)

from ompq_plugin.budgets import KIB_BITS, Budgets
from ompq_plugin.errors import OmpqError

EXPECTED = {"generic", "hls4ml", "finn", "imx500", "cmsis-nn", "tensorrt", "qualcomm-htp"}

VALID = """\
name = "mine"
description = "test target"
sources = ["https://example.org - says 4 and 8 bit"]
power_of_two_scales = true
per_channel_weights = false

[bits]
weight = [8, 4]
activation = [8]

[bits.depthwise]
weight = [8]

[pinned]
weight = 8
activation = 8

[budgets]
weight_memory_kib = 512
bops_g = 10
act_buffer_kib = 256
"""


def write(tmp_path: Path, text: str, name: str = "mine.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- shipped


def test_shipped_names() -> None:
    assert EXPECTED <= set(profile_names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_shipped_profile_loads(name: str) -> None:
    p = load_profile(name)
    assert p.name == name  # file stem and name agree
    assert p.sources and all(s.strip() for s in p.sources)
    assert p.pinned_weight_bits in p.default_bits.weight
    assert set(p.kind_bits) <= set(LAYER_KINDS)
    for kind in LAYER_KINDS:
        bits = p.bits_for(kind)
        assert list(bits.weight) == sorted(set(bits.weight))
        assert all(1 <= b <= 16 for b in bits.weight + bits.activation)
    assert Path(p.path or "").parent == PROFILE_DIR


def test_list_profiles_sorted_and_complete() -> None:
    names = [p.name for p in list_profiles()]
    assert names == sorted(names) and EXPECTED <= set(names)


def test_profile_contents_match_sources() -> None:
    assert load_profile("imx500").default_bits.weight == (2, 4, 8)
    assert load_profile("imx500").default_bits.activation == (8, 16)
    assert load_profile("finn").default_bits.weight[0] == 2  # 1-bit bipolar left out (finn.toml)
    assert load_profile("hls4ml").power_of_two_scales
    cmsis = load_profile("cmsis-nn")
    assert not cmsis.pair_allowed(4, 16) and cmsis.pair_allowed(4, 8)
    assert load_profile("qualcomm-htp").bits_for("depthwise").weight == (8,)
    assert load_profile("tensorrt").bits_for("conv").weight == (8,)


def test_name_lookup_is_forgiving() -> None:
    assert load_profile("CMSIS_NN").name == "cmsis-nn"


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(OmpqError) as err:
        load_profile("hls5ml")
    msg = str(err.value)
    assert "hls5ml" in msg and all(n in msg for n in EXPECTED) and "\n" not in msg


# ----------------------------------------------------------------------------- user files


def test_user_file_by_path(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    for arg in (str(path), path):
        p = load_profile(arg)
        assert p.name == "mine" and p.path == str(path)
        assert p.default_bits.weight == (4, 8)  # sorted
        assert p.bits_for("depthwise").weight == (8,)
        assert p.bits_for("depthwise").activation == (8,)  # inherited
        assert p.bits_for("linear") == p.default_bits
        assert p.power_of_two_scales and not p.per_channel_weights


def test_user_file_without_toml_suffix(tmp_path: Path) -> None:
    path = write(tmp_path, VALID, "target.cfg")
    assert load_profile(str(path)).name == "mine"


def test_missing_user_file(tmp_path: Path) -> None:
    with pytest.raises(OmpqError, match="not found"):
        load_profile(str(tmp_path / "nope.toml"))


def test_budgets_conversion_exact(tmp_path: Path) -> None:
    p = load_profile(write(tmp_path, VALID))
    assert p.budgets == Budgets(
        weight_memory_bits=512 * KIB_BITS, bops=10 * 1e9, act_buffer_bits=256 * KIB_BITS
    )
    assert p.budgets.weight_memory_bits == 4_194_304
    assert load_profile("imx500").budgets.weight_memory_bits == 8192 * 8 * 1024


def test_optional_sections_default(tmp_path: Path) -> None:
    text = VALID.split("[bits.depthwise]")[0]
    p = load_profile(write(tmp_path, text))
    assert p.budgets == Budgets() and math.isinf(p.budgets.bops)
    assert (p.pinned_weight_bits, p.pinned_act_bits) == (8, 8)
    assert p.kind_bits == {} and p.excluded_pairs == ()


# ----------------------------------------------------------------------------- validation


def edit(old: str, new: str) -> str:
    assert old in VALID, old
    return VALID.replace(old, new, 1)


BAD = [
    # (id, file text, field named in the message, bad value shown)
    ("unknown-top-key", 'colour = "red"\n' + VALID, "colour", "'red'"),
    (
        "unknown-bits-key",
        edit("activation = [8]\n", "activation = [8]\nwieght = [4]\n"),
        "bits.wieght",
        "[4]",
    ),
    (
        "unknown-kind-key",
        edit("[bits.depthwise]\nweight = [8]", "[bits.depthwise]\nwidth = [8]"),
        "bits.depthwise.width",
        "[8]",
    ),
    ("unknown-pinned-key", edit("[pinned]\n", "[pinned]\nfirst = 8\n"), "pinned.first", "8"),
    ("unknown-budget-key", edit("bops_g = 10", "gops = 10"), "budgets.gops", "10"),
    ("missing-name", edit('name = "mine"\n', ""), "name", None),
    (
        "missing-sources",
        edit('sources = ["https://example.org - says 4 and 8 bit"]\n', ""),
        "sources",
        None,
    ),
    (
        "missing-bits",
        VALID.replace("[bits]\nweight = [8, 4]\nactivation = [8]\n\n", "").replace(
            "[bits.depthwise]\nweight = [8]\n\n", ""
        ),
        "bits",
        None,
    ),
    ("missing-activation", edit("activation = [8]\n", ""), "bits.activation", None),
    ("bits-too-big", edit("weight = [8, 4]", "weight = [8, 32]"), "bits.weight[1]", "32"),
    ("bits-zero", edit("weight = [8, 4]", "weight = [0, 8]"), "bits.weight[0]", "0"),
    ("bits-float", edit("activation = [8]", "activation = [7.5]"), "bits.activation[0]", "7.5"),
    ("bits-string", edit("weight = [8, 4]", 'weight = ["8"]'), "bits.weight[0]", "'8'"),
    ("bits-bool", edit("weight = [8, 4]", "weight = [true]"), "bits.weight[0]", "True"),
    ("bits-empty", edit("weight = [8, 4]", "weight = []"), "bits.weight", "[]"),
    ("bits-duplicate", edit("weight = [8, 4]", "weight = [4, 8, 4]"), "bits.weight", "[4, 8, 4]"),
    ("bits-not-list", edit("weight = [8, 4]", "weight = 8"), "bits.weight", "8"),
    (
        "kind-bad-bits",
        edit("[bits.depthwise]\nweight = [8]", "[bits.depthwise]\nweight = [17]"),
        "bits.depthwise.weight[0]",
        "17",
    ),
    ("bad-kind", edit("[bits.depthwise]", "[bits.depthwize]"), "bits.depthwize", None),
    ("pinned-bad", edit("[pinned]\nweight = 8", "[pinned]\nweight = 99"), "pinned.weight", "99"),
    (
        "pinned-not-allowed",
        edit("[pinned]\nweight = 8", "[pinned]\nweight = 6"),
        "pinned.weight",
        "6",
    ),
    (
        "budget-negative",
        edit("weight_memory_kib = 512", "weight_memory_kib = -1"),
        "budgets.weight_memory_kib",
        "-1",
    ),
    ("budget-zero", edit("bops_g = 10", "bops_g = 0"), "budgets.bops_g", "0"),
    (
        "budget-string",
        edit("act_buffer_kib = 256", 'act_buffer_kib = "256"'),
        "budgets.act_buffer_kib",
        "'256'",
    ),
    ("budget-inf", edit("bops_g = 10", "bops_g = inf"), "budgets.bops_g", "inf"),
    ("budget-nan", edit("bops_g = 10", "bops_g = nan"), "budgets.bops_g", "nan"),
    ("name-type", edit('name = "mine"', "name = 3"), "name", "3"),
    (
        "description-empty",
        edit('description = "test target"', 'description = ""'),
        "description",
        "''",
    ),
    (
        "sources-type",
        edit(
            'sources = ["https://example.org - says 4 and 8 bit"]',
            'sources = "https://example.org"',
        ),
        "sources",
        "'https://example.org'",
    ),
    (
        "sources-empty",
        edit('sources = ["https://example.org - says 4 and 8 bit"]', "sources = []"),
        "sources",
        "[]",
    ),
    (
        "flag-type",
        edit("power_of_two_scales = true", 'power_of_two_scales = "yes"'),
        "power_of_two_scales",
        "'yes'",
    ),
    (
        "bits-not-table",
        VALID.replace("[bits]\nweight = [8, 4]\nactivation = [8]\n\n", "")
        .replace("[bits.depthwise]\nweight = [8]\n\n", "")
        .replace("[pinned]", "bits = 8\n[pinned]"),
        "bits",
        "8",
    ),
    (
        "pairs-bad",
        edit(
            "power_of_two_scales = true", "power_of_two_scales = true\nexcluded_pairs = [[4, 8, 1]]"
        ),
        "excluded_pairs[0]",
        "[4, 8, 1]",
    ),
    (
        "pairs-exclude-pinned",
        edit("power_of_two_scales = true", "power_of_two_scales = true\nexcluded_pairs = [[8, 8]]"),
        "excluded_pairs",
        "[8, 8]",
    ),
    ("toml-syntax", edit("weight = [8, 4]", "weight = [8, 4"), None, None),
]


@pytest.mark.parametrize(("text", "field", "value"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_validation_names_file_field_value(
    tmp_path: Path, text: str, field: str | None, value: str | None
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(OmpqError) as err:
        load_profile(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))  # names the file
    assert ";" in msg  # ... and the fix after the problem
    if field is not None:
        assert f" {field} " in msg, msg
    else:
        assert "TOML" in msg and "line" in msg, msg
    if value is not None:
        assert f"= {value}:" in msg, msg


# ----------------------------------------------------------------------------- describe


def test_describe_profile_rows() -> None:
    p = load_profile("qualcomm-htp")
    rows = describe_profile(p)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in rows)
    table = dict(rows)
    assert table["name"] == "qualcomm-htp"
    assert table["weight bits"] == "4, 8, 16"
    assert table["activation bits"] == "8, 16"
    assert table["depthwise weight bits"] == "8"
    assert table["weight memory budget"] == "none"
    assert table["pinned first/last (w/a)"] == "8/8"
    assert sum(k.startswith("source ") for k in table) == len(p.sources)


def test_describe_budgets_in_user_units(tmp_path: Path) -> None:
    table = dict(describe_profile(load_profile(write(tmp_path, VALID))))
    assert table["weight memory budget"] == "512 KiB"
    assert table["BOPs budget"] == "10 GBOPs"
    assert table["activation buffer budget"] == "256 KiB"
    assert table["power-of-two scales"] == "yes"
    assert dict(describe_profile(load_profile("cmsis-nn")))["excluded pairs"] == "w4/a16"
