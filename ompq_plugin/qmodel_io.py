"""Save and reload a quantized model as one self-describing file.

The file (``torch.save`` of plain data, readable with ``weights_only=True``) holds what is needed
to rebuild the model: the model name (a registry name or ``path/to/file.py:factory``), the
BitConfig JSON, the hardware profile's fields, the quantized state_dict and free-form metadata
(PTQ options, training history). ``load_quantized`` rebuilds the float architecture, runs
:func:`ompq_plugin.quantizer.quantize` with the stored bits and profile, and loads the state.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ompq_plugin.bitconfig import BitConfig
from ompq_plugin.errors import OmpqError
from ompq_plugin.fileio import atomic_path
from ompq_plugin.hw_profiles.profile import BitChoices, HardwareProfile

FORMAT = "ompq-quantized-model"
VERSION = 1


@dataclass
class QuantizedModelFile:
    model: nn.Module
    model_name: str
    bits: BitConfig
    profile: HardwareProfile
    meta: dict[str, Any] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_json"):
            return value.to_json()
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return None
    return value


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def profile_to_json(profile: HardwareProfile) -> dict[str, Any]:
    return _plain(profile)


def profile_from_json(data: dict[str, Any]) -> HardwareProfile:
    from ompq_plugin.budgets import Budgets

    def choices(d: dict[str, Any]) -> BitChoices:
        return BitChoices(weight=tuple(d["weight"]), activation=tuple(d["activation"]))

    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(HardwareProfile):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name == "default_bits":
            value = choices(value)
        elif f.name == "kind_bits":
            value = {k: choices(v) for k, v in value.items()}
        elif f.name == "budgets":
            value = Budgets.from_json(value)
        else:
            value = _tuples(value)
        kwargs[f.name] = value
    return HardwareProfile(**kwargs)


def save_quantized(
    path: str | os.PathLike[str],
    qmodel: nn.Module,
    model_name: str,
    bits: BitConfig,
    profile: HardwareProfile,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write ``qmodel`` with everything needed to rebuild it, atomically.

    ``meta["input"]`` (size and mean/std the model takes) defaults to the BitConfig's record.
    """
    meta = dict(meta or {})
    if "input" not in meta and bits.input is not None:
        meta["input"] = bits.input.to_json()
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_name": model_name,
        "bitconfig": bits.to_json(),
        "profile": profile_to_json(profile),
        "state_dict": {k: v.detach().cpu() for k, v in qmodel.state_dict().items()},
        "meta": _plain(meta),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_payload(path: str | os.PathLike[str]) -> dict[str, Any]:
    fix = "re-create it with `ompq quantize`"
    if not os.path.isfile(path):
        raise OmpqError(f"quantized model {path} not found: check the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError,
            zipfile.BadZipFile, AttributeError, TypeError) as exc:
        raise OmpqError(
            f"{path} is not a readable quantized model ({type(exc).__name__}: corrupt, truncated "
            f"or not written by ompq); {fix}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise OmpqError(f"{path} is not an ompq quantized model file; {fix}")
    version = payload.get("version")
    if isinstance(version, int) and version > VERSION:
        raise OmpqError(
            f"{path} has format version {version}, written by a newer ompq (this one reads "
            f"{VERSION}); upgrade ompq-plugin, or {fix} of this version"
        )
    if version != VERSION:
        raise OmpqError(f"{path} has format version {version}, this tool reads {VERSION}; {fix}")
    for key in ("model_name", "bitconfig", "profile", "state_dict"):
        if key not in payload:
            raise OmpqError(f"{path} lacks {key!r} (truncated or edited?); {fix}")
    for name, value in payload["state_dict"].items():
        if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all():
            raise OmpqError(f"{path}: tensor {name} contains NaN or Inf (a diverged training "
                            f"run or a damaged file); {fix} from finite float weights")
    return payload


def build_float(model_name: str) -> nn.Module:
    from ompq_plugin.models import build_model

    built = build_model(model_name)
    return built[0] if isinstance(built, tuple) else built


def load_quantized(path: str | os.PathLike[str]) -> QuantizedModelFile:
    """Rebuild the quantized model stored in ``path`` (bits, profile and weights included)."""
    from ompq_plugin.quantizer import quantize

    payload = read_payload(path)
    bits = BitConfig.from_json(payload["bitconfig"], source=f"{path} (BitConfig)")
    try:
        profile = profile_from_json(payload["profile"])
    except (KeyError, TypeError, ValueError) as exc:
        raise OmpqError(f"{path}: stored profile is invalid ({exc}); re-create the file") from None
    float_model = build_float(str(payload["model_name"]))
    qmodel = quantize(float_model, bits, profile)
    try:
        qmodel.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise OmpqError(
            f"{path}: stored weights do not fit model {payload['model_name']} ({first}); "
            "re-create the file with this version of the tool"
        ) from None
    qmodel.eval()
    return QuantizedModelFile(qmodel, str(payload["model_name"]), bits, profile,
                              dict(payload.get("meta") or {}))
