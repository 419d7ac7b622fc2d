"""Shared fixtures. Tests that need the full data folder (../shared/data) take ``data_dir`` and
are skipped, with the reason, when it is absent (CI has it); tests that can run on the embedded
500 + 500 CIFAR-10 images and ResNet-20 checkpoint take ``embedded_data`` and always run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The data folder: $OMPQ_DATA_DIR, else ../shared/data next to the repository."""
    # resolved: CLI tests run `ompq` in a temporary folder, where a relative path means nothing
    path = Path(os.environ.get("OMPQ_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().resolve()
    needed = ["cifar10-exact/test_batch", "cifar10-jpeg/test_batch", "weights/resnet20.th"]
    absent = [n for n in needed if not (path / n).is_file()]
    if absent:
        pytest.skip(f"full data missing under {path} ({', '.join(absent)}): set OMPQ_DATA_DIR to "
                    f"the shared data folder (see ../shared/data/MANIFEST.md)")
    return path


@pytest.fixture(scope="session")
def embedded_data():  # noqa: ANN201
    """The embedded sample as an opened DataSource (no data folder needed)."""
    from ompq_plugin.datasets import embedded_source

    return embedded_source()
