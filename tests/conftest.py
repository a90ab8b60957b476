"""The tests' shared harness: core sharing under pytest-xdist, and the five kinds of model users bring.

Without the first, torch starts one thread per core in every worker, and two workers on two cores run
four threads that slow each other down. ``USER_MODELS`` are the models every plugin and recipe is run
on (tests/test_any_model.py): streamcl's MLP, a plain ``nn.Sequential``, torchvision's ResNet-18 with a
1-channel first convolution, a timm VisionTransformer (``forward_features`` / ``forward_head``) and streamcl's
resnet32 (the class-incremental literature's CIFAR ResNet, at width 8).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

from streamcl.scenarios import TensorData, class_incremental


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def image_blobs(n_per_class: int = 8, n_classes: int = 4, seed: int = 0) -> TensorData:
    """1x28x28 images: class c is a bright 7x7 square at its own place of a 4x4 grid, on unit noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), 1, 28, 28, generator=g) * 0.5
    for c in range(n_classes):
        r, k = divmod(c % 16, 4)
        x[y == c, :, 7 * r:7 * r + 7, 7 * k:7 * k + 7] += 2.0
    return TensorData(x, y)


def image_benchmark(n_classes: int = 4, n_experiences: int = 2, n_per_class: int = 8, **kwargs):
    """A tiny class-incremental stream of :func:`image_blobs` (test set: 4 images per class)."""
    return class_incremental(image_blobs(n_per_class, n_classes), image_blobs(4, n_classes, seed=1),
                             n_experiences, **kwargs)


