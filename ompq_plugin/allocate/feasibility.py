"""Exact feasibility: each budget's smallest achievable value, and the messages naming it.

The smallest achievable value of each budget is computed per act group (each of its act bits,
each member at its cheapest allowed weight bits for it); without excluded pairs this is simply
every layer at its lowest bits, which minimises all three budgets at once. A budget below its
minimum is an error naming that minimum. With excluded pairs the budgets can also be infeasible
only together; the solvers prove that and raise :func:`jointly_infeasible`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ompq_plugin.allocate.problem import AllocationProblem, Prepared, budget_limits
from ompq_plugin.bitconfig import FIXED_KIND
from ompq_plugin.budgets import KIB_BITS
from ompq_plugin.errors import InfeasibleBudgetError


def _fmt_up(value: float, digits: int = 4) -> str:
    """``value`` rounded *up* to ``digits`` significant digits, so 'at least X' is enough."""
    if value <= 0:
        return "0"
    q = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return f"{math.ceil(value / q * (1 - 1e-12)) * q:.{digits}g}"


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def allowed_acts(
    problem: AllocationProblem, prep: Prepared, buffer_limit: float
) -> dict[str, tuple[int, ...]]:
    """Per group: its allowed act bits whose largest input activation fits the buffer budget."""
    out: dict[str, tuple[int, ...]] = {}
    for g, members in prep.groups.items():
        biggest = max(problem.layers[i].input_numel for i in members)
        out[g] = tuple(a for a in prep.act_allowed[g] if biggest * a <= buffer_limit)
    return out


def _smallest(
    problem: AllocationProblem, prep: Prepared, act_ok: Mapping[str, tuple[int, ...]], k: int
) -> int:
    """Exact minimum of weight memory (k=0) or BOPs (k=1) over configurations using ``act_ok``.

    Groups are independent, so the minimum is a sum over groups of the best act bits for that
    group with each member at its cheapest weight bits allowed with those act bits.
    """
    total = 0
    for g, members in prep.groups.items():
        per_a = []
        for a in act_ok[g]:
            cost = 0
            for i in members:
                lay = problem.layers[i]
                w = min(prep.weights_for(i, a))
                cost += lay.params * w if k == 0 else lay.macs * w * a
            per_a.append(cost)
        total += min(per_a)
    return total


def check_feasible(problem: AllocationProblem, prep: Prepared) -> None:
    """Raise InfeasibleBudgetError when a budget is below its smallest achievable value."""
    limits = budget_limits(problem.budgets)
    layers = problem.layers
    any_excluded = any(prep.excluded)
    how = (
        "each layer at its cheapest allowed (weight, act) pair, pins kept"
        if any_excluded
        else "all free layers at their lowest bits, pins kept"
    )
    # buffer: a max over groups, each group independently at its lowest act bits
    low_buffer = max(
        (
            max(layers[i].input_numel for i in members) * prep.act_allowed[g][0]
            for g, members in prep.groups.items()
        ),
        default=0,
    )
    act_ok = allowed_acts(problem, prep, limits[2])
    low_memory = _smallest(problem, prep, act_ok, 0) if low_buffer <= limits[2] else 0
    low_bops = _smallest(problem, prep, act_ok, 1) if low_buffer <= limits[2] else 0
    if low_memory > limits[0]:
        # --avg-weight-bits counts the model's own layers; the fixed ones come on top
        total_params = sum(lay.params for lay in layers if lay.kind != FIXED_KIND)
        fixed = sum(lay.params * max(lay.weight_choices) for lay in layers
                    if lay.kind == FIXED_KIND)
        need = (low_memory - fixed) / max(total_params, 1)
        avg = f" (or --avg-weight-bits to at least {_fmt_up(need)})"
        extra = f", incl. {fixed} bits of the fixed convs quantize / export add" if fixed else ""
        raise InfeasibleBudgetError(
            f"weight memory budget {_fmt(limits[0] / KIB_BITS)} KiB is infeasible: the smallest "
            f"achievable is {_fmt_up(low_memory / KIB_BITS)} KiB ({low_memory} bits; {how}"
            f"{extra}); "
            f"raise --weight-memory-kib to at least {_fmt_up(low_memory / KIB_BITS)}"
            + (avg if total_params else "")
        )
    if low_bops > limits[1]:
        raise InfeasibleBudgetError(
            f"BOPs budget {_fmt(limits[1] / 1e9)} G is infeasible: the smallest achievable is "
            f"{_fmt_up(low_bops / 1e9)} G ({low_bops} BOPs; {how}); raise --bops-g to at least "
            f"{_fmt_up(low_bops / 1e9)}"
        )
    if low_buffer > limits[2]:
        raise InfeasibleBudgetError(
            f"activation buffer budget {_fmt(limits[2] / KIB_BITS)} KiB is infeasible: the "
            f"smallest achievable is {_fmt_up(low_buffer / KIB_BITS)} KiB ({low_buffer} bits; "
            f"{how}); raise --act-buffer-kib to at least {_fmt_up(low_buffer / KIB_BITS)}"
        )


def jointly_infeasible(problem: AllocationProblem) -> InfeasibleBudgetError:
    limits = budget_limits(problem.budgets)
    return InfeasibleBudgetError(
        f"the budgets are infeasible together: each alone is achievable, but no configuration "
        f"meets weight memory {_fmt(limits[0] / KIB_BITS)} KiB and BOPs {_fmt(limits[1] / 1e9)} G "
        f"(activation buffer {_fmt(limits[2] / KIB_BITS)} KiB) at once, because of the excluded "
        "(weight, act) pairs; raise --weight-memory-kib or --bops-g"
    )
