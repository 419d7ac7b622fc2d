"""CIFAR-10 reader, normalisation and the seeded choice of search images, on the real data."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ompq_plugin.data import (
    CIFAR10_CLASSES,
    CifarSplit,
    choose_samples,
    cifar_folder,
    load_cifar10,
    normalise,
    resolve_data_dir,
    search_samples,
)
from ompq_plugin.errors import OmpqError
from ompq_plugin.models import get_spec

EXACT_TEST_COUNTS = [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]  # MANIFEST
JPEG_BATCH1_COUNTS = [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]
FIRST_TRAIN_LABELS = [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]


@pytest.fixture(scope="module")
def exact_test(data_dir: Path) -> CifarSplit:
    return load_cifar10(cifar_folder(data_dir, "exact"), "test")


@pytest.fixture(scope="module")
def exact_train(data_dir: Path) -> CifarSplit:
    return load_cifar10(cifar_folder(data_dir, "exact"), "train")


def _write_batch(path: Path, data: np.ndarray, labels: list, protocol: int = 2) -> None:
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"synthetic", b"labels": labels, b"data": data}, f,
                    protocol=protocol)


# ------------------------------------------------------------------------------ reader


def test_exact_test_split(exact_test: CifarSplit) -> None:
    assert exact_test.images.shape == (1017, 3, 32, 32)
    assert exact_test.images.dtype == torch.uint8
    assert exact_test.labels.dtype == torch.int64
    assert exact_test.class_counts() == EXACT_TEST_COUNTS
    assert exact_test.classes == CIFAR10_CLASSES


def test_exact_train_split(exact_train: CifarSplit) -> None:
    assert len(exact_train) == 5 * 1017
    assert exact_train.labels[:10].tolist() == FIRST_TRAIN_LABELS
    assert exact_train.labels.min() == 0 and exact_train.labels.max() == 9


def test_pixel_layout_matches_raw_rows(data_dir: Path, exact_test: CifarSplit) -> None:
    with open(data_dir / "cifar10-exact" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    rows = raw[b"data"]
    i, c, h, w = 17, 2, 5, 30  # row = 1024 R, 1024 G, 1024 B; each plane row-major
    assert int(exact_test.images[i, c, h, w]) == int(rows[i, c * 1024 + h * 32 + w])
    assert torch.equal(exact_test.images[3].flatten(), torch.from_numpy(rows[3]))


def test_jpeg_folder(data_dir: Path, exact_test: CifarSplit) -> None:
    jpeg = load_cifar10(cifar_folder(data_dir, "jpeg"), "test")
    assert jpeg.images.shape == (10000, 3, 32, 32)
    assert jpeg.class_counts() == [1000] * 10
    # same order and labels as the exact pixels; pixels differ by the JPEG round trip (~5.8)
    assert torch.equal(jpeg.labels[:1017], exact_test.labels)
    mae = (jpeg.images[:1017].float() - exact_test.images.float()).abs().mean().item()
    assert 4.0 < mae < 8.0


def test_jpeg_train_counts(data_dir: Path) -> None:
    train = load_cifar10(cifar_folder(data_dir, "jpeg"), "train")
    assert train.images.shape == (50000, 3, 32, 32)
    assert train.class_counts() == [5000] * 10
    assert torch.bincount(train.labels[:10000], minlength=10).tolist() == JPEG_BATCH1_COUNTS
    assert train.labels[:10].tolist() == FIRST_TRAIN_LABELS


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_batch_folder_without_meta_or_filenames(tmp_path: Path, protocol: int) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(7, 3072), dtype=np.uint8)
    labels = [0, 1, 2, 3, 4, 5, np.int64(9)]  # numpy scalars pickle too
    _write_batch(tmp_path / "test_batch", data, labels, protocol)
    split = load_cifar10(tmp_path, "test")
    assert len(split) == 7 and split.labels.tolist() == [0, 1, 2, 3, 4, 5, 9]
    assert torch.equal(split.images.reshape(7, -1), torch.from_numpy(data))
    assert cifar_folder(tmp_path, "jpeg") == tmp_path  # a batch folder is accepted as is


# ------------------------------------------------------------------------------ errors


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("OMPQ_DATA_DIR", str(other))
    assert resolve_data_dir(str(tmp_path)) == tmp_path  # the flag wins
    assert resolve_data_dir(None) == other
    monkeypatch.delenv("OMPQ_DATA_DIR")
    with pytest.raises(OmpqError, match="--data.*OMPQ_DATA_DIR"):
        resolve_data_dir(None)
    with pytest.raises(OmpqError, match="does not exist"):
        resolve_data_dir(str(tmp_path / "nope"))


def test_missing_variant_and_files(tmp_path: Path) -> None:
    with pytest.raises(OmpqError, match="cifar10-exact"):
        cifar_folder(tmp_path, "exact")
    with pytest.raises(OmpqError, match="test_batch.*not found"):
        load_cifar10(tmp_path, "test")
    rng = np.random.default_rng(0)
    _write_batch(tmp_path / "data_batch_1", rng.integers(0, 256, (2, 3072), np.uint8), [0, 1])
    with pytest.raises(OmpqError, match="data_batch_2"):
        load_cifar10(tmp_path, "train")


@pytest.mark.parametrize(
    "content",
    [b"not a pickle at all", b"\x80\x02}q\x01(U\x04data"],  # garbage, truncated pickle
    ids=["garbage", "truncated"],
)
def test_corrupt_batch(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "test_batch").write_bytes(content)
    with pytest.raises(OmpqError, match="test_batch") as exc:
        load_cifar10(tmp_path, "test")
    assert "\n" not in str(exc.value)


def test_truncated_real_batch(tmp_path: Path, data_dir: Path) -> None:
    real = (data_dir / "cifar10-exact" / "test_batch").read_bytes()
    (tmp_path / "test_batch").write_bytes(real[: len(real) // 2])
    with pytest.raises(OmpqError, match="not a readable CIFAR-10 batch"):
        load_cifar10(tmp_path, "test")


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pwned",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(OmpqError, match="refusing"):
        load_cifar10(tmp_path, "test")


def test_bad_shapes(tmp_path: Path) -> None:
    _write_batch(tmp_path / "test_batch", np.zeros((2, 100), np.uint8), [0, 1])
    with pytest.raises(OmpqError, match="expected uint8"):
        load_cifar10(tmp_path, "test")
    _write_batch(tmp_path / "test_batch", np.zeros((2, 3072), np.uint8), [0])
    with pytest.raises(OmpqError, match="1 labels for 2 images"):
        load_cifar10(tmp_path, "test")
    _write_batch(tmp_path / "test_batch", np.zeros((1, 3072), np.uint8), [10])
    with pytest.raises(OmpqError, match="labels outside"):
        load_cifar10(tmp_path, "test")


# ------------------------------------------------------------------------------ normalise


def test_normalise_maths() -> None:
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 2.0)
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    y = normalise(x, mean, std)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 2, 2)
    expected = [(0 / 255 - 0.5) / 0.5, (51 / 255 - 0.25) / 0.25, (255 / 255 - 0.0) / 2.0]
    assert torch.allclose(y[1, :, 1, 0], torch.tensor(expected), atol=1e-6)
    with pytest.raises(ValueError):
        normalise(y, mean, std)
    with pytest.raises(ValueError):
        normalise(x, mean[:2], std[:2])


def test_normalise_matches_manifest_recipe(exact_test: CifarSplit) -> None:
    spec = get_spec("resnet20")
    x = exact_test.images[:4].numpy().astype(np.float32) / 255
    m = np.array(spec.mean, np.float32)[:, None, None]
    s = np.array(spec.std, np.float32)[:, None, None]
    ref = torch.from_numpy((x - m) / s)
    assert torch.allclose(normalise(exact_test.images[:4], spec.mean, spec.std), ref, atol=1e-6)


# ------------------------------------------------------------------------------ sampling


def test_choose_samples_reproducible(exact_train: CifarSplit) -> None:
    a = choose_samples(exact_train, 64, seed=3)
    assert torch.equal(a, choose_samples(exact_train, 64, seed=3))
    assert not torch.equal(a, choose_samples(exact_train, 64, seed=4))
    assert a.dtype == torch.int64 and len(set(a.tolist())) == 64
    assert int(a.max()) < len(exact_train)


def test_choose_samples_balanced(exact_train: CifarSplit) -> None:
    idx = choose_samples(exact_train, 64, seed=0, balanced=True)
    assert torch.equal(idx, choose_samples(exact_train.labels, 64, seed=0, balanced=True))
    assert len(set(idx.tolist())) == 64
    counts = torch.bincount(exact_train.labels[idx], minlength=10).tolist()
    assert counts == [7, 7, 7, 7, 6, 6, 6, 6, 6, 6]
    idx30 = choose_samples(exact_train, 30, seed=1, balanced=True)
    assert torch.bincount(exact_train.labels[idx30], minlength=10).tolist() == [3] * 10


def test_choose_samples_balanced_when_a_class_runs_out() -> None:
    labels = torch.tensor([0, 0] + [1] * 10)
    idx = choose_samples(labels, 8, seed=0, balanced=True)
    assert torch.bincount(labels[idx], minlength=2).tolist() == [2, 6]
    assert len(set(idx.tolist())) == 8


def test_choose_samples_too_many(exact_test: CifarSplit) -> None:
    with pytest.raises(OmpqError, match="only 1017 images"):
        choose_samples(exact_test, 1018, seed=0)
    with pytest.raises(OmpqError, match="at least 1"):
        choose_samples(exact_test, 0, seed=0)


def test_search_samples_are_normalised_training_images(
    data_dir: Path, exact_train: CifarSplit
) -> None:
    spec = get_spec("resnet20")
    x = search_samples(data_dir, spec, 64, seed=0)
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    idx = choose_samples(exact_train, 64, seed=0, balanced=True)
    assert torch.equal(x, normalise(exact_train.images[idx], spec.mean, spec.std))
    assert torch.equal(x, search_samples(data_dir, spec, 64, seed=0))


def test_search_samples_resized_for_imagenet_models(data_dir: Path) -> None:
    spec = get_spec("mobilenetv2")
    x = search_samples(data_dir, spec)  # default N = spec.default_samples
    assert x.shape == (spec.default_samples, 3, 224, 224)
    assert torch.isfinite(x).all()
