"""OMPQ search: float model + N real samples + hardware profile -> BitConfig.

features (one streamed forward pass, Grams only) -> ORM matrix K -> gamma, theta -> integer
program (Eq. 10) under the target's and the user's budgets. No search iterations.
"""

from __future__ import annotations

import functools
import math
import platform
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ompq_plugin import __version__
from ompq_plugin.allocate import Allocation, AllocationProblem, solve
from ompq_plugin.bitconfig import BitConfig, LayerBits
from ompq_plugin.budgets import Budgets
from ompq_plugin.device import on_device, resolve_device
from ompq_plugin.errors import OmpqError
from ompq_plugin.features import WidthsFor, discover_and_stream
from ompq_plugin.fixed_layers import added_layers, average_bits_memory
from ompq_plugin.hw_profiles import load_profile
from ompq_plugin.hw_profiles.profile import HardwareProfile
from ompq_plugin.importance import IMPORTANCE_FUNCTIONS, gamma_from_orm, importance
from ompq_plugin.layer_choices import allocation_layer, check_buildable, narrowing, pins_for
from ompq_plugin.layers import ModelLayers, discover_layers, layer_kind
from ompq_plugin.methods import DEFAULT_ACT_WEIGHT, DEFAULT_BETA, DEFAULT_METHOD, ORM_METHODS
from ompq_plugin.methods import METHODS as _METHODS
from ompq_plugin.methods.build import build_problem, solve_uniform, with_fixed_layers
from ompq_plugin.methods.objectives import range_ends
from ompq_plugin.orm import ORM_FORMS, OrmForm, orm_matrix, uninformative

METHODS = _METHODS

Pin = tuple[int | None, int | None]
# BitConfig.orm_form of an ORM method's search that skipped the ORM (theta identically 1)
ORM_NOT_COMPUTED = "not computed (theta = 1 at beta 0)"


@dataclass
class SearchResult:
    """Everything a search produced: the BitConfig plus what a report needs."""

    config: BitConfig
    layers: ModelLayers
    orm: np.ndarray | None  # K over all layers, in layer order (ORM methods only)
    allocation: Allocation
    problem: AllocationProblem | None = None  # what was solved (a Pareto sweep re-solves it)
    # free layers whose weight width is the lowest ("min") or highest ("max") they were offered
    range_ends: dict[str, str] = field(default_factory=dict)


def search(
    model: nn.Module,
    samples: torch.Tensor,
    profile: HardwareProfile | str,
    budgets: Budgets | None = None,
    *,
    beta: float | None = None,
    method: str = DEFAULT_METHOD,
    **options: object,
) -> BitConfig:
    """Per-layer weight and activation bits for ``model`` on ``profile`` (see ``run_search``)."""
    return run_search(model, samples, profile, budgets, beta=beta, method=method,  # type: ignore[arg-type]
                      **options).config


