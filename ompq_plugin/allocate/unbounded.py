"""The integer program without a finite budget: each act group on its own.

Contract: when weight memory, BOPs and the activation buffer are all unlimited, nothing links
one act group's choice to another's, so the optimum is, per group, the act width ``a`` and the
members' weight widths maximising ``aval[a] + sum_i wval_i[w_i]`` over the allowed (w, a) pairs
(pins and excluded pairs as :func:`~ompq_plugin.allocate.problem.prepare` left them). Ties keep
the narrowest act width, then the narrowest weight width (the cheapest, as the DP's dominance
rule does). Exact, in one pass over the choices; the DP reaches the same optimum after
building its steps and bounds (ResNet-20's whole solve: 2-2.6 ms with the DP, 0.5-0.6 ms
here, validation included).
"""

from __future__ import annotations

import math

from ompq_plugin.allocate.problem import AllocationProblem, Prepared, budget_limits


def unbounded(problem: AllocationProblem) -> bool:
    """Whether no budget is finite."""
    return not any(math.isfinite(x) for x in budget_limits(problem.budgets))


def solve_unbounded(prep: Prepared, n_layers: int) -> list[tuple[int, int]]:
    """Per layer (w, a): every act group's best choice (see the module docstring)."""
    chosen: list[tuple[int, int]] = [(0, 0)] * n_layers
    for g, members in prep.groups.items():
        best: tuple[float, int, list[int]] | None = None
        for a in sorted(prep.act_allowed[g]):
            total = prep.aval[g][a]
            ws = []
            for i in members:
                # narrowest first: max keeps the first of equal values
                w = max(sorted(prep.weights_for(i, a)), key=prep.wval[i].__getitem__)
                total += prep.wval[i][w]
                ws.append(w)
            if best is None or total > best[0]:
                best = (total, a, ws)
        assert best is not None  # prepare() leaves only act widths every member can pair with
        for i, w in zip(members, best[2], strict=True):
            chosen[i] = (w, best[1])
    return chosen
