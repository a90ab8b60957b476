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
