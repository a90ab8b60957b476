"""Tensor-backed datasets (the fast path) and how any labelled dataset becomes one or a subset."""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset

from streamcl.errors import DataError


class TensorData(Dataset):
    """Samples held as three aligned tensors: inputs ``x``, labels ``y``, task labels ``t``.

    Experiences built on it train by shuffled index slices on the model's device, with no
    DataLoader and no per-sample collate.
    """

    def __init__(self, x: Tensor, y: Tensor, t: Tensor | None = None):
        from streamcl.batch import labels

        y = labels(y).reshape(-1)
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
        t = torch.zeros_like(y) if t is None else labels(t, "task labels")
        if t.shape != y.shape:
            raise DataError(f"{t.shape[0]} task labels for {y.shape[0]} samples")
        self.x, self.y, self.t = x, y, t

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.t[i]

    @property
    def targets(self) -> Tensor:
        return self.y

    def subset(self, index: Tensor) -> TensorData:
        return TensorData(self.x[index], self.y[index], self.t[index])

    def to(self, device) -> TensorData:
        if self.x.device == torch.device(device):
            return self
        return TensorData(self.x.to(device), self.y.to(device), self.t.to(device))


def targets_of(dataset: Dataset) -> Tensor:
    """The class label of every sample, read from ``.targets``/``.y`` or, failing that, by iteration."""
    from streamcl.batch import labels

    for attr in ("targets", "y", "labels"):
        if hasattr(dataset, attr):
            found = getattr(dataset, attr)
            transform = getattr(dataset, "target_transform", None)
            if transform is not None:  # the labels the dataset yields, not the ones it stores
                found = [transform(int(v)) for v in torch.as_tensor(found).reshape(-1)]
            return labels(found).reshape(-1)
    if isinstance(dataset, Subset):
        return targets_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([targets_of(d) for d in dataset.datasets])
    return labels([dataset[i][1] for i in range(len(dataset))])


def as_dataset(data) -> Dataset:
    """``(x, y)`` / ``(x, y, t)`` tensors become :class:`TensorData`; a Dataset is returned as is."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and 2 <= len(data) <= 3 and all(isinstance(d, Tensor) for d in data):
        return TensorData(*data)
    raise DataError(f"expected a Dataset or a tuple of tensors (x, y[, t]), got {type(data).__name__}")


def subset(dataset: Dataset, index: Tensor, task: int | Tensor | None = None) -> Dataset:
    """The samples at ``index``, with task label ``task`` when given."""
    if isinstance(dataset, TensorData):
        part = dataset.subset(index)
        if task is not None:
            part.t = torch.as_tensor(task, dtype=torch.long).expand_as(part.y).clone()
        return part
    part = Subset(dataset, index.tolist())
    return part if task is None else WithTask(part, task)


class WithTask(Dataset):
    """Wraps a dataset so that each sample carries a fixed task label: ``(x, y, t)``."""

    def __init__(self, dataset: Dataset, task: int):
        self.dataset, self.task = dataset, int(task)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y, *_ = self.dataset[i]
        return x, y, self.task

    @property
    def targets(self) -> Tensor:
        return targets_of(self.dataset)


def join(datasets: Sequence[Dataset]) -> Dataset:
    """One dataset of all ``datasets``: still tensors when every part is, else a ConcatDataset."""
    datasets = [d for d in datasets if d is not None and len(d) > 0]
    if len(datasets) == 1:
        return datasets[0]
    if datasets and all(isinstance(d, TensorData) for d in datasets):
        dev = datasets[0].x.device
        return TensorData(*(torch.cat([getattr(d, k).to(dev) for d in datasets]) for k in ("x", "y", "t")))
    return ConcatDataset(datasets)


def as_batch(data: Dataset, device=None):
    """Every sample of ``data`` as one :class:`streamcl.Batch` (on ``device``): tensors directly, any
    other dataset through a DataLoader."""
    from torch.utils.data import DataLoader

    from streamcl.batch import Batch

    if isinstance(data, TensorData):
        data = data.to(device) if device is not None else data
        return Batch(data.x, data.y, data.t)
    parts = list(DataLoader(data, batch_size=1024, collate_fn=Batch.collate))
    batch = parts[0].cat(*parts[1:])
    return batch.to(device) if device is not None else batch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Within the context, torch's (CPU), Python's and numpy's global generators start from ``seed``;
    after it, each is as it was before. Random transforms inside a dataset draw from these."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
