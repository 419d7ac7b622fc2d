"""The DP's items and bounds: steps per act group, suffix bounds, Lagrangian multipliers.

* Items: a group of one layer is one item whose options are its (w, a) pairs, minus pairs another
  pair dominates (no better objective, no cheaper in either resource). A group of several layers
  is a block of consecutive steps: first its act bits ``a`` (carried in the state), then each
  member's weight bits.
* Bound: multipliers ``lam = (lam_mem, lam_bops) >= 0`` minimising the Lagrangian dual
  ``L(lam) = sum_items max_option (obj - lam . resources) + lam . budgets`` (which equals the LP
  relaxation bound; found by a nested golden-section search -- any ``lam >= 0`` gives a valid
  bound, a better one only prunes more). A partial state (value, memory, BOPs, open group's a)
  after step k can complete to at most
  ``value - lam . used + suffix_k(a) + lam . budgets``, ``suffix_k`` being the sum of the later
  items' largest reduced profits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ompq_plugin.allocate.feasibility import allowed_acts
from ompq_plugin.allocate.pairs import undominated_pairs
from ompq_plugin.allocate.problem import AllocationProblem, Prepared


@dataclass
class Step:
    """One DP step: a one-layer group's (w, a) pair, a block's act bits, or a member's w."""

    kind: str  # "pair" | "open" | "member"
    group: str
    layer: int  # the layer index ("pair", "member"); -1 for "open"
    w: np.ndarray  # per option: weight bits (0 for "open")
    a: np.ndarray  # per option: act bits (0 for "member": the state's open a)
    value: np.ndarray  # per option: objective contribution
    mem: np.ndarray  # per option: weight memory bits (0 when that budget is infinite)
    bops: np.ndarray  # per option: BOPs; for "member" macs * w, multiplied by the state's a
    ok: np.ndarray | None  # "member": [option, a] -> (w, a) allowed
    last: bool  # "member": the block's last layer (closes the block)


def build_steps(
    problem: AllocationProblem, prep: Prepared, limits: tuple[float, float, float]
) -> tuple[list[Step], int]:
    """The DP's steps (groups in order of first appearance) and the largest act bit width."""
    layers = problem.layers
    act_ok = allowed_acts(problem, prep, limits[2])
    mem_on, bops_on = math.isfinite(limits[0]), math.isfinite(limits[1])
    a_max = max((max(acts) for acts in act_ok.values() if acts), default=1)
    steps: list[Step] = []
    for g, members in prep.groups.items():
        av = prep.aval[g]
        if len(members) == 1:
            i = members[0]
            lay = layers[i]
            wv = prep.wval[i]
            pairs = sorted((w, a) for a in act_ok[g] for w in prep.weights_for(i, a))
            obj = [wv[w] + av[a] for w, a in pairs]
            pairs = undominated_pairs(pairs, obj, lay, finite_bops=bops_on)
            steps.append(
                Step(
                    "pair",
                    g,
                    i,
                    np.array([w for w, _ in pairs], dtype=np.int64),
                    np.array([a for _, a in pairs], dtype=np.int64),
                    np.array([wv[w] + av[a] for w, a in pairs]),
                    np.array([lay.params * w * mem_on for w, _ in pairs], dtype=np.int64),
                    np.array([lay.macs * w * a * bops_on for w, a in pairs], dtype=np.int64),
                    None,
                    False,
                )
            )
            continue
        acts = act_ok[g]
        zeros = np.zeros(len(acts), dtype=np.int64)
        steps.append(
            Step(
                "open",
                g,
                -1,
                zeros,
                np.array(acts, dtype=np.int64),
                np.array([av[a] for a in acts]),
                zeros,
                zeros,
                None,
                False,
            )
        )
        for n, i in enumerate(members):
            lay = layers[i]
            ws = prep.weight_allowed[i]
            ok = np.zeros((len(ws), a_max + 1), dtype=bool)
            for k, w in enumerate(ws):
                for a in acts:
                    ok[k, a] = (w, a) not in prep.excluded[i]
            steps.append(
                Step(
                    "member",
                    g,
                    i,
                    np.array(ws, dtype=np.int64),
                    np.zeros(len(ws), dtype=np.int64),
                    np.array([prep.wval[i][w] for w in ws]),
                    np.array([lay.params * w * mem_on for w in ws], dtype=np.int64),
                    np.array([lay.macs * w * bops_on for w in ws], dtype=np.int64),
                    ok,
                    n == len(members) - 1,
                )
            )
    return steps, a_max


