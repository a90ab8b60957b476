"""The benchmarks of the literature by name, each registered under the entry-point group ``streamcl.benchmarks``.

Every function returns a :class:`Benchmark` and takes keyword arguments only (after ``root``). The split
benchmarks share: ``n_experiences`` and ``classes_per_exp`` (an int, or a list of ints for experiences of
unequal sizes; with neither, the literature's split named in each docstring), ``first_exp_classes`` (the
"B50" first experience), ``class_order`` (wins over ``class_seed``), ``class_seed`` (the order
``numpy.random.RandomState(class_seed).permutation(n_classes)``, as PyCIL, Zhou et al. 2023, draws it with
``np.random.seed``; None: label order), ``scenario`` ("class", or "task": experience i is task i at train and
test time) and ``train_range`` (training images ``first .. end-1`` only). ``download`` lets torchvision fetch
a missing dataset. Images stay uint8 (N, C, H, W); ``info["mean"]``/``info["std"]`` give the per-channel
statistics in [0, 1] units, with which the runner normalises ``x / 255``. Fashion-MNIST's benchmarks are the
exception: their inputs are already normalised floats, as SFM-5 and PFM-5 have always been (no mean/std).
``scenarios`` on each function lists the scenarios it takes (the config's check).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from streamcl.errors import DataError
from streamcl.scenarios.builders import class_incremental, domain_incremental
from streamcl.scenarios.data import TensorData
from streamcl.scenarios.stream import Benchmark

PYCIL_SEED = 1993  # PyCIL's (and iCaRL's) seed of the class order: configs "seed": [1993], "shuffle": true

Split = Callable[..., Benchmark]


def scenarios(*names: str) -> Callable[[Split], Split]:
    """Mark a benchmark function with the scenarios it takes (read by the config check)."""
    def mark(fn: Split) -> Split:
        fn.scenarios = names  # type: ignore[attr-defined]
        return fn
    return mark


def seeded_order(n_classes: int, seed: int | None) -> list[int]:
    """Label order for ``None``, else ``np.random.RandomState(seed).permutation(n_classes)``: PyCIL's
    ``np.random.seed(seed); np.random.permutation(n)`` without touching numpy's global generator. With
    seed 1993 and 100 classes this is the CIFAR-100 order of PyCIL and of FACIL's ``cifar100_icarl``
    (68, 56, 78, 8, 23, ...)."""
    if seed is None:
        return list(range(n_classes))
    return np.random.RandomState(seed % 2**32).permutation(n_classes).tolist()


def take_range(train: Dataset, span: Sequence[int] | None, name: str) -> Dataset:
    """Training samples ``first .. end-1`` of ``train`` (``train_range``), in dataset order."""
    if span is None:
        return train
    if len(span) != 2 or not 0 <= span[0] < span[1]:
        raise DataError(f"train_range = {list(span)!r} must be [first, end] training images, 0 <= first < end")
    first, end = span
    if end > len(train):
        raise DataError(f"train_range = {list(span)}: {name} has {len(train)} training images")
    if isinstance(train, TensorData):
        return TensorData(train.x[first:end], train.y[first:end], train.t[first:end])
    part = Subset(train, range(first, end))
    part.targets = torch.as_tensor(train.targets)[first:end]  # type: ignore[attr-defined]
    return part


def split(train: Dataset, test: Dataset, *, name: str, n_classes: int, default_per_exp: int,
          n_experiences: int | None, scenario: str, class_order: Sequence[int] | None, class_seed: int | None,
          classes_per_exp: int | Sequence[int] | None, first_exp_classes: int | None,
          train_range: Sequence[int] | None, info: dict, torch_seed: bool = False) -> Benchmark:
    """The class-incremental (or, with scenario "task", task-incremental) split that the functions below share."""
    if scenario not in ("class", "task"):
        raise DataError(f"{name} takes scenario 'class' or 'task', not {scenario!r}")
    train = take_range(train, train_range, name)
    if n_experiences is None and classes_per_exp is None:
        classes_per_exp = default_per_exp
    order, seed = class_order, None
    if order is None and class_seed is not None:
        order, seed = (None, class_seed) if torch_seed else (seeded_order(n_classes, class_seed), None)
    bench = class_incremental(train, test, n_experiences, classes_per_exp=classes_per_exp, class_order=order,
                              seed=seed, first_exp_classes=first_exp_classes, task_labels=scenario == "task")
    bench.info.update(info, benchmark=name)
    return bench


def _permuted(train: TensorData, test: TensorData, n_experiences: int, perms: list[Tensor | None],
              split_data: bool, task_labels: bool, name: str, info: dict) -> Benchmark:
    most = min(len(train), len(test)) if split_data else n_experiences
    if not 0 < n_experiences <= most:
        raise DataError(f"n_experiences = {n_experiences}: {name} cuts its {len(train)} training and {len(test)} "
                        f"test images into n_experiences parts; give 1 to {most}")

    def transform(k: int, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        return (flat if perms[k] is None else flat[:, perms[k]]).reshape(x.shape)

    bench = domain_incremental(train, test, n_experiences, transform, split=split_data, task_labels=task_labels)
    bench.info.update(info, benchmark=name)
    return bench


# ------------------------------------------------------------------------------------------ MNIST, Fashion-MNIST
@scenarios("class", "task")
def split_mnist(root: str | os.PathLike | None = None, *, n_experiences: int | None = None, scenario: str = "class",
                class_order: Sequence[int] | None = None, class_seed: int | None = None,
                classes_per_exp: int | Sequence[int] | None = None, first_exp_classes: int | None = None,
                train_range: Sequence[int] | None = None, download: bool = True) -> Benchmark:
    """Split MNIST: 5 experiences of 2 digits in label order, (0, 1), (2, 3), ... (Zenke et al. 2017; Hsu et
    al. 2018; van de Ven & Tolias 2019). Inputs uint8 (N, 1, 28, 28)."""
    from streamcl.datasets.mnist import MEAN, STD, mnist

    train, test = mnist(root, download=download)
    return split(train, test, name="split_mnist", n_classes=10, default_per_exp=2, n_experiences=n_experiences,
                 scenario=scenario, class_order=class_order, class_seed=class_seed, classes_per_exp=classes_per_exp,
                 first_exp_classes=first_exp_classes, train_range=train_range, info={"mean": MEAN, "std": STD})


@scenarios("domain")
def permuted_mnist(root: str | os.PathLike | None = None, *, n_experiences: int = 10, scenario: str = "domain",
                   task_labels: bool = False, permutation_seed: int = 0, keep_first: bool = False,
                   split_data: bool = False, train_range: Sequence[int] | None = None,
                   download: bool = True) -> Benchmark:
    """Permuted MNIST (Goodfellow et al. 2014; Kirkpatrick et al. 2017): 10 experiences, as Hsu et al. 2018 and
    van de Ven & Tolias 2019 run it, each the whole training and test set under its own fixed pixel
    permutation. Permutation k is the k-th draw of ``np.random.RandomState(permutation_seed).permutation(784)``, every
    experience permuted, as Avalanche's ``PermutedMNIST(seed=...)``; ``keep_first`` leaves experience 0 the
    original digits and draws the others in turn (van de Ven et al.'s ``exception``). ``split_data`` cuts the
    data into disjoint chunks instead, for smaller experiences (GEM, Lopez-Paz & Ranzato 2017, trains on
    1,000 samples per task; ``train_range`` picks fewer training images).
    ``task_labels``: experience k is task k at train and test time. Inputs uint8 (N, 1, 28, 28)."""
    from streamcl.datasets.mnist import MEAN, STD, mnist

    if scenario != "domain":
        raise DataError(f"permuted_mnist is domain-incremental (scenario 'domain'), not {scenario!r}; "
                        "task_labels=True gives its experiences task labels")
    train, test = mnist(root, download=download)
    train = take_range(train, train_range, "permuted_mnist")
    rng = np.random.RandomState(permutation_seed % 2**32)
    perms = [None if keep_first and k == 0 else torch.from_numpy(rng.permutation(784)) for k in range(n_experiences)]
    return _permuted(train, test, n_experiences, perms, split_data, task_labels, "permuted_mnist",
                     {"mean": MEAN, "std": STD, "permutation_seed": permutation_seed})


@scenarios("class", "task")
def split_fmnist(root: str | os.PathLike | None = None, *, n_experiences: int | None = None, scenario: str = "class",
                 class_order: Sequence[int] | None = None, class_seed: int | None = None,
                 classes_per_exp: int | Sequence[int] | None = None, first_exp_classes: int | None = None,
                 train_range: Sequence[int] | None = None, download: bool = True) -> Benchmark:
    """Split Fashion-MNIST, the SFM-5 protocol of docs/protocols.md: 5 experiences of 2 classes in label order,
    exactly the stream of ``benchmark.name = "split-fmnist"`` (inputs flattened normalised floats; ``class_seed``
    draws ``torch.randperm`` as that config key does)."""
    from streamcl.datasets.fmnist import fashion_mnist

    train, test = fashion_mnist(root, download=download)
    return split(train, test, name="split_fmnist", n_classes=10, default_per_exp=2, n_experiences=n_experiences,
                 scenario=scenario, class_order=class_order, class_seed=class_seed, classes_per_exp=classes_per_exp,
                 first_exp_classes=first_exp_classes, train_range=train_range, info={}, torch_seed=True)


@scenarios("domain")
def permuted_fmnist(root: str | os.PathLike | None = None, *, n_experiences: int = 5, scenario: str = "domain",
                    task_labels: bool = False, train_range: Sequence[int] | None = None,
                    download: bool = True) -> Benchmark:
    """Permuted Fashion-MNIST, the PFM-5 protocol of docs/protocols.md: experience k holds the k-th of
    ``n_experiences`` disjoint chunks of the data in dataset order, permuted by ``randperm`` seeded with k
    (experience 0 unpermuted); exactly the stream of ``benchmark.name = "permuted-fmnist"``. Inputs are
    flattened normalised floats."""
    from streamcl.datasets.fmnist import fashion_mnist
    from streamcl.scenarios.builders import pixel_permutation

    if scenario != "domain":
        raise DataError(f"permuted_fmnist is domain-incremental (scenario 'domain'), not {scenario!r}")
    train, test = fashion_mnist(root, download=download)
    train = take_range(train, train_range, "permuted_fmnist")
    perms = [pixel_permutation(k, 784) for k in range(n_experiences)]
    return _permuted(train, test, n_experiences, perms, True, task_labels, "permuted_fmnist", {})


# ------------------------------------------------------------------------------------------ CIFAR, Tiny ImageNet
@scenarios("class", "task")
def split_cifar10(root: str | os.PathLike | None = None, *, n_experiences: int | None = None, scenario: str = "class",
                  class_order: Sequence[int] | None = None, class_seed: int | None = None,
                  classes_per_exp: int | Sequence[int] | None = None, first_exp_classes: int | None = None,
                  train_range: Sequence[int] | None = None, download: bool = True) -> Benchmark:
    """Split CIFAR-10: 5 experiences of 2 classes in label order (Buzzega et al. 2020's Seq-CIFAR-10; van de
    Ven et al. 2022). Inputs uint8 (N, 3, 32, 32)."""
    from streamcl.datasets.cifar import CIFAR10_MEAN, CIFAR10_STD, cifar10

    train, test = cifar10(root, download=download)
    return split(train, test, name="split_cifar10", n_classes=10, default_per_exp=2, n_experiences=n_experiences,
                 scenario=scenario, class_order=class_order, class_seed=class_seed, classes_per_exp=classes_per_exp,
                 first_exp_classes=first_exp_classes, train_range=train_range,
                 info={"mean": CIFAR10_MEAN, "std": CIFAR10_STD})


@scenarios("class", "task")
def split_cifar100(root: str | os.PathLike | None = None, *, n_experiences: int | None = None, scenario: str = "class",
                   class_order: Sequence[int] | None = None, class_seed: int | None = PYCIL_SEED,
                   classes_per_exp: int | Sequence[int] | None = None, first_exp_classes: int | None = None,
                   train_range: Sequence[int] | None = None, download: bool = True) -> Benchmark:
    """Split CIFAR-100 as iCaRL (Rebuffi et al. 2017), PyCIL and FACIL (Masana et al. 2022) run it: the classes in
    PyCIL's order (seed 1993: 68, 56, 78, 8, 23, ...), B0-Inc10 by default (10 experiences of 10 classes);
    ``first_exp_classes=50`` gives B50-Inc10 (50, then 5 x 10), with ``classes_per_exp=5`` B50-Inc5.
    Inputs uint8 (N, 3, 32, 32)."""
    from streamcl.datasets.cifar import CIFAR100_MEAN, CIFAR100_STD, cifar100

    train, test = cifar100(root, download=download)
    return split(train, test, name="split_cifar100", n_classes=100, default_per_exp=10, n_experiences=n_experiences,
                 scenario=scenario, class_order=class_order, class_seed=class_seed, classes_per_exp=classes_per_exp,
                 first_exp_classes=first_exp_classes, train_range=train_range,
                 info={"mean": CIFAR100_MEAN, "std": CIFAR100_STD})


@scenarios("class", "task")
def split_tinyimagenet(root: str | os.PathLike | None = None, *, n_experiences: int | None = None,
                       scenario: str = "class", class_order: Sequence[int] | None = None,
                       class_seed: int | None = PYCIL_SEED, classes_per_exp: int | Sequence[int] | None = None,
                       first_exp_classes: int | None = None, train_range: Sequence[int] | None = None,
                       in_memory: bool = True, download: bool = True) -> Benchmark:
    """Split Tiny ImageNet: 10 experiences of 20 classes (Buzzega et al. 2020's Seq-TinyImageNet; B0-Inc20),
    labels the sorted WordNet ids, the classes in PyCIL's order (``np.random.seed(1993)`` permutation of
    the 200); ``first_exp_classes=100`` gives B100 (then 5 x 20, or 10 x 10 with ``classes_per_exp=10``).
    The validation set is the test set. Inputs uint8 (N, 3, 64, 64); ``in_memory=False`` reads files per item."""
    from streamcl.datasets.tinyimagenet import MEAN, STD, tiny_imagenet

    train, test, wnids = tiny_imagenet(root, download=download, in_memory=in_memory)
    return split(train, test, name="split_tinyimagenet", n_classes=len(wnids), default_per_exp=20,
                 n_experiences=n_experiences, scenario=scenario, class_order=class_order, class_seed=class_seed,
                 classes_per_exp=classes_per_exp, first_exp_classes=first_exp_classes, train_range=train_range,
                 info={"mean": MEAN, "std": STD, "class_names": wnids})


# ------------------------------------------------------------------------------------------ image folders
@scenarios("class", "task")
def image_folder(root: str | os.PathLike | None = None, *, train_dir: str = "train", test_dir: str | None = "test",
                 test_fraction: float | None = None, split_seed: int = 0, image_size: int = 224,
                 center_crop: bool = False, in_memory: bool = False, n_experiences: int | None = None,
                 scenario: str = "class", class_order: Sequence[int] | None = None, class_seed: int | None = None,
                 classes_per_exp: int | Sequence[int] | None = None, first_exp_classes: int | None = None,
                 train_range: Sequence[int] | None = None, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225)) -> Benchmark:
    """Any class-per-folder dataset (``root/<train_dir>/<class>/*.png|jpg|jpeg`` and ``root/<test_dir>/...``, or
    one folder split by ``test_fraction``, 0.2 for ImageNet-R as in L2P, Wang et al. 2022, and CODA-Prompt,
    Smith et al. 2023; see :func:`streamcl.datasets.image_folder.image_folder`), classes in sorted folder order
    unless ``class_order``/``class_seed`` say otherwise; 10 experiences by default (ImageNet-R's 10 x 20).
    Images resized to ``image_size`` square, uint8 (N, 3, size, size); read per item unless ``in_memory``.
    ``mean``/``std`` default to ImageNet's (torchvision's pre-trained models)."""
    from streamcl.datasets.image_folder import image_folder as load
    from streamcl.errors import DatasetNotFound

    if root is None:
        root = os.environ.get("STREAMCL_DATA")
        if not root:
            raise DatasetNotFound("image_folder needs root: the folder holding <train_dir>/<class>/ (give "
                                  "benchmark.root, root=..., or STREAMCL_DATA)")
    train, test, classes = load(root, train_dir=train_dir, test_dir=test_dir, test_fraction=test_fraction,
                                split_seed=split_seed, image_size=image_size, center_crop=center_crop,
                                in_memory=in_memory)
    if n_experiences is None and classes_per_exp is None:
        n_experiences = 10
    return split(train, test, name="image_folder", n_classes=len(classes), default_per_exp=0,
                 n_experiences=n_experiences, scenario=scenario, class_order=class_order, class_seed=class_seed,
                 classes_per_exp=classes_per_exp, first_exp_classes=first_exp_classes, train_range=train_range,
                 info={"mean": tuple(mean), "std": tuple(std), "class_names": classes})


@scenarios("class", "task")
def cub200(root: str | os.PathLike | None = None, *, image_size: int = 224, center_crop: bool = False,
           in_memory: bool = False, n_experiences: int | None = None, scenario: str = "class",
           class_order: Sequence[int] | None = None, class_seed: int | None = None,
           classes_per_exp: int | Sequence[int] | None = None, first_exp_classes: int | None = None,
           train_range: Sequence[int] | None = None) -> Benchmark:
    """CUB-200-2011 in its official layout and train/test split: 10 experiences of 20 classes (as SLCA, Zhang
    et al. 2023, runs it), in label order; ``class_seed=1993`` gives the order of PyCIL-based code such as
    SLCA's. Images resized to ``image_size`` square, uint8 (N, 3, size, size); ImageNet's mean/std."""
    from streamcl.datasets.image_folder import IMAGENET_MEAN, IMAGENET_STD
    from streamcl.datasets.image_folder import cub200 as load

    train, test, classes = load(root, image_size=image_size, center_crop=center_crop, in_memory=in_memory)
    return split(train, test, name="cub200", n_classes=len(classes), default_per_exp=20,
                 n_experiences=n_experiences, scenario=scenario, class_order=class_order, class_seed=class_seed,
                 classes_per_exp=classes_per_exp, first_exp_classes=first_exp_classes, train_range=train_range,
                 info={"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "class_names": classes})


BENCHMARKS = {f.__name__: f for f in (split_mnist, permuted_mnist, split_fmnist, permuted_fmnist, split_cifar10,
                                      split_cifar100, split_tinyimagenet, image_folder, cub200)}
