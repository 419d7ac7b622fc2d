"""The exact dynamic program over the act groups, pruned with Lagrangian bounds.

* States are pruned when (a) even the cheapest completion breaks a budget (exact, in integers),
  (b) their bound (:mod:`dp_bounds`) is below a target ``T``, or (c) another state with the same
  open ``a`` is no worse in value and no larger in memory and in BOPs (dominance; exact
  duplicates keep one). Every pruning keeps at least one optimal completion of every state at or
  above ``T``, so when the best final state reaches ``T`` it is optimal. ``T`` starts at the
  value of a first configuration that meets the budgets, found by a beam pass (the same steps,
  the ``_BEAM`` states with the highest bounds kept per step; without a finite budget, or when
  the beam finds none, just below the root bound), and is lowered geometrically (never below the
  best configuration already found, which then closes the search) until that happens. The beam
  cut ResNet-20's searches from 4-15 rounds to 2 (9 ms to 3.0 ms per solve) and the 90 ResNet-50
  instances of ``bench/solvers.py`` from 4.06 s to 3.48 s in total (measured back to back,
  2026-12-07; beams of 8-128 tried, 16 fastest on both; the beam is cut before the dominance
  check, which then compares at most 16 states).
* Exactness: memory and BOPs are integers and compared exactly. The objective is a float sum:
  bounds are compared with a slack of ``1e-9`` relative to the objective's scale (the sum over
  steps of the largest option magnitude; on the safe side: it keeps states), and two
  configurations whose objectives agree to about ``1e-12`` relative (float rounding) are treated
  as equal -- either may be returned.
* The bound is the LP (Lagrangian) bound of :mod:`dp_bounds`; once the states of one step
  exceed ``_EASY_STATES`` (a tight budget where that bound is loose), and in a sweep from the
  start, the knapsack bounds of :mod:`dp_memory` are added (one budget kept exact, the other
  priced; one bound per finite budget): on the ResNet-50 sweep of ``bench/solvers.py
  --sweep-time`` they cut the gap to the optimum up to 30-fold and the slowest point from
  63 s to under 1.5 s. The target then falls by ``_GAP_FACTOR`` per round.
* If the states of one step exceed ``_MAX_STATES`` (a hard instance), :class:`TooHard` hands the
  problem to the integer program. The deadline is checked between steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from ompq_plugin.allocate.dp_bounds import Step, Suffix, build_steps, lagrangian, suffix_bounds
from ompq_plugin.allocate.dp_memory import MemoryBound, memory_bound
from ompq_plugin.allocate.feasibility import jointly_infeasible
from ompq_plugin.allocate.problem import AllocationProblem, Prepared, budget_limits

_MAX_STATES = 1_500_000  # DP states per step before handing the instance to HiGHS
_EASY_STATES = 3000  # states per step before adding the memory-knapsack bound
_COVER = 1.05  # a sweep's memory tables cover this times the memory cap ...
_MU_REUSE = 0.2  # ... and serve while the BOPs multiplier stays this close (relative)
_GAP_START = 0.7  # a sweep's first gap: this times the previous point's
_GAP_FACTOR = 2.0  # the target's distance below the root bound grows by this per round
_BEAM = 16  # states per step of the heuristic pass that finds a first configuration
_PAIRWISE = 64  # up to this many states, dominance is checked pair by pair
_BOUND_SLACK = 1e-9  # relative: a bound this close below the target keeps its state


class TooHard(Exception):
    """The DP's states outgrew _MAX_STATES: hand the instance to the integer program."""


