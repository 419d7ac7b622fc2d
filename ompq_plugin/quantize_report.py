"""What :func:`ompq_plugin.quantizer.quantize` did to a model (``qmodel.ompq_report``): the bits
of every layer, the frozen shortcut convs it added, its activation quantizers, the norms it
folded and what it kept in float; ``notes()`` are the lines a user should read."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class QuantizeReport:
    """What :func:`quantize` did: layer bits, fixed shortcut convs and activation quantizers."""

    weight_bits: dict[str, int] = field(default_factory=dict)
    fixed_layers: list[str] = field(default_factory=list)
    act_quantizers: dict[str, int] = field(default_factory=dict)  # module name -> bits
    shared_add_quantizers: list[str] = field(default_factory=list)
    shared_cat_quantizers: list[str] = field(default_factory=list)
    folded_norms: list[str] = field(default_factory=list)
    # ops kept in float between quantizers: name -> why (not integer-only there)
    float_ops: dict[str, str] = field(default_factory=dict)
    rewritten_pools: list[str] = field(default_factory=list)
    # fixed layers the BitConfig does not list (written before the search counted them)
    uncounted_fixed: list[str] = field(default_factory=list)

    def notes(self) -> list[str]:
        """One line per thing a user should know: what stays float (not integer-only), and fixed
        layers outside the BitConfig's totals."""
        out = []
        if self.float_ops:
            shown = "; ".join(f"{name} ({why})" for name, why in list(self.float_ops.items())[:8])
            more = len(self.float_ops) - 8
            out.append(f"kept in float between quantizers (not integer-only there): {shown}"
                       + (f"; and {more} more" if more > 0 else ""))
        if self.uncounted_fixed:
            out.append(
                "the BitConfig does not count the frozen shortcut convs "
                f"{', '.join(self.uncounted_fixed)} (an older `ompq search` wrote it): the "
                "quantized model has them on top of its "
                "totals and budgets; re-run `ompq search` for budgets that include them"
            )
        return out
