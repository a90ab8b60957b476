"""Streams of experiences built from any labelled dataset."""
from streamcl.scenarios.builders import (class_incremental, domain_incremental, pixel_permutation,
                                         online, split_classes, split_online, task_incremental)
from streamcl.scenarios.data import TensorData, as_batch, as_dataset, join, subset, targets_of
from streamcl.scenarios.stream import Benchmark, Experience, Stream, hold_out
from streamcl.scenarios.catalog import (cub200, image_folder, permuted_fmnist, permuted_mnist, split_cifar10,
                                        split_cifar100, split_fmnist, split_mnist, split_tinyimagenet)

__all__ = ["Benchmark", "Experience", "Stream", "TensorData", "as_batch", "as_dataset", "class_incremental",
           "domain_incremental", "hold_out", "join", "online", "pixel_permutation", "split_classes", "subset", "targets_of",
           "task_incremental", "split_online", "split_mnist", "permuted_mnist", "split_fmnist", "permuted_fmnist",
           "split_cifar10", "split_cifar100", "split_tinyimagenet", "image_folder", "cub200"]