def _undominated_states(
    value: np.ndarray, mem: np.ndarray, bops: np.ndarray, act: np.ndarray
) -> np.ndarray:
    """Indices of states to keep: one per (act, mem, BOPs), minus states another dominates.

    A state is dropped only for a state with the same open act bits that has at least its value
    and at most its memory and BOPs (every completion of the one completes the other at least as
    well). Checked against the best-valued earlier state in two sweeps (by memory, by BOPs): not
    every dominated state is found, but every state dropped is dominated. Up to _PAIRWISE
    states, every pair is compared instead (all dominated states found; cheaper there).
    """
    n = len(value)
    if n <= _PAIRWISE:
        idx = np.arange(n)
        # beats[j, i]: state j dominates state i (ties: the earlier one stays)
        beats = (act[:, None] == act) & (value[:, None] >= value)
        beats &= (mem[:, None] <= mem) & (bops[:, None] <= bops)
        beats &= (
            (value[:, None] > value)
            | (mem[:, None] < mem)
            | (bops[:, None] < bops)
            | (idx[:, None] < idx)
        )
        return np.flatnonzero(~beats.any(axis=0))
    order = np.lexsort((-value, bops, mem, act))
    v, m, b, a = value[order], mem[order], bops[order], act[order]
    first = np.ones(len(v), dtype=bool)
    first[1:] = (m[1:] != m[:-1]) | (b[1:] != b[:-1]) | (a[1:] != a[:-1])
    keep = order[first]
    for sweep in (0, 1):
        if len(keep) < 2:
            break
        v, m, b, a = value[keep], mem[keep], bops[keep], act[keep]
        order = np.lexsort((-v, b, m, a)) if sweep == 0 else np.lexsort((-v, m, b, a))
        v, m, b, a = v[order], m[order], b[order], a[order]
        dominated = np.zeros(len(v), dtype=bool)
        bounds = np.flatnonzero(np.diff(a)) + 1
        for lo, hi in zip(
            np.concatenate(([0], bounds)), np.concatenate((bounds, [len(v)])), strict=True
        ):
            seg_v = v[lo:hi]
            if len(seg_v) < 2:
                continue
            idx = np.arange(len(seg_v))
            running = np.maximum.accumulate(seg_v)
            champ = np.maximum.accumulate(np.where(seg_v == running, idx, 0))[:-1] + lo
            other = (m[lo + 1 : hi], b[lo + 1 : hi]) if sweep == 0 else (b[lo + 1 : hi],)
            # sorted by (m, b) [sweep 0] or (b, m) [sweep 1]: the champion is no larger in the
            # sort key; check value and the other resource
            worse = v[champ] >= seg_v[1:]
            if sweep == 0:
                worse &= b[champ] <= other[1]
            else:
                worse &= m[champ] <= m[lo + 1 : hi]
            dominated[lo + 1 : hi] = worse
        keep = keep[order[~dominated]]
    return keep


@dataclass
class _Found:
    value: float
    choice: list[tuple[int, int]]  # per layer (w, a)


