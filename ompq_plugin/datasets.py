"""What ``--data`` names, opened as one :class:`DataSource` with a training and a test split.

Accepted forms (:func:`open_data`):

- a data folder like ../shared/data (``cifar10-exact/``, ``cifar10-jpeg/``, ``weights/``) or a
  CIFAR-10 python batch folder (``data_batch_1..5``, ``test_batch``);
- a folder of images in class sub-folders (``cat/001.png``; class = sub-folder, sorted by name,
  as torchvision's ImageFolder), optionally split as ``train/`` and ``test/`` (or ``val/``);
- an ``.npy`` file of images, or an ``.npz`` file with ``images`` (optionally ``labels``), or
  ``x``/``y``, or ``x_train``/``y_train``/``x_test``/``y_test``, or
  ``train_images``/``train_labels``/``test_images``/``test_labels``; arrays are (N, H, W, C),
  (N, C, H, W) or (N, H, W), uint8 (0..255) or float (taken as they are);
- ``path/to/file.py:function``: ``function()`` returns images, ``(images, labels)``, a torch
  ``Dataset`` of ``(image, label)`` or of images, or a dict ``{"train": ..., "test": ...}`` of
  those;
- nothing (no ``--data``, no ``$OMPQ_DATA_DIR``): the embedded sample of 500 + 500 CIFAR-10
  images that ships with the package.

A source without separate splits serves the same images for calibration and evaluation;
:attr:`DataSource.description` says so, and the CLI prints it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ompq_plugin import data as cifar
from ompq_plugin.data import CifarSplit, Split, Variant
from ompq_plugin.errors import OmpqError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
TEST_FOLDERS = ("test", "val", "valid", "validation")

Loader = Callable[[Split, Variant, "tuple[int, int] | None"], CifarSplit]


@dataclass(frozen=True)
class DataSource:
    """An opened ``--data``: ``split("train")`` / ``split("test")`` give a :class:`CifarSplit`."""

    kind: str  # "data-folder", "cifar-folder", "image-folder", "array", "python", "embedded"
    location: str
    separate_splits: bool
    weights_dir: Path | None = None  # where registry checkpoints live (weights/<name>.th)
    _load: Loader | None = field(default=None, repr=False, compare=False)
    _cache: dict[Any, CifarSplit] = field(default_factory=dict, repr=False, compare=False)

    def split(
        self, which: Split, variant: Variant = "exact", size: tuple[int, int] | None = None
    ) -> CifarSplit:
        """Training or test images. ``variant`` picks cifar10-exact/-jpeg in a data folder
        (ignored elsewhere); ``size`` (H, W) is used to decode image files of mixed sizes."""
        if which not in ("train", "test"):
            raise OmpqError(f"unknown split {which!r}: use 'train' or 'test'")
        assert self._load is not None
        key = (which, variant, None if size is None else tuple(size))
        if key not in self._cache:
            self._cache[key] = self._load(which, variant, size)
        return self._cache[key]

    @property
    def description(self) -> str:
        shared = "" if self.separate_splits else " (one set: the same images calibrate and test)"
        names = {
            "data-folder": "data folder",
            "cifar-folder": "CIFAR-10 batch folder",
            "image-folder": "image folder",
            "array": "array file",
            "python": "Python loader",
            "embedded": "embedded CIFAR-10 sample (500 train, "
            "500 test; pass --data or set OMPQ_DATA_DIR for the full data)",
        }
        return f"{names.get(self.kind, self.kind)} {self.location}{shared}"


def open_data(flag: str | os.PathLike[str] | None = None) -> DataSource:
    """Open ``flag`` (a ``--data`` value), else ``$OMPQ_DATA_DIR``, else the embedded sample."""
    origin = "--data"
    raw = str(flag) if flag not in (None, "") else None
    if raw is None:
        raw = os.environ.get(cifar.ENV_VAR) or None
        origin = cifar.ENV_VAR
    if raw is None:
        return embedded_source()
    file_part, sep, func = raw.rpartition(":")
    if sep and file_part.endswith(".py") and func:
        return _python_source(Path(file_part).expanduser(), func)
    path = Path(raw).expanduser()
    if path.suffix.lower() in (".npy", ".npz"):
        if not path.is_file():
            raise OmpqError(f"array file {path} (from {origin}) not found: check the path")
        return _array_source(path, path.suffix.lower())
    if not path.exists():
        raise OmpqError(
            f"{path} (from {origin}) does not exist: pass --data a data folder, an "
            f"image folder, an .npy/.npz file or file.py:function"
        )
    if not path.is_dir():
        raise OmpqError(
            f"{path} (from {origin}) is a file but not .npy/.npz: pass an array file, "
            f"a folder, or file.py:function"
        )
    if cifar.is_batch_folder(path):
        return DataSource(
            "cifar-folder",
            str(path),
            True,
            path.parent / "weights",
            lambda which, variant, size: cifar.load_cifar10(path, which),
        )
    if any((path / f"cifar10-{v}").is_dir() for v in ("exact", "jpeg")):
        return DataSource(
            "data-folder",
            str(path),
            True,
            path / "weights",
            lambda which, variant, size: cifar.load_cifar10(
                cifar.cifar_folder(path, variant), which
            ),
        )
    return _image_folder_source(path)


def embedded_source() -> DataSource:
    from ompq_plugin import embedded

    src = _array_source(embedded.sample_path(), ".npz")
    return DataSource("embedded", src.location, True, None, src._load)


# ------------------------------------------------------------------------------------ arrays


def as_images(array: Any, what: str) -> torch.Tensor:
    """An image array as a (N, C, H, W) tensor: uint8 kept, floats as float32."""
    x = torch.as_tensor(np.asarray(array)) if not isinstance(array, torch.Tensor) else array
    x = x.detach().cpu()
    if x.dim() == 3:  # (N, H, W): one channel
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise OmpqError(
            f"{what}: images must be (N, H, W, C), (N, C, H, W) or (N, H, W), got "
            f"shape {tuple(x.shape)}"
        )
    first, last = int(x.shape[1]), int(x.shape[3])
    if (last in (1, 3) and first not in (1, 3)) or (last == 4 and first not in (1, 3, 4)):
        x = x.permute(0, 3, 1, 2)  # channels last -> channels first
    elif first not in (1, 3, 4):
        raise OmpqError(f"{what}: cannot tell the channel axis of shape {tuple(x.shape)}: "
                        f"store images as (N, H, W, C) or (N, C, H, W) with 1, 3 or 4 channels")
    if x.dtype == torch.uint8 or x.dtype.is_floating_point:
        return x.contiguous() if x.dtype == torch.uint8 else x.float().contiguous()
    if x.dtype in (torch.int16, torch.int32, torch.int64, torch.uint16) and x.numel():
        if int(x.min()) >= 0 and int(x.max()) <= 255:
            return x.to(torch.uint8).contiguous()
    raise OmpqError(f"{what}: images are {x.dtype}; use uint8 pixels (0..255) or floats")


def as_labels(array: Any, n: int, what: str) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(array)) if not isinstance(array, torch.Tensor) else array
    y = y.detach().cpu().reshape(-1)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.shape[0] != n:
        raise OmpqError(
            f"{what}: labels must be {n} integers (one per image), got {y.dtype} {tuple(y.shape)}"
        )
    if n and int(y.min()) < 0:
        raise OmpqError(f"{what}: labels must be class indices >= 0")
    return y.to(torch.int64)


def _classes(labels: torch.Tensor | None) -> tuple[str, ...]:
    k = int(labels.max()) + 1 if labels is not None and labels.numel() else 0
    return tuple(str(i) for i in range(k))


def _image_set(
    images: Any, labels: Any, what: str, classes: tuple[str, ...] | None = None
) -> CifarSplit:
    x = as_images(images, what)
    y = None if labels is None else as_labels(labels, int(x.shape[0]), what)
    if x.shape[0] == 0:
        raise OmpqError(f"{what} holds no images")
    return CifarSplit(x, y, classes or _classes(y), what)


_NPZ_SPLIT_KEYS = (
    ("x_train", "y_train", "x_test", "y_test"),
    ("train_images", "train_labels", "test_images", "test_labels"),
)
_NPZ_ONE_KEYS = (("images", "labels"), ("x", "y"))


def _fixed(sets: dict[str, CifarSplit]) -> Loader:
    """A loader returning the ready ``sets`` (one set serves both splits if only one)."""
    return lambda which, variant, size: sets[which if which in sets else "train"]


def _array_source(path: Path, suffix: str) -> DataSource:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise OmpqError(
            f"{path} is not a readable {suffix} file ({type(exc).__name__}: "
            f"{str(exc)[:120]}): save it with numpy.save / numpy.savez"
        ) from None
    if suffix == ".npy":
        return DataSource(
            "array", str(path), False, None, _fixed({"train": _image_set(loaded, None, str(path))})
        )
    with loaded:
        keys = set(loaded.files)
        classes = tuple(str(c) for c in loaded["classes"]) if "classes" in keys else None
        for xtr, ytr, xte, yte in _NPZ_SPLIT_KEYS:
            if {xtr, xte} <= keys:
                sets = {
                    "train": _image_set(
                        loaded[xtr], loaded[ytr] if ytr in keys else None, f"{path}:{xtr}", classes
                    ),
                    "test": _image_set(
                        loaded[xte], loaded[yte] if yte in keys else None, f"{path}:{xte}", classes
                    ),
                }
                return DataSource("array", str(path), True, None, _fixed(sets))
        for xk, yk in _NPZ_ONE_KEYS:
            if xk in keys:
                one = _image_set(
                    loaded[xk], loaded[yk] if yk in keys else None, f"{path}:{xk}", classes
                )
                return DataSource("array", str(path), False, None, _fixed({"train": one}))
        if len(keys) == 1:
            only = next(iter(keys))
            one = _image_set(loaded[only], None, f"{path}:{only}")
            return DataSource("array", str(path), False, None, _fixed({"train": one}))
    raise OmpqError(
        f"{path} holds {sorted(keys)}: name the arrays images/labels, x/y or "
        f"x_train/y_train/x_test/y_test"
    )


# ------------------------------------------------------------------------------ image folders


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def _image_folder_source(path: Path) -> DataSource:
    sub = {p.name.lower(): p for p in _class_dirs(path)}
    test = next((sub[n] for n in TEST_FOLDERS if n in sub), None)
    if "train" in sub and test is not None:
        folders = {"train": sub["train"], "test": test}
        return DataSource(
            "image-folder",
            str(path),
            True,
            None,
            lambda which, v, size: read_image_folder(folders[which], size),
        )
    if not _class_dirs(path) or not _image_files(path):
        raise OmpqError(
            f"{path} is neither a CIFAR-10/data folder nor a folder of images in "
            f"class sub-folders (e.g. {path}/cat/1.png): check --data"
        )
    return DataSource(
        "image-folder", str(path), False, None, lambda which, v, size: read_image_folder(path, size)
    )


def read_image_folder(
    folder: Path, size: tuple[int, int] | None = None, channels: int = 3
) -> CifarSplit:
    """Images in class sub-folders, decoded with Pillow as uint8 (N, C, H, W).

    Classes are the sub-folders sorted by name. Images of different sizes need ``size``
    (H, W): each is resized (bilinear) to it while decoding.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # Pillow is a dependency
        raise OmpqError("reading image folders needs Pillow: pip install pillow") from None
    classes = tuple(d.name for d in _class_dirs(folder))
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for file in _image_files(folder / name):
            try:
                with Image.open(file) as im:
                    im = im.convert("L" if channels == 1 else "RGB")
                    if size is not None and im.size != (size[1], size[0]):
                        im = im.resize((size[1], size[0]), Image.BILINEAR)
                    arrays.append(np.asarray(im, dtype=np.uint8))
            except (OSError, UnidentifiedImageError) as exc:
                raise OmpqError(
                    f"{file} is not a readable image ({exc}): remove or replace it"
                ) from None
            labels.append(label)
    if not arrays:
        raise OmpqError(
            f"{folder} has no images ({', '.join(IMAGE_SUFFIXES)}) in its class sub-folders"
        )
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise OmpqError(
            f"images in {folder} have different sizes ({len(shapes)} sizes, e.g. "
            f"{sorted(shapes)[:2]}): pass --input-size HxW to resize them"
        )
    x = np.stack(arrays)
    return _image_set(x if x.ndim == 4 else x[:, None], np.array(labels), str(folder), classes)


