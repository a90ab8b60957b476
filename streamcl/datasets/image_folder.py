"""Image files as uint8 tensors: a class-per-folder dataset (ImageNet-R and the like) and CUB-200-2011.

:class:`ImageFiles` decodes one file per item with PIL (the DataLoader path, workers welcome);
:func:`decode_all` decodes every file once into :class:`TensorData` (the tensor fast path), when it fits.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from streamcl.datasets import common
from streamcl.errors import DataError, DatasetNotFound
from streamcl.scenarios.data import TensorData

EXTENSIONS = (".png", ".jpg", ".jpeg")
# ImageNet's per-channel statistics in [0, 1] units (torchvision's pre-trained models)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CUB_URL = "https://data.caltech.edu/records/65de6-vzs50 (CUB_200_2011.tgz)"


def read_image(path: Path, size: int | tuple[int, int] | None, center_crop: bool = False) -> Tensor:
    """One image file as a uint8 ``(3, H, W)`` tensor, converted to RGB; resized (bilinear) to ``size``
    (an int: square) unless it already has that size, or with ``center_crop`` its shorter side resized to
    ``size`` and the centre cut out. :class:`DataError` naming the file when PIL cannot decode it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{path} cannot be decoded as an image ({type(err).__name__}: {err}); "
                        "delete it or replace it with a good copy") from None
    if size is not None:
        w, h = (size, size) if isinstance(size, int) else (size[1], size[0])
        if center_crop:
            scale = max(w / img.width, h / img.height)
            img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                             Image.Resampling.BILINEAR)
            left, top = (img.width - w) // 2, (img.height - h) // 2
            img = img.crop((left, top, left + w, top + h))
        elif img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class ImageFiles(Dataset):
    """Images read from ``paths`` one at a time: items ``(uint8 (3, size, size) tensor, label)``; labels in
    ``targets``. Decoding happens in ``__getitem__``, so a DataLoader's workers share it."""

    def __init__(self, paths: Sequence[Path], targets: Sequence[int], image_size: int | None = 224,
                 center_crop: bool = False):
        if len(paths) != len(targets):
            raise DataError(f"{len(paths)} image files but {len(targets)} labels")
        self.paths = [Path(p) for p in paths]
        self.targets = torch.as_tensor(list(targets), dtype=torch.long)
        self.image_size, self.center_crop = image_size, center_crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return read_image(self.paths[i], self.image_size, self.center_crop), self.targets[i]


def decode_all(files: ImageFiles, workers: int | None = None) -> TensorData:
    """Every image of ``files`` decoded once (in threads: PIL decodes without the GIL) into :class:`TensorData`."""
    if not len(files):
        raise DataError("no image files to decode")
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        images = list(pool.map(files.__getitem__, range(len(files))))
    shapes = {tuple(x.shape) for x, _ in images}
    if len(shapes) > 1:
        raise DataError(f"the images have different sizes {sorted(shapes)[:3]}; give image_size to resize them")
    return TensorData(torch.stack([x for x, _ in images]), files.targets.clone())


