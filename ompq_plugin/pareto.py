"""Pareto front of one model on one target: one search, then many budgets.

``pareto_front`` runs the search once at the loosest budgets (features, importances, error
tables, the integer program), then re-solves that same problem at every budget of a line from
``low`` to ``high`` (:func:`ompq_plugin.allocate.sweep`), each point proven optimal. Each point
can be written as a BitConfig (:meth:`ParetoFront.config_at`) for ``quantize``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ompq_plugin.allocate import ParetoPoint, budget_line, sweep, usage
from ompq_plugin.allocate.problem import prepare
from ompq_plugin.bitconfig import BitConfig
from ompq_plugin.budgets import KIB_BITS, Budgets
from ompq_plugin.errors import OmpqError
from ompq_plugin.fileio import write_text_atomic
from ompq_plugin.fixed_layers import average_bits_memory
from ompq_plugin.hw_profiles import load_profile
from ompq_plugin.hw_profiles.profile import HardwareProfile
from ompq_plugin.searcher import SearchResult, run_search


@dataclass(frozen=True)
class ParetoFront:
    model: str
    profile: str
    total_params: int
    total_macs: int
    points: list[ParetoPoint]
    search: SearchResult  # the one search (ORM, importances) the sweep re-solved
    sweep_s: float  # every point of the sweep together (the search excluded)

    def with_model_info(self, spec: Any) -> ParetoFront:
        """A copy whose search BitConfig records the model's spec (input size, normalisation,
        the weights file and its hash), as ``ompq search`` records it; every point's
        BitConfig then carries it too."""
        search = replace(self.search, config=self.search.config.with_model_info(spec))
        return replace(self, search=search)

    def average_weight_bits(self, index: int) -> float:
        """Point ``index``'s average weight width over the model's own layers, as its BitConfig
        reports it (its memory also counts the fixed layers ``quantize`` adds)."""
        return self.config_at(index).average_weight_bits

    def config_at(self, index: int) -> BitConfig:
        """Point ``index`` as a BitConfig (for ``quantize``): the search's own BitConfig with
        that point's bits and budgets."""
        base = self.search.config
        point = self.points[index]
        bits = point.allocation
        layers, fixed = (
            [replace(lb, weight_bits=bits.weight_bits[lb.name], act_bits=bits.act_bits[lb.name])
             for lb in group]
            for group in (base.layers, base.fixed_layers)
        )
        return replace(base, layers=layers, fixed_layers=fixed, budgets=point.budgets)

    def slack_notes(self) -> list[str]:
        """A line for each finite budget the model cannot reach: even every layer at its widest
        allowed width (pins kept) stays within the lowest budget of the line, so sweeping it
        changes nothing. (A budget met with room to spare at the optimum may still bind: only
        this certain case gets a note.)"""
        problem = self.search.problem
        if problem is None:
            return []
        prep = prepare(problem)
        widest_w = {lay.name: max(prep.weight_allowed[i]) for i, lay in enumerate(problem.layers)}
        widest_a = {lay.name: max(prep.act_allowed[lay.act_group]) for lay in problem.layers}
        most = usage(problem, widest_w, widest_a)
        notes = []
        for k, (label, field_name, scale, unit) in enumerate((
            ("weight memory", "weight_memory_bits", KIB_BITS, "KiB"),
            ("BOPs", "bops", 1e9, "G"),
            ("activation buffer", "act_buffer_bits", KIB_BITS, "KiB"),
        )):
            lowest = min(getattr(p.budgets, field_name) for p in self.points)
            if math.isfinite(lowest) and most[k] <= lowest:
                notes.append(
                    f"the {label} budget never binds: the most this model can use is "
                    f"{most[k] / scale:.4g} {unit} (every layer at its widest allowed width), "
                    f"within the lowest budget {lowest / scale:.4g} {unit}; lower its range to "
                    f"trade {label} against accuracy"
                )
        return notes

    def to_json(self) -> dict[str, Any]:
        config = self.search.config.to_json()
        return {
            "model": self.model,
            "profile": self.profile,
            "total_params": self.total_params,
            "total_macs": self.total_macs,
            "search": {  # how the one search behind every point was made (BitConfig fields)
                key: config[key]
                for key in (
                    "method", "beta", "act_weight", "samples", "seed", "orm_form", "versions",
                    "input", "weights",
                )
            },
            "sweep_s": self.sweep_s,
            "points": [
                {
                    "budgets": p.budgets.to_json(),
                    "objective": p.allocation.objective,
                    "weight_memory_bits": p.allocation.weight_memory_bits,
                    "avg_weight_bits": self.average_weight_bits(i),
                    "bops": p.allocation.bops,
                    "max_act_buffer_bits": p.allocation.max_act_buffer_bits,
                    "status": p.allocation.status,
                    "solver": p.allocation.solver,
                    "solve_s": p.allocation.solve_s,
                    "weight_bits": p.allocation.weight_bits,
                    "act_bits": p.allocation.act_bits,
                }
                for i, p in enumerate(self.points)
            ],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        import json

        write_text_atomic(path, json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")


def pareto_front(
    model: nn.Module,
    samples: torch.Tensor,
    profile: HardwareProfile | str,
    low: Budgets,
    high: Budgets,
    points: int = 100,
    *,
    time_limit_s: float = 60.0,
    avg_weight_bits: tuple[float, float] | None = None,
    **search_options: Any,
) -> ParetoFront:
    """The proven-optimal allocation at ``points`` budgets from ``low`` to ``high``.

    Budgets left infinite in both ends keep the profile's value. ``avg_weight_bits`` (low,
    high) sweeps the weight memory as average bits over the layers the search discovers
    (instead of ``low``/``high``'s weight memory). ``search_options`` go to
    :func:`ompq_plugin.searcher.run_search` (beta, pins, model_name, ...); ``time_limit_s``
    bounds each solve.
    """
    if points < 2:  # before the search: it is the expensive part
        raise OmpqError(f"a front needs at least 2 points, got {points}")
    hw = load_profile(profile) if isinstance(profile, str) else profile
    high_avg = avg_weight_bits[1] if avg_weight_bits is not None else None
    result = run_search(
        model,
        samples,
        hw,
        hw.budgets.merged(high),
        time_limit_s=time_limit_s,
        avg_weight_bits=high_avg,
        **search_options,
    )
    if result.problem is None:
        raise OmpqError("internal error: the search returned no problem to sweep")
    if avg_weight_bits is not None:
        params = result.layers.total_params
        fixed = sum(lb.weight_memory_bits for lb in result.config.fixed_layers)
        low = replace(low, weight_memory_bits=average_bits_memory(avg_weight_bits[0], params,
                                                                  fixed))
        high = replace(high, weight_memory_bits=average_bits_memory(avg_weight_bits[1], params,
                                                                    fixed))
    line = budget_line(hw.budgets.merged(low), hw.budgets.merged(high), points)
    start = time.perf_counter()
    front = sweep(result.problem, line, time_limit_s)
    layers = result.layers
    return ParetoFront(
        model=result.config.model,
        profile=hw.name,
        total_params=layers.total_params,
        total_macs=layers.total_macs,
        points=front,
        search=result,
        sweep_s=time.perf_counter() - start,
    )
