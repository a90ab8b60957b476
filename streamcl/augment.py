"""Training-time augmentation applied by the engine (``Strategy(augment=...)``, config ``train.augment``).

Memories store clean inputs; the engine augments every training input, new and replayed alike. A
callable with ``batched = True`` takes the whole minibatch ``(N, C, H, W)`` at once (on the device);
any other callable takes one input at a time (torchvision's transforms do).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from streamcl.batch import to_device
from streamcl.errors import ConfigError


class CropFlip:
    """A random crop of the input's size after ``padding`` zero pixels on each side, then a horizontal
    flip with probability one half, drawn per sample (the CIFAR-style augmentation of SFM-5-CNN)."""

    batched = True

    def __init__(self, padding: int = 2, flip: bool = True, image_shape: tuple[int, int, int] | None = None):
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ConfigError(f"CropFlip padding={padding!r}: a whole number of pixels >= 0")
        self.padding, self.flip = padding, flip
        self.image_shape = tuple(image_shape) if image_shape is not None else None

    def __call__(self, x: Tensor) -> Tensor:
        if self.image_shape is not None and x.ndim == 2:  # flat inputs: images of image_shape, flattened
            return self(x.reshape(len(x), *self.image_shape)).reshape(x.shape)
        if x.ndim != 4:
            raise ConfigError(f"CropFlip takes images (N, C, H, W), or flat ones with image_shape=(C, H, W); "
                              f"got inputs of shape {tuple(x.shape)}")
        n, _, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p))
        dy, dx = (to_device(torch.randint(0, 2 * p + 1, (n,)), x.device) for _ in range(2))  # CPU draws: seeded
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        out = padded[torch.arange(n, device=x.device)[:, None, None, None],
                     torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
        if self.flip:
            flip = to_device(torch.rand(n) < 0.5, x.device)[:, None, None, None]
            out = torch.where(flip, out.flip(-1), out)
        return out

    def __repr__(self) -> str:
        return f"CropFlip(padding={self.padding}, flip={self.flip}, image_shape={self.image_shape})"


AUGMENTATIONS = {"crop_flip": CropFlip}


def build(name: str | None, input_shape: tuple = (), padding: int | None = None):
    """The augmentation a config names (``None``: none), for inputs of ``input_shape``: flat inputs of
    a square length (Fashion-MNIST's 784) are one-channel square images. ``padding`` (``train.crop_padding``):
    2 by default (SFM-5-CNN), 4 in the CIFAR recipe of the class-incremental literature."""
    if name is None:
        return None
    if name not in AUGMENTATIONS:
        raise ConfigError(f"train.augment = {name!r}: use one of {', '.join(AUGMENTATIONS)}")
    side = math.isqrt(input_shape[0]) if len(input_shape) == 1 else 0
    options = {} if padding is None else {"padding": padding}
    return AUGMENTATIONS[name](image_shape=(1, side, side) if side and side * side == input_shape[0] else None,
                               **options)
