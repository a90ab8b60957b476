"""Resources: each experience's training wall-clock time and peak memory."""
from __future__ import annotations

import resource
import sys
from time import perf_counter

import torch

from streamcl import Plugin, hookimpl


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: on CUDA the tensors' peak on ``device`` since the last reset
    (``torch.cuda.max_memory_allocated``); elsewhere the process's peak resident set size so far (``ru_maxrss``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class Resources(Plugin):
    """For each experience, the seconds from ``before_training_exp`` to ``after_training_exp`` (its epochs, after
    the device finished them; not the model's adaptation or evaluation) and the peak memory
    (:func:`peak_memory_mb`: on CUDA reset at each experience's start, so it is that experience's peak; on a CPU
    the process's peak so far, which never decreases).

    Logs ``resources/train_seconds`` and ``resources/peak_memory_mb`` at the experience's row (axis
    ``"experience"``). Results: ``train_seconds_per_experience`` and ``peak_memory_mb``, lists in training
    order. A resumed experience counts the seconds before the checkpoint and after the restart. A metric: it
    owns no role.
    """

    metric = True  # observes only; the generic pair and resume tests leave metrics out (tests/reliability.py)

    def __init__(self):
        self.seconds: list[float] = []
        self.peak: list[float] = []
        self._start: float | None = None

    @hookimpl
    def before_training_exp(self, strategy) -> None:
        if strategy.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(strategy.device)
        self._start = perf_counter()

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        if strategy.device.type == "cuda":
            torch.cuda.synchronize(strategy.device)
        self.seconds.append(perf_counter() - self._start if self._start is not None else float("nan"))
        self.peak.append(peak_memory_mb(strategy.device))
        self._start = None
        row = len(strategy.trained) - 1
        strategy.log("resources/train_seconds", self.seconds[-1], step=row, axis="experience")
        strategy.log("resources/peak_memory_mb", self.peak[-1], step=row, axis="experience")

    @hookimpl
    def results(self) -> dict:
        return {"train_seconds_per_experience": list(self.seconds), "peak_memory_mb": list(self.peak)}

    def state_dict(self) -> dict:
        return {"seconds": list(self.seconds), "peak": list(self.peak),
                "elapsed": None if self._start is None else perf_counter() - self._start}

    def load_state_dict(self, state: dict) -> None:
        self.seconds, self.peak = list(state["seconds"]), list(state["peak"])
        self._start = None if state["elapsed"] is None else perf_counter() - state["elapsed"]