def run_search(
    model: nn.Module,
    samples: torch.Tensor,
    profile: HardwareProfile | str,
    budgets: Budgets | None = None,
    *,
    beta: float | None = None,
    method: str = DEFAULT_METHOD,
    act_weight: float = DEFAULT_ACT_WEIGHT,
    orm_form: OrmForm = "centred",
    importance_fn: str = "exp",
    pins: Mapping[str, Pin] | None = None,
    pin_first_last: bool = True,
    model_name: str | None = None,
    seed: int | None = None,
    allow_unsupported: bool = False,
    time_limit_s: float = 60.0,
    weight_bits: Sequence[int] | None = None,
    act_bits: Sequence[int] | None = None,
    labelled: tuple[torch.Tensor, torch.Tensor] | None = None,
    avg_weight_bits: float | None = None,
    orm: bool = False,
    device: str | torch.device | None = None,
) -> SearchResult:
    """Choose bits with ``method`` (see :mod:`ompq_plugin.methods`) and return the BitConfig
    with the ORM matrix and the solver's answer.

    ``budgets`` override the profile's default budgets field by field (an infinite field keeps
    the profile's value). ``pins`` fix (weight bits, act bits) of named layers; ``None`` in a
    pin leaves that part free. By default the first and last layer are pinned to the profile's
    pinned bits (8/8 unless the profile says otherwise) and, as in the authors' code, left out
    of the importance computation. ``weight_bits`` / ``act_bits`` narrow the profile's choices
    for the free layers. ``beta`` defaults to the method's (``DEFAULT_BETA``). ``labelled``
    (images, labels) feeds ``hawq``'s Hessian (200 training images are the reference setting);
    ``seed`` drives ``random``. ``act_weight`` scales ``ompq-noise``'s activation errors
    against its weight errors. ``avg_weight_bits`` sets the weight memory budget as average
    bits over the model's quantized layers (counted by the search's own layer discovery), plus
    the memory of the fixed layers ``quantize`` adds (:mod:`ompq_plugin.fixed_layers`).

    The ORM matrix (Grams of every layer's features) is computed only when it matters: for the
    ORM methods unless theta is identically 1 (``exp`` importance at beta 0, the default of
    ``ompq-noise``), or when ``orm`` asks for it (e.g. a plot). Otherwise ``SearchResult.orm``
    is None and the BitConfig's ``orm_form`` says "not computed".

    ``device`` (``cpu``, ``cuda``): where the forward pass and the error tables run (see
    :mod:`ompq_plugin.device`); by default where the model is. The model is moved back after.
    """
    start_all = time.perf_counter()
    if method not in METHODS:
        raise OmpqError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if beta is None:
        beta = DEFAULT_BETA.get(method, 1.0)
    if orm_form not in ORM_FORMS:
        raise OmpqError(f"unknown ORM form {orm_form!r}; choose one of {', '.join(ORM_FORMS)}")
    if importance_fn not in IMPORTANCE_FUNCTIONS:
        raise OmpqError(
            f"unknown importance function {importance_fn!r}; "
            f"choose one of {', '.join(IMPORTANCE_FUNCTIONS)}"
        )
    if not beta >= 0:
        raise OmpqError(f"--beta must be >= 0, got {beta}")
    if not act_weight > 0:
        raise OmpqError(f"--act-weight must be > 0, got {act_weight}")
    if samples.dim() < 2 or samples.shape[0] < 2:
        raise OmpqError("the search needs at least 2 samples (N x C x H x W); use --samples 64")
    # a finite sum proves every value finite; torch.isfinite is ~200x slower than the sum here
    if not math.isfinite(float(samples.sum())) and not torch.isfinite(samples).all():
        raise OmpqError("the search samples contain NaN/Inf; check the data and normalisation")
    if method == "hawq" and labelled is None:
        raise OmpqError("--method hawq needs labelled training images for its Hessian")
    target = resolve_device(device)
    with on_device(model, target) as on:
        samples = samples.to(on)
        if labelled is not None:
            labelled = (labelled[0].to(on), labelled[1].to(on))
        hw = load_profile(profile) if isinstance(profile, str) else profile
        check_buildable(hw)
        limits = hw.budgets.merged(budgets) if budgets is not None else hw.budgets
        narrow = narrowing(hw, weight_bits, act_bits)  # checked before the forward pass

        timings: dict[str, float] = {}
        k: np.ndarray | None = None
        gamma: dict[int, float] = {}
        theta: dict[int, float] = {}
        stats = None
        # theta is identically 1 at beta 0 with the exp importance: the ORM would change nothing
        need_orm = method in ORM_METHODS and (orm or beta > 0 or importance_fn != "exp")
        if method in ORM_METHODS:  # one pass: discovery, Grams and activation statistics
            widths = _act_widths(model, hw, narrow, pins or {}, pin_first_last, method)
            streamed = discover_and_stream(
                model,
                samples,
                grams=need_orm,
                centred=orm_form == "centred",
                act_widths=widths,
                power_of_two=hw.power_of_two_scales,
            )
            found, grams, stats = streamed.layers, streamed.grams, streamed.act_stats
            timings["features_s"] = grams.features_s - stats.seconds
            if method == "ompq-noise":
                timings["act_error_s"] = stats.seconds
        else:
            found = discover_layers(model, samples[:1])
        if not allow_unsupported:
            found.require_supported()
        fixed = added_layers(model, found, hw)
        if avg_weight_bits is not None:
            if not avg_weight_bits > 0:
                raise OmpqError(f"--avg-weight-bits must be positive, got {avg_weight_bits}")
            memory = average_bits_memory(avg_weight_bits, found.total_params,
                                         fixed.weight_memory_bits)
            limits = limits.merged(Budgets(weight_memory_bits=memory))
        pin_map = pins_for(found, hw, pins or {}, pin_first_last)
        alloc_layers = tuple(
            allocation_layer(layer, hw, None if layer.name in pin_map else narrow)
            for layer in found.layers
        )
        if method in ORM_METHODS and not need_orm:
            theta = dict.fromkeys(_scored_indices(found, pin_first_last), 1.0)
        elif method in ORM_METHODS:
            start = time.perf_counter()
            k = orm_matrix(grams.grams, orm_form)
            for i in uninformative(grams.grams, orm_form):
                warnings.warn(
                    f"layer {found.layers[i].name}: its feature is the same for all "
                    f"{samples.shape[0]} search samples (e.g. an SE gate or a head at its bias), "
                    "so ORM learns nothing about it; it is treated as unrelated to every other "
                    "layer",
                    stacklevel=2,
                )
            scored = _scored_indices(found, pin_first_last)
            gamma_sub = gamma_from_orm(k[np.ix_(scored, scored)])
            theta_sub = importance(gamma_sub, beta, importance_fn)
            gamma = dict(zip(scored, gamma_sub.tolist(), strict=True))
            theta = dict(zip(scored, theta_sub.tolist(), strict=True))
            timings["orm_s"] = grams.gram_s + time.perf_counter() - start

        problem = build_problem(
            method, model, found, alloc_layers, limits, pin_map, hw,
            theta=theta, act_errors=stats.errors if stats is not None else {},
            labelled=labelled, seed=seed, timings=timings, act_weight=act_weight, samples=samples,
        )
        for name in fixed.uncounted:
            warnings.warn(
                f"{name}: `ompq quantize` turns this shortcut into a 1x1 convolution that no "
                "budget counts (no quantized layer reads its input)",
                stacklevel=2,
            )
        for name in fixed.uncounted_pools:
            warnings.warn(
                f"{name}: the {hw.name} export turns this average pool into a depthwise "
                "convolution that no budget counts (its input size is unknown to the search)",
                stacklevel=2,
            )
        problem = with_fixed_layers(problem, fixed.layers, hw.excluded_pairs)
        if method == "uniform":
            default_pins = {found.names[0], found.names[-1]} if pin_first_last else set()
            soft = frozenset(default_pins - set(pins or {}))
            allocation = solve_uniform(problem, time_limit_s, soft)
        else:
            allocation = solve(problem, time_limit_s=time_limit_s)
        timings["solve_s"] = allocation.solve_s
        timings["total_s"] = time.perf_counter() - start_all

        config = BitConfig(
            model=model_name or type(model).__name__,
            profile=hw.name,
            method=method,
            layers=[
                LayerBits(
                    name=layer.name,
                    kind=layer.kind,
                    weight_bits=allocation.weight_bits[layer.name],
                    act_bits=allocation.act_bits[layer.name],
                    params=layer.params,
                    macs=layer.macs,
                    input_numel=layer.input_numel,
                    act_group=layer.act_group,
                    theta=theta.get(i),
                    gamma=gamma.get(i),
                )
                for i, layer in enumerate(found.layers)
            ],
            fixed_layers=[extra.layer_bits(allocation.act_bits[extra.name])
                          for extra in fixed.layers],
            budgets=limits,
            beta=beta if method in ORM_METHODS else None,
            act_weight=act_weight if method == "ompq-noise" else None,
            samples=int(samples.shape[0]),
            seed=seed,
            orm_form=(orm_form if k is not None else ORM_NOT_COMPUTED) if method in ORM_METHODS
            else None,
            timings=timings,
            versions=library_versions(),
        )
        free = {lay.name: lay.weight_choices for lay in alloc_layers if lay.name not in pin_map}
        ends = range_ends({n: allocation.weight_bits[n] for n in free}, free)
        return SearchResult(
            config=config, layers=found, orm=k, allocation=allocation, problem=problem,
            range_ends=ends,
        )


