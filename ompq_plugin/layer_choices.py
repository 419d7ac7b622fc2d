"""Which bit widths each layer may take in a search: the profile's choices, the user's
narrowing (``--weight-bits`` / ``--act-bits``) and pins (``--pin``, first and last layer).

Contract: inputs are the discovered layers, the hardware profile and the user's flags; outputs are
the solver's :class:`~ompq_plugin.allocate.AllocationLayer` per layer and the pins, or an
``OmpqError`` naming the flag and the widths the profile offers. Nothing here runs the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ompq_plugin.allocate import AllocationLayer
from ompq_plugin.errors import OmpqError
from ompq_plugin.hw_profiles.profile import HardwareProfile
from ompq_plugin.layers import LayerInfo, ModelLayers

Pin = tuple[int | None, int | None]


def check_buildable(hw: HardwareProfile) -> None:
    """The search never offers a width that ``ompq quantize`` refuses (it builds 2 bits up)."""
    offered = [hw.default_bits, *hw.kind_bits.values()]
    low = sorted({b for c in offered for b in (*c.weight, *c.activation) if b < 2})
    if low:
        raise OmpqError(
            f"profile {hw.name} offers {low}-bit widths, which `ompq quantize` cannot build "
            "(2 bits or more); remove them from the profile's [bits]"
        )


def narrowing(
    hw: HardwareProfile, weight_bits: Sequence[int] | None, act_bits: Sequence[int] | None
) -> tuple[set[int] | None, set[int] | None]:
    """The user's subsets of bit widths, checked against what the profile offers at all."""
    offered = [hw.default_bits, *hw.kind_bits.values()]
    out: list[set[int] | None] = []
    for flag, wanted, have in (
        ("--weight-bits", weight_bits, {b for c in offered for b in c.weight}),
        ("--act-bits", act_bits, {b for c in offered for b in c.activation}),
    ):
        if wanted is None:
            out.append(None)
            continue
        extra = sorted(set(wanted) - have)
        if extra or not wanted:
            raise OmpqError(
                f"{flag} {','.join(map(str, wanted))}: profile {hw.name} offers "
                f"{sorted(have)} only; choose among those"
            )
        out.append(set(wanted))
    return out[0], out[1]


def allocation_layer(
    layer: LayerInfo,
    hw: HardwareProfile,
    narrow: tuple[set[int] | None, set[int] | None] | None,
) -> AllocationLayer:
    choices = hw.bits_for(layer.kind)
    weights, acts = choices.weight, choices.activation
    if narrow is not None:  # a kind that runs none of the narrowed widths keeps its own
        keep_w, keep_a = narrow
        weights = tuple(b for b in weights if keep_w is None or b in keep_w) or weights
        acts = tuple(b for b in acts if keep_a is None or b in keep_a) or acts
    return AllocationLayer(
        name=layer.name,
        kind=layer.kind,
        params=layer.params,
        macs=layer.macs,
        input_numel=layer.input_numel,
        act_group=layer.act_group,
        weight_choices=weights,
        act_choices=acts,
        excluded_pairs=hw.excluded_pairs,
    )


def pins_for(
    found: ModelLayers, hw: HardwareProfile, user: Mapping[str, Pin], pin_first_last: bool
) -> dict[str, Pin]:
    names = found.names
    unknown = [name for name in user if name not in names]
    if unknown:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise OmpqError(f"--pin names unknown layers {unknown}; layers are: {shown}")
    pins: dict[str, Pin] = {}
    if pin_first_last:
        for name in (names[0], names[-1]):
            pins[name] = (hw.pinned_weight_bits, hw.pinned_act_bits)
    pins.update(user)
    kinds = {layer.name: layer.kind for layer in found.layers}
    for name, (w, a) in pins.items():
        allowed = hw.bits_for(kinds[name])
        if w is not None and w not in allowed.weight:
            raise OmpqError(
                f"pin {name}={w}/{a}: profile {hw.name} runs {kinds[name]} weights at "
                f"{list(allowed.weight)} bits only; pick one of those"
            )
        if a is not None and a not in allowed.activation:
            raise OmpqError(
                f"pin {name}={w}/{a}: profile {hw.name} runs activations at "
                f"{list(allowed.activation)} bits only; pick one of those"
            )
    return pins


def parse_pin(text: str) -> tuple[str, Pin]:
    """``NAME=W/A`` (either side may be ``*`` for free) -> (name, (w, a))."""
    name, sep, bits = text.partition("=")
    w_text, slash, a_text = bits.partition("/")
    if not sep or not slash or not name:
        raise OmpqError(f"--pin {text!r}: expected NAME=W/A, e.g. layer1.0.conv1=4/8")

    def one(part: str) -> int | None:
        if part in ("*", ""):
            return None
        if not part.isdigit():
            raise OmpqError(f"--pin {text!r}: {part!r} is not a bit width; use e.g. 4 or *")
        return int(part)

    return name, (one(w_text), one(a_text))
