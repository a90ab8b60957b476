"""Fashion-MNIST (Xiao et al. 2017) as tensors, from local IDX files or torchvision's download."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from streamcl.datasets import common
from streamcl.errors import DataError, DatasetNotFound
from streamcl.scenarios.data import TensorData

MEAN, STD = 0.2860, 0.3530
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
HOW_TO_GET = (
    "Fashion-MNIST was not found. Get it one of these ways:\n"
    "  * Debian/Ubuntu, offline: apt-get install -y dataset-fashion-mnist   (files land in {debian})\n"
    "  * point STREAMCL_DATA (or root=...) at a folder holding the four IDX files "
    "(train-images-idx3-ubyte[.gz], ...), or a torchvision root with FashionMNIST/raw/\n"
    "  * with internet access: fashion_mnist(download=True) fetches it through torchvision\n"
    "Looked in: {looked}"
)


CORRUPT = ("{path} is damaged ({why}). Get a good copy: delete it, and streamcl looks in the other places or "
           "downloads it again; for Debian's copy ({debian}): apt-get install --reinstall -y dataset-fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array of its declared shape; :class:`DataError` naming
    the file when it is truncated or garbled."""
    return common.read_idx(path, lambda p, why: CORRUPT.format(path=p, why=why, debian=DEBIAN_ROOT))


_find = common.find_file


def candidate_folders(root: str | os.PathLike | None) -> list[Path]:
    """Where the IDX files are looked for, in order: ``root``, ``$STREAMCL_DATA``, the Debian location."""
    return [f for r in common.search_roots(root, DEBIAN_ROOT)
            for f in (r, r / "FashionMNIST" / "raw", r / "fashion-mnist")]


def fashion_mnist(root: str | os.PathLike | None = None, *, flatten: bool = True, normalize: bool = True,
                  download: bool = True) -> tuple[TensorData, TensorData]:
    """Train (60,000) and test (10,000) sets as :class:`TensorData`.

    Inputs are pixels / 255, normalised with mean 0.2860 and std 0.3530 when ``normalize``, and
    flattened to 784 when ``flatten`` (else 1x28x28). Raises :class:`DatasetNotFound` saying how
    to get the data when no copy is found and the download fails.
    """
    folders = candidate_folders(root)
    for folder in folders:
        paths = {split: [_find(folder, s) for s in stems] for split, stems in FILES.items()}
        if all(p is not None for ps in paths.values() for p in ps):
            return _load(tuple(p.resolve() for s in ("train", "test") for p in paths[s]), flatten, normalize)
    if download:
        data = _download(root)
        if data is not None:
            return tuple(_to_tensors_arrays(x, y, flatten, normalize) for x, y in data)  # type: ignore
    raise DatasetNotFound(HOW_TO_GET.format(debian=DEBIAN_ROOT, looked=", ".join(map(str, folders))))


@lru_cache(maxsize=4)
def _load(paths: tuple[Path, ...], flatten: bool, normalize: bool) -> tuple[TensorData, TensorData]:
    """Parsed once per process: every stream builder copies what it takes, so sharing is safe."""
    tr_x, tr_y, te_x, te_y = (read_idx(p) for p in paths)
    for images, labels, files in ((tr_x, tr_y, paths[:2]), (te_x, te_y, paths[2:])):
        if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise DataError(CORRUPT.format(path=" or ".join(map(str, files)), debian=DEBIAN_ROOT,
                                           why=f"images of shape {images.shape}, labels of shape {labels.shape}"))
    return _to_tensors_arrays(tr_x, tr_y, flatten, normalize), _to_tensors_arrays(te_x, te_y, flatten, normalize)


def _to_tensors_arrays(images: np.ndarray, labels: np.ndarray, flatten: bool, normalize: bool) -> TensorData:
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)
    if normalize:
        x.sub_(MEAN).div_(STD)
    x = x.reshape(len(x), -1) if flatten else x.reshape(len(x), 1, 28, 28)
    return TensorData(x, torch.from_numpy(np.array(labels, dtype=np.int64)))


def _download(root) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """torchvision's download into ``root`` (or ``$STREAMCL_DATA``, or ~/.cache/streamcl); None on failure."""
    target = common.download_root(root)
    try:
        from torchvision.datasets import FashionMNIST
        sets = [FashionMNIST(str(target), train=t, download=True) for t in (True, False)]
    except Exception:  # no internet, no write access: fall through to the message
        return None
    return [(s.data.numpy(), s.targets.numpy()) for s in sets]
