"""The residual networks of the continual-learning literature, each a :class:`Classifier` (``head(backbone(x))``).

* ``resnet32``: the CIFAR ResNet of He et al. 2016 (Sec. 4.2, 6n+2 layers with n = 5: a 3x3 convolution with 16
  channels, three stages of n basic blocks with 16, 32 and 64 channels, the last two starting with stride 2, global
  average pooling, 64 features). Shortcuts are identities, and where a stage halves the side and doubles the
  channels, option A: every second pixel, the new channels zero (the paper's CIFAR choice; PyCIL's ``resnet32``,
  which iCaRL's experiments use, does the same). ``shortcut="B"`` gives 1x1 convolutions with batch norm there
  instead (FACIL's ``resnet32``). 464,154 parameters with a 10-way head (the paper's 0.46M).
* ``resnet18``: ResNet-18 in its ImageNet form (He et al. 2016, Table 1: 7x7 stride-2 stem, 3x3 stride-2 max-pool,
  stages of 64, 128, 256, 512 channels; torchvision's layers and initialisation), 512 features.
* ``resnet18_cifar``: the same stages after a 3x3 stride-1 stem without max-pool (the CIFAR ResNet-18 of PyCIL and
  Mammoth), 512 features.
* ``slim_resnet18``: the reduced ResNet-18 of GEM (Lopez-Paz & Ranzato 2017, Sec. 6: ``nf`` = 20, stages of 20, 40,
  80, 160 channels after a 3x3 stride-1 stem; GEM, A-GEM, Avalanche's ``SlimResNet18`` and Mammoth), 160 features.

Every model takes images (N, C, H, W); built with ``image_size`` (the factories do so for flat samples) it first
reshapes its input with :class:`ToImage`. Pooling is global, so any side from 8 (``resnet18``: 32) up works.
The factories at the end are what the ``streamcl.models`` entry points name.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from streamcl.errors import ConfigError
from streamcl.models.nets import Classifier, ToImage, _head


class ZeroPadShortcut(nn.Module):
    """Option A of He et al. 2016 (Sec. 3.3): ``x`` sampled every ``stride`` pixels, ``extra`` zero channels added."""

    def __init__(self, extra: int, stride: int):
        super().__init__()
        self.extra, self.stride = extra, stride

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with 3x3 convolutions (He et al. 2016, Fig. 2 and Sec. 4.2).
    The shortcut is the identity where shapes agree, else option A (:class:`ZeroPadShortcut`) or B (a 1x1 convolution
    with batch norm)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride == 1 and c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(c_out - c_in, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _stages(c_in: int, widths: Sequence[int], blocks: int, shortcut: str) -> list[tuple[str, nn.Module]]:
    """``stage1 ...``: ``blocks`` basic blocks of each width, every stage after the first starting with stride 2."""
    out = []
    for i, width in enumerate(widths):
        seq = [BasicBlock(c_in if b == 0 else width, width, 2 if b == 0 and i > 0 else 1, shortcut)
               for b in range(blocks)]
        out.append((f"stage{i + 1}", nn.Sequential(*seq)))
        c_in = width
    return out


def _he_init(module: nn.Module) -> None:
    """He et al. 2015's normal initialisation (fan-out) of the convolutions, batch norm at scale 1 and shift 0, as
    He et al. 2016 train their CIFAR networks (and PyCIL, FACIL and torchvision initialise theirs)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _backbone(parts: list[tuple[str, nn.Module]], in_channels: int, image_size: int | None) -> nn.Sequential:
    head = [("to_image", ToImage(in_channels, image_size))] if image_size else []
    tail = [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
    return nn.Sequential(OrderedDict(head + parts + tail))


def _stem(in_channels: int, width: int) -> list[tuple[str, nn.Module]]:
    """A 3x3 stride-1 convolution, batch norm, ReLU (the CIFAR networks' first layer)."""
    return [("conv1", nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)), ("bn1", nn.BatchNorm2d(width)),
            ("relu", nn.ReLU())]


