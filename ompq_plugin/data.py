"""CIFAR-10 python-pickle reader, per-model normalisation and the seeded choice of search images.

Reads the standard ``cifar-10-batches-py`` layout (``data_batch_1..5``, ``test_batch``,
optional ``batches.meta``) with any number of rows per batch, so both folders under
../shared/data work: ``cifar10-exact`` (1017 official images per batch) and ``cifar10-jpeg``
(10 000 JPEG-round-tripped images per batch). ``b'filenames'`` is never needed.

The batch files are pickles; they are read with a restricted unpickler that only resolves the
numpy names an array needs, so a tampered file cannot run code.

The search (OMPQ) uses *training* images, never test images: see :func:`search_samples`.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ompq_plugin.errors import OmpqError

if TYPE_CHECKING:
    from ompq_plugin.datasets import DataSource
    from ompq_plugin.models import ModelSpec

ENV_VAR = "OMPQ_DATA_DIR"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
IMAGE_SHAPE = (3, 32, 32)
_ROW = 3 * 32 * 32

Variant = Literal["exact", "jpeg"]
Split = Literal["test", "train"]


@dataclass
class CifarSplit:
    """A set of images: ``images`` uint8 (pixels 0..255) or float (N, C, H, W), ``labels``
    int64 (N,) or None (unlabelled: fine for search and calibration, not for evaluation).

    Named after CIFAR-10, where it started; :data:`ImageSet` is the same class. CIFAR-10 splits
    are uint8 (N, 3, 32, 32).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: tuple[str, ...] = CIFAR10_CLASSES
    source: str = ""  # folder and split it was read from, for messages and provenance

    def __post_init__(self) -> None:
        dtype = self.images.dtype
        if self.images.dim() != 4 or not (dtype == torch.uint8 or dtype.is_floating_point):
            raise ValueError(f"images must be uint8 or float (N, C, H, W), got {dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have one entry per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the stored images."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def class_counts(self) -> list[int]:
        if self.labels is None:
            raise OmpqError(f"{self.source or 'these images'} have no labels")
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def subset(self, indices: torch.Tensor) -> CifarSplit:
        labels = None if self.labels is None else self.labels[indices]
        return CifarSplit(self.images[indices], labels, self.classes, self.source)


ImageSet = CifarSplit


# ------------------------------------------------------------------------------------ folders


def resolve_data_dir(flag: str | os.PathLike[str] | None) -> Path:
    """The data folder: ``flag`` (``--data``), else ``$OMPQ_DATA_DIR``, else an error.

    A data folder holds ``cifar10-exact/``, ``cifar10-jpeg/`` and ``weights/`` (like
    ../shared/data); a folder that directly holds the CIFAR batches (``test_batch``) is also
    accepted.
    """
    raw = flag if flag not in (None, "") else os.environ.get(ENV_VAR) or None
    if raw is None:
        raise OmpqError(f"no data folder: pass --data DIR or set {ENV_VAR}=DIR "
                        "(the folder holding cifar10-exact/, cifar10-jpeg/ and weights/)")
    path = Path(raw).expanduser()
    if not path.is_dir():
        origin = "--data" if flag not in (None, "") else ENV_VAR
        raise OmpqError(f"data folder {path} (from {origin}) does not exist: pass --data DIR or "
                        f"set {ENV_VAR} to the folder holding cifar10-exact/ and weights/")
    return path


def is_batch_folder(path: Path) -> bool:
    return (path / TEST_FILE).is_file() or (path / TRAIN_FILES[0]).is_file()


def cifar_folder(data_dir: str | os.PathLike[str], variant: Variant = "exact") -> Path:
    """The CIFAR batch folder of ``data_dir``: ``data_dir/cifar10-<variant>``, or ``data_dir``
    itself when it already holds the batches (then ``variant`` is not checked)."""
    if variant not in ("exact", "jpeg"):
        raise OmpqError(f"unknown CIFAR variant {variant!r}: use 'exact' or 'jpeg'")
    data_dir = Path(data_dir)
    if is_batch_folder(data_dir):
        return data_dir
    folder = data_dir / f"cifar10-{variant}"
    if not folder.is_dir():
        raise OmpqError(f"{folder} not found: point --data / {ENV_VAR} at the folder holding "
                        f"cifar10-{variant}/ (or directly at a CIFAR-10 batch folder)")
    return folder


# ------------------------------------------------------------------------------------ reading


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only what a pickled numpy array needs; anything else is refused."""

    _ALLOWED = {
        *((f"numpy.{core}.multiarray", name) for core in ("core", "_core")
          for name in ("_reconstruct", "scalar")),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _fix(path: Path) -> str:
    return (f"replace {path.name} with the original CIFAR-10 python batch file, or point "
            f"--data / {ENV_VAR} at a complete CIFAR-10 batch folder")


def _unpickle(path: Path) -> dict[bytes, Any]:
    if not path.is_file():
        raise OmpqError(f"CIFAR-10 file {path} not found: point --data / {ENV_VAR} at a folder "
                        f"with test_batch and data_batch_1..5")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as exc:
        raise OmpqError(f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}: "
                        f"{exc}): {_fix(path)}") from None
    if not isinstance(obj, dict):
        raise OmpqError(f"{path} is not a CIFAR-10 batch (holds a {type(obj).__name__}, "
                        f"not a dict): {_fix(path)}")
    return obj


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    data, labels = d.get(b"data"), d.get(b"labels")
    if data is None or labels is None:
        raise OmpqError(f"{path} lacks the b'data' or b'labels' key: {_fix(path)}")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        raise OmpqError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 "
                        f"(N, {_ROW}): {_fix(path)}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise OmpqError(f"{path}: {labels.shape[0] if labels.ndim else 0} labels for "
                        f"{data.shape[0]} images: {_fix(path)}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise OmpqError(f"{path}: labels outside 0..{num_classes - 1}: {_fix(path)}")
    return data, labels.astype(np.int64)


def _read_classes(folder: Path) -> tuple[str, ...]:
    meta = folder / META_FILE
    if not meta.is_file():
        return CIFAR10_CLASSES
    names = _unpickle(meta).get(b"label_names")
    if not isinstance(names, list) or not names:
        raise OmpqError(f"{meta} has no b'label_names' list: {_fix(meta)}")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def load_cifar10(folder: str | os.PathLike[str], split: Split = "test") -> CifarSplit:
    """Read ``test_batch`` (``split="test"``) or ``data_batch_1..5`` (``"train"``) of a CIFAR-10
    python folder. Any number of rows per batch; ``b'filenames'`` is not needed."""
    if split not in ("test", "train"):
        raise OmpqError(f"unknown split {split!r}: use 'test' or 'train'")
    folder = Path(folder)
    classes = _read_classes(folder)
    names = (TEST_FILE,) if split == "test" else TRAIN_FILES
    parts = [_read_batch(folder / name, len(classes)) for name in names]
    data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts])
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, *IMAGE_SHAPE))
    return CifarSplit(images, torch.from_numpy(labels), classes, f"{folder}:{split}")


# ------------------------------------------------------------------------------ preprocessing


def normalise(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel."""
    if images.dtype != torch.uint8:
        raise ValueError(f"normalise expects uint8 images, got {images.dtype}")
    c = images.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {c} channels")
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    return (images.to(torch.float32) / 255.0 - m) / s


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of float images to ``size`` (H, W); no-op when already that size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def prepare(
    images: torch.Tensor,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Images as the model takes them: float32 ``(x - mean) / std`` at ``size`` (H, W).

    uint8 images are scaled to 0..1 first (``x / 255``); float images are taken as they are.
    ``mean``/``std`` None means no normalisation; ``size`` None keeps the images' size.
    """
    x = images.to(torch.float32) / 255.0 if images.dtype == torch.uint8 else images.float()
    c = x.shape[1]
    if mean is not None or std is not None:
        mean = tuple(mean) if mean is not None else (0.0,) * c
        std = tuple(std) if std is not None else (1.0,) * c
        if len(mean) != c or len(std) != c:
            raise OmpqError(f"mean/std have {len(mean)}/{len(std)} entries but the images have "
                            f"{c} channels: pass one value per channel to --mean/--std")
        x = (x - torch.tensor(mean).view(1, c, 1, 1)) / torch.tensor(std).view(1, c, 1, 1)
    return resize(x, size) if size is not None else x


def choose_samples(
    split: CifarSplit | torch.Tensor, n: int, seed: int = 0, balanced: bool = False
) -> torch.Tensor:
    """Indices (int64, length ``n``) of the search images, reproducible for a given ``seed``.

    ``split`` is a :class:`CifarSplit` or its labels tensor. ``balanced=True`` visits the classes
    round-robin (class 0, 1, ..., 9, 0, ...), taking a seeded random image of each, so any ``n``
    has class counts that differ by at most one (until a class runs out of images).
    """
    labels = split.labels if isinstance(split, CifarSplit) else split
    if labels is None:  # unlabelled images: a plain seeded draw
        total = len(split)
        balanced = False
        labels = torch.zeros(total, dtype=torch.int64)
    total = int(labels.shape[0])
    if n < 1:
        raise OmpqError(f"the number of search samples must be at least 1, got {n}")
    if n > total:
        raise OmpqError(f"asked for {n} samples but the split has only {total} images: "
                        f"lower --samples or use a larger data folder")
    gen = torch.Generator().manual_seed(int(seed))
    if not balanced:
        return torch.randperm(total, generator=gen)[:n]
    num_classes = int(labels.max()) + 1 if total else 0
    pools = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        pools.append(idx[torch.randperm(idx.numel(), generator=gen)].tolist())
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        for pool in pools:
            if depth < len(pool):
                chosen.append(pool[depth])
                if len(chosen) == n:
                    break
        depth += 1
    return torch.tensor(chosen, dtype=torch.int64)


def search_samples(
    data: str | os.PathLike[str] | DataSource | None,
    spec: ModelSpec,
    n: int | None = None,
    seed: int = 0,
    balanced: bool = True,
    variant: Variant = "exact",
) -> torch.Tensor:
    """N preprocessed *training* images for the search, float32 (N, *spec.input_size).

    ``data`` is anything ``--data`` takes (see :func:`ompq_plugin.datasets.open_data`; None:
    ``$OMPQ_DATA_DIR``, else the embedded CIFAR-10 sample) or an opened
    :class:`~ompq_plugin.datasets.DataSource`. ``n`` defaults to ``spec.default_samples``.
    Images come from the training split (never the test split of a source that has one), are
    normalised with the spec's mean/std and resized (bilinear) to its input size.
    """
    from ompq_plugin.datasets import DataSource, open_data

    source = data if isinstance(data, DataSource) else open_data(data)
    n = spec.default_samples if n is None else n
    train = source.split("train", variant, size=spec.input_size[1:])
    check_channels(train, spec.input_size)
    chosen = train.subset(choose_samples(train, n, seed, balanced))
    return prepare(chosen.images, spec.mean, spec.std, spec.input_size[1:]).contiguous()


def check_channels(images: CifarSplit, input_size: tuple[int, ...]) -> None:
    """An error naming the fix when the images' channels differ from the model's input."""
    if images.image_shape[0] != input_size[0]:
        raise OmpqError(f"the model takes {input_size[0]} input channels but the images of "
                        f"{images.source} have {images.image_shape[0]}: pass --input-size with "
                        f"{images.image_shape[0]} channels or images with {input_size[0]}")
