"""Confusion matrix: counts of (true class, predicted class) over the latest evaluation of the test stream."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from streamcl import Plugin, distributed as dist, hookimpl
from streamcl.metrics import recording


class ConfusionMatrix(Plugin):
    """``counts[a][b]``: test samples of class ``classes[a]`` predicted as ``classes[b]`` (the argmax of the
    evaluated logits, after every ``adapt_logits``), counted on the device over the last evaluation that enters
    the accuracy matrix with bias corrections on (``strategy.correcting``). ``classes`` are the classes of the
    test experiences evaluated and every class predicted, sorted; each row sums to that class's test samples.

    Logs the image ``confusion_matrix`` (:func:`streamcl.report.confusion_figure`) at the matrix row,
    experiences trained minus one (axis ``"experience"``), when a logger takes images. Results:
    ``confusion_matrix`` (the counts, a list of lists of ints) and ``confusion_classes``. A metric: it owns no
    role.
    """

    metric = True  # observes only; the generic pair and resume tests leave metrics out (tests/reliability.py)

    def __init__(self):
        self.counts: list[list[int]] | None = None
        self.classes: list[int] = []
        self._counts: torch.Tensor | None = None  # K x K, true x predicted, during an evaluation
        self._classes: set[int] = set()

    @staticmethod
    def _measures(strategy) -> bool:
        return recording(strategy) and strategy.correcting and bool(strategy.trained)

    @hookimpl
    def before_eval(self) -> None:
        self._counts, self._classes = None, set()

    @hookimpl
    def after_eval_forward(self, strategy) -> None:
        if not self._measures(strategy):
            return
        logits, y = strategy.output.logits, strategy.batch.y
        k = max(logits.shape[1], strategy.experience.n_classes, 0 if self._counts is None else len(self._counts))
        pairs = torch.bincount(y * k + logits.argmax(1), minlength=k * k).view(k, k)
        if self._counts is not None:
            grow = k - len(self._counts)
            pairs += F.pad(self._counts, (0, grow, 0, grow))
        self._counts = pairs
        self._classes.update(int(c) for c in strategy.experience.classes)

    @hookimpl
    def after_eval(self, strategy) -> None:
        if not self._measures(strategy) or self._counts is None:
            return
        counts = dist.all_reduce(self._counts).cpu()
        predicted = torch.nonzero(counts.sum(0)).flatten().tolist()
        self.classes = sorted(self._classes | set(predicted))
        self.counts = counts[self.classes][:, self.classes].tolist()
        self._counts = None
        if strategy.logs_images:
            from streamcl.report import confusion_figure
            image = torch.from_numpy(confusion_figure(self.counts, self.classes)).permute(2, 0, 1).float() / 255
            strategy.log_image("confusion_matrix", image, step=len(strategy.trained) - 1, axis="experience")

    @hookimpl
    def results(self) -> dict:
        return {"confusion_matrix": self.counts, "confusion_classes": list(self.classes)}

    def state_dict(self) -> dict:
        return {"counts": self.counts, "classes": list(self.classes)}

    def load_state_dict(self, state: dict) -> None:
        self.counts, self.classes = state["counts"], list(state["classes"])