class CifarResNet(Classifier):
    """He et al. 2016's CIFAR ResNet of ``depth`` = 6n+2 layers (Sec. 4.2): a 3x3 stem of ``width`` channels, three
    stages of n basic blocks with ``width``, 2 ``width``, 4 ``width`` channels, global average pooling. ``shortcut``
    "A" (the paper's: zero-padded identity) or "B" (1x1 projections where the shape changes)."""

    def __init__(self, in_channels: int = 3, n_classes: int = 10, *, depth: int = 32, width: int = 16,
                 shortcut: str = "A", growing: bool = False, image_size: int | None = None):
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"CifarResNet depth={depth}: 6n+2 layers (20, 32, 44, 56, 110)")
        _check(width=width, shortcut=shortcut)
        widths = (width, 2 * width, 4 * width)
        backbone = _backbone(_stem(in_channels, width) + _stages(width, widths, (depth - 2) // 6, shortcut),
                             in_channels, image_size)
        _he_init(backbone)
        super().__init__(backbone, _head(widths[-1], n_classes, growing), widths[-1])


class ResNet18(Classifier):
    """ResNet-18 (He et al. 2016, Table 1): four stages of two basic blocks with ``width`` x (1, 2, 4, 8) channels,
    1x1 projection shortcuts where the shape changes, global average pooling. ``stem="imagenet"``: torchvision's
    ``resnet18`` layers (7x7 stride-2 convolution, 3x3 stride-2 max-pool; ``width`` 64 only); ``stem="cifar"``: a
    3x3 stride-1 convolution, no max-pool, initialised as He et al. (``he_init=False``: PyTorch's defaults, as
    GEM's reduced ResNet-18 is)."""

    def __init__(self, in_channels: int = 3, n_classes: int = 10, *, stem: str = "imagenet", width: int = 64,
                 growing: bool = False, image_size: int | None = None, he_init: bool = True):
        if stem not in ("imagenet", "cifar"):
            raise ConfigError(f"ResNet18 stem={stem!r}: 'imagenet' (7x7 stride 2 and max-pool) or 'cifar' (3x3 stride 1)")
        _check(width=width)
        if stem == "imagenet":
            if width != 64:
                raise ConfigError(f"ResNet18 stem='imagenet' is torchvision's resnet18 (width 64), not width={width}; "
                                  "use stem='cifar' for other widths")
            parts = _torchvision_resnet18(in_channels)
        else:
            parts = _stem(in_channels, width) + _stages(width, [width * 2 ** i for i in range(4)], 2, "B")
        backbone = _backbone(parts, in_channels, image_size)
        if stem == "cifar" and he_init:
            _he_init(backbone)
        super().__init__(backbone, _head(8 * width, n_classes, growing), 8 * width)


def _torchvision_resnet18(in_channels: int) -> list[tuple[str, nn.Module]]:
    """torchvision's ``resnet18`` up to its average pooling (its first convolution re-made for ``in_channels``)."""
    import torchvision

    net = torchvision.models.resnet18()
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's
    return [(name, getattr(net, name)) for name in
            ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")]


def _check(width: int = 1, shortcut: str = "A") -> None:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"width={width!r}: a number of channels, at least 1")
    if shortcut not in ("A", "B"):
        raise ConfigError(f"shortcut={shortcut!r}: 'A' (zero-padded identity) or 'B' (1x1 projection)")


def image_input(sample_shape: Sequence[int], name: str) -> tuple[int, int | None]:
    """``(in_channels, image_size)`` for a model on samples of ``sample_shape``: images (C, H, W) as they are
    (``image_size`` None), square grey (H, H) or flat rows of C x H x H values, C = 1 or 3, reshaped by ToImage."""
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) == 3:
        return shape[0], None
    if len(shape) == 2 and shape[0] == shape[1]:
        return 1, shape[0]
    if len(shape) == 1:
        for c in (1, 3):
            side = math.isqrt(shape[0] // c)
            if c * side * side == shape[0]:
                return c, side
    raise ConfigError(f"model '{name}' takes images; samples of shape {shape} are neither images (C, H, W) nor "
                      "flat square images of 1 or 3 channels")


def resnet32(n_classes: int, sample_shape: Sequence[int], *, growing: bool = False, width: int = 16,
             shortcut: str = "A") -> CifarResNet:
    """He et al. 2016's 32-layer CIFAR ResNet (option A shortcuts; ``width`` channels in the first stage)."""
    c, side = image_input(sample_shape, "resnet32")
    return CifarResNet(c, n_classes, depth=32, width=width, shortcut=shortcut, growing=growing, image_size=side)


def resnet18(n_classes: int, sample_shape: Sequence[int], *, growing: bool = False) -> ResNet18:
    """ResNet-18 in its ImageNet form (torchvision's layers)."""
    c, side = image_input(sample_shape, "resnet18")
    return ResNet18(c, n_classes, stem="imagenet", growing=growing, image_size=side)


def resnet18_cifar(n_classes: int, sample_shape: Sequence[int], *, growing: bool = False,
                   width: int = 64) -> ResNet18:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool (PyCIL's and Mammoth's CIFAR ResNet-18)."""
    c, side = image_input(sample_shape, "resnet18_cifar")
    return ResNet18(c, n_classes, stem="cifar", width=width, growing=growing, image_size=side)


def slim_resnet18(n_classes: int, sample_shape: Sequence[int], *, growing: bool = False,
                  width: int = 20) -> ResNet18:
    """GEM's reduced ResNet-18 (Lopez-Paz & Ranzato 2017): ``nf`` = 20 channels first, PyTorch's initialisation."""
    c, side = image_input(sample_shape, "slim_resnet18")
    return ResNet18(c, n_classes, stem="cifar", width=width, growing=growing, image_size=side, he_init=False)
