"""Backbones with a head: ``forward(x)`` gives ``head(backbone(x))``, the logits."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from streamcl.models.heads import IncrementalLinear


def module_chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model``'s children in registration order, each ``nn.Sequential`` among them replaced by its own
    children (recursively), with their dotted paths: the order in which a model that is a chain of
    modules (an ``nn.Sequential``, a :class:`Classifier`) calls them. Other models register their
    modules roughly in calling order too (torchvision's ResNet: ``conv1 ... layer4.1, avgpool, fc``), but
    their forward may do more between them (a flatten, a pooling); callers check what they rely on."""
    out: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.Sequential):
                walk(child, path)
            else:
                out.append((path, child))

    walk(model, "")
    return out or [("", model)]


class Classifier(nn.Module):
    """``head(backbone(x))``; the features (the backbone's output) are what plugins distil or store."""

    def __init__(self, backbone: nn.Module, head: nn.Module, feature_dim: int):
        super().__init__()
        self.backbone, self.head, self.feature_dim = backbone, head, feature_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def _head(feature_dim: int, n_classes: int, growing: bool) -> nn.Module:
    return IncrementalLinear(feature_dim, 0) if growing else nn.Linear(feature_dim, n_classes)


class MLP(Classifier):
    """Fully connected ReLU network, e.g. 784-256-256-10 (the SFM-5 protocol's model)."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (256, 256), n_classes: int = 10,
                 *, growing: bool = False, dropout: float = 0.0):
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        super().__init__(nn.Sequential(*layers), _head(width, n_classes, growing), width)


class ToImage(nn.Module):
    """Reshape flat or image inputs to ``(N, channels, size, size)``."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.shape = (channels, size, size)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


class SmallCNN(Classifier):
    """Two 3x3 conv blocks (32, 64 channels) with max-pooling, then a 256-unit layer; for 28x28 grey images."""

    def __init__(self, in_channels: int = 1, n_classes: int = 10, *, image_size: int = 28, growing: bool = False):
        side = image_size // 4
        backbone = nn.Sequential(
            ToImage(in_channels, image_size),
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * side * side, 256), nn.ReLU(),
        )
        super().__init__(backbone, _head(256, n_classes, growing), 256)
