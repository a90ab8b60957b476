"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) as uint8 tensors, read from the original pickled batches.

The files are Python pickles; they are read with :func:`streamcl.datasets.common.load_pickle`, which refuses
anything but dicts, lists, strings, numbers and numpy arrays, so a crafted file cannot run code.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from streamcl.datasets import common
from streamcl.errors import DataError, DatasetNotFound
from streamcl.scenarios.data import TensorData

# per-channel mean and std of the training images in [0, 1] units
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

# folder, training files, test files, label key, torchvision class, URL
LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", "CIFAR10",
         "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    100: ("cifar-100-python", ["train"], ["test"], "fine_labels", "CIFAR100",
          "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}
HOW_TO_GET = (
    "CIFAR-{n} was not found{failed}. Get it one of these ways:\n"
    "  * with internet access: torchvision.datasets.{tv}(root, download=True) (streamcl does this itself with "
    "download=True), or unpack {url} into root\n"
    "  * point STREAMCL_DATA (or root=...) at the folder that holds {folder}/\n"
    "Looked for {expected}"
)


def cifar10(root: str | os.PathLike | None = None, *, download: bool = True) -> tuple[TensorData, TensorData]:
    """CIFAR-10's train (50,000) and test (10,000) sets: uint8 images ``(N, 3, 32, 32)``, int64 labels 0-9,
    from ``<root>/cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``)."""
    return _cifar(10, root, download)


def cifar100(root: str | os.PathLike | None = None, *, download: bool = True) -> tuple[TensorData, TensorData]:
    """CIFAR-100's train (50,000) and test (10,000) sets: uint8 images ``(N, 3, 32, 32)``, int64 fine labels
    0-99, from ``<root>/cifar-100-python/`` (``train``, ``test``)."""
    return _cifar(100, root, download)


def _cifar(n: int, root, download: bool) -> tuple[TensorData, TensorData]:
    folder, train, test, _, tv, url = LAYOUT[n]
    # the dataset's own folder under each root, or the root itself when it is that folder
    candidates = [f for r in common.search_roots(root) for f in (r / folder, r)]
    for f in candidates:
        if all((f / name).is_file() for name in train + test):
            return _load(n, f.resolve())
    failed = ""
    if download:
        target = common.download_root(root)
        try:
            import torchvision.datasets
            getattr(torchvision.datasets, tv)(str(target), train=True, download=True)
        except Exception as err:  # no internet, no write access: say so in the message
            failed = f" and the download into {target} failed ({type(err).__name__}: {err})"
        else:
            return _cifar(n, target, False)
    expected = " or ".join(str(r / folder / train[0]) for r in common.search_roots(root)) or \
        f"<root>/{folder}/{train[0]} (no root given and STREAMCL_DATA is not set)"
    raise DatasetNotFound(HOW_TO_GET.format(n=n, failed=failed, tv=tv, url=url, folder=folder, expected=expected))


@lru_cache(maxsize=2)
def _load(n: int, folder: Path) -> tuple[TensorData, TensorData]:
    """Parsed once per process: stream builders copy what they take."""
    _, train, test, key, _, _ = LAYOUT[n]
    return _read(folder, train, key, n), _read(folder, test, key, n)


def _read(folder: Path, names: list[str], key: str, n: int) -> TensorData:
    xs, ys = [], []
    for name in names:
        path = folder / name
        batch = common.load_pickle(path, f"CIFAR-{n}", f" (CIFAR-{n}: {LAYOUT[n][5]})")
        data = batch.get("data") if isinstance(batch, dict) else None
        labels = batch.get(key) if isinstance(batch, dict) else None
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
                or labels is None or len(labels) != len(data):
            raise DataError(f"{path} is not a CIFAR-{n} batch: it needs 'data', uint8 rows of 3072 pixels, and "
                            f"'{key}', one label per row. Delete it and get the original again ({LAYOUT[n][5]})")
        y = np.asarray(labels)
        if y.dtype.kind not in "iu" or (len(y) and not (0 <= y.min() and y.max() < n)):
            raise DataError(f"{path}: '{key}' must be integers 0..{n - 1}")
        xs.append(data)
        ys.append(y.astype(np.int64))
    # a row is 1024 red, 1024 green, then 1024 blue values, each plane row-major
    x = torch.from_numpy(np.concatenate(xs)).reshape(-1, 3, 32, 32)
    return TensorData(x, torch.from_numpy(np.concatenate(ys)))