# ------------------------------------------------------------------------------------ Python


def _python_source(path: Path, func: str) -> DataSource:
    from ompq_plugin.models import load_user_factory

    target = f"{path}:{func}"
    if not path.is_file():
        raise OmpqError(f"data loader file {path} not found: pass --data path/to/file.py:function "
                        f"with an existing file")
    loader = load_user_factory(target)
    try:
        value = loader()
    except Exception as exc:
        raise OmpqError(
            f"{target}() raised {type(exc).__name__}: {exc}: fix the data "
            f"function (it is called with no arguments)"
        ) from None
    if isinstance(value, dict):
        missing = {"train", "test"} - set(value)
        if missing:
            raise OmpqError(
                f"{target}() returned a dict without {sorted(missing)}: return "
                f"{{'train': ..., 'test': ...}} or one set of images"
            )
        sets = {k: _from_python(value[k], f"{target}[{k!r}]") for k in ("train", "test")}
        return DataSource("python", target, True, None, _fixed(sets))
    return DataSource("python", target, False, None, _fixed({"train": _from_python(value, target)}))


def _from_python(value: Any, what: str) -> CifarSplit:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _image_set(value, None, what)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _image_set(value[0], value[1], what)
    if isinstance(value, torch.utils.data.Dataset):
        return _from_dataset(value, what)
    raise OmpqError(
        f"{what}() returned a {type(value).__name__}: return images, "
        f"(images, labels), a torch Dataset or {{'train': ..., 'test': ...}}"
    )


def _from_dataset(dataset: Any, what: str) -> CifarSplit:
    try:
        items = [dataset[i] for i in range(len(dataset))]
    except Exception as exc:
        raise OmpqError(
            f"reading {what} failed ({type(exc).__name__}: {exc}): the Dataset "
            f"needs __len__ and __getitem__ returning (image, label) or an "
            f"image"
        ) from None
    if not items:
        raise OmpqError(f"{what} is an empty Dataset")
    if isinstance(items[0], (tuple, list)):
        images = torch.stack([torch.as_tensor(np.asarray(it[0])) for it in items])
        labels = torch.tensor([int(it[1]) for it in items])
        return _image_set(images, labels, what)
    return _image_set(torch.stack([torch.as_tensor(np.asarray(it)) for it in items]), None, what)
