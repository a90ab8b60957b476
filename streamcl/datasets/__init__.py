"""Real datasets as tensors (the fast path) or as image files read per item.

The loaders of MNIST and of image folders live in modules of their own name: ``streamcl.datasets.mnist.mnist``,
``streamcl.datasets.image_folder.image_folder`` (the package does not shadow those modules with the functions).
"""
from streamcl.datasets import image_folder, mnist
from streamcl.datasets.cifar import cifar10, cifar100
from streamcl.datasets.fmnist import fashion_mnist
from streamcl.datasets.image_folder import ImageFiles, cub200, decode_all, read_image
from streamcl.datasets.tinyimagenet import tiny_imagenet

__all__ = ["ImageFiles", "cifar10", "cifar100", "cub200", "decode_all", "fashion_mnist", "image_folder", "mnist",
           "read_image", "tiny_imagenet"]
