"""A tiny, learnable, synthetic stream for fast engine tests (no real data needed)."""
from __future__ import annotations

import torch

from streamcl.scenarios import TensorData, class_incremental


def blobs(n_per_class: int = 20, n_classes: int = 4, dim: int = 8, seed: int = 0) -> TensorData:
    """Gaussian blobs: class c centred at 3 * e_c (dimension c), unit noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), dim, generator=g) + 3 * torch.nn.functional.one_hot(y, dim).float()
    return TensorData(x, y)


def tiny_benchmark(n_classes: int = 4, n_experiences: int = 2, **kwargs):
    return class_incremental(blobs(n_classes=n_classes), blobs(10, n_classes, seed=1), n_experiences, **kwargs)


def task_benchmark(n_experiences: int = 3):
    """Experience k is task k (2 classes each) at training and test time; 40 training samples each, 10 test."""
    n = 2 * n_experiences
    return class_incremental(blobs(n_classes=n), blobs(10, n, seed=1), n_experiences, task_labels=True)


def keeps_first_task(strategy, bench) -> bool:
    """Train the first experience, then the others: are the first task's classes scored exactly as before?"""
    strategy.train(bench.train_stream[0])
    x = bench.test_stream[0].dataset.x
    t = torch.zeros(len(x), dtype=torch.long)
    classes = list(bench.train_stream[0].classes)
    before = strategy.predict(x, t)[:, classes]
    strategy.train(bench.train_stream[1:])
    return torch.equal(strategy.predict(x, t)[:, classes], before)
