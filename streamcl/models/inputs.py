"""Images stored as bytes, standardised on the device by the model's first step."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from streamcl.parts import find_head


class Standardize(nn.Module):
    """``model((x / 255 - mean) / std)`` for integer images ``x`` (uint8, as image benchmarks store them, four
    times smaller than floats), per channel; floating-point inputs are taken as standardised already (a
    generator's samples). The classifier is ``model``'s."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def get_classifier(self) -> nn.Module | None:
        path = find_head(self.model)
        return None if path is None else self.model.get_submodule(path)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            x = (x.float().div_(255) - self.mean) / self.std
        return self.model(x)
