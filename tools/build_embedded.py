"""Build ompq_plugin/embedded/ from ../shared/data: the small default that ships in the wheel.

Writes, deterministically (same input -> same bytes, except the npz's zip timestamps):
- ``resnet20.th``: akamaster's pretrained CIFAR-10 ResNet-20, copied byte for byte;
- ``LICENSE.akamaster-pytorch_resnet_cifar10``: its BSD-2 licence, copied;
- ``cifar10_sample.npz``: 500 training + 500 test images of ``cifar10-exact`` (official pixels),
  class-balanced: the first 50 images of each class, in official order, of the training batches
  1..5 (read in sequence) and of the test batch. Keys ``train_images`` / ``test_images`` (uint8,
  N x 3 x 32 x 32), ``train_labels`` / ``test_labels`` (int64), ``train_index`` /
  ``test_index`` (position in the concatenated exact training batches / in the test batch),
  ``classes``;
- ``PROVENANCE.md``: sources, selection rule and sha256 of every file.

Usage: ``python tools/build_embedded.py [--data DIR]`` (default: $OMPQ_DATA_DIR, else
../shared/data)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from ompq_plugin.data import cifar_folder, load_cifar10

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "ompq_plugin" / "embedded"
PER_CLASS = 50
LICENSE = "LICENSE.akamaster-pytorch_resnet_cifar10"


def first_per_class(labels: np.ndarray, per_class: int, num_classes: int = 10) -> np.ndarray:
    """Indices of the first ``per_class`` images of each class, in the split's own order."""
    keep: list[int] = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise SystemExit(f"class {c} has only {len(idx)} images")
        keep.extend(idx.tolist())
    return np.sort(np.array(keep, dtype=np.int64))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("OMPQ_DATA_DIR") or str(ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--data", default=default, help="the shared data folder (default: %(default)s)"
    )
    args = parser.parse_args()
    data = Path(args.data)
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "weights" / "resnet20.th", OUT / "resnet20.th")
    shutil.copyfile(data / "weights" / LICENSE, OUT / LICENSE)

    folder = cifar_folder(data, "exact")
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        s = load_cifar10(folder, split)
        labels = s.labels.numpy()
        idx = first_per_class(labels, PER_CLASS)
        arrays[f"{split}_images"] = s.images.numpy()[idx]
        arrays[f"{split}_labels"] = labels[idx]
        arrays[f"{split}_index"] = idx
        classes = s.classes
    arrays["classes"] = np.array(classes)
    np.savez_compressed(OUT / "cifar10_sample.npz", **arrays)

    files = ["resnet20.th", LICENSE, "cifar10_sample.npz"]
    rows = "\n".join(f"| {f} | {(OUT / f).stat().st_size:,} | {sha256(OUT / f)} |" for f in files)
    src = {n: sha256(folder / n) for n in ("data_batch_1", "test_batch")}
    title = "# Embedded default data (built by tools/build_embedded.py)"
    (OUT / "PROVENANCE.md").write_text(f"""{title}

The package ships this small default so that `ompq demo` and the tests run on a machine with no
data folder. Rebuild with `python tools/build_embedded.py --data ../shared/data`.

| file | bytes | sha256 |
|---|---:|---|
{rows}

## resnet20.th

Pretrained CIFAR-10 ResNet-20 of `akamaster/pytorch_resnet_cifar10`
(https://github.com/akamaster/pytorch_resnet_cifar10, file
`pretrained_models/resnet20-12fca82f.th`, added in commit
`d1ea1080238e82429bcb41792ca5f1e1dd0296ad`), byte-identical to `shared/data/weights/resnet20.th`
(sha256 12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8).
Licence: BSD-2-Clause, (c) 2018 Yerlan Idelbayev, text in `{LICENSE}`.
The author asks users to cite: Y. Idelbayev, *Proper ResNet Implementation for CIFAR10/CIFAR100
in PyTorch*. Inputs are normalised with the ImageNet mean/std (the author's `trainer.py`).

## cifar10_sample.npz

{2 * PER_CLASS * 10} CIFAR-10 images with their official pixels and labels, taken from
`shared/data/cifar10-exact` (the first 1017 images of every official batch, see that folder's
MANIFEST.md): the first {PER_CLASS} images of each class, in official order, of the training
batches 1..5 read in sequence ({PER_CLASS * 10} training images) and of the test batch
({PER_CLASS * 10} test images). `train_index` / `test_index` give each image's position.
Source batches: data_batch_1 sha256 {src["data_batch_1"]}, test_batch sha256
{src["test_batch"]}.
CIFAR-10 (A. Krizhevsky, *Learning Multiple Layers of Features from Tiny Images*, 2009,
https://www.cs.toronto.edu/~kriz/cifar.html) carries no formal licence; its page asks users to
cite that report.

Accuracy on 500 test images has a binomial standard error of about 1.2 points; use the full data
folder (`--data` / `OMPQ_DATA_DIR`) for figures to report.
""")
    for f in files:
        print(f"{OUT / f}: {(OUT / f).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
