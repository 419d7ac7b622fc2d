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

Only the rows a state can query are computed: after step ``k`` the memory used lies between the
prefix's smallest and largest, so ``r`` lies in a window (``window``); the window of step ``k``
also covers every row the step before reads. On ResNet-50 (58 steps, 39,225 units) the windows
hold 18 % of the full tables' cells on one instance of `bench/solvers.py` (memory exact).

The same with the roles swapped (``exact=1``: BOPs kept as the knapsack, memory dualised)
bounds the points where BOPs binds harder, e.g. the wide end of a sweep; the DP can use both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from ompq_plugin.allocate.dp_bounds import Step, _bracket, _golden
from ompq_plugin.allocate.pairs import frontier

_MAX_UNITS = 1 << 16  # memory units per table row (a larger gcd-exact count is coarsened)
_MAX_CELLS = 1 << 23  # numbers in all the tables together (64 MiB)


@dataclass
class MemoryBound:
    """Per step: a (rows, width) table of the rows ``lo .. lo + width - 1``; one row (any open
    a) or one per act width in use."""

    mu: float  # the multiplier of the dualised resource
    q: int
    caps: tuple[int, int]  # the smallest and largest cap on the exact resource it serves
    tables: list[np.ndarray]
    lo: list[int]  # per step: the first row its table holds
    first: np.ndarray  # before step 0: the whole problem's table ...
    first_lo: int  # ... from this row
    exact: int  # the resource kept exact: 0 memory, 1 BOPs
    row_of: np.ndarray  # the row of each open act width in the block tables

    @property
    def units(self) -> int:
        """The largest cap's row: the most units any table covers."""
        return self.caps[1] // self.q

    def covers(self, caps: tuple[int, int]) -> bool:
        return self.caps[0] <= caps[self.exact] <= self.caps[1]

    def root(self, caps: tuple[int, int]) -> float:
        """The bound of the whole problem under ``caps`` (memory, BOPs); needs ``covers``."""
        r = caps[self.exact] // self.q - self.first_lo
        return float(self.first[r]) + self.mu * caps[1 - self.exact]

    def bound(
        self, k: int, value: np.ndarray, act: np.ndarray, used: tuple[np.ndarray, np.ndarray],
        caps: tuple[int, int],
    ) -> np.ndarray:  # fmt: skip
        """The most these states (value, act, (memory, BOPs) used after step ``k``) reach.
        States over the cap read the window's first row (more room: still an upper bound)."""
        e = self.exact
        table = self.tables[k]
        r = np.clip((caps[e] - used[e]) // self.q - self.lo[k], 0, table.shape[1] - 1)
        done = value - self.mu * used[1 - e] + self.mu * caps[1 - e]
        return done + (table[self.row_of[act], r] if len(table) > 1 else table[0, r])


def _resources(st: Step, a: int, exact: int) -> tuple[np.ndarray, np.ndarray]:
    """(exact, dualised) resource of each option of ``st`` (a member's BOPs at act bits a)."""
    bops = st.bops * a if st.kind == "member" else st.bops
    return (st.mem, bops) if exact == 0 else (bops, st.mem)


def acts_in_blocks(steps: list[Step]) -> list[int]:
    """The act widths a block (an act group of several layers) may open, ascending."""
    return sorted({a for st in steps if st.kind == "open" for a in st.a.tolist()})


def _exact_options(st: Step, acts: list[int], exact: int) -> list[int]:
    """The exact resource of every option of ``st`` (a member's at every act width in use)."""
    if st.kind == "open":
        return [0]
    if st.kind == "pair":
        return _resources(st, 1, exact)[0].tolist()
    assert st.ok is not None
    return [r for a in acts for r in _resources(st, a, exact)[0][st.ok[:, a]].tolist()] or [0]


def memory_quantum(steps: list[Step], cap: int, exact: int = 0) -> tuple[int, int]:
    """(q, units): the gcd of the options' exact resource, coarsened to at most _MAX_UNITS
    units and to tables of at most _MAX_CELLS numbers in all."""
    acts = acts_in_blocks(steps)
    varying = []
    for st in steps:
        res = _exact_options(st, acts, exact)
        if len(set(res)) > 1:
            varying += res
    q = reduce(math.gcd, varying, 0) or max(cap, 1)
    rows = sum(1 if st.kind == "pair" else len(acts) for st in steps) + 1
    most = max(min(_MAX_UNITS, _MAX_CELLS // rows), 1)
    if cap // q > most:
        q = -(-cap // most)
    return q, cap // q


def window(
    steps: list[Step], q: int, caps: tuple[int, int], exact: int = 0
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The rows (first, last) each table needs for exact-resource caps in ``caps`` (smallest,
    largest): before step 0 the caps' own rows; after step ``k`` the rows of states whose
    prefix uses between the least and the most of the exact resource, and every row the
    previous table reads (its rows minus step ``k``'s units), within 0 .. largest cap's row."""
    acts = acts_in_blocks(steps)
    top = caps[1] // q
    first = (caps[0] // q, top)
    lo, hi = first
    least = most = 0  # the prefix's exact resource, in the resource's own unit
    out = []
    for st in steps:
        res = _exact_options(st, acts, exact)
        least, most = least + min(res), most + max(res)
        units = [r // q for r in res]
        lo = min(lo - max(units), (caps[0] - most) // q)
        hi = max(hi - min(units), (caps[1] - least) // q)
        lo, hi = min(max(lo, 0), top), min(max(hi, 0), top)
        out.append((lo, hi))
    return first, out


def _add_item(
    src: np.ndarray, src_lo: int, units: np.ndarray, red: np.ndarray,
    dst: np.ndarray, dst_lo: int, tmp: np.ndarray,
) -> None:  # fmt: skip
    """Knapsack step on windows: ``dst[r] = max_o src[r - units_o] + red_o`` (-inf where no
    option's row is in ``src``; rows counted from ``dst_lo`` and ``src_lo``), over the options
    that no option with at most their units and at least their value precedes (the others
    never give the max); ``tmp``: a scratch buffer at least as long as ``dst``."""
    costs, values = units.tolist(), red.tolist()
    options = [(costs[k], values[k]) for k in frontier(costs, values)]
    nd, ns = len(dst), len(src)
    if not options:
        dst.fill(-np.inf)
    for i, (u, v) in enumerate(options):
        start = max(src_lo + u - dst_lo, 0)  # dst's first row this option reaches
        end = min(nd, ns + src_lo + u - dst_lo)
        if i == 0:  # the fewest units: only it reaches the lowest rows
            dst[:start] = -np.inf
            dst[end:] = -np.inf
        if end <= start:
            continue
        s = start + dst_lo - u - src_lo
        if i == 0:
            np.add(src[s : s + end - start], v, out=dst[start:end])
        else:
            np.add(src[s : s + end - start], v, out=tmp[: end - start])
            np.maximum(dst[start:end], tmp[: end - start], out=dst[start:end])


def _tables(
    steps: list[Step], a_max: int, mu: float, q: int, caps: tuple[int, int], keep: bool,
    exact: int = 0,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, tuple[int, list[int]]]:  # fmt: skip
    """(the table before step 0, per-step tables if ``keep``, the row of each act width in the
    block tables, (the first row of the table before step 0, of each step's)); see the module
    doc. The tables are views of two buffers per shape; a table kept for the DP takes its
    buffer with it, so without ``keep`` four buffers serve every step."""
    acts = acts_in_blocks(steps)
    row_of = np.zeros(a_max + 1, dtype=np.int64)
    row_of[acts] = np.arange(len(acts))
    first_win, wins = window(steps, q, caps, exact)
    size = caps[1] // q + 1
    tmp = np.empty(size)
    tails, t = [np.empty(size), np.empty(size)], 0
    blks, b = [np.empty((len(acts), size)), np.empty((len(acts), size))], 0
    lo, hi = wins[-1]
    tail = tails[t][: hi - lo + 1]
    tail.fill(0.0)
    blk = blks[b][:, :0]
    out: list[np.ndarray] = [np.empty((1, 0))] * len(steps)
    for k in range(len(steps) - 1, -1, -1):
        st = steps[k]
        lo, _ = wins[k]  # the first row of the tables after step k ...
        new_lo, new_hi = wins[k - 1] if k else first_win  # ... and the rows before it
        width = new_hi - new_lo + 1
        if st.kind == "pair":
            if keep:
                out[k], tails[t] = tail[None], np.empty(size)
            res, dual = _resources(st, 1, exact)
            dst = tails[1 - t][:width]
            _add_item(tail, lo, res // q, st.value - mu * dual, dst, new_lo, tmp)
            tail, t = dst, 1 - t
        elif st.kind == "member":
            assert st.ok is not None
            if st.last:
                blk = blks[b][:, : len(tail)]
                blk[:] = tail
            if keep:
                out[k], blks[b] = blk, np.empty((len(acts), size))
            dst = blks[1 - b][:, :width]
            for row, a in enumerate(acts):
                sel = st.ok[:, a]
                if sel.any():
                    res, dual = _resources(st, a, exact)
                    red = st.value[sel] - mu * dual[sel]
                    _add_item(blk[row], lo, res[sel] // q, red, dst[row], new_lo, tmp)
                else:
                    dst[row].fill(-np.inf)
            blk, b = dst, 1 - b
        else:  # open: the state carries a; before it, the best a (no resources: same rows)
            if keep:
                out[k], blks[b] = blk, np.empty((len(acts), size))
            tail = np.max(blk[row_of[st.a]] + st.value[:, None], axis=0)
    return tail, out, row_of, (first_win[0], [w[0] for w in wins])


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
    sections from it: any ``mu`` is valid, a better one only prunes more), serving caps on the
    exact resource from ``caps[exact]`` up to ``max(caps[exact], cover)`` (a sweep reuses them
    for the next budgets)."""
    served = (caps[exact], max(caps[exact], cover))
    q, _ = memory_quantum(steps, served[1], exact)
    c1 = max(caps[1 - exact], 1)
    at = caps[exact] // q - served[0] // q

    def h(v: float) -> float:  # in units of mu * dualised cap, on the objective's scale
        return float(_tables(steps, a_max, v / c1, q, served, False, exact)[0][at]) + v

    if iters:
        start = 2 * mu_hint * c1 if mu_hint > 0 else 1.0
        v, _ = _golden(h, _bracket(h, start), iters)
    else:
        v = mu_hint * c1
    first, tables, row_of, (first_lo, los) = _tables(steps, a_max, v / c1, q, served, True, exact)
    return MemoryBound(v / c1, q, served, tables, los, first, first_lo, exact, row_of)
