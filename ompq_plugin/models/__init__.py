"""Model registry: built-in architectures, their input conventions and pretrained weights.

Only the CIFAR-10 ResNets have real pretrained weights (../shared/data/weights); the other
architectures are randomly initialised and serve structure and scale (layer counts, MACs,
search speed), never accuracy claims.

Entry points: :func:`build_model` (a registry name or ``path/to/file.py:factory``, plus optional
weights), :func:`load_checkpoint`, :func:`load_user_factory`, :func:`get_spec`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import math
import os
import pickle
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ompq_plugin.errors import OmpqError
from ompq_plugin.models import cifar_resnet, imagenet_resnet, mobilenetv2

if TYPE_CHECKING:
    from ompq_plugin.datasets import DataSource

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_IMAGENET_MEAN = IMAGENET_MEAN  # akamaster's trainer.py normalises CIFAR with these
CIFAR_IMAGENET_STD = IMAGENET_STD
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10 training-set statistics
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and feed it: input shape (C, H, W), normalisation, defaults.

    ``pretrained`` and ``weights_path`` describe one *built* model (see :func:`build_model`):
    ``pretrained`` is True only when real weights were loaded into it.
    """

    name: str
    factory: Callable[[], nn.Module]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_samples: int  # N images for the search (paper: 64 for ResNets, 32 for MobileNetV2)
    weights_file: str | None = None  # relative to the data folder, if real weights exist
    pretrained: bool = False
    weights_path: str | None = None  # the checkpoint actually loaded, if any


MODELS: dict[str, ModelSpec] = {
    f"resnet{depth}": ModelSpec(
        name=f"resnet{depth}",
        factory=getattr(cifar_resnet, f"resnet{depth}"),
        input_size=(3, 32, 32),
        mean=CIFAR_IMAGENET_MEAN,
        std=CIFAR_IMAGENET_STD,
        default_samples=64,
        weights_file=None if depth == 44 else f"weights/resnet{depth}.th",
    )
    for depth in (20, 32, 44, 56)
}
MODELS.update(
    {
        "mobilenetv2_cifar": ModelSpec(
            name="mobilenetv2_cifar",
            factory=mobilenetv2.mobilenetv2_cifar,
            input_size=(3, 32, 32),
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
            default_samples=32,
        ),
        "mobilenetv2": ModelSpec(
            name="mobilenetv2",
            factory=mobilenetv2.mobilenetv2,
            input_size=(3, 224, 224),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            default_samples=32,
        ),
        "resnet18": ModelSpec(
            name="resnet18",
            factory=imagenet_resnet.resnet18,
            input_size=(3, 224, 224),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            default_samples=64,
        ),
        "resnet50": ModelSpec(
            name="resnet50",
            factory=imagenet_resnet.resnet50,
            input_size=(3, 224, 224),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            default_samples=64,
        ),
    }
)


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise OmpqError(
            f"unknown model {name!r}: choose one of {known}, or pass path/to/file.py:factory"
        ) from None


# ---------------------------------------------------------------------------- checkpoints

_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
_SHOW = 5  # keys shown per list in a mismatch message


