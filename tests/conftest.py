"""The tests' shared harness: core sharing under pytest-xdist, and the four kinds of model users bring.

Without the first, torch starts one thread per core in every worker, and two workers on two cores run
four threads that slow each other down. ``USER_MODELS`` are the models every plugin and recipe is run
on (tests/test_any_model.py): streamcl's MLP, a plain ``nn.Sequential``, torchvision's ResNet-18 with a
1-channel first convolution, and a timm VisionTransformer (``forward_features`` / ``forward_head``).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from streamcl.scenarios import TensorData, class_incremental


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def image_blobs(n_per_class: int = 8, n_classes: int = 4, seed: int = 0) -> TensorData:
    """1x28x28 images: class c is a bright 7x7 square at its own place of a 4x4 grid, on unit noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), 1, 28, 28, generator=g) * 0.5
    for c in range(n_classes):
        r, k = divmod(c % 16, 4)
        x[y == c, :, 7 * r:7 * r + 7, 7 * k:7 * k + 7] += 2.0
    return TensorData(x, y)


def image_benchmark(n_classes: int = 4, n_experiences: int = 2, n_per_class: int = 8, **kwargs):
    """A tiny class-incremental stream of :func:`image_blobs` (test set: 4 images per class)."""
    return class_incremental(image_blobs(n_per_class, n_classes), image_blobs(4, n_classes, seed=1),
                             n_experiences, **kwargs)


def rgb_benchmark(side: int = 224, per_class: int = 2):
    """Two experiences of two classes of 3 x side x side images (class c: a bright quadrant c on noise)."""
    def images(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(4).repeat_interleave(n)
        x = torch.randn(len(y), 3, side, side, generator=g) * 0.5
        h = side // 2
        for c in range(4):
            x[y == c, :, (c // 2) * h:(c // 2 + 1) * h, (c % 2) * h:(c % 2 + 1) * h] += 1.0
        return TensorData(x, y)
    return class_incremental(images(per_class, 0), images(1, 1), 2)


def sequential(n_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, n_classes))


def resnet18(n_classes: int = 10) -> nn.Module:
    import torchvision
    model = torchvision.models.resnet18(num_classes=n_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def vit(n_classes: int = 10) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=n_classes, embed_dim=32, depth=1,
                             num_heads=2, mlp_ratio=2.0)


def mlp(n_classes: int = 10) -> nn.Module:
    from streamcl.models import MLP
    return MLP(784, [32], n_classes)


class NoHead(nn.Module):
    """A model whose only linear layer is not named as a head: the engine finds no classifier head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 6)

    def forward(self, x):
        return self.body(x)


USER_MODELS = {"mlp": mlp, "sequential": sequential, "resnet18": resnet18, "vit": vit}


class ItemDataset(torch.utils.data.Dataset):
    """A user's map-style dataset in torchvision's manner: items ``(transform(x), target_transform(y))``,
    stored labels in ``targets`` (no task label), read one at a time through a DataLoader."""

    def __init__(self, data: TensorData, transform=None, target_transform=None):
        self.x, self.targets = data.x, data.y.tolist()
        self.transform, self.target_transform = transform, target_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x, y = self.x[i], self.targets[i]
        return (x if self.transform is None else self.transform(x),
                y if self.target_transform is None else self.target_transform(y))


def jitter(x: torch.Tensor) -> torch.Tensor:
    """A random transform drawing from torch's global generator, as torchvision's do."""
    return x + 0.5 * torch.randn_like(x)
