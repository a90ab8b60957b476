"""Evaluation loss: the criterion's mean over each test experience, as a matrix like the accuracy matrix."""
from __future__ import annotations

import torch

from streamcl import Plugin, distributed as dist, hookimpl
from streamcl.metrics import recording


class EvalLoss(Plugin):
    """``strategy.criterion`` (cross-entropy unless the user gave another) on the evaluated logits (after every
    ``adapt_logits``) and labels, weighted by batch size: the mean over each test experience's samples.

    Measured in the evaluations that enter the accuracy matrix, with bias corrections on
    (``strategy.correcting``). ``cells[n][j]`` is the loss on test experience j after ``n`` experiences were
    trained; ``None`` when the model has no logit for some of the experience's classes (a head not grown to
    them yet), where the loss is undefined. Logs ``eval_loss/exp<j>`` and ``eval_loss/mean`` (mean of the row's
    known cells) at the matrix row, experiences trained minus one (axis ``"experience"``). Results:
    ``eval_loss``, rows as ``accuracy_matrix``'s, ``None`` where not measured. A metric: it owns no role.
    """

    metric = True  # observes only; the generic pair and resume tests leave metrics out (tests/reliability.py)

    def __init__(self):
        self.cells: dict[int, dict[int, float | None]] = {}
        self._sum: torch.Tensor | int = 0
        self._n, self._defined = 0, True

    @staticmethod
    def _measures(strategy) -> bool:
        return recording(strategy) and strategy.correcting and bool(strategy.trained)

    @hookimpl
    def before_eval_exp(self) -> None:
        self._sum, self._n, self._defined = 0, 0, True

    @hookimpl
    def after_eval_forward(self, strategy) -> None:
        if not self._measures(strategy) or not self._defined:
            return
        logits, y = strategy.output.logits, strategy.batch.y
        if max(strategy.experience.classes, default=-1) >= logits.shape[1]:
            self._defined = False
            return
        self._sum = strategy.criterion(logits.float(), y).detach() * len(y) + self._sum
        self._n += len(y)

    @hookimpl
    def after_eval_exp(self, strategy) -> None:
        if not self._measures(strategy):
            return
        total = torch.stack([torch.as_tensor(self._sum, device=strategy.device).reshape(()).float(),
                             torch.tensor(float(self._n), device=strategy.device)])
        loss_sum, n = dist.all_reduce(total).tolist()
        value = loss_sum / n if n and self._defined else None
        self.cells.setdefault(len(strategy.trained), {})[strategy.experience.index] = value

    @hookimpl
    def after_eval(self, strategy) -> None:
        if not self._measures(strategy):
            return
        row = len(strategy.trained) - 1
        known = sorted((j, v) for j, v in self.cells.get(row + 1, {}).items() if v is not None)
        for j, v in known:
            strategy.log(f"eval_loss/exp{j}", v, step=row, axis="experience")
        if known:
            strategy.log("eval_loss/mean", sum(v for _, v in known) / len(known), step=row, axis="experience")

    @property
    def matrix(self) -> list[list[float | None]]:
        width = max((j + 1 for row in self.cells.values() for j in row), default=0)
        return [[self.cells.get(n, {}).get(j) for j in range(width)] for n in range(1, max(self.cells, default=0) + 1)]

    @hookimpl
    def results(self) -> dict:
        return {"eval_loss": self.matrix}

    def state_dict(self) -> dict:
        return {"cells": {n: dict(row) for n, row in self.cells.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.cells = {n: dict(row) for n, row in state["cells"].items()}