def _dp(
    steps: list[Step],
    n_layers: int,
    suffixes: list[Suffix],
    lams: list[tuple[float, float]],
    caps: tuple[int, int],
    target: float,
    slack: float,
    deadline: float,
    mbounds: tuple[MemoryBound, ...] = (),
    max_states: int = _MAX_STATES,
    beam: int | None = None,
) -> _Found | None:
    """Best configuration among states whose bound reaches ``target - slack`` (None: none).

    States whose every completion is below ``target - slack`` are dropped, so the result is
    optimal whenever its value is at least ``target - slack``. With ``beam``, only that many
    states with the highest bounds survive each step: a heuristic pass whose result meets the
    budgets (the feasibility pruning stays exact) but need not be optimal.
    """
    value = np.zeros(1)
    mem = np.zeros(1, dtype=np.int64)
    bops = np.zeros(1, dtype=np.int64)
    act = np.zeros(1, dtype=np.int64)
    trail: list[tuple[np.ndarray, np.ndarray]] = []  # per step: (parent, option) of each state
    offsets = [lam[0] * caps[0] + lam[1] * caps[1] for lam in lams]
    for k, st in enumerate(steps):
        if time.perf_counter() > deadline:
            raise TimeoutError
        n, n_opt = len(value), len(st.value)
        parent = np.tile(np.arange(n, dtype=np.int64), n_opt)
        option = np.repeat(np.arange(n_opt, dtype=np.int64), n)
        a_parent = act[parent]
        value = value[parent] + st.value[option]
        mem = mem[parent] + st.mem[option]
        if st.kind == "member":
            assert st.ok is not None
            bops = bops[parent] + st.bops[option] * a_parent
            act = a_parent
            keep = st.ok[option, a_parent]
        else:
            bops = bops[parent] + st.bops[option]
            act = st.a[option] if st.kind == "open" else a_parent
            keep = np.ones(len(value), dtype=bool)
        keep &= mem + suffixes[0].mem[k][act] <= caps[0]
        keep &= bops + suffixes[0].bops[k][act] <= caps[1]
        for lam, suf, off in zip(lams, suffixes, offsets, strict=True):
            bound = value - lam[0] * mem - lam[1] * bops + suf.bound[k][act] + off
            keep &= bound >= target - slack
        # ``bound`` (the last multipliers') ranks the states for a beam
        for mb in mbounds:
            keep &= mb.bound(k, value, act, (mem, bops), caps) >= target - slack
        if st.kind == "member" and st.last:
            act = np.zeros_like(act)
        sel = np.flatnonzero(keep)
        if beam is not None and len(sel) > beam:  # before the dominance check: fewer to compare
            sel = np.sort(sel[np.argpartition(-bound[sel], beam)[:beam]])
        sel = sel[_undominated_states(value[sel], mem[sel], bops[sel], act[sel])]
        if len(sel) > max_states:
            raise TooHard
        value, mem, bops, act = value[sel], mem[sel], bops[sel], act[sel]
        trail.append((parent[sel], option[sel]))
        if not len(sel):
            return None
    best = int(np.argmax(value))
    w_of = [0] * n_layers
    a_of = [0] * n_layers
    open_a: dict[str, int] = {}
    picks = []
    idx = best
    for k in range(len(steps) - 1, -1, -1):
        parent, option = trail[k]
        picks.append((k, int(option[idx])))
        idx = int(parent[idx])
    for k, o in reversed(picks):
        st = steps[k]
        if st.kind == "pair":
            w_of[st.layer], a_of[st.layer] = int(st.w[o]), int(st.a[o])
        elif st.kind == "open":
            open_a[st.group] = int(st.a[o])
        else:
            w_of[st.layer], a_of[st.layer] = int(st.w[o]), open_a[st.group]
    return _Found(float(value[best]), list(zip(w_of, a_of, strict=True)))


@dataclass
class DpCache:
    """What a sweep over budgets can reuse between solves of the same problem.

    The steps depend on the budgets only through the activation buffer and which budgets are
    finite (``key``); the multipliers of the previous budget start the next search.
    """

    key: tuple[float, bool, bool] | None = None
    steps: list[Step] | None = None
    a_max: int = 0
    lam: tuple[float, float] | None = None
    gap: float = 0.0  # (root bound - optimum) / scale of the previous solve
    # the knapsack bounds' tables (by the resource kept exact), reused while they cover it
    mbounds: dict[int, MemoryBound] = field(default_factory=dict)


def _knapsack_bounds(
    steps: list[Step],
    a_max: int,
    caps: tuple[int, int],
    on: tuple[bool, bool],
    lam: tuple[float, float],
    cache: DpCache | None,
) -> tuple[MemoryBound, ...]:
    """The knapsack bounds of :mod:`dp_memory`, one per finite budget kept exact (the other
    priced at its LP multiplier). A cached one serves while it covers the cap and its
    multiplier is within ``_MU_REUSE`` of the new one (any multiplier is valid)."""
    out = []
    for exact in (0, 1):
        if not on[exact]:
            continue
        mu = lam[1 - exact]
        old = cache.mbounds.get(exact) if cache is not None else None
        if old is not None and old.covers(caps) and abs(old.mu - mu) <= _MU_REUSE * mu:
            out.append(old)
            continue
        cover = int(caps[exact] * _COVER)
        bound = memory_bound(steps, a_max, caps, mu, cover=cover, exact=exact)
        if cache is not None:
            cache.mbounds[exact] = bound
        out.append(bound)
    return tuple(out)


