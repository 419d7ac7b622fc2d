"""A stronger DP bound: BOPs dualised with one multiplier, weight memory kept as a knapsack.

The LP bound of :mod:`dp_bounds` dualises both budgets; on tight budgets with error-shaped
per-option values its gap can be a few percent of the objective (the fractional layer's next
width is worth a lot) and the DP then keeps too many states. Here only BOPs is dualised
(multiplier ``mu >= 0``) and memory stays a constraint, solved as a knapsack over memory units:

``table_k[a][r]`` = the largest sum over the steps after ``k`` of ``value - mu * BOPs`` among
their configurations whose memory, counted in units of ``q`` bits rounded down per option, is at
most ``r`` units (``a``: the open act bits, for the steps inside an act group of several layers).

Valid for any ``mu >= 0`` and any ``q``: a configuration that fits ``cap - used`` bits fits
``floor((cap - used) / q)`` units (a sum of floors never exceeds the floor of the sum), so a
state (value, memory ``used``, BOPs ``b``) after step ``k`` completes to at most
``value - mu * b + table_k[a][floor((cap - used) / q)] + mu * bops_cap``. ``q`` is the gcd of
the options' memories (exact) unless that makes more than ``_MAX_UNITS`` units.

The same with the roles swapped (``exact=1``: BOPs kept as the knapsack, memory dualised)
bounds the points where BOPs binds harder, e.g. the wide end of a sweep; the DP can use both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from ompq_plugin.allocate.dp_bounds import Step, _bracket, _golden

_MAX_UNITS = 1 << 16  # memory units per table row (a larger gcd-exact count is coarsened)
_MAX_CELLS = 1 << 23  # numbers in all the tables together (64 MiB)


@dataclass
class MemoryBound:
    """Per step: (rows, units + 1) tables; one row (any open a) or one per open a."""

    mu: float  # the multiplier of the dualised resource
    q: int
    units: int  # the largest use of the exact resource (in units) the tables cover
    tables: list[np.ndarray]
    first: np.ndarray  # before step 0: the whole problem's table
    exact: int = 0  # the resource kept exact: 0 memory, 1 BOPs

    def covers(self, caps: tuple[int, int]) -> bool:
        return caps[self.exact] // self.q <= self.units

    def root(self, caps: tuple[int, int]) -> float:
        """The bound of the whole problem under ``caps`` (memory, BOPs); needs ``covers``."""
        return float(self.first[caps[self.exact] // self.q]) + self.mu * caps[1 - self.exact]

    def bound(
        self, k: int, value: np.ndarray, act: np.ndarray, used: tuple[np.ndarray, np.ndarray],
        caps: tuple[int, int],
    ) -> np.ndarray:  # fmt: skip
        """The most these states (value, act, (memory, BOPs) used after step ``k``) reach."""
        e = self.exact
        table = self.tables[k]
        r = np.clip((caps[e] - used[e]) // self.q, 0, self.units)
        done = value - self.mu * used[1 - e] + self.mu * caps[1 - e]
        return done + table[np.minimum(act, table.shape[0] - 1), r]


def _resources(st: Step, a: int, exact: int) -> tuple[np.ndarray, np.ndarray]:
    """(exact, dualised) resource of each option of ``st`` (a member's BOPs at act bits a)."""
    bops = st.bops * a if st.kind == "member" else st.bops
    return (st.mem, bops) if exact == 0 else (bops, st.mem)


def memory_quantum(steps: list[Step], a_max: int, cap: int, exact: int = 0) -> tuple[int, int]:
    """(q, units): the gcd of the options' exact resource, coarsened to at most _MAX_UNITS
    units and to tables of at most _MAX_CELLS numbers in all."""
    varying = []
    for st in steps:
        for a in range(1, a_max + 1) if st.kind == "member" else (1,):
            res = _resources(st, a, exact)[0].tolist()
            if len(set(res)) > 1:
                varying += res
    q = reduce(math.gcd, varying, 0) or max(cap, 1)
    rows = sum(1 if st.kind == "pair" else a_max + 1 for st in steps) + 1
    most = max(min(_MAX_UNITS, _MAX_CELLS // rows), 1)
    if cap // q > most:
        q = -(-cap // most)
    return q, cap // q


def _add_item(table: np.ndarray, units: np.ndarray, red: np.ndarray) -> np.ndarray:
    """Knapsack step: ``new[r] = max_o table[r - units_o] + red_o`` (-inf where none fits)."""
    new = np.full_like(table, -np.inf)
    size = len(table)
    best: dict[int, float] = {}
    for u, v in zip(units.tolist(), red.tolist(), strict=True):
        if u < size and v > best.get(u, -math.inf):
            best[u] = v
    for u, v in best.items():
        np.maximum(new[u:], table[: size - u] + v, out=new[u:])
    return new


def _tables(
    steps: list[Step], a_max: int, mu: float, q: int, units: int, keep: bool, exact: int = 0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(the table before step 0, per-step tables if ``keep``); see the module doc."""
    tail = np.zeros(units + 1)
    blk = np.zeros((a_max + 1, units + 1))
    out: list[np.ndarray] = [np.empty((1, 0))] * len(steps)
    for k in range(len(steps) - 1, -1, -1):
        st = steps[k]
        if st.kind == "pair":
            if keep:
                out[k] = tail[None]
            res, dual = _resources(st, 1, exact)
            tail = _add_item(tail, res // q, st.value - mu * dual)
        elif st.kind == "member":
            assert st.ok is not None
            if st.last:
                blk = np.repeat(tail[None], a_max + 1, axis=0)
            if keep:
                out[k] = blk
            new = np.full_like(blk, -np.inf)
            for a in range(a_max + 1):
                sel = st.ok[:, a]
                if sel.any():
                    res, dual = _resources(st, a, exact)
                    new[a] = _add_item(blk[a], res[sel] // q, st.value[sel] - mu * dual[sel])
            blk = new
        else:  # open: the state carries a; before it, the best a
            if keep:
                out[k] = blk
            tail = np.max(blk[st.a] + st.value[:, None], axis=0)
    return tail, out


def memory_bound(
    steps: list[Step],
    a_max: int,
    caps: tuple[int, int],
    mu_hint: float,
    iters: int = 0,
    cover: int = 0,
    exact: int = 0,
) -> MemoryBound:
    """The bound's tables at ``mu_hint`` (or, with ``iters``, at a ``mu`` searched by golden
    sections from it: any ``mu`` is valid, a better one only prunes more), covering memory
    caps up to ``max(caps[0], cover)`` (a sweep reuses them for the next budgets)."""
    q, units = memory_quantum(steps, a_max, max(caps[exact], cover), exact)
    c1 = max(caps[1 - exact], 1)
    at = caps[exact] // q

    def h(v: float) -> float:  # in units of mu * dualised cap, on the objective's scale
        return float(_tables(steps, a_max, v / c1, q, units, False, exact)[0][at]) + v

    if iters:
        start = 2 * mu_hint * c1 if mu_hint > 0 else 1.0
        v, _ = _golden(h, _bracket(h, start), iters)
    else:
        v = mu_hint * c1
    first, tables = _tables(steps, a_max, v / c1, q, units, True, exact)
    return MemoryBound(v / c1, q, units, tables, first, exact)
