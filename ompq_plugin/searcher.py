"""OMPQ search: float model + N real samples + hardware profile -> BitConfig.

features (one streamed forward pass, Grams only) -> ORM matrix K -> gamma, theta -> integer
program (Eq. 10) under the target's and the user's budgets. No search iterations.
"""

from __future__ import annotations

import platform
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ompq_plugin import __version__
from ompq_plugin.allocate import (
    Allocation,
    AllocationLayer,
    AllocationProblem,
    eq10_coefficients,
    solve,
)
from ompq_plugin.bitconfig import BitConfig, LayerBits
from ompq_plugin.budgets import Budgets
from ompq_plugin.errors import OmpqError
from ompq_plugin.features import collect_grams
from ompq_plugin.hw_profiles import load_profile
from ompq_plugin.hw_profiles.profile import HardwareProfile
from ompq_plugin.importance import IMPORTANCE_FUNCTIONS, gamma_from_orm, importance
from ompq_plugin.layers import LayerInfo, ModelLayers, discover_layers
from ompq_plugin.orm import ORM_FORMS, OrmForm, orm_matrix, uninformative

DEFAULT_BETA = 1.0  # the authors' default (their ImageNet scripts pass larger values, e.g. 100)
METHODS = ("ompq",)

Pin = tuple[int | None, int | None]


@dataclass
class SearchResult:
    """Everything a search produced: the BitConfig plus what a report needs."""

    config: BitConfig
    layers: ModelLayers
    orm: np.ndarray  # K over all layers, in layer order
    allocation: Allocation


def search(
    model: nn.Module,
    samples: torch.Tensor,
    profile: HardwareProfile | str,
    budgets: Budgets | None = None,
    *,
    beta: float = DEFAULT_BETA,
    **options: object,
) -> BitConfig:
    """Per-layer weight and activation bits for ``model`` on ``profile`` (see ``run_search``)."""
    return run_search(model, samples, profile, budgets, beta=beta, **options).config  # type: ignore[arg-type]


def run_search(
    model: nn.Module,
    samples: torch.Tensor,
    profile: HardwareProfile | str,
    budgets: Budgets | None = None,
    *,
    beta: float = DEFAULT_BETA,
    method: str = "ompq",
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
) -> SearchResult:
    """Run OMPQ and return the BitConfig with the ORM matrix and the solver's answer.

    ``budgets`` override the profile's default budgets field by field (an infinite field keeps
    the profile's value). ``pins`` fix (weight bits, act bits) of named layers; ``None`` in a
    pin leaves that part free. By default the first and last layer are pinned to the profile's
    pinned bits (8/8 unless the profile says otherwise) and, as in the authors' code, left out
    of the importance computation. ``weight_bits`` / ``act_bits`` narrow the profile's choices
    for the free layers (e.g. 3..8 for PTQ, where 2-bit layers rarely recover).
    """
    if method not in METHODS:
        raise OmpqError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if orm_form not in ORM_FORMS:
        raise OmpqError(f"unknown ORM form {orm_form!r}; choose one of {', '.join(ORM_FORMS)}")
    if importance_fn not in IMPORTANCE_FUNCTIONS:
        raise OmpqError(
            f"unknown importance function {importance_fn!r}; "
            f"choose one of {', '.join(IMPORTANCE_FUNCTIONS)}"
        )
    if not beta >= 0:
        raise OmpqError(f"--beta must be >= 0, got {beta}")
    if samples.dim() < 2 or samples.shape[0] < 2:
        raise OmpqError("the search needs at least 2 samples (N x C x H x W); use --samples 64")
    if not torch.isfinite(samples).all():
        raise OmpqError("the search samples contain NaN/Inf; check the data and normalisation")
    hw = load_profile(profile) if isinstance(profile, str) else profile
    limits = hw.budgets.merged(budgets) if budgets is not None else hw.budgets
    narrow = _narrowing(hw, weight_bits, act_bits)  # checked before the forward pass

    found = discover_layers(model, samples[:1])
    if not allow_unsupported:
        found.require_supported()
    pin_map = _pins(found, hw, pins or {}, pin_first_last)

    grams = collect_grams(model, found, samples)
    start = time.perf_counter()
    k = orm_matrix(grams.grams, orm_form)
    for i in uninformative(grams.grams, orm_form):
        warnings.warn(
            f"layer {found.layers[i].name}: its feature is the same for all "
            f"{samples.shape[0]} search samples (e.g. an SE gate or a head at its bias), so ORM "
            "learns nothing about it; it is treated as unrelated to every other layer",
            stacklevel=2,
        )
    scored = _scored_indices(found, pin_first_last)
    gamma_sub = gamma_from_orm(k[np.ix_(scored, scored)])
    theta_sub = importance(gamma_sub, beta, importance_fn)
    orm_s = grams.gram_s + time.perf_counter() - start

    coeff = _coefficients(len(found.layers), scored, theta_sub)
    problem = AllocationProblem(
        layers=tuple(
            _allocation_layer(layer, hw, None if layer.name in pin_map else narrow)
            for layer in found.layers
        ),
        weight_coeff=tuple(coeff),
        budgets=limits,
        pins=pin_map,
    )
    allocation = solve(problem, time_limit_s=time_limit_s)

    gamma = dict(zip(scored, gamma_sub.tolist(), strict=True))
    theta = dict(zip(scored, theta_sub.tolist(), strict=True))
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
        budgets=limits,
        beta=beta,
        samples=int(samples.shape[0]),
        seed=seed,
        orm_form=orm_form,
        timings={
            "features_s": grams.features_s,
            "orm_s": orm_s,
            "solve_s": allocation.solve_s,
        },
        versions=library_versions(),
    )
    return SearchResult(config=config, layers=found, orm=k, allocation=allocation)


