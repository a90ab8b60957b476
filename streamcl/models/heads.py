"""Classifier heads."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class IncrementalLinear(nn.Module):
    """A linear head whose output grows to cover every class seen so far.

    ``grow_to(n)`` adds output units for classes ``out_features .. n-1``; the rows already there
    keep their values. ``Strategy`` grows it before each experience (see :func:`grow_heads`) and
    the optimizer follows the new parameters.
    """

    def __init__(self, in_features: int, out_features: int = 0):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self._init(self.weight, self.bias)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def _init(self, weight: Tensor, bias: Tensor) -> None:
        bound = 1 / math.sqrt(self.in_features)  # nn.Linear's default initialisation
        with torch.no_grad():
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5)) if weight.numel() else None
            bias.uniform_(-bound, bound)

    @torch.no_grad()
    def grow_to(self, n: int) -> bool:
        """Widen to ``n`` outputs; return whether anything changed."""
        old = self.out_features
        if n <= old:
            return False
        w = torch.empty(n - old, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        b = torch.empty(n - old, device=self.bias.device, dtype=self.bias.dtype)
        self._init(w, b)
        self.weight = nn.Parameter(torch.cat([self.weight, w]))
        self.bias = nn.Parameter(torch.cat([self.bias, b]))
        return True

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def grow_heads(model: nn.Module, n_classes: int) -> bool:
    """Grow every module of ``model`` that has ``grow_to`` to ``n_classes`` outputs."""
    changed = False
    for module in model.modules():
        grow = getattr(module, "grow_to", None)
        if callable(grow):
            changed |= bool(grow(n_classes))
    return changed
