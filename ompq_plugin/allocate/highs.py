"""The allocation problem as a 0-1 integer program, solved by HiGHS (the ``highspy`` package).

One binary per (layer, allowed (w, a) pair) and, for act groups of several layers, one per
(group, act bits); each layer picks one pair, each such group one act width, and a member's pair
must use its group's width. Budget rows are scaled to 1. A group of one layer needs no group
binaries: its act value goes straight onto the layer's pairs, minus pairs another pair dominates.

HiGHS compares rows with a float tolerance (about 1e-6 relative), so its answer is re-checked in
exact integers (:func:`usage`): a configuration over budget is cut off with a no-good row, the
violated row is tightened slightly, and the model is solved again.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import highspy
import numpy as np

from ompq_plugin.allocate.feasibility import allowed_acts, jointly_infeasible
from ompq_plugin.allocate.pairs import undominated_pairs
from ompq_plugin.allocate.problem import (
    Allocation,
    AllocationProblem,
    Prepared,
    budget_limits,
    checked_allocation,
    timeout_error,
)
from ompq_plugin.errors import OmpqError

_MAX_RESOLVES = 20  # tolerance repairs before giving up (in practice 0 or 1 are needed)
_REL_GAP = 1e-9  # HiGHS's relative MIP gap for "optimal" (the DP's own float slack: 1e-9)


@dataclass(frozen=True)
class Formulation:
    """``max cost . x`` s.t. ``row_lower <= A x <= row_upper``, ``x`` binary; A row-wise (CSR)."""

    cost: np.ndarray
    row_lower: np.ndarray
    row_upper: np.ndarray
    a_start: np.ndarray  # int32, one per row (+1 at the end)
    a_index: np.ndarray  # int32
    a_value: np.ndarray
    pairs: list[list[tuple[int, int]]]  # per layer: its (w, a) pairs, in column order
    first: list[int]  # per layer: the column of its first pair


def formulate(
    problem: AllocationProblem, prep: Prepared, limits: tuple[float, float, float]
) -> Formulation:
    """The integer program of ``problem`` with budgets ``limits`` (memory, BOPs, buffer)."""
    layers = problem.layers
    act_ok = allowed_acts(problem, prep, limits[2])  # the buffer budget: a filter per group
    scale = _objective_scale(prep)
    cost: list[float] = []
    pairs: list[list[tuple[int, int]]] = []
    first: list[int] = []
    for i, lay in enumerate(layers):
        single = len(prep.groups[lay.act_group]) == 1
        wv, av = prep.wval[i], prep.aval[lay.act_group]
        lay_pairs = sorted((w, a) for a in act_ok[lay.act_group] for w in prep.weights_for(i, a))
        if single:
            obj = [wv[w] + av[a] for w, a in lay_pairs]
            lay_pairs = undominated_pairs(lay_pairs, obj, lay, math.isfinite(limits[1]))
        first.append(len(cost))
        pairs.append(lay_pairs)
        cost += [(wv[w] + (av[a] if single else 0.0)) / scale for w, a in lay_pairs]
    rows: list[tuple[list[int], list[float], float, float]] = []
    for i, lay_pairs in enumerate(pairs):
        rows.append(
            (list(range(first[i], first[i] + len(lay_pairs))), [1.0] * len(lay_pairs), 1, 1)
        )
    for g, members in prep.groups.items():
        if len(members) == 1:
            continue
        y = {a: len(cost) + k for k, a in enumerate(act_ok[g])}
        cost += [prep.aval[g][a] / scale for a in act_ok[g]]
        rows.append((list(y.values()), [1.0] * len(y), 1, 1))
        for i in members:
            for a, col in y.items():
                cols = [first[i] + k for k, (_, b) in enumerate(pairs[i]) if b == a]
                rows.append((cols + [col], [1.0] * len(cols) + [-1.0], 0, 0))
    every = [first[i] + k for i, lp in enumerate(pairs) for k in range(len(lp))]
    for k, resource in ((0, "mem"), (1, "bops")):
        if math.isfinite(limits[k]):
            coeff = [
                (lay.params * w if resource == "mem" else lay.macs * w * a) / limits[k]
                for lay, lp in zip(layers, pairs, strict=True)
                for w, a in lp
            ]
            rows.append((every, coeff, -math.inf, 1.0))
    lengths = [len(r[0]) for r in rows]
    return Formulation(
        cost=np.array(cost),
        row_lower=np.array([r[2] for r in rows], dtype=float),
        row_upper=np.array([r[3] for r in rows], dtype=float),
        a_start=np.concatenate(([0], np.cumsum(lengths))).astype(np.int32),
        a_index=np.array([c for r in rows for c in r[0]], dtype=np.int32),
        a_value=np.array([v for r in rows for v in r[1]], dtype=float),
        pairs=pairs,
        first=first,
    )


def _objective_scale(prep: Prepared) -> float:
    """Divisor of the objective: the mean largest option magnitude becomes 10.

    HiGHS's absolute tolerances suit values of about 1-16 (Eq. 10); per-option values can be
    tiny (errors of 1e-5), which would otherwise fall below them.
    """
    tops = [max(map(abs, v.values())) for v in [*prep.wval, *prep.aval.values()]]
    return (sum(tops) / len(tops) / 10.0) or 1.0 if tops else 1.0


_banner_done = False


def _new_highs() -> highspy.Highs:
    """A silent Highs object.

    highspy 1.16 prints a banner on stdout (at the C level) when a process makes its first
    Highs object, before any option can turn output off; that first time, file descriptor 1
    points at /dev/null for the duration of the call, so stdout stays ours (JSON, tables).
    """
    global _banner_done
    if _banner_done:
        h = highspy.Highs()
    else:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _banner_done = True
    h.setOptionValue("output_flag", False)
    return h


def loaded_highs(form: Formulation) -> highspy.Highs:
    """A silent Highs object holding ``form`` as a binary maximisation, with our gap settings
    (relative ``_REL_GAP``, absolute 0, one thread); the caller sets the time limit."""
    h = _new_highs()
    h.setOptionValue("mip_rel_gap", _REL_GAP)
    h.setOptionValue("mip_abs_gap", 0.0)
    h.setOptionValue("threads", 1)
    n = len(form.cost)
    h.passModel(
        n,
        len(form.row_lower),
        len(form.a_index),
        int(highspy.MatrixFormat.kRowwise),
        int(highspy.ObjSense.kMaximize),
        0.0,
        form.cost,
        np.zeros(n),
        np.ones(n),
        form.row_lower,
        form.row_upper,
        form.a_start,
        form.a_index,
        form.a_value,
        np.full(n, int(highspy.HighsVarType.kInteger), dtype=np.int32),
    )
    return h


def _run(
    form: Formulation,
    cuts: list[list[int]],
    time_limit_s: float,
) -> tuple[highspy.HighsModelStatus, np.ndarray]:
    h = loaded_highs(form)
    h.setOptionValue("time_limit", max(time_limit_s, 1e-3))
    for cut in cuts:  # never this over-budget configuration again
        h.addRow(
            -math.inf, len(cut) - 1, len(cut), np.array(cut, dtype=np.int32), np.ones(len(cut))
        )
    h.run()
    status = h.getModelStatus()
    values = (
        np.array(h.getSolution().col_value)
        if status == highspy.HighsModelStatus.kOptimal
        else np.zeros(0)
    )
    return status, values


def solve_highs(
    problem: AllocationProblem,
    prep: Prepared,
    start: float,
    time_limit_s: float,
) -> Allocation:
    """Proven-optimal allocation from HiGHS, exact-checked and repaired (see the module doc)."""
    limits = budget_limits(problem.budgets)
    effective = list(limits)
    cuts: list[list[int]] = []  # per over-budget configuration: its chosen columns
    over: list[list[tuple[int, int]]] = []
    for attempt in range(_MAX_RESOLVES + 1):
        form = formulate(problem, prep, (effective[0], effective[1], effective[2]))
        cuts = [
            [form.first[i] + form.pairs[i].index(p) for i, p in enumerate(c)]
            for c in over
            if all(p in form.pairs[i] for i, p in enumerate(c))  # else this model excludes it
        ]
        remaining = time_limit_s - (time.perf_counter() - start)
        if remaining <= 0:
            raise timeout_error(time_limit_s)
        # no MIP start: a sweep's previous point as HiGHS's start made it return a worse
        # configuration as optimal (tests/test_pareto.py, per-option objectives)
        status, x = _run(form, cuts, remaining)
        if status == highspy.HighsModelStatus.kInfeasible and attempt > 0:
            # the tightening overshot (the exact problem is feasible, checked before): keep the
            # cuts, which alone guarantee progress, and go back to the true budgets
            effective = list(limits)
            continue
        if status == highspy.HighsModelStatus.kInfeasible and any(prep.excluded):
            raise jointly_infeasible(problem)  # each budget alone is achievable (checked)
        if status == highspy.HighsModelStatus.kTimeLimit:
            raise timeout_error(time_limit_s)
        if status != highspy.HighsModelStatus.kOptimal:
            raise OmpqError(
                f"HiGHS returned status {h_name(status)} for a feasible allocation problem; "
                "please report this with the model and budgets"
            )
        chosen = [
            lp[int(np.argmax(x[f : f + len(lp)]))]
            for f, lp in zip(form.first, form.pairs, strict=True)
        ]
        allocation, broken = checked_allocation(problem, chosen, start, "highs")
        if not broken:
            return allocation
        over.append(chosen)
        used = (allocation.weight_memory_bits, allocation.bops, allocation.max_act_buffer_bits)
        for k in broken:  # tighten by twice the excess, growing on repeats
            excess = used[k] - limits[k]
            effective[k] = min(effective[k], limits[k] - excess * 2 ** (attempt + 1))
    raise OmpqError(
        "the solver kept returning configurations over budget by a rounding tolerance; "
        "loosen the budgets slightly (e.g. by 0.01%) and retry"
    )


def h_name(status: highspy.HighsModelStatus) -> str:
    return str(status.name) if hasattr(status, "name") else str(status)
