"""Every form `--data` takes, the embedded sample, and preprocessing (size, mean/std)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ompq_plugin.data import prepare, search_samples
from ompq_plugin.datasets import DataSource, open_data
from ompq_plugin.errors import OmpqError
from ompq_plugin.models import build_model

RNG = np.random.default_rng(0)


def _pixels(n: int, h: int = 8, w: int = 6, c: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)  # channels last


# ------------------------------------------------------------------------------ arrays


def test_npy_channels_last_is_one_unlabelled_set(tmp_path: Path) -> None:
    x = _pixels(5)
    np.save(tmp_path / "imgs.npy", x)
    source = open_data(str(tmp_path / "imgs.npy"))  # an existing file, not "does not exist"
    train, test = source.split("train"), source.split("test")
    assert train.images.shape == (5, 3, 8, 6) and train.images.dtype == torch.uint8
    assert torch.equal(train.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert train.labels is None and test is train and not source.separate_splits
    assert "same images" in source.description


def test_npz_images_labels_float_channels_first(tmp_path: Path) -> None:
    x = RNG.random((4, 1, 5, 5), dtype=np.float32)
    np.savez(tmp_path / "d.npz", images=x, labels=np.array([0, 2, 1, 2]))
    split = open_data(tmp_path / "d.npz").split("test")
    assert split.images.dtype == torch.float32 and split.image_shape == (1, 5, 5)
    assert torch.equal(split.images, torch.from_numpy(x)) and split.labels.tolist() == [0, 2, 1, 2]


def test_npz_with_splits_and_grayscale(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x_train=RNG.integers(0, 256, (6, 7, 7), dtype=np.uint8),
             y_train=np.arange(6) % 3, x_test=RNG.integers(0, 256, (2, 7, 7), dtype=np.uint8),
             y_test=np.array([1, 0]))
    source = open_data(tmp_path / "d.npz")
    assert source.separate_splits
    assert source.split("train").image_shape == (1, 7, 7) and len(source.split("train")) == 6
    assert source.split("test").labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("arrays", "match"),
    [({"a": np.zeros((2, 3, 4, 4)), "b": np.zeros(2)}, "name the arrays"),
     ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(3, int)}, "2 integers"),
     ({"images": np.zeros((2, 4), np.uint8)}, "must be"),
     ({"images": np.zeros((2, 5, 6, 7), np.uint8)}, "channel axis"),
     ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(2)}, "integers")],
    ids=["keys", "label-count", "shape", "channels", "float-labels"],
)
def test_bad_arrays(tmp_path: Path, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(OmpqError, match=match):
        open_data(tmp_path / "d.npz")


def test_missing_paths_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(OmpqError, match="array file .* not found"):
        open_data(tmp_path / "absent.npy")
    with pytest.raises(OmpqError, match="does not exist"):
        open_data(tmp_path / "absent")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(OmpqError, match="not .npy/.npz"):
        open_data(tmp_path / "x.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OmpqError, match="class sub-folders"):
        open_data(tmp_path / "empty")


# ------------------------------------------------------------------------------ image folders


def _write_images(folder: Path, sizes: dict[str, list[tuple[int, int]]]) -> None:
    from PIL import Image

    for cls, dims in sizes.items():
        (folder / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(dims):
            Image.fromarray(_pixels(1, h, w)[0]).save(folder / cls / f"{i}.png")


def test_image_folder_classes_by_name(tmp_path: Path) -> None:
    _write_images(tmp_path, {"dog": [(9, 7)] * 2, "cat": [(9, 7)] * 3})
    split = open_data(tmp_path).split("train")
    assert split.classes == ("cat", "dog") and split.labels.tolist() == [0, 0, 0, 1, 1]
    assert split.images.shape == (5, 3, 9, 7) and split.images.dtype == torch.uint8


def test_image_folder_with_train_and_val(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": [(4, 4)] * 2, "b": [(4, 4)]})
    _write_images(tmp_path / "val", {"a": [(4, 4)], "b": [(4, 4)]})
    source = open_data(tmp_path)
    assert source.separate_splits and source.kind == "image-folder"
    assert len(source.split("train")) == 3 and source.split("test").labels.tolist() == [0, 1]


def test_image_folder_of_mixed_sizes_needs_a_size(tmp_path: Path) -> None:
    _write_images(tmp_path, {"a": [(10, 12), (5, 5)]})
    source = open_data(tmp_path)
    with pytest.raises(OmpqError, match="--input-size"):
        source.split("train")
    assert source.split("train", size=(6, 8)).images.shape == (2, 3, 6, 8)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    _write_images(tmp_path, {"a": [(4, 4)]})
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(OmpqError, match="broken.png"):
        open_data(tmp_path).split("train")


# ------------------------------------------------------------------------------ Python loaders

LOADERS = '''
import torch

def tensors():
    return torch.zeros(3, 3, 4, 4, dtype=torch.uint8)

def pair():
    return torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 1, 0])

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 5
    def __getitem__(self, i):
        return torch.full((3, 4, 4), i / 10), i % 2

def dataset():
    return Items()

def splits():
    return {"train": pair(), "test": tensors()}

def wrong():
    return "images"
'''


@pytest.fixture()
def loaders(tmp_path: Path) -> Path:
    path = tmp_path / "loaders.py"
    path.write_text(LOADERS)
    return path


def test_python_loaders(loaders: Path) -> None:
    assert open_data(f"{loaders}:tensors").split("train").labels is None
    pair = open_data(f"{loaders}:pair").split("test")
    assert pair.images.dtype == torch.float32 and pair.labels.tolist() == [0, 1, 1, 0]
    items = open_data(f"{loaders}:dataset").split("train")
    assert items.images.shape == (5, 3, 4, 4) and items.labels.tolist() == [0, 1, 0, 1, 0]
    assert torch.allclose(items.images[3], torch.full((3, 4, 4), 0.3))
    both = open_data(f"{loaders}:splits")
    assert both.separate_splits and len(both.split("train")) == 4 and len(both.split("test")) == 3
    with pytest.raises(OmpqError, match="returned a str"):
        open_data(f"{loaders}:wrong")
    with pytest.raises(OmpqError, match="has no 'absent'"):
        open_data(f"{loaders}:absent")
    with pytest.raises(OmpqError, match="data loader file .* not found"):
        open_data(f"{loaders.parent / 'nope.py'}:tensors")


# ------------------------------------------------------------------------------ defaults


def test_no_data_flag_means_the_embedded_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMPQ_DATA_DIR", raising=False)
    source = open_data(None)
    assert source.kind == "embedded" and source.separate_splits
    for which in ("train", "test"):
        split = source.split(which)
        assert split.images.shape == (500, 3, 32, 32) and split.images.dtype == torch.uint8
        assert split.class_counts() == [50] * 10


def test_embedded_images_are_the_exact_pixels(data_dir: Path, embedded_data: DataSource) -> None:
    with np.load(embedded_data.location) as sample:
        for which, files in (("test", ["test_batch"]),
                             ("train", [f"data_batch_{i}" for i in range(1, 6)])):
            rows, labels = [], []
            for name in files:
                with open(data_dir / "cifar10-exact" / name, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                rows.append(batch[b"data"])
                labels += batch[b"labels"][: len(batch[b"data"])]
            rows_all = np.concatenate(rows)
            idx = sample[f"{which}_index"]
            assert np.array_equal(sample[f"{which}_images"].reshape(500, -1), rows_all[idx])
            assert np.array_equal(sample[f"{which}_labels"], np.array(labels)[idx])


def test_embedded_weights_load_for_the_embedded_source(embedded_data: DataSource) -> None:
    _, spec = build_model("resnet20", data_dir=embedded_data)
    assert spec.pretrained and Path(spec.weights_path).name == "resnet20.th"
    with pytest.raises(OmpqError, match="only resnet20"):
        build_model("resnet32", data_dir=embedded_data)


# ------------------------------------------------------------------------------ preprocessing


def test_prepare_scales_normalises_and_resizes() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    none = prepare(x)
    assert torch.allclose(none[0, :, 0, 0], torch.tensor([0.0, 0.2, 1.0]))
    y = prepare(x, (0.5, 0.0, 0.0), (0.5, 0.2, 2.0), (4, 3))
    assert y.shape == (2, 3, 4, 3)
    assert torch.allclose(y[1, :, 3, 2], torch.tensor([-1.0, 1.0, 0.5]))
    f = torch.full((1, 1, 2, 2), 0.75)  # floats are taken as they are, then normalised
    assert torch.allclose(prepare(f, (0.25,), (0.5,)), torch.ones(1, 1, 2, 2))
    with pytest.raises(OmpqError, match="one value per channel"):
        prepare(x, (0.5,), (0.5,))


def test_search_samples_from_an_array_at_the_model_size(tmp_path: Path) -> None:
    np.save(tmp_path / "imgs.npy", _pixels(12, 10, 10))
    user = tmp_path / "net.py"
    user.write_text("import torch\ndef make():\n    return torch.nn.Conv2d(3, 4, 3)\n")
    _, spec = build_model(f"{user}:make", input_size=(3, 16, 16))
    x = search_samples(str(tmp_path / "imgs.npy"), spec, 5, seed=1)
    assert x.shape == (5, 3, 16, 16) and float(x.min()) >= 0 and float(x.max()) <= 1
    _, gray = build_model(f"{user}:make", input_size=(1, 16, 16))
    with pytest.raises(OmpqError, match="1 input channels"):
        search_samples(str(tmp_path / "imgs.npy"), gray, 5)