@dataclass
class Suffix:
    """Per step k, indexed by the state's open act bits (0: none): what the later steps add."""

    bound: list[np.ndarray]  # largest total reduced profit (value - lam . resources)
    mem: list[np.ndarray]  # smallest weight memory
    bops: list[np.ndarray]  # smallest BOPs
    root: float  # the Lagrangian bound of the whole problem (without lam . budgets)


def suffix_bounds(steps: list[Step], a_max: int, lam: tuple[float, float]) -> Suffix:
    size = a_max + 1
    bound: list[np.ndarray] = [np.empty(0)] * len(steps)
    mem: list[np.ndarray] = [np.empty(0)] * len(steps)
    bops: list[np.ndarray] = [np.empty(0)] * len(steps)
    tail, tail_mem, tail_bops = 0.0, 0, 0  # everything after the current block / step
    blk = np.zeros(size)  # inside a block: the later members, per open a
    blk_mem = np.zeros(size, dtype=np.int64)
    blk_bops = np.zeros(size, dtype=np.int64)
    acts = np.arange(size, dtype=np.int64)
    for k in range(len(steps) - 1, -1, -1):
        st = steps[k]
        if st.kind == "pair":
            bound[k] = np.full(size, tail)
            mem[k] = np.full(size, tail_mem, dtype=np.int64)
            bops[k] = np.full(size, tail_bops, dtype=np.int64)
            tail += float(np.max(st.value - lam[0] * st.mem - lam[1] * st.bops))
            tail_mem += int(st.mem.min())
            tail_bops += int(st.bops.min())
        elif st.kind == "member":
            if st.last:
                blk, blk_mem, blk_bops = np.zeros(size), blk_mem * 0, blk_bops * 0
            bound[k], mem[k], bops[k] = tail + blk, tail_mem + blk_mem, tail_bops + blk_bops
            assert st.ok is not None
            # [option, a]: reduced profit / resources of weight option w given act bits a
            red = (st.value - lam[0] * st.mem)[:, None] - lam[1] * np.outer(st.bops, acts)
            big = np.iinfo(np.int64).max // 4
            blk = blk + np.where(st.ok, red, -np.inf).max(axis=0)
            blk_mem = blk_mem + np.where(st.ok, st.mem[:, None], big).min(axis=0)
            blk_bops = blk_bops + np.where(st.ok, np.outer(st.bops, acts), big).min(axis=0)
        else:  # open: the whole block is now "later"
            bound[k], mem[k], bops[k] = tail + blk, tail_mem + blk_mem, tail_bops + blk_bops
            tail += float(np.max(st.value + blk[st.a]))
            tail_mem += int(blk_mem[st.a].min())
            tail_bops += int(blk_bops[st.a].min())
    return Suffix(bound, mem, bops, tail)


_HINTED_ITERS = 20  # golden-section steps per multiplier when started near a hint (a sweep)
_COLD_ITERS = 16  # ... and otherwise (see `lagrangian`)


class _Dual:
    """Fast evaluation of the Lagrangian bound ``max_config (obj - lam . used)`` for many lam."""

    def __init__(self, steps: list[Step]) -> None:
        pv, pm, pb, pstart = [], [], [], []  # one-layer groups: their (w, a) options
        bv, bm, bb, bstart = [], [], [], []  # blocks: segments (block, a, member) of w options
        seg_start, act_value, blk_start = [], [], []  # per (block, a): its first segment
        n_seg = 0
        k = 0
        while k < len(steps):
            st = steps[k]
            if st.kind == "pair":
                pstart.append(sum(len(x) for x in pv))
                pv.append(st.value)
                pm.append(st.mem)
                pb.append(st.bops)
                k += 1
                continue
            end = k + 1
            while not steps[end].last:
                end += 1
            members = steps[k + 1 : end + 1]
            blk_start.append(len(act_value))
            for a, va in zip(st.a.tolist(), st.value.tolist(), strict=True):
                seg_start.append(n_seg)
                act_value.append(va)
                for m in members:
                    assert m.ok is not None
                    sel = m.ok[:, a]
                    bstart.append(sum(len(x) for x in bv))
                    bv.append(m.value[sel])
                    bm.append(m.mem[sel])
                    bb.append(m.bops[sel] * a)
                    n_seg += 1
            k = end + 1
        self.pv, self.pm, self.pb = _cat(pv, float), _cat(pm, float), _cat(pb, float)
        self.pstart = np.array(pstart, dtype=np.int64)
        self.bv, self.bm, self.bb = _cat(bv, float), _cat(bm, float), _cat(bb, float)
        self.bstart = np.array(bstart, dtype=np.int64)
        self.seg_start = np.array(seg_start, dtype=np.int64)
        self.act_value = np.array(act_value)
        self.blk_start = np.array(blk_start, dtype=np.int64)

    def __call__(self, l1: float, l2: float) -> float:
        total = 0.0
        if len(self.pstart):
            red = self.pv - l1 * self.pm - l2 * self.pb
            total += float(np.maximum.reduceat(red, self.pstart).sum())
        if len(self.blk_start):
            red = self.bv - l1 * self.bm - l2 * self.bb
            per_seg = np.maximum.reduceat(red, self.bstart)
            per_act = np.add.reduceat(per_seg, self.seg_start) + self.act_value
            total += float(np.maximum.reduceat(per_act, self.blk_start).sum())
        return total


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


