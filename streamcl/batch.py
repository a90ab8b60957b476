"""A minibatch and a forward pass's output: the two values that travel through every hook."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Batch(NamedTuple):
    """Inputs ``x``, class labels ``y`` and task labels ``t`` (all of length ``len(y)``)."""

    x: Tensor
    y: Tensor
    t: Tensor

    def __len__(self) -> int:  # type: ignore[override]
        return self.y.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.x.to(device), self.y.to(device), self.t.to(device))

    def select(self, index) -> Batch:
        """The samples at ``index``."""
        return Batch(self.x[index], self.y[index], self.t[index])

    def cat(self, *others: Batch) -> Batch:
        """This batch followed by ``others``."""
        parts = (self, *others)
        return Batch(*(torch.cat([getattr(p, k) for p in parts]) for k in ("x", "y", "t")))

    @classmethod
    def from_sample(cls, sample) -> Batch:
        """A batch from a DataLoader's ``(x, y)`` or ``(x, y, t)``; a missing ``t`` is task 0."""
        if isinstance(sample, Batch):
            return sample
        x, y, *rest = sample
        y = torch.as_tensor(y, dtype=torch.long)
        t = torch.as_tensor(rest[0], dtype=torch.long) if rest else torch.zeros_like(y)
        return cls(x, y, t)


class Output(NamedTuple):
    """A forward pass: ``logits`` (after every ``adapt_logits``), ``features`` (or ``None``) and
    ``raw``, the model's own logits before any ``adapt_logits`` (``None`` where nobody set it)."""

    logits: Tensor
    features: Tensor | None
    raw: Tensor | None = None
