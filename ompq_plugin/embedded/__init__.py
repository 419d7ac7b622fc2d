"""The small default that ships inside the package (see PROVENANCE.md here).

- ``resnet20.th``: akamaster's pretrained CIFAR-10 ResNet-20 (BSD-2, licence file alongside);
- ``cifar10_sample.npz``: 500 training + 500 test CIFAR-10 images with their official pixels,
  50 of each class per split.

Used when neither ``--data`` nor ``$OMPQ_DATA_DIR`` names a data folder, so that ``ompq demo``
and the tests run after a plain ``pip install``. Built by ``tools/build_embedded.py``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SAMPLE_FILE = "cifar10_sample.npz"
WEIGHTS = {"resnet20": "resnet20.th"}


def path(name: str) -> Path:
    """The installed path of one embedded file (the package is always unpacked on disk)."""
    return Path(str(resources.files(__name__).joinpath(name)))


def sample_path() -> Path:
    return path(SAMPLE_FILE)


def weights_path(model: str) -> Path | None:
    """The embedded checkpoint of a registry model, or None when none ships."""
    name = WEIGHTS.get(model)
    return path(name) if name is not None else None
