"""Shared fixtures. The real data (../shared/data) is required: CI always has it, so a missing
folder is a test failure with the fix in the message, never a skip."""

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
    path = Path(os.environ.get("OMPQ_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()
    needed = ["cifar10-exact/test_batch", "cifar10-jpeg/test_batch", "weights/resnet20.th"]
    absent = [n for n in needed if not (path / n).is_file()]
    if absent:
        pytest.fail(f"test data missing under {path} ({', '.join(absent)}): set OMPQ_DATA_DIR to "
                    f"the shared data folder (see ../shared/data/MANIFEST.md)", pytrace=False)
    return path
