"""End-to-end search on ResNet-20 with real weights and real CIFAR-10 images, API and CLI."""

import json
import math

import pytest
import torch
from ompq_plugin.hw_profiles import load_profile

from ompq_plugin.bitconfig import BitConfig
from ompq_plugin.budgets import KIB_BITS, Budgets
from ompq_plugin.cli import main
from ompq_plugin.data import search_samples
from ompq_plugin.errors import InfeasibleBudgetError, OmpqError
from ompq_plugin.layer_choices import parse_pin
from ompq_plugin.layers import QUANTIZABLE_TYPES
from ompq_plugin.models import build_model
from ompq_plugin.searcher import run_search, search


@pytest.fixture(scope="module")
def resnet20(data_dir):
    model, spec = build_model("resnet20", data_dir=data_dir)
    assert spec.pretrained
    samples = search_samples(data_dir, spec, 64, seed=0)
    return model, samples


@pytest.fixture(scope="module")
def four_bit(resnet20):
    model, samples = resnet20
    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, QUANTIZABLE_TYPES))
    budgets = Budgets(weight_memory_bits=4 * params)
    result = run_search(model, samples, "generic", budgets, model_name="resnet20", seed=0,
                        method="ompq")
    return result, budgets


def test_search_meets_budget_pins_first_last_and_records_provenance(four_bit):
    result, budgets = four_bit
    config = result.config
    assert len(config.layers) == 20
    assert config.totals.weight_memory_bits <= budgets.weight_memory_bits
    # The budget binds: 4-bit average leaves little slack (< one bit on the largest layer).
    assert config.totals.weight_memory_bits > budgets.weight_memory_bits - 36864
    first, last = config.layers[0], config.layers[-1]
    assert (first.weight_bits, first.act_bits, last.weight_bits, last.act_bits) == (8, 8, 8, 8)
    assert first.theta is None and last.theta is None  # pinned layers sit out of the importance
    allowed = set(load_profile("generic").default_bits.weight)
    assert {lb.weight_bits for lb in config.layers} <= allowed
    assert len({lb.weight_bits for lb in config.layers}) > 1  # a real mixed-precision answer
    assert config.samples == 64 and config.orm_form == "centred" and config.beta == 1.0
    assert set(config.timings) == {"features_s", "orm_s", "solve_s", "total_s"}
    assert config.method == "ompq"
    assert "torch" in config.versions and "highspy" in config.versions


def test_orm_matrix_of_real_features_is_a_valid_similarity(four_bit):
    k = four_bit[0].orm
    assert k.shape == (20, 20)
    assert (k == k.T).all() and (k.diagonal() == 1).all()
    assert 0 <= k.min() and k.max() <= 1
    # Neighbouring layers share more than distant ones (the basis of OMPQ's importance).
    assert k[1, 2] > k[1, 18]


def test_search_is_deterministic_for_a_seed(resnet20, four_bit):
    model, samples = resnet20
    again = search(model, samples, "generic", four_bit[1], model_name="resnet20", seed=0,
                   method="ompq")
    assert [lb.weight_bits for lb in again.layers] == [
        lb.weight_bits for lb in four_bit[0].config.layers
    ]


def test_bops_and_act_buffer_budgets_are_met(resnet20):
    model, samples = resnet20
    budgets = Budgets(bops=0.9e9, act_buffer_bits=16 * 32 * 32 * 6)
    config = search(model, samples, "generic", budgets)
    assert config.totals.bops <= 0.9e9
    assert config.totals.max_act_buffer_bits <= 16 * 32 * 32 * 6
    acts = {lb.act_group: lb.act_bits for lb in config.layers}
    assert all(lb.act_bits == acts[lb.act_group] for lb in config.layers)


def test_infeasible_budget_names_the_smallest_feasible_value(resnet20):
    model, samples = resnet20
    with pytest.raises(InfeasibleBudgetError, match=r"weight memory.*KiB"):
        search(model, samples, "generic", Budgets(weight_memory_bits=10 * KIB_BITS))


def test_nan_activations_name_the_layer(resnet20):
    model, samples = resnet20
    broken = type(model)(3)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.layer2[0].conv1.weight[0, 0, 0, 0] = math.nan
    with pytest.raises(OmpqError, match="layer layer2.0.conv1 produced NaN"):
        search(broken.eval(), samples, "generic")


def test_user_pins_and_bad_pins(resnet20):
    model, samples = resnet20
    config = search(model, samples, "generic", pins={"layer2.0.conv1": (3, None)})
    assert config.layer("layer2.0.conv1").weight_bits == 3
    with pytest.raises(OmpqError, match="unknown layers"):
        search(model, samples, "generic", pins={"nope": (4, 4)})
    with pytest.raises(OmpqError, match="runs conv weights at"):
        search(model, samples, "tensorrt", pins={"layer1.0.conv1": (4, 8)})
    assert parse_pin("a.b=4/*") == ("a.b", (4, None))
    with pytest.raises(OmpqError, match="NAME=W/A"):
        parse_pin("a.b=4")


def test_bitconfig_round_trip_and_corrupt_files(four_bit, tmp_path):
    config = four_bit[0].config
    path = tmp_path / "bits.json"
    config.save(path)
    again = BitConfig.load(path)
    assert again.to_json() == config.to_json()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(OmpqError, match="not valid JSON"):
        BitConfig.load(tmp_path / "bad.json")
    data = config.to_json()
    data["layers"][3]["weight_bits"] = 1 if data["layers"][3]["weight_bits"] != 1 else 2
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(OmpqError, match="totals do not match"):
        BitConfig.load(tmp_path / "edited.json")
    with pytest.raises(OmpqError, match="not found"):
        BitConfig.load(tmp_path / "missing.json")