def _golden(f: Callable[[float], float], hi: float, iters: int) -> tuple[float, float]:
    """(argmin, min) of a convex ``f`` on [0, hi] by golden sections (also tries 0)."""
    r = (math.sqrt(5) - 1) / 2
    lo, up = 0.0, hi
    x1, x2 = up - r * (up - lo), lo + r * (up - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(iters):
        if f1 <= f2:
            up, x2, f2 = x2, x1, f1
            x1 = up - r * (up - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + r * (up - lo)
            f2 = f(x2)
    best = (x1, f1) if f1 <= f2 else (x2, f2)
    f0 = f(0.0)
    return best if best[1] < f0 else (0.0, f0)


def _bracket(f: Callable[[float], float], start: float) -> float:
    """An upper end ``hi`` such that the convex ``f`` has a minimiser in [0, hi]."""
    hi = start
    for _ in range(60):
        if f(2 * hi) >= f(hi):
            return 2 * hi
        hi *= 2
    return hi


def lagrangian(
    steps: list[Step],
    caps: tuple[int, int],
    on: tuple[bool, bool],
    hint: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """Multipliers (near-)minimising the Lagrangian dual bound, by nested golden sections.

    Searched in units of ``lam_k * budget_k`` so both live on the objective's scale. Any result
    is a valid bound; its precision only affects how much the DP prunes. ``hint`` (multipliers
    of a nearby problem, e.g. the previous budget of a sweep) starts the brackets near them.

    Without a hint, ``_COLD_ITERS`` = 16 steps per multiplier (each nested search costs about
    (steps + 3)^2 evaluations): on the 90 ResNet-50 instances of ``bench/solvers.py`` the DP
    took 2.66 s in total with 30 steps, 2.16 s with 20, 2.06-2.12 s with 16, 2.07 s with 12, but
    4.1 s with 10 (one instance 16x slower: its bound too loose), so 16 keeps a margin;
    ResNet-20 / 56 searches under memory and BOPs budgets: 6.9 -> 4.2 ms and 12.6-19.8 ->
    9.3-16.3 ms per solve
    (2026-12-07, ad-hoc scripts, every objective unchanged). Near a hint (a sweep's previous
    point), 20 steps: the ResNet-50 sweep of ``bench/solvers.py --sweep-time`` with the Eq. 10
    objective took 13.7 s with 10, 7.1 s with 16, 6.5 s with 20 to 30 (its near-ties need a
    precise bound); the default method's sweep 1.2 s with 10, 1.5 s with 20.
    """
    dual = _Dual(steps)
    c0, c1 = max(caps[0], 1), max(caps[1], 1)

    def f(u: float, v: float) -> float:
        return dual(u / c0, v / c1) + u + v

    spread = sum(float(st.value.max() - st.value.min()) for st in steps) + 1.0
    start_u = 2 * hint[0] * c0 if hint and hint[0] > 0 else spread
    start_v = 2 * hint[1] * c1 if hint and hint[1] > 0 else spread
    iters = _HINTED_ITERS if hint else _COLD_ITERS
    if on[0] and on[1]:
        best_u: dict[float, float] = {}

        def inner(v: float) -> float:
            hi_u = _bracket(lambda u: f(u, v), start_u)
            u, val = _golden(lambda x: f(x, v), hi_u, iters)
            best_u[v] = u
            return val

        v, _ = _golden(inner, _bracket(inner, start_v), iters)
        if v not in best_u:
            inner(v)
        return best_u[v] / c0, v / c1
    if on[0]:
        g = lambda u: f(u, 0.0)  # noqa: E731
        return _golden(g, _bracket(g, start_u), iters)[0] / c0, 0.0
    if on[1]:
        h = lambda v: f(0.0, v)  # noqa: E731
        return 0.0, _golden(h, _bracket(h, start_v), iters)[0] / c1
    return 0.0, 0.0