def _act_widths(
    model: nn.Module,
    hw: HardwareProfile,
    narrow: tuple[set[int] | None, set[int] | None],
    user_pins: Mapping[str, Pin],
    pin_first_last: bool,
    method: str,
) -> WidthsFor:
    """Which layer inputs the single pass scores, at which widths (``ompq-noise`` only): every
    layer whose act width is left to the solver (pins and narrowing as
    :mod:`ompq_plugin.layer_choices` applies them). Without the execution order (an untraced
    model) the first and last layers are scored too."""

    def widths(names: list[str], ordered: bool) -> dict[str, tuple[int, ...]]:
        if method != "ompq-noise" or not names:
            return {}
        ends = {names[0], names[-1]} if ordered and pin_first_last else set()
        out = {}
        for name in names:
            pinned = name in user_pins or name in ends
            act = (
                user_pins[name][1]
                if name in user_pins
                else (hw.pinned_act_bits if name in ends else None)
            )
            if act is not None:
                continue  # a fixed width needs no error: the solver has no choice
            choices = hw.bits_for(layer_kind(model.get_submodule(name))).activation
            keep = None if pinned else narrow[1]
            choices = tuple(b for b in choices if keep is None or b in keep) or choices
            if len(choices) > 1:
                out[name] = choices
        return out

    return widths


def _scored_indices(found: ModelLayers, pin_first_last: bool) -> list[int]:
    """Layers that take part in gamma/theta: all, or all but the pinned first and last."""
    n = len(found.layers)
    if pin_first_last and n > 2:
        return list(range(1, n - 1))
    return list(range(n))


def library_versions() -> dict[str, str]:
    """Versions recorded in every BitConfig (read once per process)."""
    return dict(_library_versions())


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str]:
    from importlib.metadata import version

    # plain str: torch.__version__ is a TorchVersion, which torch.load(weights_only=True) refuses
    return {
        "ompq_plugin": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "highspy": version("highspy"),
    }
