"""Options another option dominates, dropped: (w, a) pairs of a one-layer act group, and options
with one cost and one value.

Contract: :func:`frontier` returns the options no cheaper-or-equal option matches in value
(cheapest first; the knapsack's group options, the knapsack bound's items).
:func:`undominated_pairs` returns a sub-list of ``pairs`` (in their order) that still
holds an optimum of every problem the layer can be part of: a pair is dropped only when another
pair is at least as good in the objective and no dearer in weight memory and (when BOPs are
budgeted) in BOPs; of exact ties the first pair stays. Used by the DP's steps and HiGHS's
formulation (tested against the definition in ``tests/test_allocate.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ompq_plugin.allocate.problem import AllocationLayer


def frontier(costs: Sequence[int], values: Sequence[float]) -> list[int]:
    """Indices of the options better in value than every option cheaper than them, cheapest
    first (of equal cost and value, the first given): the rest never give a maximum."""
    order = sorted(range(len(costs)), key=lambda k: (costs[k], -values[k]))
    out: list[int] = []
    for k in order:
        if not out or values[k] > values[out[-1]]:
            out.append(k)
    return out


def undominated_pairs(
    pairs: list[tuple[int, int]], obj: list[float], lay: AllocationLayer, finite_bops: bool
) -> list[tuple[int, int]]:
    """Drop (w, a) pairs of a one-layer act group that another pair dominates.

    Once the buffer budget has filtered the act choices, a pair only matters through its
    objective ``obj`` (e.g. ``c*w + d*a``), memory ``params*w`` and BOPs ``macs*w*a``. A pair no
    better in the objective and no cheaper in either resource than another can be dropped without
    losing every optimum (exact ties keep the first pair). With the default ``d = c`` this
    removes e.g. (8, 2) in favour of (2, 8): same objective and BOPs, less memory -- a symmetry
    that otherwise leaves a MIP solver with a flat tree to close.
    """
    n = len(pairs)
    if n < 2:
        return list(pairs)
    w = np.array([p[0] for p in pairs], dtype=np.int64)
    o = np.array(obj, dtype=np.float64)
    mem = lay.params * w
    idx = np.arange(n)
    if not finite_bops:  # two criteria: sorted by memory (ties: better objective, then earlier
        # pair first), a pair survives when it beats the best objective before it
        order = np.lexsort((idx, -o, mem))
        ranked = o[order]
        before = np.maximum.accumulate(np.concatenate(([-np.inf], ranked[:-1])))
        return [pairs[k] for k in np.sort(order[ranked > before])]
    a = np.array([p[1] for p in pairs], dtype=np.int64)
    bops = lay.macs * w * a
    # beats[j, k]: pair j dominates pair k (exact ties: the earlier pair stays)
    beats = (o[:, None] >= o) & (mem[:, None] <= mem) & (bops[:, None] <= bops)
    beats &= (o[:, None] > o) | (mem[:, None] < mem) | (bops[:, None] < bops) | (idx[:, None] < idx)
    return [pairs[k] for k in np.flatnonzero(~beats.any(axis=0))]
