"""Real datasets as tensors (the fast path) or as image files read per item."""
from streamcl.datasets.cifar import cifar10, cifar100
from streamcl.datasets.fmnist import fashion_mnist
from streamcl.datasets.image_folder import ImageFiles, cub200, decode_all, image_folder
from streamcl.datasets.mnist import mnist
from streamcl.datasets.tinyimagenet import tiny_imagenet

__all__ = ["ImageFiles", "cifar10", "cifar100", "cub200", "decode_all", "fashion_mnist", "image_folder", "mnist",
           "tiny_imagenet"]
