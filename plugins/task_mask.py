"""Task-incremental prediction: logits masked to the classes of the sample's task."""
from __future__ import annotations

import torch

from streamcl import Plugin, hookimpl


class TaskMask(Plugin):
    """Masks every logit outside the classes of each sample's task to -inf, in training and evaluation.

    The single-head equivalent of a multi-head classifier for task-incremental learning (the
    "labels trick" / multi-head evaluation of van de Ven & Tolias 2019, Sec. 2): with the task label
    given, the model chooses among that task's classes only. The task -> classes table is learned
    from the training experiences (``experience.task`` and ``experience.classes``).
    """

    owns = frozenset({"task_head"})

    def __init__(self):
        self.table = torch.zeros(0, 0, dtype=torch.bool)  # [task, class] -> allowed

    @hookimpl
    def before_training_exp(self, strategy) -> None:
        exp = strategy.experience
        if exp.task is None:
            return
        tasks, classes = max(exp.task + 1, self.table.shape[0]), max(exp.n_classes, self.table.shape[1])
        table = torch.zeros(tasks, classes, dtype=torch.bool)
        table[: self.table.shape[0], : self.table.shape[1]] = self.table
        table[exp.task, list(exp.classes)] = True
        self.table = table

    @hookimpl
    def adapt_logits(self, logits, batch):
        if self.table.numel() == 0:
            return logits
        table = self.table.to(logits.device)
        t = batch.t.clamp(max=table.shape[0] - 1)
        allowed = table[t][:, : logits.shape[1]]
        known = batch.t < table.shape[0]  # a task never trained keeps all its logits
        return logits.masked_fill(~allowed & known[:, None], float("-inf"))

    def state_dict(self) -> dict:
        return {"table": self.table.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.table = state["table"].clone()