def class_folders(folder: Path) -> list[str]:
    """The sub-folders of ``folder`` that hold at least one image, sorted by name (torchvision's ImageFolder)."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and any(_images(d)))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def _listing(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for k, name in enumerate(classes):
        found = _images(folder / name) if (folder / name).is_dir() else []
        paths += found
        labels += [k] * len(found)
    return paths, labels


def image_folder(root: str | os.PathLike, *, train_dir: str = "train", test_dir: str | None = "test",
                 test_fraction: float | None = None, split_seed: int = 0, image_size: int | None = 224,
                 center_crop: bool = False, in_memory: bool = False
                 ) -> tuple[Dataset, Dataset, list[str]]:
    """Train and test sets from ``root/<train_dir>/<class>/*.png|jpg|jpeg`` and ``root/<test_dir>/<class>/...``,
    and the class names: label k is the k-th class folder of ``train_dir`` in sorted order (torchvision's
    ImageFolder). With ``test_fraction`` (ImageNet-R's 80/20 split in L2P, Wang et al. 2022, and CODA-Prompt,
    Smith et al. 2023, is 0.2) one folder is split instead (``root/<train_dir>`` or, when absent, ``root``):
    of each class's sorted files, a share ``test_fraction`` drawn with ``split_seed`` goes to the test set.
    Images are resized to ``image_size`` square (see :func:`read_image`), kept uint8 ``(3, H, W)``: read per
    item (:class:`ImageFiles`), or all decoded at once into :class:`TensorData` with ``in_memory``."""
    root = Path(root)
    train_folder = root / train_dir
    if test_fraction is not None:
        folder = train_folder if train_folder.is_dir() else root
        parts = _split(folder, test_fraction, split_seed)
        classes = class_folders(folder)
    else:
        if test_dir is None:
            raise DataError("give test_dir (a folder of class folders) or test_fraction (to split one folder)")
        test_folder = root / test_dir
        if not train_folder.is_dir() or not test_folder.is_dir() or not class_folders(train_folder):
            raise DatasetNotFound(f"image folder not found: expected {train_folder}/<class>/*.png|jpg|jpeg and "
                                  f"{test_folder}/<class>/... Give root, train_dir and test_dir, or test_fraction "
                                  "to split one folder")
        classes = class_folders(train_folder)
        extra = sorted(set(class_folders(test_folder)) - set(classes))
        if extra:
            raise DataError(f"{test_folder} has classes that {train_folder} lacks: {', '.join(extra[:5])}")
        parts = [_listing(train_folder, classes), _listing(test_folder, classes)]
    sets = [ImageFiles(p, y, image_size, center_crop) for p, y in parts]
    return (*(decode_all(s) if in_memory else s for s in sets), classes)  # type: ignore[return-value]


def cub200(root: str | os.PathLike | None = None, *, image_size: int | None = 224, center_crop: bool = False,
           in_memory: bool = False) -> tuple[Dataset, Dataset, list[str]]:
    """CUB-200-2011 (Wah et al. 2011) in its official layout: ``CUB_200_2011/images.txt`` (``<id> <path>``),
    ``image_class_labels.txt`` (``<id> <class 1-200>``), ``train_test_split.txt`` (``<id> <1 train, 0 test>``)
    and ``images/``; the official split (5,994 / 5,794 images), label = class - 1. Images as in
    :func:`image_folder`."""
    names = ("images.txt", "image_class_labels.txt", "train_test_split.txt")
    roots = common.search_roots(root)
    found = next((f for r in roots for f in (r / "CUB_200_2011", r) if all((f / n).is_file() for n in names)), None)
    if found is None:
        expected = " or ".join(str(r / "CUB_200_2011" / names[0]) for r in roots) or \
            "<root>/CUB_200_2011/images.txt (no root given and STREAMCL_DATA is not set)"
        raise DatasetNotFound(f"CUB-200-2011 was not found. Download it from {CUB_URL}, unpack it into root, and "
                              f"give root= or STREAMCL_DATA. Looked for {expected}")
    table = [_pairs(found / n) for n in names]
    paths, labels, is_train = table[0], table[1], table[2]
    if not (paths.keys() == labels.keys() == is_train.keys()):
        raise DataError(f"{found}: images.txt, image_class_labels.txt and train_test_split.txt list different ids")
    classes_file = found / "classes.txt"
    ids = sorted(paths, key=int)
    y = {i: int(labels[i]) - 1 for i in ids}
    n_classes = max(y.values()) + 1
    classes = [line.split(maxsplit=1)[1] for line in classes_file.read_text().splitlines() if line.strip()] \
        if classes_file.is_file() else [str(c) for c in range(n_classes)]
    sets = [ImageFiles([found / "images" / paths[i] for i in ids if is_train[i] == flag],
                       [y[i] for i in ids if is_train[i] == flag], image_size, center_crop) for flag in ("1", "0")]
    return (*(decode_all(s) if in_memory else s for s in sets), classes)  # type: ignore[return-value]


def _split(folder: Path, fraction: float, seed: int) -> list[tuple[list[Path], list[int]]]:
    """The files of ``folder``'s class folders cut into train and test: of each class, a share ``fraction``
    drawn with ``seed`` is test."""
    if not 0 < fraction < 1:
        raise DataError(f"test_fraction = {fraction!r} must lie between 0 and 1")
    if not folder.is_dir() or not class_folders(folder):
        raise DatasetNotFound(f"no class folders with images (<class>/*.png|jpg|jpeg) in {folder}; give root "
                              "the folder holding one sub-folder per class")
    paths, labels = _listing(folder, class_folders(folder))
    y = torch.tensor(labels)
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(paths), dtype=torch.bool)
    for k in y.unique().tolist():
        idx = torch.nonzero(y == k).flatten()
        test[idx[torch.randperm(len(idx), generator=g)[:round(len(idx) * fraction)]]] = True
    return [([paths[i] for i in torch.nonzero(m).flatten().tolist()], y[m].tolist()) for m in (~test, test)]


def _pairs(path: Path) -> dict[str, str]:
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise DataError(f"{path}, line {n}: expected '<id> <value>', got {line!r}")
            out[parts[0]] = parts[1].strip()
    return out