def solve_dp(
    problem: AllocationProblem,
    prep: Prepared,
    deadline: float,
    *,
    incumbent: tuple[float, list[tuple[int, int]]] | None = None,
    cache: DpCache | None = None,
) -> list[tuple[int, int]]:
    """The exact DP with a falling target (see the module docstring); per layer (w, a).

    ``incumbent``: (objective, per-layer (w, a)) of a configuration known to meet these budgets
    (e.g. the previous point of a sweep); the target then never falls below it.
    """
    limits = budget_limits(problem.budgets)
    on = (math.isfinite(limits[0]), math.isfinite(limits[1]))
    caps = (
        math.floor(limits[0]) if on[0] else 0,
        math.floor(limits[1]) if on[1] else 0,
    )
    key = (limits[2], on[0], on[1])
    if cache is not None and cache.key == key and cache.steps is not None:
        steps, a_max = cache.steps, cache.a_max
    else:
        try:
            steps, a_max = build_steps(problem, prep, limits)
        except OverflowError:  # resources beyond int64: leave it to HiGHS
            raise TooHard from None
        for st in steps:
            if st.kind != "open" and int(st.bops.max(initial=0)) * max(a_max, 1) > 2**62 // (
                len(steps) + 1
            ):
                raise TooHard  # BOPs could overflow int64: leave it to HiGHS
        if cache is not None:
            cache.key, cache.steps, cache.a_max, cache.mbounds = key, steps, a_max, {}
    lam = lagrangian(steps, caps, on, cache.lam if cache is not None else None)
    if cache is not None:
        cache.lam = lam
    lams = [lam]
    suffixes = [suffix_bounds(steps, a_max, x) for x in lams]
    root = min(
        s.root + x[0] * caps[0] + x[1] * caps[1] for s, x in zip(suffixes, lams, strict=True)
    )
    floor = sum(float(st.value.min()) for st in steps) - 1.0  # below every objective
    # tolerances on the objective's own scale (per-option values may be tiny, e.g. errors)
    scale = sum(float(np.abs(st.value).max(initial=0.0)) for st in steps) or 1.0
    slack = _BOUND_SLACK * scale
    gap = 1e-6 * scale
    best = _Found(incumbent[0], list(incumbent[1])) if incumbent is not None else None
    mbounds: tuple[MemoryBound, ...] = ()
    max_states = _EASY_STATES if on[0] or on[1] else _MAX_STATES
    if cache is not None:  # a sweep: the memory tables serve many points; start near the
        # previous point's gap
        gap = max(gap, _GAP_START * cache.gap * scale)
        if on[0] or on[1]:
            mbounds = _knapsack_bounds(steps, a_max, caps, on, lam, cache)
            root, max_states = min([root, *(mb.root(caps) for mb in mbounds)]), _MAX_STATES
    if best is None and (on[0] or on[1]):
        # a beam pass finds a configuration that meets the budgets, often the optimum: the
        # exact rounds then start at its value instead of just below the root bound
        best = _dp(
            steps,
            len(problem.layers),
            suffixes,
            lams,
            caps,
            -math.inf,
            slack,
            deadline,
            mbounds,
            beam=_BEAM,
        )
        if best is not None:
            gap = max(gap, root - best.value)
    while True:
        target = root - gap
        if best is not None:
            target = max(target, best.value)
        if target < floor:
            target = -math.inf
        try:
            found = _dp(
                steps,
                len(problem.layers),
                suffixes,
                lams,
                caps,
                target,
                slack,
                deadline,
                mbounds,
                max_states,
            )
        except TooHard:
            if max_states == _MAX_STATES:
                raise
            # a hard instance: the knapsack bounds prune far more (and cost more)
            mbounds = _knapsack_bounds(steps, a_max, caps, on, lam, cache)
            root = min([root, *(mb.root(caps) for mb in mbounds)])
            max_states, gap = _MAX_STATES, 1e-6 * scale
            continue
        if found is not None and (best is None or found.value > best.value):
            best = found
        if best is not None and best.value >= target - slack:
            if cache is not None:
                cache.gap = max(root - best.value, 0.0) / scale
            return best.choice
        if target == -math.inf:
            raise jointly_infeasible(problem)
        gap *= _GAP_FACTOR
