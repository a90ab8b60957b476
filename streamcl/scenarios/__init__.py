"""Streams of experiences built from any labelled dataset."""
from streamcl.scenarios.builders import (class_incremental, domain_incremental, pixel_permutation,
                                         split_classes, task_incremental)
from streamcl.scenarios.data import TensorData, as_batch, as_dataset, join, subset, targets_of
from streamcl.scenarios.stream import Benchmark, Experience, Stream

__all__ = ["Benchmark", "Experience", "Stream", "TensorData", "as_batch", "as_dataset", "class_incremental",
           "domain_incremental", "join", "pixel_permutation", "split_classes", "subset", "targets_of",
           "task_incremental"]
