"""Per-option objective values of the allocation methods (pure maths, no model).

Every method hands the exact solver a value per (layer, weight width) and per (act group, act
width), maximised under the same budgets, pins, tied groups and excluded pairs:

* ``ompq``: the paper's Eq. 10, ``c_i * w`` (linear in the bits; built in the searcher);
* ``ompq-noise``: ``-theta_i * E_i(w)``, ``E_i`` the relative quantization error of layer ``i``'s
  weights at ``w`` bits, and ``-sum_{i in g} theta_i * A_i(a)`` for act group ``g``, ``A_i`` the
  relative error of layer ``i``'s input at ``a`` bits: a first-order model of the output noise
  the layers add, weighted by ORM importance. Errors fall about 4x per bit, so the objective has
  the diminishing returns that Eq. 10 lacks. The activation term is multiplied by ``act_weight``
  (``DEFAULT_ACT_WEIGHT``): GPTQ and bias correction remove much of the weights' error after
  the search, nothing removes the activations', so equal weights under-price activation bits
  (measured: bench/results/allocation_validation.json);
* ``size-greedy``: Eq. 10 with every ``theta = 1``;
* ``hawq``: ``-(Tr H_i / n_i) * ||Q_w(W_i) - W_i||^2`` (HAWQ-V2/V3), the same with the trace of
  the Hessian with respect to the layer's input for activations;
* ``random``: independent uniform random values per option (seeded), so the solver returns a
  random configuration that is feasible by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Values = dict[int, float]


def noise_values(theta: Sequence[float], errors: Sequence[Mapping[int, float]]) -> list[Values]:
    """``-theta_i * E_i(b)`` for every width ``b`` of every layer (maximised)."""
    if len(theta) != len(errors):
        raise ValueError(f"{len(theta)} importances for {len(errors)} layers")
    return [
        {b: -float(t) * float(e) for b, e in err.items()}
        for t, err in zip(theta, errors, strict=True)
    ]


def group_noise_values(
    groups: Mapping[str, Sequence[int]],
    theta: Sequence[float],
    errors: Sequence[Mapping[int, float]],
    weight: float = 1.0,
) -> dict[str, Values]:
    """``-weight * sum_{i in g} theta_i * A_i(a)`` per act group ``g`` and width ``a``."""
    out: dict[str, Values] = {}
    for group, members in groups.items():
        widths = set.intersection(*(set(errors[i]) for i in members)) if members else set()
        out[group] = {
            a: -weight * float(sum(float(theta[i]) * float(errors[i][a]) for i in members))
            for a in sorted(widths)
        }
    return out


def hawq_values(
    traces: Sequence[float], sizes: Sequence[int], sq_errors: Sequence[Mapping[int, float]]
) -> list[Values]:
    """HAWQ-V3's ``-(Tr(H_i) / n_i) * ||Q_b(W_i) - W_i||^2`` per layer and width."""
    out = []
    for tr, n, err in zip(traces, sizes, sq_errors, strict=True):
        mean_trace = max(float(tr), 0.0) / max(int(n), 1)
        out.append({b: -mean_trace * float(e) for b, e in err.items()})
    return out


def random_values(
    weight_choices: Sequence[Sequence[int]],
    act_choices: Mapping[str, Sequence[int]],
    seed: int,
) -> tuple[list[Values], dict[str, Values]]:
    """Independent U(0, 1) values per option, from ``seed``."""
    rng = np.random.default_rng(seed)
    weights = [{b: float(rng.random()) for b in choices} for choices in weight_choices]
    acts = {g: {a: float(rng.random()) for a in choices} for g, choices in act_choices.items()}
    return weights, acts


def uniform_order(weight_widths: Sequence[int], act_widths: Sequence[int]) -> list[tuple[int, int]]:
    """Uniform (w, a) candidates, widest first: by the narrower of the two widths, then by the
    activation width, then by the weight width (so W5A6 comes before W4A8 and W8A4)."""
    pairs = [(w, a) for w in set(weight_widths) for a in set(act_widths)]
    return sorted(pairs, key=lambda p: (min(p), p[1], p[0]), reverse=True)


def range_ends(bits: Mapping[str, int], choices: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """Layers whose width is the lowest or highest they were offered: name -> 'min' / 'max'."""
    out: dict[str, str] = {}
    for name, b in bits.items():
        allowed = choices.get(name, ())
        if len(allowed) < 2:
            continue
        if b == min(allowed):
            out[name] = "min"
        elif b == max(allowed):
            out[name] = "max"
    return out