def _scored_indices(found: ModelLayers, pin_first_last: bool) -> list[int]:
    """Layers that take part in gamma/theta: all, or all but the pinned first and last."""
    n = len(found.layers)
    if pin_first_last and n > 2:
        return list(range(1, n - 1))
    return list(range(n))


def _coefficients(n_layers: int, scored: list[int], theta: np.ndarray) -> list[float]:
    """Eq. 10 coefficients over the scored layers; layers outside (pinned) get 0."""
    coeff = [0.0] * n_layers
    for i, c in zip(scored, eq10_coefficients(theta.tolist()), strict=True):
        coeff[i] = c
    return coeff


def _narrowing(
    hw: HardwareProfile, weight_bits: Sequence[int] | None, act_bits: Sequence[int] | None
) -> tuple[set[int] | None, set[int] | None]:
    """The user's subsets of bit widths, checked against what the profile offers at all."""
    offered = [hw.default_bits, *hw.kind_bits.values()]
    out: list[set[int] | None] = []
    for flag, wanted, have in (
        ("--weight-bits", weight_bits, {b for c in offered for b in c.weight}),
        ("--act-bits", act_bits, {b for c in offered for b in c.activation}),
    ):
        if wanted is None:
            out.append(None)
            continue
        extra = sorted(set(wanted) - have)
        if extra or not wanted:
            raise OmpqError(
                f"{flag} {','.join(map(str, wanted))}: profile {hw.name} offers "
                f"{sorted(have)} only; choose among those"
            )
        out.append(set(wanted))
    return out[0], out[1]


def _allocation_layer(
    layer: LayerInfo,
    hw: HardwareProfile,
    narrow: tuple[set[int] | None, set[int] | None] | None,
) -> AllocationLayer:
    choices = hw.bits_for(layer.kind)
    weights, acts = choices.weight, choices.activation
    if narrow is not None:  # a kind that runs none of the narrowed widths keeps its own
        keep_w, keep_a = narrow
        weights = tuple(b for b in weights if keep_w is None or b in keep_w) or weights
        acts = tuple(b for b in acts if keep_a is None or b in keep_a) or acts
    return AllocationLayer(
        name=layer.name,
        kind=layer.kind,
        params=layer.params,
        macs=layer.macs,
        input_numel=layer.input_numel,
        act_group=layer.act_group,
        weight_choices=weights,
        act_choices=acts,
        excluded_pairs=hw.excluded_pairs,
    )


def _pins(
    found: ModelLayers, hw: HardwareProfile, user: Mapping[str, Pin], pin_first_last: bool
) -> dict[str, Pin]:
    names = found.names
    unknown = [name for name in user if name not in names]
    if unknown:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise OmpqError(f"--pin names unknown layers {unknown}; layers are: {shown}")
    pins: dict[str, Pin] = {}
    if pin_first_last:
        for name in (names[0], names[-1]):
            pins[name] = (hw.pinned_weight_bits, hw.pinned_act_bits)
    pins.update(user)
    kinds = {layer.name: layer.kind for layer in found.layers}
    for name, (w, a) in pins.items():
        allowed = hw.bits_for(kinds[name])
        if w is not None and w not in allowed.weight:
            raise OmpqError(
                f"pin {name}={w}/{a}: profile {hw.name} runs {kinds[name]} weights at "
                f"{list(allowed.weight)} bits only; pick one of those"
            )
        if a is not None and a not in allowed.activation:
            raise OmpqError(
                f"pin {name}={w}/{a}: profile {hw.name} runs activations at "
                f"{list(allowed.activation)} bits only; pick one of those"
            )
    return pins


def parse_pin(text: str) -> tuple[str, Pin]:
    """``NAME=W/A`` (either side may be ``*`` for free) -> (name, (w, a))."""
    name, sep, bits = text.partition("=")
    w_text, slash, a_text = bits.partition("/")
    if not sep or not slash or not name:
        raise OmpqError(f"--pin {text!r}: expected NAME=W/A, e.g. layer1.0.conv1=4/8")

    def one(part: str) -> int | None:
        if part in ("*", ""):
            return None
        if not part.isdigit():
            raise OmpqError(f"--pin {text!r}: {part!r} is not a bit width; use e.g. 4 or *")
        return int(part)

    return name, (one(w_text), one(a_text))


def library_versions() -> dict[str, str]:
    import mip

    # plain str: torch.__version__ is a TorchVersion, which torch.load(weights_only=True) refuses
    return {
        "ompq_plugin": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "mip": str(getattr(mip, "__version__", "unknown")),
    }
