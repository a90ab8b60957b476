"""Training accuracy: the share of each epoch's training samples the model classified right."""
from __future__ import annotations

import torch

from streamcl import Plugin, distributed as dist, hookimpl


class TrainAccuracy(Plugin):
    """Accuracy of the training forward's predictions (``strategy.output.logits.argmax(1)`` against
    ``strategy.batch.y``, the whole minibatch: replayed rows included, held-out rows not), counted on the
    device over each epoch and read once at its end (one host sync per epoch, none per step).

    Logs ``train/accuracy`` at the epoch's last step (axis ``"step"``). Results: ``train_accuracy``, the last
    epoch's value for each experience trained, in order. A metric: it only observes and owns no role.
    """

    metric = True  # observes only; the generic pair and resume tests leave metrics out (tests/reliability.py)

    def __init__(self):
        self.correct: torch.Tensor | int = 0  # this epoch's right predictions so far (a device tensor once counted)
        self.seen = 0  # this epoch's samples so far
        self.epoch_accuracy: float | None = None
        self.per_experience: list[float | None] = []

    @hookimpl
    def before_training_epoch(self) -> None:
        self.correct, self.seen = 0, 0

    @hookimpl
    def after_training_iteration(self, strategy) -> None:
        logits, y = strategy.output.logits, strategy.batch.y
        self.correct = (logits.argmax(1) == y).sum() + self.correct
        self.seen += len(y)

    @hookimpl
    def after_training_epoch(self, strategy) -> None:
        counts = torch.stack([torch.as_tensor(self.correct, device=strategy.device).reshape(()).long(),
                              torch.tensor(self.seen, device=strategy.device)])
        correct, seen = dist.all_reduce(counts).tolist()  # the one sync of the epoch
        if not seen:
            return
        self.epoch_accuracy = correct / seen
        strategy.log("train/accuracy", self.epoch_accuracy, step=max(0, strategy.global_step - 1))

    @hookimpl
    def after_training_exp(self) -> None:
        self.per_experience.append(self.epoch_accuracy)
        self.epoch_accuracy = None

    @hookimpl
    def results(self) -> dict:
        return {"train_accuracy": list(self.per_experience)}

    def state_dict(self) -> dict:
        return {"correct": int(self.correct), "seen": self.seen, "epoch_accuracy": self.epoch_accuracy,
                "per_experience": list(self.per_experience)}

    def load_state_dict(self, state: dict) -> None:
        self.correct, self.seen = state["correct"], state["seen"]
        self.epoch_accuracy, self.per_experience = state["epoch_accuracy"], list(state["per_experience"])
