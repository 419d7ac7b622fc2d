"""Resource budgets of a deployment target. Every budget is optional: ``math.inf`` = no limit."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

KIB_BITS = 8 * 1024  # bits in one KiB


@dataclass(frozen=True)
class Budgets:
    """Upper bounds on the quantized model.

    weight_memory_bits: sum over layers of weight params x weight bits.
    bops: sum over layers of MACs x weight bits x input-activation bits.
    act_buffer_bits: the largest single layer input activation (numel x act bits, batch 1).
    """

    weight_memory_bits: float = math.inf
    bops: float = math.inf
    act_buffer_bits: float = math.inf

    def __post_init__(self) -> None:
        from ompq_plugin.errors import OmpqError

        for field, value in asdict(self).items():
            if not (value > 0):  # also catches NaN
                raise OmpqError(f"budget {field} must be positive, got {value}")

    def to_json(self) -> dict[str, Any]:
        return {k: (None if math.isinf(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Budgets:
        return cls(**{k: (math.inf if v is None else float(v)) for k, v in data.items()})

    def merged(self, override: Budgets) -> Budgets:
        """``override``'s finite budgets replace ours; its infinite ones keep ours."""
        values = asdict(self)
        for k, v in asdict(override).items():
            if not math.isinf(v):
                values[k] = v
        return Budgets(**values)

    @staticmethod
    def from_user(
        weight_memory_kib: float | None = None,
        bops_g: float | None = None,
        act_buffer_kib: float | None = None,
        avg_weight_bits: float | None = None,
        total_params: int | None = None,
    ) -> Budgets:
        """Build budgets from the CLI's units (KiB, GBOPs, average weight bits)."""
        from ompq_plugin.errors import OmpqError

        if weight_memory_kib is not None and avg_weight_bits is not None:
            raise OmpqError("give either --weight-memory-kib or --avg-weight-bits, not both")
        wm = math.inf
        if weight_memory_kib is not None:
            wm = weight_memory_kib * KIB_BITS
        if avg_weight_bits is not None:
            if total_params is None:
                raise ValueError("avg_weight_bits needs total_params")
            wm = avg_weight_bits * total_params
        return Budgets(
            weight_memory_bits=wm,
            bops=math.inf if bops_g is None else bops_g * 1e9,
            act_buffer_bits=math.inf if act_buffer_kib is None else act_buffer_kib * KIB_BITS,
        )