def test_cli_search_round_trip(data_dir, tmp_path, capsys):
    out = tmp_path / "bits.json"
    rc = main(["search", "--data", str(data_dir), "--profile", "hls4ml", "--avg-weight-bits", "5",
               "--bops-g", "1.5", "--samples", "32", "-o", str(out), "--json",
               "--orm-plot", str(tmp_path / "orm.png")])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    config = BitConfig.load(out)
    ends = printed.pop("range_ends")
    assert printed == config.to_json()
    assert set(ends.values()) <= {"min", "max"} and set(ends) <= {lb.name for lb in config.layers}
    assert config.profile == "hls4ml" and config.samples == 32
    assert config.totals.bops <= 1.5e9
    assert config.average_weight_bits <= 5
    assert (tmp_path / "orm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_are_one_line_and_leave_no_file(data_dir, tmp_path, capsys):
    out = tmp_path / "bits.json"
    rc = main(["search", "--data", str(data_dir), "--avg-weight-bits", "0.5", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("ompq: error:") and err.count("\n") == 1
    assert "smallest" in err and not out.exists()
    assert list(tmp_path.iterdir()) == []
    rc = main(["search", "--data", str(tmp_path / "nowhere"), "-o", str(out)])
    assert rc == 1 and "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["search", "--bogus"])
    assert usage.value.code == 2


def test_narrowed_bit_choices_apply_to_free_layers_only(resnet20):
    model, samples = resnet20
    config = search(model, samples, "generic", Budgets(weight_memory_bits=4.5 * 268_336),
                    weight_bits=[3, 4, 5, 6], act_bits=[6])
    free = config.layers[1:-1]
    assert {lb.weight_bits for lb in free} <= {3, 4, 5, 6}
    assert {lb.act_bits for lb in free} == {6}
    assert (config.layers[0].weight_bits, config.layers[-1].act_bits) == (8, 8)  # pins kept
    with pytest.raises(OmpqError, match="offers"):
        search(model, samples, "tensorrt", weight_bits=[4])


def test_profile_excluded_pairs_are_never_chosen(resnet20):
    model, samples = resnet20
    hw = load_profile("cmsis-nn")  # no int4-weight kernels for int16 activations
    assert (4, 16) in hw.excluded_pairs
    config = search(model, samples, hw, Budgets(weight_memory_bits=6 * 268_336))
    pairs = {(lb.weight_bits, lb.act_bits) for lb in config.layers}
    assert (4, 16) not in pairs
    assert {lb.weight_bits for lb in config.layers} == {4, 8}


def test_default_method_skips_the_orm_it_does_not_use(resnet20):
    from ompq_plugin.searcher import ORM_NOT_COMPUTED

    model, samples = resnet20
    budgets = Budgets(weight_memory_bits=4 * 268_336)
    skipped = run_search(model, samples[:16], "generic", budgets)  # ompq-noise, beta 0
    assert skipped.orm is None and skipped.config.orm_form == ORM_NOT_COMPUTED
    assert "orm_s" not in skipped.config.timings
    free = skipped.config.layers[1:-1]
    assert all(lb.theta == 1.0 and lb.gamma is None for lb in free)
    full = run_search(model, samples[:16], "generic", budgets, orm=True)
    assert full.orm is not None and full.config.orm_form == "centred"
    assert full.allocation.weight_bits == skipped.allocation.weight_bits  # theta = 1 either way
    assert full.allocation.act_bits == skipped.allocation.act_bits


def test_avg_weight_bits_counts_the_discovered_layers(resnet20):
    model, samples = resnet20
    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, QUANTIZABLE_TYPES))
    by_avg = run_search(model, samples[:8], "generic", avg_weight_bits=3.0, method="size-greedy")
    # ... plus the two frozen 2-bit shortcut convs `quantize` adds (16x32 and 32x64 weights)
    fixed = (16 * 32 + 32 * 64) * 2
    by_bits = run_search(model, samples[:8], "generic",
                         Budgets(weight_memory_bits=3.0 * params + fixed), method="size-greedy")
    assert by_avg.config.budgets == by_bits.config.budgets
    assert by_avg.allocation.weight_bits == by_bits.allocation.weight_bits
    assert by_avg.config.average_weight_bits <= 3.0


@pytest.mark.parametrize(
    "extra",
    [["--avg-weight-bits", "inf"], ["--bops-g", "nan"], ["--time-limit", "-1"],
     ["--samples", "0"]],
)
def test_cli_search_refuses_non_positive_or_infinite_numbers(extra, tmp_path, capsys):
    """An infinite budget is no budget (the flag left out), a time limit must be positive:
    one line naming the flag, before any work, no file."""
    from ompq_plugin.cli import main

    out = tmp_path / "bits.json"
    assert main(["search", "--model", "resnet20", *extra, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{extra[0]} must be a positive" in err and not out.exists()


def test_cli_uniform_says_when_it_releases_the_end_pins(tmp_path, capsys):
    from ompq_plugin.cli import main

    out = tmp_path / "u.json"
    argv = ["search", "--model", "resnet20", "--method", "uniform", "--samples", "8",
            "-o", str(out)]
    assert main([*argv, "--avg-weight-bits", "4"]) == 0
    assert "note: uniform released the first/last-layer pins (conv1 4/8, linear 4/8)" in (
        capsys.readouterr().out)
    assert main(argv) == 0  # no budget: the ends keep their 8/8 pins, and nothing is said
    assert "released" not in capsys.readouterr().out
