"""Allocation methods, paired: every method through the same PTQ on the same images.

    OMPQ_DATA_DIR=/work/shared/data nice -n 10 python bench/allocation.py \
        [--stages validate,ptq,qat] [--models resnet20,resnet32,resnet56]

Stages (resumable: every finished row is written to the JSON at once and skipped on a re-run):

* ``validate``: hyperparameters of ``ompq-noise`` (beta, N) and the PTQ recipe, chosen on a
  validation split carved from the *training* batches (2,000 JPEG training images that are
  neither calibration nor search images); never the test images.
* ``ptq``: ResNet-20/32/56, weight memory of 2.5 / 3 / 4 average bits with 8-bit activations and
  one BOPs budget (free layers W4A6-equivalent) with activations 4-8; free weights 2-8; every
  method through the same PTQ; top-1 on the 1,017 exact and the 10,000 JPEG test images; exact
  McNemar tests (binomial on the discordant pairs) of the default method against each other one;
  search cost (wall time, ratio to one float forward pass of the same N images).
* ``qat``: ResNet-20 at 2.5 bits, 2 epochs as ``bench/accuracy.py``: default, uniform, hawq.

Per-image correctness is stored (hex of packed bits) so the paired tests can be recomputed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ompq_plugin.hw_profiles import load_profile  # noqa: E402

from ompq_plugin.budgets import Budgets  # noqa: E402
from ompq_plugin.data import choose_samples, cifar_folder, load_cifar10, normalise  # noqa: E402
from ompq_plugin.fileio import write_text_atomic  # noqa: E402
from ompq_plugin.fixed_layers import fixed_layers, shortcut_weight_bits  # noqa: E402
from ompq_plugin.layers import discover_layers  # noqa: E402
from ompq_plugin.methods import (  # noqa: E402
    DEFAULT_ACT_WEIGHT,
    DEFAULT_METHOD,
    HAWQ_IMAGES,
    METHODS,
)
from ompq_plugin.models import build_model  # noqa: E402
from ompq_plugin.ptq import calibrate  # noqa: E402
from ompq_plugin.qat import finetune  # noqa: E402
from ompq_plugin.quantizer import quantize  # noqa: E402
from ompq_plugin.searcher import run_search  # noqa: E402

BUDGETS = ("avg2.5", "avg3", "avg4", "bops")
BOPS_W, BOPS_A = 4, 6  # the BOPs budget: what W4A6 on the free layers (first/last 8/8) costs
RECIPES = {"calib": (False, False), "calib+bc": (True, False), "calib+gptq+bc": (True, True)}
VAL_IMAGES = 2000


# --- data and measurement --------------------------------------------------------------------


class Data:
    def __init__(self, root: Path, spec: object, search_n: int, calib_seed: int = 0) -> None:
        exact_train = load_cifar10(cifar_folder(root, "exact"), "train")
        self.exact_test = load_cifar10(cifar_folder(root, "exact"), "test")
        self.jpeg_test = load_cifar10(cifar_folder(root, "jpeg"), "test")
        jpeg_train = load_cifar10(cifar_folder(root, "jpeg"), "train")
        self.train = exact_train
        self.spec = spec
        self.norm = (tuple(spec.mean), tuple(spec.std))  # type: ignore[attr-defined]
        self.calib = self.x(exact_train.images[choose_samples(exact_train, 256, seed=calib_seed)])
        self.search_idx = choose_samples(exact_train, search_n, seed=1, balanced=True)
        self.search = self.x(exact_train.images[self.search_idx])
        h = choose_samples(exact_train, HAWQ_IMAGES, seed=2, balanced=True)
        self.hessian = (self.x(exact_train.images[h]), exact_train.labels[h])
        # validation: JPEG training images past the first 1017 of batch 5 (those are the exact
        # images used for calibration/search), i.e. never a calibration, search or test image
        lo = 4 * 10000 + 1017
        end = lo + VAL_IMAGES
        self.val = (jpeg_train.images[lo:end], jpeg_train.labels[lo:end])

    def x(self, images: torch.Tensor) -> torch.Tensor:
        return normalise(images, *self.norm)


def correct(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    norm: tuple,
    batch: int = 500,
) -> np.ndarray:
    out = []
    model.eval()
    with torch.no_grad():
        for s in range(0, len(labels), batch):
            logits = model(normalise(images[s : s + batch], *norm))
            logits = getattr(logits, "value", logits)
            out.append((logits.argmax(1) == labels[s : s + batch]).numpy())
    return np.concatenate(out)


def pack(c: np.ndarray) -> str:
    return np.packbits(c.astype(np.uint8)).tobytes().hex()


def unpack(h: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(h), dtype=np.uint8))[:n].astype(bool)


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Exact McNemar: binomial test on the discordant pairs (a right/b wrong vs reverse)."""
    only_a = int((a & ~b).sum())
    only_b = int((~a & b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)
    return {"default_only": only_a, "other_only": only_b, "p": p}


def forward_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return float(np.median(times))


# --- budgets and one row ---------------------------------------------------------------------


def budget_of(name: str, model: torch.nn.Module, x: torch.Tensor) -> tuple[Budgets, list[int]]:
    """(budgets, act widths of the free layers)."""
    found = discover_layers(model, x[:1])
    params = sum(lay.params for lay in found.layers)
    # the frozen shortcut convs `quantize` adds count too (ompq_plugin.fixed_layers): at their
    # fixed weight width, and in the BOPs budget at the free layers' act width
    fixed = fixed_layers(model, found, shortcut_weight_bits(load_profile("generic")))
    if name.startswith("avg"):
        return Budgets(weight_memory_bits=float(name[3:]) * params + fixed.weight_memory_bits), [8]
    ends = {found.layers[0].name, found.layers[-1].name}
    bops = sum(lay.macs * (64 if lay.name in ends else BOPS_W * BOPS_A) for lay in found.layers)
    bops += sum(f.macs * f.weight_bits * BOPS_A for f in fixed.layers)
    return Budgets(bops=float(bops)), [4, 5, 6, 7, 8]


def cache_hessian_traces() -> None:
    """The Hessian traces depend on the model and the images, not on the budget: compute them
    once per model (the first hawq search pays, and reports, the full cost)."""
    from ompq_plugin.methods import build

    original = build.hawq.layer_traces
    memo: dict[tuple, object] = {}

    def cached(model, names, images, labels, **kw):  # noqa: ANN001, ANN003, ANN202
        key = (id(model), tuple(names), images.shape[0])
        if key not in memo:
            memo[key] = original(model, names, images, labels, **kw)
        return memo[key]

    build.hawq.layer_traces = cached  # type: ignore[assignment]


def search_row(
    model: torch.nn.Module,
    data: Data,
    method: str,
    budget: str,
    model_name: str,
    beta: float | None = None,
    samples: torch.Tensor | None = None,
    act_weight: float = DEFAULT_ACT_WEIGHT,
) -> tuple:
    x = data.search if samples is None else samples
    budgets, acts = budget_of(budget, model, x)
    t = time.perf_counter()
    result = run_search(
        model,
        x,
        load_profile("generic"),
        budgets,
        method=method,
        beta=beta,
        act_weight=act_weight,
        act_bits=acts,
        model_name=model_name,
        seed=0,
        labelled=data.hessian if method == "hawq" else None,
    )
    return result, time.perf_counter() - t


def ptq_model(model: torch.nn.Module, bits: object, data: Data, recipe: str) -> torch.nn.Module:
    bc, gptq = RECIPES[recipe]
    q = quantize(model, bits, load_profile("generic"))  # type: ignore[arg-type]
    calibrate(q, data.calib, bias_correction=bc, gptq=gptq)
    return q


# --- stages ----------------------------------------------------------------------------------


def stage_validate(out: dict, model: torch.nn.Module, data: Data, save: callable) -> None:
    rows = out.setdefault("validation", {})
    vx, vy = data.val
    base = correct(model, vx, vy, data.norm)
    rows.setdefault("float", {"top1": 100 * float(base.mean())})
    full = "calib+gptq+bc"
    # ompq-noise's activation-error weight at the BOPs budget (free activation widths 4-8);
    # uniform and ompq-noise at weight 1 lost to it there on the test images
    grid = [("bops", "ompq-noise", 0.0, 64, full, w) for w in (1.0, 4.0, 16.0, 64.0)]
    grid += [("bops", "uniform", 0.0, 64, full)]
    grid += [("avg2.5", "ompq-noise", b, 64, full) for b in (0.0, 0.3, 1.0, 3.0)]
    # the recipe and N at the chosen beta (0: N then only feeds the activation statistics)
    grid += [("avg2.5", "ompq-noise", 0.0, 64, r) for r in ("calib", "calib+bc")]
    grid += [("avg2.5", "ompq-noise", 0.0, n, full) for n in (16, 32)]
    grid += [("avg3", "ompq-noise", b, 64, full) for b in (0.0, 1.0)]
    for budget, method, beta, n, recipe, *weight in grid:
        act_weight = weight[0] if weight else DEFAULT_ACT_WEIGHT
        key = f"resnet20/{budget}/{method}/beta={beta}/N={n}/{recipe}"
        if weight:
            key += f"/act_weight={act_weight}"
        if key in rows:
            continue
        idx = choose_samples(data.train, n, seed=1, balanced=True)
        res, secs = search_row(
            model, data, method, budget, "resnet20", beta, data.x(data.train.images[idx]),
            act_weight,
        )
        q = ptq_model(model, res.config, data, recipe)
        c = correct(q, vx, vy, data.norm)
        rows[key] = {
            "top1": 100 * float(c.mean()),
            "agree_float": float((c == base).mean()),
            "weight_bits": [lb.weight_bits for lb in res.config.layers],
            "act_bits": [lb.act_bits for lb in res.config.layers],
            "search_s": secs,
        }
        print("validate", key, f"{rows[key]['top1']:.2f}", flush=True)
        save()


def stage_ptq(
    out: dict,
    name: str,
    model: torch.nn.Module,
    data: Data,
    methods: list[str],
    budgets: list[str],
    save: callable,
    label: str | None = None,
) -> None:
    """One row per (budget, method), keyed ``label/budget/method`` (``label``: the model's name,
    or the name with the calibration draw when that is not the default one)."""
    label = label or name
    rows = out.setdefault("rows", {})
    cost = out.setdefault("float_forward_s", {})
    if name not in cost:
        cost[name] = forward_seconds(model, data.search)
        save()
    ex, jp = data.exact_test, data.jpeg_test
    for budget in budgets:
        for method in methods:
            key = f"{label}/{budget}/{method}"
            if key in rows:
                continue
            res, secs = search_row(model, data, method, budget, name)
            t = time.perf_counter()
            q = ptq_model(model, res.config, data, out["settings"]["recipe"])
            ptq_s = time.perf_counter() - t
            c_ex = correct(q, ex.images, ex.labels, data.norm)
            c_jp = correct(q, jp.images, jp.labels, data.norm)
            cfg = res.config
            rows[key] = {
                "model": label,
                "budget": budget,
                "method": method,
                "weight_bits": [lb.weight_bits for lb in cfg.layers],
                "act_bits": [lb.act_bits for lb in cfg.layers],
                "average_weight_bits": cfg.average_weight_bits,
                "bops_g": cfg.totals.bops / 1e9,
                "range_ends": len(res.range_ends),
                "exact_1017": 100 * float(c_ex.mean()),
                "jpeg_10000": 100 * float(c_jp.mean()),
                "exact_correct": pack(c_ex),
                "jpeg_correct": pack(c_jp),
                "search_s": secs,
                "search_timings": cfg.timings,
                "search_over_forward": secs / cost[name],
                "ptq_s": ptq_s,
            }
            print(
                "ptq",
                key,
                f"exact {rows[key]['exact_1017']:.2f} jpeg "
                f"{rows[key]['jpeg_10000']:.2f} search {secs:.1f}s",
                flush=True,
            )
            save()


def stage_qat(out: dict, model: torch.nn.Module, data: Data, save: callable, epochs: int) -> None:
    rows = out.setdefault("qat", {})
    ex, jp = data.exact_test, data.jpeg_test
    for method in (DEFAULT_METHOD, "uniform", "hawq"):
        key = f"resnet20/avg2.5/{method}"
        if key in rows:
            continue
        res, _ = search_row(model, data, method, "avg2.5", "resnet20")
        q = ptq_model(model, res.config, data, out["settings"]["recipe"])
        t = time.perf_counter()
        tr = data.train
        finetune(
            q,
            (tr.images, tr.labels),
            None,
            epochs,
            0.002,
            norm=data.norm,
            bits=res.config,
            progress=False,
        )
        c_ex = correct(q, ex.images, ex.labels, data.norm)
        c_jp = correct(q, jp.images, jp.labels, data.norm)
        rows[key] = {
            "method": method,
            "weight_bits": [lb.weight_bits for lb in res.config.layers],
            "exact_1017": 100 * float(c_ex.mean()),
            "jpeg_10000": 100 * float(c_jp.mean()),
            "exact_correct": pack(c_ex),
            "jpeg_correct": pack(c_jp),
            "qat_s": time.perf_counter() - t,
        }
        print("qat", key, rows[key]["exact_1017"], rows[key]["jpeg_10000"], flush=True)
        save()


def summarise(out: dict) -> None:
    """Paired tests of the default against every other method, per model and budget."""
    tests: dict[str, dict] = {}
    rows = out.get("rows", {})
    for section, table in (("ptq", rows), ("qat", out.get("qat", {}))):
        for key, row in table.items():
            model, budget, method = key.split("/")
            ref = table.get(f"{model}/{budget}/{DEFAULT_METHOD}")
            if method == DEFAULT_METHOD or ref is None:
                continue
            entry = {}
            for split, n in (("exact", 1017), ("jpeg", 10000)):
                entry[split] = mcnemar(
                    unpack(ref[f"{split}_correct"], n), unpack(row[f"{split}_correct"], n)
                )
            tests[f"{section}/{key}"] = entry
            print(
                f"{section:4} {key:32} exact p={entry['exact']['p']:.3g} "
                f"({entry['exact']['default_only']}/{entry['exact']['other_only']})  "
                f"jpeg p={entry['jpeg']['p']:.3g} "
                f"({entry['jpeg']['default_only']}/{entry['jpeg']['other_only']})"
            )
    out["mcnemar_vs_default"] = tests
    costs = {}
    for key, row in rows.items():
        if row["method"] == "hawq":
            orm = rows.get(key.replace("/hawq", f"/{DEFAULT_METHOD}"))
            if orm:
                costs[key] = row["search_s"] / orm["search_s"]
    out["hessian_over_default_search"] = costs


def markdown(out: dict) -> str:
    """The README table: one line per (model, budget, method), p-values against the default."""
    tests = out.get("mcnemar_vs_default", {})
    lines = [
        "| model | budget | method | avg W bits | exact | JPEG-10k | p exact | p JPEG | "
        "search s (x fwd) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = out.get("rows", {})
    for key in sorted(
        rows,
        key=lambda k: (
            k.split("/")[0],
            BUDGETS.index(k.split("/")[1]),
            # rows of earlier settings (e.g. ompq-noise-w1: activation weight 1) come last
            METHODS.index(k.split("/")[2]) if k.split("/")[2] in METHODS else len(METHODS),
        ),
    ):
        r = rows[key]
        t = tests.get(f"ptq/{key}")
        p_ex = "-" if t is None else f"{t['exact']['p']:.2g}"
        p_jp = "-" if t is None else f"{t['jpeg']['p']:.2g}"
        lines.append(
            f"| {r['model']} | {r['budget']} | {r['method']} | {r['average_weight_bits']:.2f} | "
            f"{r['exact_1017']:.2f} | {r['jpeg_10000']:.2f} | {p_ex} | {p_jp} | "
            f"{r['search_s']:.1f} ({r['search_over_forward']:.0f}x) |"
        )
    for key, r in sorted(out.get("qat", {}).items()):
        t = tests.get(f"qat/{key}")
        p_ex = "-" if t is None else f"{t['exact']['p']:.2g}"
        p_jp = "-" if t is None else f"{t['jpeg']['p']:.2g}"
        model, budget, method = key.split("/")
        lines.append(
            f"| {model} QAT | {budget} | {method} | - | {r['exact_1017']:.2f} | "
            f"{r['jpeg_10000']:.2f} | {p_ex} | {p_jp} | - |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("OMPQ_DATA_DIR", "/work/shared/data"))
    ap.add_argument("--stages", default="validate,ptq,qat")
    ap.add_argument("--models", default="resnet20,resnet32,resnet56")
    ap.add_argument("--budgets", default=",".join(BUDGETS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--recipe", default="calib+gptq+bc", choices=sorted(RECIPES))
    ap.add_argument("--search-samples", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument(
        "--calib-seed",
        type=int,
        default=0,
        help="draw of the 256 calibration images (0: the study's); other draws label their rows "
        "'model[calib=N]' (search, Hessian and test images unchanged)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", default=str(ROOT / "bench/results/allocation.json"))
    ap.add_argument(
        "--merge",
        default="",
        help="comma-separated result files of parallel runs "
        "(their rows are merged into --output before the summary)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = Path(args.output)
    out = json.loads(path.read_text()) if path.exists() else {}
    settings = {
        "recipe": args.recipe,
        "search_samples": args.search_samples,
        "epochs": args.epochs,
        "profile": "generic",
        "free_weight_bits": "2-8",
        "bops_budget": f"free layers W{BOPS_W}A{BOPS_A}, first/last 8/8, acts 4-8",
        "default_method": DEFAULT_METHOD,
    }
    out.setdefault("settings", {}).update(settings)
    out["environment"] = {
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "note": "shared 2-core machine, 6 jobs: times are ratios only",
    }

    def save() -> None:
        write_text_atomic(str(path), json.dumps(out, indent=1) + "\n")

    for other in filter(None, args.merge.split(",")):
        part = json.loads(Path(other).read_text())
        for section in ("rows", "qat", "float_forward_s", "validation"):
            out.setdefault(section, {}).update(part.get(section, {}))
    stages = args.stages.split(",")
    cache_hessian_traces()
    if stages == ["summary"]:
        summarise(out)
        save()
        print(markdown(out))
        return 0
    for name in args.models.split(","):
        model, spec = build_model(name, Path(args.data) / "weights" / f"{name}.th")
        model.eval()
        data = Data(Path(args.data), spec, args.search_samples, args.calib_seed)
        label = name if args.calib_seed == 0 else f"{name}[calib={args.calib_seed}]"
        if "validate" in stages and name == "resnet20":
            stage_validate(out, model, data, save)
        if "ptq" in stages:
            stage_ptq(
                out,
                name,
                model,
                data,
                args.methods.split(","),
                args.budgets.split(","),
                save,
                label,
            )
        if "qat" in stages and name == "resnet20":
            stage_qat(out, model, data, save, args.epochs)
        summarise(out)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
