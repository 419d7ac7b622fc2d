"""Weight memory the only finite budget: an exact knapsack over the act groups.

Contract: when BOPs and the activation buffer are unlimited and the weight memory is finite,
nothing but memory links the act groups, and memory does not depend on activation widths. So
each act group's choices reduce to one option per combination of its members' weight widths
(pins and excluded pairs as :func:`~ompq_plugin.allocate.problem.prepare` left them), taking
the act width best for that combination, and the problem is a multiple-choice knapsack over
memory. Every option's memory above its group's cheapest is a multiple of ``g`` (the gcd of
those differences), so a DP over ``floor((cap - sum of the cheapest) / g)`` units is exact in
integers. Ties keep the cheapest configuration (the fewest units reaching the optimum, to
1e-12 of the objective's scale like the DP), then the narrower act width (as the DP's dominance
rule).

:func:`solve_memory_knapsack` returns None (the general DP then solves it) when another budget
is finite, a group has more than ``_MAX_OPTIONS`` weight combinations, or the table would pass
``_MAX_CELLS`` numbers or ``_MAX_WORK`` updates. On ResNet-20's search at a 5-bit average the
whole solve (validation included) takes 0.9 ms against the DP's 2.9 ms, with the same
configuration.
"""

from __future__ import annotations

import itertools
import math
from functools import reduce

import numpy as np

from ompq_plugin.allocate.pairs import frontier
from ompq_plugin.allocate.problem import AllocationProblem, Prepared, budget_limits

_MAX_OPTIONS = 64  # weight-width combinations of one act group (two layers of 7 widths: 49)
_MAX_CELLS = 1 << 22  # DP table numbers (units x groups)
# table updates (units x options): beyond this the general DP was faster (torchvision models:
# GoogLeNet's 4-layer groups at a 5-bit average took 5 s here, 25 ms in the DP)
_MAX_WORK = 1 << 20


def memory_only(problem: AllocationProblem) -> bool:
    """Whether the weight memory is the only finite budget."""
    memory, bops, buffer = budget_limits(problem.budgets)
    return math.isfinite(memory) and not math.isfinite(bops) and not math.isfinite(buffer)


def _group_options(
    problem: AllocationProblem, prep: Prepared, members: list[int], g: str
) -> list[tuple[int, float, int, tuple[int, ...]]] | None:
    """(memory, value, act width, members' weight widths) of the combinations worth keeping,
    cheapest first: each one better in value than every cheaper one (of equal values the
    cheapest); None past ``_MAX_OPTIONS`` combinations."""
    choices = [prep.weight_allowed[i] for i in members]
    if math.prod(len(c) for c in choices) > _MAX_OPTIONS:
        return None
    acts = prep.act_allowed[g]
    free = not any(prep.excluded[i] for i in members)  # then one act width serves every ws
    out = []
    best_a: int | None = None
    for ws in itertools.product(*choices):
        if best_a is None or not free:
            best_a = None
            for a in acts:  # ascending: ties keep the narrower width
                if all((w, a) not in prep.excluded[i] for w, i in zip(ws, members, strict=True)):
                    if best_a is None or prep.aval[g][a] > prep.aval[g][best_a]:
                        best_a = a
        if best_a is None:  # every act width excluded for this combination
            continue
        memory = sum(problem.layers[i].params * w for w, i in zip(ws, members, strict=True))
        value = prep.aval[g][best_a] + sum(
            prep.wval[i][w] for w, i in zip(ws, members, strict=True)
        )
        out.append((memory, value, best_a, ws))
    # only the options no cheaper one matches in value (the rest never pay: a group of four
    # layers keeps tens of its 2,401 combinations)
    return [out[k] for k in frontier([o[0] for o in out], [o[1] for o in out])]


def solve_memory_knapsack(
    problem: AllocationProblem, prep: Prepared
) -> list[tuple[int, int]] | None:
    """Per layer (w, a) maximising the objective within the weight memory; None when this
    solver does not apply (see the module docstring). The caller has checked feasibility."""
    if not memory_only(problem):
        return None
    groups = []
    for g, members in prep.groups.items():
        options = _group_options(problem, prep, members, g)
        if not options:
            return None
        groups.append((members, options))
    base = sum(options[0][0] for _, options in groups)
    diffs = [o[0] - options[0][0] for _, options in groups for o in options]
    unit = reduce(math.gcd, diffs, 0) or 1
    units = (math.floor(problem.budgets.weight_memory_bits) - base) // unit
    # more units than every group's dearest option needs change nothing
    units = min(units, sum(options[-1][0] - options[0][0] for _, options in groups) // unit)
    options_total = sum(len(options) for _, options in groups)
    if (
        units < 0
        or (units + 1) * len(groups) > _MAX_CELLS
        or (units + 1) * options_total > _MAX_WORK
    ):
        return None
    best = np.zeros(units + 1)  # the largest value within each number of units
    picks = []
    for _, options in groups:
        table = np.full((len(options), units + 1), -np.inf)
        for k, (memory, v, _, _) in enumerate(options):
            c = (memory - options[0][0]) // unit
            if c <= units:
                table[k, c:] = best[: units + 1 - c] + v
        pick = table.argmax(axis=0)  # the first of equal values: the cheapest option
        best = table[pick, np.arange(units + 1)]
        picks.append(pick)
    # the fewest units that reach the optimum (to float rounding, as the DP's 1e-12): of equal
    # objectives the cheapest configuration, as the DP's dominance rule keeps
    scale = sum(max(abs(o[1]) for o in options) for _, options in groups) or 1.0
    left = int(np.argmax(best >= best[units] - 1e-12 * scale))
    chosen: list[tuple[int, int]] = [(0, 0)] * len(problem.layers)
    for (members, options), pick in zip(reversed(groups), reversed(picks), strict=True):
        memory, _, a, ws = options[int(pick[left])]
        left -= (memory - options[0][0]) // unit
        for i, w in zip(members, ws, strict=True):
            chosen[i] = (w, a)
    return chosen
