"""The accuracy matrix and what is derived from it.

``R[i][j]`` is the accuracy on test experience j after training the i-th experience. Definitions
follow ../shared/PROTOCOLS.md: final average accuracy = mean_j R[T-1][j]; average incremental
accuracy = mean over i of the accuracy on the test experiences seen after experience i (for a
class-incremental stream: on the classes seen); forgetting =
mean over j < T-1 of (max_{i<T-1} R[i][j] - R[T-1][j]); backward transfer (Lopez-Paz & Ranzato
2017, eq. 3) = mean over j < T-1 of (R[T-1][j] - R[j][j]).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from streamcl.plugin import hookimpl


@dataclass
class EvalCounts:
    """Correct and total predictions per class on one test experience."""

    experience: int
    correct: Tensor
    total: Tensor

    @property
    def accuracy(self) -> float:
        n = int(self.total.sum())
        return float(self.correct.sum()) / n if n else float("nan")


def final_accuracy(R: list[list[float]]) -> float:
    return sum(R[-1]) / len(R[-1])


def forgetting(R: list[list[float]]) -> float | None:
    T = len(R)
    if T < 2:
        return None
    cols = range(min(T - 1, len(R[-1])))
    return sum(max(R[i][j] for i in range(T - 1)) - R[-1][j] for j in cols) / len(cols)


def backward_transfer(R: list[list[float]]) -> float | None:
    T = len(R)
    if T < 2 or len(R[0]) < T - 1:
        return None
    return sum(R[-1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def pooled_accuracy(counts: list[EvalCounts], experiences) -> float | None:
    """Accuracy over the samples of the test experiences numbered in ``experiences`` (None if none)."""
    chosen = [c for c in counts if c.experience in experiences]
    total = sum(int(c.total.sum()) for c in chosen)
    return sum(int(c.correct.sum()) for c in chosen) / total if total else None


@dataclass
class Metrics:
    """Engine-owned plugin: after each evaluation that follows training, records a row of R.

    Test experience j counts as seen once the train experience j was trained (``covers``);
    ``new`` accuracy pools the test experiences of the latest train experience, ``old`` those of
    earlier ones (for a class-incremental stream: new classes vs old classes). ``uncorrected`` keeps
    the same numbers measured with bias-correction plugins switched off (``summary()["uncorrected"]``).
    """

    name = "metrics"
    matrix: list[list[float]] = field(default_factory=list)
    seen_acc: list[float | None] = field(default_factory=list)
    old_acc: list[float | None] = field(default_factory=list)
    new_acc: list[float | None] = field(default_factory=list)
    rows_of: list[int] = field(default_factory=list)
    uncorrected: dict[int, dict] = field(default_factory=dict)  # experiences trained -> the same, before correction

    @hookimpl
    def after_eval(self, strategy) -> None:
        trained = strategy.trained
        if not trained:
            return
        counts: list[EvalCounts] = strategy.eval_results
        row = [c.accuracy for c in counts]
        new = set(trained[-1].covers)
        seen = {j for e in trained for j in e.covers}
        entry = (row, pooled_accuracy(counts, seen), pooled_accuracy(counts, seen - new),
                 pooled_accuracy(counts, new))
        if self.rows_of and self.rows_of[-1] == len(trained):  # evaluated twice after one experience
            for lst, value in zip(self._lists(), entry):
                lst[-1] = value
        else:
            for lst, value in zip(self._lists(), entry):
                lst.append(value)
            self.rows_of.append(len(trained))

    def note_uncorrected(self) -> None:
        """Keep the latest evaluation as the one before correction (see ``streamcl.runner.evaluate``)."""
        if self.matrix:
            self.uncorrected[self.rows_of[-1]] = {"final_accuracy": final_accuracy([self.matrix[-1]]),
                                                  "old_accuracy": self.old_acc[-1], "new_accuracy": self.new_acc[-1]}

    def _lists(self):
        return self.matrix, self.seen_acc, self.old_acc, self.new_acc

    def summary(self) -> dict:
        R = self.matrix
        if not R:
            return {"accuracy_matrix": []}
        inc = [a for a in self.seen_acc if a is not None]
        return {
            "accuracy_matrix": [list(r) for r in R],
            "final_accuracy": final_accuracy(R),
            "avg_incremental_accuracy": sum(inc) / len(inc) if inc else None,
            "forgetting": forgetting(R),
            "bwt": backward_transfer(R),
            "seen_accuracy": list(self.seen_acc),
            "old_accuracy": list(self.old_acc),
            "new_accuracy": list(self.new_acc),
            **({"uncorrected": {k: [self.uncorrected.get(n, {}).get(k) for n in self.rows_of]
                                for k in ("final_accuracy", "old_accuracy", "new_accuracy")}}
               if self.uncorrected else {}),
        }

    def state_dict(self) -> dict:
        return {k: dict(v) if isinstance(v, dict) else [list(x) if isinstance(x, list) else x for x in v]
                for k, v in vars(self).items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
