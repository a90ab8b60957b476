"""What every dataset loader shares: where files are looked for, IDX files, a pickle reader that runs no code."""
from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from streamcl.errors import DataError

DAMAGED = "{path} is damaged ({why}). Get a good copy: delete it, and streamcl looks in the other places or " \
          "downloads it again"


def search_roots(root: str | os.PathLike | None, *extra: Path) -> list[Path]:
    """The folders a dataset is looked for under, in order: ``root``, ``$STREAMCL_DATA``, then ``extra``."""
    return [Path(r) for r in (root, os.environ.get("STREAMCL_DATA")) if r] + list(extra)


def download_root(root: str | os.PathLike | None) -> Path:
    """Where a download goes: ``root``, else ``$STREAMCL_DATA``, else ``~/.cache/streamcl``."""
    return Path(root or os.environ.get("STREAMCL_DATA") or Path.home() / ".cache" / "streamcl")


def find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem.gz`` or ``folder/stem``, whichever is a file (the gzipped one first)."""
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path, damaged: Callable[[object, str], str] | None = None) -> np.ndarray:
    """An IDX file (LeCun et al.'s MNIST format, optionally gzipped) as a numpy array of its declared shape;
    :class:`DataError` naming the file when it is truncated or garbled (``damaged(path, why)`` words it)."""
    damaged = damaged or (lambda p, why: DAMAGED.format(path=p, why=why))
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(damaged(path, f"{type(err).__name__}: {err}")) from None
    ndim = raw[3] if len(raw) >= 4 else 0
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\0\0\x08":
        raise DataError(damaged(path, "not an unsigned-byte IDX file"))
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - 4 - 4 * ndim != np.prod(shape, dtype=np.int64):
        raise DataError(damaged(path, f"{len(raw) - 4 - 4 * ndim} bytes of data for shape {shape}"))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _numpy_core():
    return getattr(np, "_core", None) or np.core


def _allowed() -> dict[tuple[str, str], object]:
    """What a pickled dict of numpy arrays, lists, ints and strings refers to by name (protocols 2 to 5, pickled
    by numpy 1 or 2, in Python 2 or 3), each mapped to the object itself: nothing else is ever imported."""
    core = _numpy_core()
    reconstruct, frombuffer = core.multiarray._reconstruct, core.numeric._frombuffer
    import _codecs
    return {("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy.core.numeric", "_frombuffer"): frombuffer,
            ("numpy._core.numeric", "_frombuffer"): frombuffer,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _codecs.encode}  # how Python 3 writes bytes at protocol 2


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = _allowed().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a data file never holds")
        return found


def load_pickle(path: Path, what: str, hint: str = "") -> object:
    """Unpickle ``path`` with an allow-list of exactly what data pickles hold (dicts, lists, strings, bytes,
    numbers, numpy arrays and dtypes), so a crafted file cannot run code; Python 2 strings are read as
    latin-1, as the CIFAR files need. :class:`DataError` naming the file when it is damaged or crafted."""
    try:
        with open(path, "rb") as f:
            return _Restricted(f, encoding="latin1").load()
    except Exception as err:  # every unpickling failure is a bad file: name it, whatever pickle raised
        raise DataError(f"{path} is not a {what} file streamcl can read ({type(err).__name__}: {err}). "
                        f"Delete it and get the original again{hint}") from None
