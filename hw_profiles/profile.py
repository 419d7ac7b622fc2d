"""HardwareProfile: what a deployment target runs (bit widths per layer kind, scale format)
and its default budgets. Loaded from one TOML file per target (see ``loader``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ompq_plugin.budgets import Budgets

LAYER_KINDS = ("conv", "depthwise", "pointwise", "linear")


@dataclass(frozen=True)
class BitChoices:
    """Bit widths a target runs for one layer kind (sorted ascending, no duplicates)."""

    weight: tuple[int, ...]
    activation: tuple[int, ...]


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    sources: tuple[str, ...]
    default_bits: BitChoices
    # Per layer kind overrides of ``default_bits`` (e.g. depthwise limited to 8 bit).
    kind_bits: dict[str, BitChoices] = field(default_factory=dict)
    power_of_two_scales: bool = False  # scales must be 2^k (hls4ml / FINN style fixed point)
    per_channel_weights: bool = True  # per-output-channel weight scales allowed
    # how activation quantizers round a tie: "half-even" (Brevitas / QONNX ROUND) or "half-up"
    # (FINN's thresholds; see ompq_plugin.rounding)
    act_rounding: str = "half-even"
    pinned_weight_bits: int = 8  # first and last layer, unless the user pins otherwise
    pinned_act_bits: int = 8
    budgets: Budgets = field(default_factory=Budgets)
    path: str | None = None  # file it was loaded from
    # (weight bits, activation bits) combinations the target cannot run even though each width
    # is allowed on its own (e.g. CMSIS-NN has int4-weight kernels only for int8 activations).
    excluded_pairs: tuple[tuple[int, int], ...] = ()

    def bits_for(self, kind: str) -> BitChoices:
        return self.kind_bits.get(kind, self.default_bits)

    def pair_allowed(self, weight_bits: int, act_bits: int) -> bool:
        """False if the target cannot run this weight / input-activation bit combination."""
        return (weight_bits, act_bits) not in self.excluded_pairs