def rgb_benchmark(side: int = 224, per_class: int = 2):
    """Two experiences of two classes of 3 x side x side images (class c: a bright quadrant c on noise)."""
    def images(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(4).repeat_interleave(n)
        x = torch.randn(len(y), 3, side, side, generator=g) * 0.5
        h = side // 2
        for c in range(4):
            x[y == c, :, (c // 2) * h:(c // 2 + 1) * h, (c % 2) * h:(c % 2 + 1) * h] += 1.0
        return TensorData(x, y)
    return class_incremental(images(per_class, 0), images(1, 1), 2)


def sequential(n_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, n_classes))


def resnet18(n_classes: int = 10) -> nn.Module:
    import torchvision
    model = torchvision.models.resnet18(num_classes=n_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def vit(n_classes: int = 10) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=n_classes, embed_dim=32, depth=1,
                             num_heads=2, mlp_ratio=2.0)


def mlp(n_classes: int = 10) -> nn.Module:
    from streamcl.models import MLP
    return MLP(784, [32], n_classes)


def resnet32(n_classes: int = 10) -> nn.Module:
    """streamcl's resnet32 (He et al. 2016's CIFAR ResNet: 32 layers, option A shortcuts) on 1x28x28 images, at
    width 8 (8/16/32 channels, 32 features): width 16 costs the generic tests ~40 s of one core, 8 about 27 s."""
    from streamcl.models import build
    return build("resnet32", n_classes, (1, 28, 28), width=8)


class NoHead(nn.Module):
    """A model whose only linear layer is not named as a head: the engine finds no classifier head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 6)

    def forward(self, x):
        return self.body(x)


USER_MODELS = {"mlp": mlp, "sequential": sequential, "resnet18": resnet18, "vit": vit, "resnet32": resnet32}


class ItemDataset(torch.utils.data.Dataset):
    """A user's map-style dataset in torchvision's manner: items ``(transform(x), target_transform(y))``,
    stored labels in ``targets`` (no task label), read one at a time through a DataLoader."""

    def __init__(self, data: TensorData, transform=None, target_transform=None):
        self.x, self.targets = data.x, data.y.tolist()
        self.transform, self.target_transform = transform, target_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x, y = self.x[i], self.targets[i]
        return (x if self.transform is None else self.transform(x),
                y if self.target_transform is None else self.target_transform(y))


def jitter(x: torch.Tensor) -> torch.Tensor:
    """A random transform drawing from torch's global generator, as torchvision's do."""
    return x + 0.5 * torch.randn_like(x)


# ----------------------------------------------------------------------------- dataset files in their real formats
def cifar_rows(n: int, offset: int = 0):
    """``n`` CIFAR rows of 3072 bytes (1024 red, 1024 green, 1024 blue, each 32x32 row-major): byte p of row i
    is ``(i + offset + p) % 256``, so every pixel can be checked exactly."""
    import numpy as np
    return ((np.arange(n)[:, None] + offset + np.arange(3072)[None, :]) % 256).astype(np.uint8)


def write_cifar(root, n_classes: int = 100, per_class: int = 2, test_per_class: int = 1, protocol: int = 2):
    """CIFAR-10 (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``) or CIFAR-100 (``cifar-100-python/
    train``, ``test``) files under ``root`` as the originals hold them: pickled dicts with ``data`` (uint8 rows,
    :func:`cifar_rows`) and the labels as a list (training row i: class ``i % n_classes``; test rows offset by
    1000). Returns ``root``."""
    import pickle
    from pathlib import Path

    import numpy as np
    root = Path(root)
    n_train, n_test = n_classes * per_class, n_classes * test_per_class
    train = {"x": cifar_rows(n_train), "y": [i % n_classes for i in range(n_train)]}
    test = {"x": cifar_rows(n_test, 1000), "y": [i % n_classes for i in range(n_test)]}
    if n_classes == 100:
        folder, key = root / "cifar-100-python", "fine_labels"
        files = {"train": (train, slice(None)), "test": (test, slice(None))}
    else:
        folder, key = root / "cifar-10-batches-py", "labels"
        cuts = np.array_split(np.arange(n_train), 5)
        files = {f"data_batch_{k + 1}": (train, slice(int(c[0]), int(c[-1]) + 1)) for k, c in enumerate(cuts)}
        files["test_batch"] = (test, slice(None))
    folder.mkdir(parents=True, exist_ok=True)
    for name, (part, rows) in files.items():
        batch = {"batch_label": f"{name} of a test copy", key: part["y"][rows], "data": part["x"][rows],
                 "filenames": [f"img_{i}.png" for i in range(len(part["y"]))][rows]}
        if n_classes == 100:
            batch["coarse_labels"] = [y // 5 for y in batch[key]]
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return root


def write_idx(path, array) -> None:
    """An IDX file (gzipped when ``path`` ends in .gz) holding uint8 ``array``."""
    import gzip
    import struct
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.astype("uint8").tobytes())


def write_mnist(folder, n_train: int = 20, n_test: int = 10, gz: bool = True):
    """The four MNIST IDX files in ``folder``: image i is filled with value ``i``, its label ``i % 10``."""
    import numpy as np
    from pathlib import Path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    end = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte{end}", np.arange(n)[:, None, None] * np.ones((1, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte{end}", np.arange(n) % 10)
    return folder


def colour(k: int) -> tuple[int, int, int]:
    """A distinct flat RGB colour for class (or image) ``k``."""
    return (40 * k % 256, 255 - 30 * k % 256, 60 + 50 * k % 196)


def write_image(path, rgb: tuple[int, int, int], size: tuple[int, int] = (64, 64), mode: str = "RGB") -> None:
    """A flat-coloured image file (its format from the suffix: .png, .jpg, .JPEG)."""
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, rgb)
    (img.convert("L") if mode == "L" else img).save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg")
                                                    else "PNG", **({"quality": 100} if path.suffix != ".png" else {}))


def write_tiny_imagenet(root, wnids=("n03", "n01", "n02"), per_class: int = 2, val_per_class: int = 1):
    """A ``tiny-imagenet-200`` folder: ``wnids.txt`` (unsorted, as the real one), ``train/<wnid>/images/*.JPEG``,
    ``val/images/*.JPEG`` and ``val/val_annotations.txt``; every image of the k-th sorted wnid is flat
    :func:`colour` (k). Returns ``root``."""
    from pathlib import Path
    root = Path(root)
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines, v = [], 0
    for k, w in enumerate(sorted(wnids)):
        for i in range(per_class):
            write_image(base / "train" / w / "images" / f"{w}_{i}.JPEG", colour(k))
        for _ in range(val_per_class):
            write_image(base / "val" / "images" / f"val_{v}.JPEG", colour(k))
            lines.append(f"val_{v}.JPEG\t{w}\t0\t0\t63\t63")
            v += 1
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


@contextmanager
def installed_package(src, dist: str, module: str, source: str, group: str, entries: dict[str, str],
                      version: str = "0.1.0"):
    """A third party's package, really pip-installed for the block: ``module`` (``source``) registering ``entries``
    (entry-point name -> ``module:object``) under the entry-point ``group``; uninstalled after. The registry's
    cached lists are cleared on both sides."""
    import importlib
    import subprocess
    import sys
    import textwrap

    from streamcl import registry

    def pip(*args: str) -> None:
        cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"

    def clear() -> None:
        importlib.invalidate_caches()
        for listing in (registry.available_plugins, registry.available_models, registry.available_benchmarks):
            listing.cache_clear()

    (src / f"{module}.py").write_text(source)
    lines = "\n".join(f'{name} = "{target}"' for name, target in entries.items())
    (src / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "{version}"
        dependencies = ["streamcl"]

        [tool.setuptools]
        py-modules = ["{module}"]

        [project.entry-points."{group}"]
        """) + lines + "\n")
    pip("install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(src))
    clear()
    try:
        yield
    finally:
        pip("uninstall", "--quiet", "-y", dist)
        sys.modules.pop(module, None)
        clear()


def warns_once_when_no_class_is_new(strategy, bench, match: str) -> None:
    """Train experiences 0 and 1 (no RuntimeWarning), experience 1 again as a domain-incremental stream brings its
    classes (one RuntimeWarning matching ``match``), then experience 0 again (none: the warning comes once)."""
    import warnings

    import pytest
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        strategy.train(bench.train_stream[0])
        strategy.train(bench.train_stream[1])
    with pytest.warns(RuntimeWarning, match=match):
        strategy.train(bench.train_stream[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        strategy.train(bench.train_stream[0])
