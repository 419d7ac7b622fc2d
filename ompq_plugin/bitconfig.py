"""BitConfig: the per-layer bit widths that the search hands to quantization and export.

It is plain JSON on disk (``save``/``load`` round-trip exactly), so every later step can run on
its own and a person can read or edit the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ompq_plugin.budgets import Budgets
from ompq_plugin.errors import OmpqError
from ompq_plugin.fileio import write_text_atomic

SCHEMA_VERSION = 1
FIXED_KIND = "fixed"  # LayerBits.kind of a layer ``quantize`` adds (see ompq_plugin.fixed_layers)


@dataclass(frozen=True)
class LayerBits:
    """One quantizable layer's bits and the figures the budgets were computed from.

    ``act_bits`` are the bits of the layer's *input* activation; layers in the same
    ``act_group`` read the same quantized tensor and so share ``act_bits``.
    """

    name: str
    kind: str
    weight_bits: int
    act_bits: int
    params: int
    macs: int
    input_numel: int
    act_group: str
    theta: float | None = None
    gamma: float | None = None

    @property
    def weight_memory_bits(self) -> int:
        return self.params * self.weight_bits

    @property
    def bops(self) -> int:
        return self.macs * self.weight_bits * self.act_bits

    @property
    def act_buffer_bits(self) -> int:
        return self.input_numel * self.act_bits


@dataclass(frozen=True)
class Totals:
    weight_memory_bits: int
    bops: int
    max_act_buffer_bits: int

    @staticmethod
    def of(layers: list[LayerBits]) -> Totals:
        return Totals(
            weight_memory_bits=sum(lb.weight_memory_bits for lb in layers),
            bops=sum(lb.bops for lb in layers),
            max_act_buffer_bits=max((lb.act_buffer_bits for lb in layers), default=0),
        )


@dataclass(frozen=True)
class WeightsRecord:
    """The float checkpoint the search ran on: absolute path and sha256 of the file."""

    path: str
    sha256: str


@dataclass(frozen=True)
class InputRecord:
    """What the model was fed: input size (C, H, W) and per-channel mean/std applied after
    scaling uint8 pixels to 0..1 (mean 0 and std 1: no normalisation)."""

    size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def normalised(self) -> bool:
        return any(m != 0.0 for m in self.mean) or any(s != 1.0 for s in self.std)

    def describe(self) -> str:
        c, h, w = self.size
        if not self.normalised:
            norm = "no normalisation (uint8 pixels / 255)"
        else:
            norm = (f"mean {', '.join(f'{m:g}' for m in self.mean)}, "
                    f"std {', '.join(f'{s:g}' for s in self.std)}")
        return f"input {c}x{h}x{w}, {norm}"

    def to_json(self) -> dict[str, Any]:
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputRecord:
        return cls(tuple(int(v) for v in data["size"]),  # type: ignore[arg-type]
                   tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]))


@dataclass
class BitConfig:
    model: str
    profile: str
    method: str
    layers: list[LayerBits]
    budgets: Budgets = field(default_factory=Budgets)
    beta: float | None = None
    act_weight: float | None = None  # ompq-noise: weight of the activation errors
    samples: int | None = None
    seed: int | None = None
    orm_form: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    input: InputRecord | None = None  # size and normalisation the search used
    weights: WeightsRecord | None = None  # None: the search ran on random weights
    # layers ``quantize`` adds (frozen shortcut convolutions, kind "fixed"): not the model's,
    # not chosen, but in the totals, as they are in the exported file
    fixed_layers: list[LayerBits] = field(default_factory=list)

    def with_model_info(self, spec: Any) -> BitConfig:
        """A copy recording a built model's spec (:class:`~ompq_plugin.models.ModelSpec`): its
        name (a user factory with an absolute path), input size, mean/std and weights file."""
        from dataclasses import replace

        from ompq_plugin.models import file_sha256

        weights = None
        if spec.weights_path is not None:
            path = os.path.abspath(spec.weights_path)
            weights = WeightsRecord(path, file_sha256(path))
        record = InputRecord(tuple(spec.input_size), tuple(spec.mean), tuple(spec.std))
        return replace(self, model=spec.name, input=record, weights=weights)

    @property
    def totals(self) -> Totals:
        """Memory, BOPs and buffer of every layer the quantized model has (fixed ones too)."""
        return Totals.of([*self.layers, *self.fixed_layers])

    @property
    def total_params(self) -> int:
        """Weights of the model's own layers (the fixed layers' are not counted)."""
        return sum(lb.params for lb in self.layers)

    @property
    def average_weight_bits(self) -> float:
        """Average weight width of the model's own layers."""
        return sum(lb.weight_memory_bits for lb in self.layers) / max(self.total_params, 1)

    def layer(self, name: str) -> LayerBits:
        for lb in self.layers:
            if lb.name == name:
                return lb
        raise OmpqError(f"layer {name!r} is not in this BitConfig (model {self.model})")

    def by_name(self) -> dict[str, LayerBits]:
        return {lb.name: lb for lb in self.layers}

    # --- JSON --------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        totals = asdict(self.totals)
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "profile": self.profile,
            "method": self.method,
            "beta": self.beta,
            "act_weight": self.act_weight,
            "samples": self.samples,
            "seed": self.seed,
            "orm_form": self.orm_form,
            "layers": [asdict(lb) for lb in self.layers],
            "fixed_layers": [asdict(lb) for lb in self.fixed_layers],
            "totals": totals,
            "budgets": self.budgets.to_json(),
            "timings": self.timings,
            "versions": self.versions,
            "input": self.input.to_json() if self.input is not None else None,
            "weights": asdict(self.weights) if self.weights is not None else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "BitConfig") -> BitConfig:
        try:
            version = data["schema_version"]
            if isinstance(version, int) and version > SCHEMA_VERSION:
                raise OmpqError(
                    f"{source}: schema_version {version} was written by a newer ompq (this one "
                    f"reads {SCHEMA_VERSION}); upgrade ompq-plugin, or re-run this version's "
                    "`ompq search` to regenerate it"
                )
            if version != SCHEMA_VERSION:
                raise OmpqError(
                    f"{source}: schema_version {version} is not supported (this tool reads "
                    f"{SCHEMA_VERSION}); re-run `ompq search` to regenerate it"
                )
            layers = [LayerBits(**lb) for lb in data["layers"]]
            fixed = [LayerBits(**lb) for lb in data.get("fixed_layers", [])]
            config = cls(
                model=str(data["model"]),
                profile=str(data["profile"]),
                method=str(data["method"]),
                layers=layers,
                budgets=Budgets.from_json(data.get("budgets", {})),
                beta=data.get("beta"),
                act_weight=data.get("act_weight"),
                samples=data.get("samples"),
                seed=data.get("seed"),
                orm_form=data.get("orm_form"),
                timings=dict(data.get("timings", {})),
                versions=dict(data.get("versions", {})),
                input=InputRecord.from_json(data["input"]) if data.get("input") else None,
                weights=WeightsRecord(**data["weights"]) if data.get("weights") else None,
                fixed_layers=fixed,
            )
        except OmpqError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise OmpqError(
                f"{source} is not a valid BitConfig ({type(exc).__name__}: {exc}); "
                "re-run `ompq search` to regenerate it"
            ) from None
        for lb in [*layers, *fixed]:
            for attr in ("weight_bits", "act_bits"):
                bits = getattr(lb, attr)
                if not isinstance(bits, int) or not 1 <= bits <= 32:
                    raise OmpqError(f"{source}: layer {lb.name} has {attr}={bits!r}; use 1..32")
        stored = data.get("totals")
        if stored is not None and stored != asdict(config.totals):
            raise OmpqError(
                f"{source}: stored totals do not match its layers (file edited by hand?); "
                "fix the layers or delete the 'totals' entry"
            )
        return config

    def save(self, path: str | os.PathLike[str]) -> None:
        write_text_atomic(path, json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BitConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise OmpqError(f"bit configuration {path} not found: check the path") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OmpqError(f"{path} is not valid JSON ({exc}); re-run `ompq search`") from None
        if not isinstance(data, dict):
            raise OmpqError(f"{path} is not a BitConfig (expected a JSON object)")
        return cls.from_json(data, source=str(path))
