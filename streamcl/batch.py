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

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(v.to(device, non_blocking=non_blocking) for v in self))

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
        y = labels(y)
        t = labels(rest[0], "task labels") if rest else torch.zeros_like(y)
        return cls(x, y, t)

    @classmethod
    def collate(cls, samples: list) -> Batch:
        """A batch of dataset items, each ``(x, y)`` or ``(x, y, t)`` (the two may mix: a dataset joined to a
        memory); inputs must be finite and labels whole numbers (else a DataError)."""
        from torch.utils.data import default_collate

        x = default_collate([s[0] for s in samples])
        y = labels([s[1] for s in samples])
        t = labels([s[2] if len(s) > 2 else 0 for s in samples], "task labels")
        if isinstance(x, Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise non_finite_inputs()
        return cls(x, y, t)


def to_device(t: Tensor, device) -> Tensor:
    """A CPU tensor (indices, random draws from a CPU generator) on ``device`` without making the host wait for
    the GPU: through pinned memory, copied asynchronously on CUDA; as ``t.to(device)`` elsewhere."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def labels(values, what: str = "labels") -> Tensor:
    """``values`` as int64, refusing fractions (6.7 is not a class) instead of truncating them."""
    from streamcl.errors import DataError

    try:
        values = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):  # a list of one-element arrays or tensors
        values = torch.stack([torch.as_tensor(v).reshape(()) for v in values])
    if values.is_floating_point() or values.is_complex():
        if not bool((values == values.round()).all()) or not bool(torch.isfinite(values).all()):
            bad = values[(values != values.round()) | ~torch.isfinite(values)][0].item()
            raise DataError(f"{what} must be whole numbers (class indices), but one is {bad}; streamcl does not "
                            "round or truncate labels: fix the dataset's labels or its target_transform")
    elif values.dtype == torch.bool:
        raise DataError(f"{what} must be whole numbers (class indices), not booleans")
    return values.to(torch.long)


def non_finite_inputs():
    from streamcl.errors import DataError

    return DataError("inputs hold NaN or infinite values; a model cannot score them (every such sample would "
                     "be predicted as class 0): clean or impute the data first")


class Output(NamedTuple):
    """A forward pass: ``logits`` (after every ``adapt_logits``), ``features`` (or ``None``) and
    ``raw``, the model's own logits before any ``adapt_logits`` (``None`` where nobody set it)."""

    logits: Tensor
    features: Tensor | None
    raw: Tensor | None = None