def _read_checkpoint(path: Path) -> Any:
    fix = "pass --weights a file written by torch.save(model.state_dict(), PATH)"
    if not path.is_file():
        raise OmpqError(f"weights file {path} not found: {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise OmpqError(f"{path} holds Python objects besides tensors ({first[:120]}): "
                            f"re-save it with torch.save(model.state_dict(), PATH)") from None
        raise OmpqError(f"{path} is not a PyTorch checkpoint ({first[:120]}): {fix}") from None
    except Exception as exc:  # torch raises many types for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OmpqError(f"{path} is not a readable PyTorch checkpoint "
                        f"({type(exc).__name__}: {first[:120]}): {fix}") from None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: a plain state dict, or one under the key
    ``'state_dict'`` or ``'model'``; ``module.`` / ``_orig_mod.`` prefixes removed."""
    sd: Any = None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                sd = obj[key]
                break
        else:
            sd = obj
    if not _is_tensor_dict(sd):
        kind = type(obj).__name__
        keys = list(obj)[:_SHOW] if isinstance(obj, Mapping) else []
        raise OmpqError(f"{source} holds no state dict ({kind} with keys {keys}): save "
                        f"model.state_dict() or {{'state_dict': model.state_dict()}}")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key.removeprefix(prefix), True
        out[key] = value
    return out


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    more = f", ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return f"{len(keys)} [{shown}{more}]"


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load weights from ``path`` into ``model`` (strict; in place).

    Accepts a plain state dict or ``{'state_dict': ...}`` / ``{'model': ...}``; strips
    ``module.`` prefixes. Any mismatch (missing or unexpected keys, wrong shapes) or a NaN/Inf in
    the weights raises :class:`OmpqError` before the model is touched.
    """
    path = Path(path)
    sd = extract_state_dict(_read_checkpoint(path), str(path))
    own = model.state_dict()
    # BatchNorm fills a missing num_batches_tracked itself (pre-0.4.1 checkpoints lack it).
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listing(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_listing(shapes)}")
        raise OmpqError(f"{path} does not fit the model: {'; '.join(parts)}: pass the checkpoint "
                        f"of this architecture (or the matching --model)")
    for key, value in sd.items():
        if value.is_floating_point() or value.is_complex():
            if not bool(torch.isfinite(value).all()):
                raise OmpqError(f"{path}: tensor {key} contains NaN or Inf: the checkpoint is "
                                f"broken, use a healthy one")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        first = str(exc).strip().splitlines()[0]
        raise OmpqError(f"{path} could not be loaded into the model ({first[:160]}): pass the "
                        f"checkpoint of this architecture") from None


# ---------------------------------------------------------------------------- user models


