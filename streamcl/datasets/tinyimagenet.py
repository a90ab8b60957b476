"""Tiny ImageNet (Le & Yang 2015; 200 classes, 64x64) from the ``tiny-imagenet-200`` folder, as uint8 tensors.

Label k is the k-th WordNet id in sorted order (the order of torchvision's ImageFolder on ``train/``, which
PyCIL-based Tiny-ImageNet loaders use); the labelled validation set (50 per class) is the test set.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from torch.utils.data import Dataset

from streamcl.datasets import common
from streamcl.datasets.image_folder import ImageFiles, decode_all
from streamcl.errors import DataError, DatasetNotFound

# per-channel mean and std of the 100,000 training images in [0, 1] units
MEAN, STD = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)
FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
HOW_TO_GET = (
    "Tiny ImageNet was not found{failed}. Get it one of these ways:\n"
    "  * with internet access: streamcl downloads and unpacks {url} itself (download=True, through torchvision's "
    "download_and_extract_archive)\n"
    "  * unpack that archive yourself and point STREAMCL_DATA (or root=...) at the folder holding {folder}/\n"
    "Looked for {expected}"
)


def tiny_imagenet(root: str | os.PathLike | None = None, *, download: bool = True, in_memory: bool = True
                  ) -> tuple[Dataset, Dataset, list[str]]:
    """Train (100,000) and test (the 10,000 validation images) sets and the class WordNet ids, from
    ``<root>/tiny-imagenet-200/`` (``wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` with
    ``val/val_annotations.txt``). Images are uint8 ``(3, 64, 64)``: decoded once into :class:`TensorData`
    (``in_memory``, 1.2 GB), else read per item (:class:`ImageFiles`)."""
    candidates = [f for r in common.search_roots(root) for f in (r / FOLDER, r)]
    for f in candidates:
        if (f / "wnids.txt").is_file() and (f / "train").is_dir() and (f / "val" / "val_annotations.txt").is_file():
            train, test, wnids = _files(f.resolve())
            return (decode_all(train) if in_memory else train, decode_all(test) if in_memory else test, wnids)
    failed = ""
    if download:
        target = common.download_root(root)
        try:
            from torchvision.datasets.utils import download_and_extract_archive
            download_and_extract_archive(URL, str(target))
        except Exception as err:  # no internet, no write access: say so in the message
            failed = f" and the download into {target} failed ({type(err).__name__}: {err})"
        else:
            return tiny_imagenet(target, download=False, in_memory=in_memory)
    expected = " or ".join(str(r / FOLDER / "wnids.txt") for r in common.search_roots(root)) or \
        f"<root>/{FOLDER}/wnids.txt (no root given and STREAMCL_DATA is not set)"
    raise DatasetNotFound(HOW_TO_GET.format(failed=failed, url=URL, folder=FOLDER, expected=expected))


@lru_cache(maxsize=1)
def _files(folder: Path) -> tuple[ImageFiles, ImageFiles, list[str]]:
    wnids = sorted({w.strip() for w in (folder / "wnids.txt").read_text().split() if w.strip()})
    label = {w: k for k, w in enumerate(wnids)}
    paths, labels = [], []
    for w in wnids:
        found = sorted(p for p in (folder / "train" / w).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        paths += found
        labels += [label[w]] * len(found)
    if not paths:
        raise DataError(f"{folder / 'train'} holds no images under <wnid>/images/ for the ids of wnids.txt")
    val_paths, val_labels = [], []
    annotations = folder / "val" / "val_annotations.txt"
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2 or parts[1] not in label:
            raise DataError(f"{annotations}, line {n}: expected '<file>\\t<wnid of wnids.txt>\\t...', got {line!r}")
        val_paths.append(folder / "val" / "images" / parts[0])
        val_labels.append(label[parts[1]])
    return ImageFiles(paths, labels, 64), ImageFiles(val_paths, val_labels, 64), wnids
