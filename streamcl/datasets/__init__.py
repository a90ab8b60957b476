"""Real datasets as tensors (the fast path)."""
from streamcl.datasets.fmnist import fashion_mnist

__all__ = ["fashion_mnist"]
