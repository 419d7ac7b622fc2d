"""What an export wrote and how it was verified: :class:`ExportReport`, one :class:`LayerExport`
per quantized layer (shared by the QONNX and QCDQ exports and the CLI)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ompq_plugin.budgets import KIB_BITS

DEFAULT_TOL = 1e-5


@dataclass
class LayerExport:
    """One quantized layer in the written file."""

    name: str  # PyTorch module name
    node: str  # ONNX node (Conv / Gemm / MatMul) in the written file
    op: str
    weight_bits: int | None  # read back from the file
    act_bits: int | None  # read back from the file (input activation)
    expected_weight_bits: int | None
    expected_act_bits: int | None
    source: str  # where the expectation came from: "BitConfig" or "model"
    weight_quant_node: str | None = None
    act_quant_node: str | None = None


@dataclass(frozen=True)
class PoolConv:
    """An average pool the target's export wrote as a depthwise conv (exporters.targets)."""

    name: str  # the pool's torch module, else the ONNX node
    weight_bits: int
    params: int
    counted: bool  # in the BitConfig's fixed layers (and so in its totals)

    def describe(self) -> str:
        kib = self.params * self.weight_bits / KIB_BITS
        return f"{self.name} ({self.weight_bits}-bit weights, {kib:.2f} KiB)"


@dataclass
class ExportReport:
    """What was written and how it was verified."""

    path: Path
    format: str  # "qonnx" or "qcdq"
    layers: list[LayerExport]
    node_map: dict[str, str]  # torch layer name -> ONNX node name in the written file
    n_images: int
    max_abs_diff: float
    exact: bool  # True: outputs had to be bit-identical (power-of-two scales)
    tolerance: float
    runtime: str  # "qonnx" or "onnxruntime"
    verified: bool
    seconds: dict[str, float] = field(default_factory=dict)
    hls4ml: Any = None  # exporters.hls4ml_check.Hls4mlReport when the check ran
    # float scales: one-LSB rounding-boundary flips accepted by the layer-by-layer check
    boundary_flips: int = 0
    flip_layers: list[str] = field(default_factory=list)
    forced_images: int = 0  # images checked layer by layer from torch's inputs
    max_forced_diff: float = 0.0  # largest other |diff| in that check
    top1_agree: int | None = None  # images whose top-1 class is the same in torch and the graph
    target: str = "generic"  # the compiler the graph was shaped for (exporters.targets)
    hls4ml_config: Path | None = None  # hls4ml config entries written beside the file
    pool_convs: list[PoolConv] = field(default_factory=list)  # hls4ml: pools written as convs

    @property
    def bits(self) -> dict[str, tuple[int | None, int | None]]:
        """Per layer (weight bits, act bits) as read back from the file."""
        return {lx.name: (lx.weight_bits, lx.act_bits) for lx in self.layers}

    def summary(self) -> str:
        lines = [
            f"wrote {self.path} ({self.format}, {len(self.layers)} quantized layers"
            f"{self._pools()})",
            f"verified with {self.runtime} on {self.n_images} images against torch: "
            f"{self._criterion()}: {'PASS' if self.verified else 'FAIL'}",
            f"bits read back from the file match the {self._sources()} for every layer",
        ]
        if self.hls4ml_config is not None:
            lines.append(f"wrote {self.hls4ml_config} (hls4ml config entries for this file; "
                         "see README: hls4ml)")
        uncounted = [pc.describe() for pc in self.pool_convs if not pc.counted]
        if uncounted:
            lines.append(f"note: the BitConfig's totals do not count {', '.join(uncounted)}: the "
                         f"{self.target} export wrote the average pool as a depthwise conv; "
                         f"`ompq search --profile {self.target}` counts it in the budgets")
        if self.hls4ml is not None:
            lines.append(self.hls4ml.summary())
        return "\n".join(lines)

    def _pools(self) -> str:
        n = len(self.pool_convs)
        s = "s" if n != 1 else ""
        return f" + {n} pool{s} as depthwise conv{s}" if n else ""

    def _criterion(self) -> str:
        diff = f"max |diff| = {self.max_abs_diff:.3g}"
        top1 = (f"; top-1 identical on {self.top1_agree}/{self.n_images} images"
                if self.top1_agree is not None else "")
        if self.exact:
            return f"{diff} (bit-exact){top1}"
        if not self.forced_images:
            return f"{diff} (tolerance {self.tolerance:g}){top1}"
        n, k = self.boundary_flips, len(self.flip_layers)
        flips = (f" except {n} rounding-boundary flip{'s' if n != 1 else ''} (1 LSB) after "
                 f"{k} layer{'s' if k != 1 else ''} ({', '.join(self.flip_layers)})" if n else "")
        return (f"{diff} end to end; each layer computed from torch's own inputs agrees within "
                f"{self.tolerance:g} (max {self.max_forced_diff:.3g}){flips}{top1}")

    def _sources(self) -> str:
        return " / ".join(sorted({lx.source for lx in self.layers})) or "model"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["hls4ml_config"] = str(self.hls4ml_config) if self.hls4ml_config else None
        data["hls4ml"] = self.hls4ml.to_json() if self.hls4ml is not None else None
        return data
