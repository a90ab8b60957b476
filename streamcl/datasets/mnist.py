"""MNIST (LeCun et al. 1998) as uint8 tensors, from local IDX files or torchvision's download."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from streamcl.datasets import common
from streamcl.errors import DataError, DatasetNotFound
from streamcl.scenarios.data import TensorData

# per-channel statistics of the 60,000 training images in [0, 1] units (PyTorch's MNIST example, Avalanche, FACIL)
MEAN, STD = (0.1307,), (0.3081,)
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
HOW_TO_GET = (
    "MNIST was not found{failed}. Get it one of these ways:\n"
    "  * with internet access: torchvision.datasets.MNIST(root, download=True) (streamcl does this itself with "
    "download=True), or the four files from https://ossci-datasets.s3.amazonaws.com/mnist/\n"
    "  * point STREAMCL_DATA (or root=...) at a folder holding the four IDX files "
    "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...), or a torchvision root with MNIST/raw/\n"
    "Looked for {expected}"
)


def candidate_folders(root: str | os.PathLike | None) -> list[Path]:
    """Where the IDX files are looked for, in order: ``root``, ``$STREAMCL_DATA``, each as a plain folder, a
    torchvision root (``MNIST/raw``) or holding ``mnist/``."""
    return [f for r in common.search_roots(root) for f in (r, r / "MNIST" / "raw", r / "mnist")]


def mnist(root: str | os.PathLike | None = None, *, download: bool = True) -> tuple[TensorData, TensorData]:
    """Train (60,000) and test (10,000) sets as :class:`TensorData` of uint8 images ``(N, 1, 28, 28)`` and
    int64 labels; :data:`MEAN` and :data:`STD` normalise them once divided by 255. Raises
    :class:`DatasetNotFound` naming the files looked for and how to get them when no copy is found and the
    download fails (or ``download`` is false)."""
    folders = candidate_folders(root)
    for folder in folders:
        paths = [common.find_file(folder, s) for split in ("train", "test") for s in FILES[split]]
        if all(p is not None for p in paths):
            return _load(tuple(p.resolve() for p in paths))
    failed = ""
    if download:
        target = common.download_root(root)
        try:
            from torchvision.datasets import MNIST
            for train in (True, False):
                MNIST(str(target), train=train, download=True)
        except Exception as err:  # no internet, no write access: say so in the message
            failed = f" and the download into {target} failed ({type(err).__name__}: {err})"
        else:
            return mnist(target, download=False)
    expected = " or ".join(str(f / (FILES["train"][0] + "[.gz]")) for f in folders) or "(no folder: give root)"
    raise DatasetNotFound(HOW_TO_GET.format(failed=failed, expected=expected))


@lru_cache(maxsize=2)
def _load(paths: tuple[Path, ...]) -> tuple[TensorData, TensorData]:
    """Parsed once per process: stream builders copy what they take."""
    tr_x, tr_y, te_x, te_y = (common.read_idx(p) for p in paths)
    for x, y, files in ((tr_x, tr_y, paths[:2]), (te_x, te_y, paths[2:])):
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != x.shape[:1]:
            raise DataError(common.DAMAGED.format(path=" or ".join(map(str, files)),
                                                  why=f"images of shape {x.shape}, labels of shape {y.shape}"))
    return tuple(TensorData(torch.from_numpy(np.array(x)).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
                 for x, y in ((tr_x, tr_y), (te_x, te_y)))