def load_user_factory(target: str) -> Callable[..., nn.Module]:
    """Import ``path/to/file.py:factory`` by path and return the callable ``factory``.

    The file's folder is on ``sys.path`` while it is imported, so it may import its neighbours.
    """
    file_part, sep, attr = target.rpartition(":")
    if not sep or not file_part or not attr:
        raise OmpqError(f"model {target!r} is neither a built-in name nor path/to/file.py:factory:"
                        f" add ':factory' naming the function that builds the model")
    path = Path(file_part).expanduser()
    if not path.is_file():
        raise OmpqError(f"model file {path} not found: pass --model path/to/file.py:factory "
                        f"with an existing file")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    mod_name = f"ompq_user_model_{resolved.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        raise OmpqError(f"cannot import {path}: pass a Python source file (.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    sys.path.insert(0, str(resolved.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise OmpqError(f"importing {path} failed ({type(exc).__name__}: {exc}): fix the "
                        f"model file") from None
    finally:
        try:
            sys.path.remove(str(resolved.parent))
        except ValueError:
            pass
    factory = getattr(module, attr, None)
    if factory is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == mod_name)
        raise OmpqError(f"{path} has no {attr!r}: use one of {found[:10]} after the ':'")
    if not callable(factory):
        raise OmpqError(f"{path}:{attr} is a {type(factory).__name__}, not callable: name a "
                        f"function or class that returns an nn.Module")
    return factory


def _user_model(target: str) -> nn.Module:
    factory = load_user_factory(target)
    try:
        model = factory()
    except Exception as exc:
        raise OmpqError(f"{target}() raised {type(exc).__name__}: {exc}: fix the factory (it "
                        f"is called with no arguments)") from None
    if not isinstance(model, nn.Module):
        raise OmpqError(f"{target}() returned a {type(model).__name__}, not a torch.nn.Module: "
                        f"make the factory return the model")
    return model


def _check_norm(input_size: tuple[int, ...], mean: tuple[float, ...],
                std: tuple[float, ...]) -> None:
    if len(input_size) != 3 or any(int(v) < 1 for v in input_size):
        raise OmpqError(f"input_size must be (C, H, W) with positive entries, got {input_size}")
    c = input_size[0]
    if len(mean) != c or len(std) != c:
        raise OmpqError(f"mean/std need {c} values (one per input channel), got "
                        f"{len(mean)}/{len(std)}")
    if any(not math.isfinite(s) or s <= 0 for s in std) or any(not math.isfinite(m) for m in mean):
        raise OmpqError(f"std must be positive and finite, mean finite: got mean={mean} std={std}")


def build_model(
    model: str,
    weights: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | DataSource | None = None,
    *,
    input_size: tuple[int, int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    default_samples: int | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Build ``model`` (a registry name or ``path/to/file.py:factory``) in eval mode.

    Weights: ``weights`` if given; otherwise, for a registry model with real weights, the
    checkpoint of ``data_dir`` (a data folder holding ``weights/``, or an opened
    :class:`~ompq_plugin.datasets.DataSource`; the embedded source gives the embedded
    ResNet-20); otherwise random initialisation. The returned spec's ``pretrained`` says whether
    weights were loaded, ``weights_path`` which ones (absolute).

    A user factory is called with no arguments; its spec's ``name`` is the factory with an
    absolute file path, so it can be rebuilt from any folder. Its input defaults to (3, 32, 32)
    with **no** normalisation (mean 0, std 1: uint8 pixels are only scaled to 0..1) and 64 search
    samples; ``input_size``, ``mean``, ``std`` and ``default_samples`` override them (for
    registry models too).
    """
    if model in MODELS:
        spec = MODELS[model]
        net = spec.factory()
    elif ":" in model or model.endswith(".py"):
        net = _user_model(model)
        model = absolute_target(model)
        c = int(input_size[0]) if input_size is not None else 3
        spec = ModelSpec(name=model, factory=functools.partial(_user_model, model),
                         input_size=(c, 32, 32), mean=(0.0,) * c, std=(1.0,) * c,
                         default_samples=64)
    else:
        spec = get_spec(model)  # raises the "unknown model" error
        net = spec.factory()
    overrides: dict[str, Any] = {}
    if input_size is not None:
        overrides["input_size"] = tuple(int(v) for v in input_size)
    if mean is not None:
        overrides["mean"] = tuple(float(v) for v in mean)
    if std is not None:
        overrides["std"] = tuple(float(v) for v in std)
    if default_samples is not None:
        overrides["default_samples"] = int(default_samples)
    spec = dataclasses.replace(spec, **overrides)
    _check_norm(spec.input_size, spec.mean, spec.std)

    path: Path | None = None
    if weights is not None:
        path = Path(weights).expanduser()
    elif data_dir is not None and spec.weights_file is not None:
        path = _registry_weights(data_dir, spec)
    if path is not None:
        load_checkpoint(net, path)
        spec = dataclasses.replace(spec, pretrained=True, weights_path=str(path.resolve()))
    return net.eval(), spec


def absolute_target(model: str) -> str:
    """``path/to/file.py:factory`` with an absolute path (registry names unchanged)."""
    file_part, sep, attr = model.rpartition(":")
    if model in MODELS or not sep or not file_part:
        return model
    return f"{Path(file_part).expanduser().resolve()}:{attr}"


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _registry_weights(data: str | os.PathLike[str] | DataSource, spec: ModelSpec) -> Path:
    """The checkpoint of a registry model: ``weights/<file>`` of the data folder (also tried
    next to a CIFAR batch folder given as data), or the embedded one for the embedded data."""
    from ompq_plugin.datasets import DataSource

    assert spec.weights_file is not None
    if isinstance(data, DataSource):
        if data.kind == "embedded":
            from ompq_plugin import embedded

            found = embedded.weights_path(spec.name)
            if found is None:
                raise OmpqError(f"no pretrained weights for {spec.name} ship with the package "
                                f"(only resnet20): pass --weights PATH or --data a folder "
                                f"holding weights/")
            return found
        if data.weights_dir is None:
            raise OmpqError(f"{data.description} holds no weights for {spec.name}: pass "
                            f"--weights PATH")
        bases: tuple[Path, ...] = (data.weights_dir.parent,)
        data_dir = data.weights_dir.parent
    else:
        data_dir = Path(data)
        bases = (data_dir, data_dir.parent)
    for base in bases:
        candidate = base / spec.weights_file
        if candidate.is_file():
            return candidate
    raise OmpqError(f"pretrained weights for {spec.name} not found at "
                    f"{data_dir / spec.weights_file}: pass --weights PATH, or point --data at "
                    f"the folder holding weights/")
