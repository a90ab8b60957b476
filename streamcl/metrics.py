"""The accuracy matrix and what is derived from it.

``R[i][j]`` is the accuracy on test experience j, measured by a recording evaluation after the
first ``i + 1`` experiences were trained (row i belongs to a training state, not to the i-th call
of ``eval``); a cell nobody measured is ``None``. Definitions follow docs/protocols.md, with
``L`` the last row and "learned(j)" the row right after the experience that covers test experience
j was trained (``Experience.covers``; row j when experience j covers test experience j):

- final average accuracy = mean of the known cells of ``R[L]``;
- average incremental accuracy = mean over rows of the accuracy pooled over the test experiences
  seen so far (for a class-incremental stream: on the classes seen), over the rows where every
  seen test experience was measured;
- forgetting = mean over test experiences j learned before the last row, with ``R[L][j]`` and at
  least one earlier cell known, of ``max_{i<L, known} R[i][j] - R[L][j]``;
- backward transfer (Lopez-Paz & Ranzato 2017, eq. 3) = mean over those j whose cell
  ``R[learned(j)][j]`` is known, of ``R[L][j] - R[learned(j)][j]``.

Evaluations that do not record (run while training is in progress, such as the engine's periodic
evaluation, or called with ``record=False``, such as a validation stream) never enter the matrix:
they are kept as their own curves in ``Metrics.periodic``.
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


def recording(strategy) -> bool:
    """Whether the evaluation in progress writes the accuracy matrix (see ``Strategy.eval``'s ``record``)."""
    return bool(getattr(strategy, "recording", not strategy.is_training))


Matrix = list[list[float | None]]


def _identity(R: Matrix) -> dict[int, int]:
    return {j: j for j in range(len(R[-1]))} if R else {}


def _cell(R: Matrix, i: int, j: int) -> float | None:
    return R[i][j] if 0 <= i < len(R) and j < len(R[i]) else None


def final_accuracy(R: Matrix) -> float | None:
    """Mean of the known cells of the last row."""
    known = [v for v in R[-1] if v is not None]
    return sum(known) / len(known) if known else None


def forgetting(R: Matrix, learned: dict[int, int] | None = None) -> float | None:
    """Mean over test experiences learned before the last row of (best earlier accuracy - last accuracy).

    ``learned[j]`` is the row right after the experience covering test experience j was trained
    (default: row j). Unknown cells (``None``) are skipped; ``None`` when no test experience qualifies.
    """
    last = len(R) - 1
    drops = []
    for j, i in (_identity(R) if learned is None else learned).items():
        now = _cell(R, last, j)
        earlier = [v for v in (_cell(R, r, j) for r in range(last)) if v is not None]
        if i < last and now is not None and earlier:
            drops.append(max(earlier) - now)
    return sum(drops) / len(drops) if drops else None


def backward_transfer(R: Matrix, learned: dict[int, int] | None = None) -> float | None:
    """Lopez-Paz & Ranzato's BWT: mean over j learned before the last row of R[last][j] - R[learned(j)][j].

    Only test experiences whose last cell and just-learned cell are both known count; ``None`` if none.
    """
    last = len(R) - 1
    diffs = []
    for j, i in (_identity(R) if learned is None else learned).items():
        now, then = _cell(R, last, j), _cell(R, i, j)
        if i < last and now is not None and then is not None:
            diffs.append(now - then)
    return sum(diffs) / len(diffs) if diffs else None


def pooled_accuracy(counts: list[EvalCounts], experiences) -> float | None:
    """Accuracy over the samples of the test experiences numbered in ``experiences`` (None if none)."""
    chosen = [c for c in counts if c.experience in experiences]
    total = sum(int(c.total.sum()) for c in chosen)
    return sum(int(c.correct.sum()) for c in chosen) / total if total else None


def _plain(value):
    """A deep copy of nested dicts and lists of numbers (checkpoints hold plain data only)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass
class Metrics:
    """Engine-owned plugin: records every recording evaluation into the accuracy matrix.

    ``cells[n][j] = [correct, total]`` for test experience j, measured after ``n`` experiences were
    trained; an evaluation after the same training state updates the cells it measured and keeps
    the others, so a subset of the test stream, or two subsets one after the other, fill one row.
    ``covers[k]`` are the test experiences the k-th trained experience covers: test experience j
    counts as seen once an experience covering it was trained; ``new`` accuracy pools the test
    experiences of the latest train experience, ``old`` those of earlier ones (for a
    class-incremental stream: new classes vs old classes). Evaluations that do not record go to
    ``periodic`` instead. ``uncorrected`` keeps the same numbers measured with bias-correction
    plugins switched off (``summary()["uncorrected"]``).
    """

    name = "metrics"
    cells: dict[int, dict[int, list[int]]] = field(default_factory=dict)
    covers: list[list[int]] = field(default_factory=list)
    periodic: list[dict] = field(default_factory=list)
    uncorrected: dict[int, dict] = field(default_factory=dict)  # experiences trained -> the same, before correction
    last_row: int | None = None  # experiences trained at the latest recording evaluation

    @hookimpl
    def after_eval(self, strategy) -> None:
        counts: list[EvalCounts] = strategy.eval_results
        trained = strategy.trained
        if not recording(strategy):
            self.periodic.append({"step": strategy.global_step, "trained": len(trained), "epoch": strategy.epoch,
                                  "accuracy": {c.experience: c.accuracy for c in counts}})
            return
        if not trained or not counts:  # nothing trained yet: no training state to give a row to
            return
        self.covers = [list(e.covers) for e in trained]
        row = self.cells.setdefault(len(trained), {})
        for c in counts:
            row[c.experience] = [int(c.correct.sum()), int(c.total.sum())]
        self.last_row = len(trained)

    def recorded(self, n: int) -> bool:
        """Whether a recording evaluation followed the training of the first ``n`` experiences."""
        return bool(self.cells.get(n))

    # ------------------------------------------------------------------------- derived numbers
    @property
    def n_columns(self) -> int:
        """The largest test-experience index measured, plus one."""
        return max((j + 1 for row in self.cells.values() for j in row), default=0)

    @property
    def rows_of(self) -> list[int]:
        """For each row of ``matrix``, the number of experiences trained when it was measured."""
        return list(range(1, max(self.cells, default=0) + 1))

    @property
    def matrix(self) -> Matrix:
        """R, one row per trained experience up to the last one evaluated; ``None`` where not measured."""
        width = self.n_columns
        return [[_accuracy(self.cells[n][j]) if j in self.cells.get(n, {}) else None for j in range(width)]
                for n in self.rows_of]

    @property
    def learned(self) -> dict[int, int]:
        """Test experience -> the matrix row right after the first experience covering it was trained."""
        out: dict[int, int] = {}
        for k, covered in enumerate(self.covers):
            for j in covered:
                out.setdefault(j, k)
        return out

    def _pooled(self, n: int, experiences: set[int]) -> float | None:
        """Accuracy pooled over ``experiences`` in row ``n``; None unless every one of them was measured."""
        row = self.cells.get(n, {})
        if not experiences or not experiences <= row.keys():
            return None
        total = sum(row[j][1] for j in experiences)
        return sum(row[j][0] for j in experiences) / total if total else None

    def _seen_old_new(self, n: int) -> tuple[float | None, float | None, float | None]:
        seen = {j for covered in self.covers[:n] for j in covered}
        new = set(self.covers[n - 1]) if 0 < n <= len(self.covers) else set()
        return self._pooled(n, seen), self._pooled(n, seen - new), self._pooled(n, new)

    @property
    def seen_acc(self) -> list[float | None]:
        return [self._seen_old_new(n)[0] for n in self.rows_of]

    @property
    def old_acc(self) -> list[float | None]:
        return [self._seen_old_new(n)[1] for n in self.rows_of]

    @property
    def new_acc(self) -> list[float | None]:
        return [self._seen_old_new(n)[2] for n in self.rows_of]

    def note_uncorrected(self) -> None:
        """Keep the latest evaluation as the one before correction (see ``streamcl.runner.evaluate``)."""
        n = self.last_row
        if n is not None:
            _, old, new = self._seen_old_new(n)
            self.uncorrected[n] = {"final_accuracy": final_accuracy([self.matrix[n - 1]]),
                                   "old_accuracy": old, "new_accuracy": new}

    def summary(self) -> dict:
        R = self.matrix
        periodic = {"periodic": _plain(self.periodic)} if self.periodic else {}
        if not R:
            return {"accuracy_matrix": [], **periodic}
        rows = [self._seen_old_new(n) for n in self.rows_of]
        seen, old, new = ([r[k] for r in rows] for k in range(3))
        inc = [a for a in seen if a is not None]
        return {
            "accuracy_matrix": R,
            "final_accuracy": final_accuracy(R),
            "avg_incremental_accuracy": sum(inc) / len(inc) if inc else None,
            "forgetting": forgetting(R, self.learned),
            "bwt": backward_transfer(R, self.learned),
            "seen_accuracy": seen,
            "old_accuracy": old,
            "new_accuracy": new,
            **({"uncorrected": {k: [self.uncorrected.get(n, {}).get(k) for n in self.rows_of]
                                for k in ("final_accuracy", "old_accuracy", "new_accuracy")}}
               if self.uncorrected else {}),
            **periodic,
        }

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"cells": _plain(self.cells), "covers": _plain(self.covers), "periodic": _plain(self.periodic),
                "uncorrected": _plain(self.uncorrected), "last_row": self.last_row}

    def load_state_dict(self, state: dict) -> None:
        if "cells" not in state:
            from streamcl.checkpoint import CheckpointError
            raise CheckpointError("these metrics were saved by an older streamcl (one accuracy-matrix row per "
                                "evaluation call), which cannot be resumed exactly; start the run again")
        state = _plain(state)
        self.cells, self.covers, self.periodic = state["cells"], state["covers"], state["periodic"]
        self.uncorrected, self.last_row = state["uncorrected"], state["last_row"]


def _accuracy(cell: list[int]) -> float:
    correct, total = cell
    return correct / total if total else float("nan")
