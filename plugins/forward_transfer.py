"""Forward transfer (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning", Sec. 4)."""
from __future__ import annotations

import math

import torch

from streamcl import Plugin, hookimpl
from streamcl.metrics import recording
from streamcl.parts import frozen


def forward_transfer(R: list[list[float | None]], b: dict[int, float], learned: dict[int, int]) -> float | None:
    """GEM's FWT = 1/(T-1) sum_{i=2..T} (R_{i-1,i} - b_i): the mean over test experiences j learned at row
    ``learned[j] = k >= 1`` of ``R[k-1][j] - b[j]`` (accuracy on j just before training it, minus the randomly
    initialised model's). Terms with an unknown cell or ``b`` are left out; ``None`` when none is left."""
    terms = []
    for j, k in sorted(learned.items()):
        cell = R[k - 1][j] if 1 <= k <= len(R) and j < len(R[k - 1]) else None
        if cell is not None and not math.isnan(cell) and b.get(j) is not None:
            terms.append(cell - b[j])
    return sum(terms) / len(terms) if terms else None


class ForwardTransfer(Plugin):
    """GEM's forward transfer FWT (Lopez-Paz & Ranzato 2017, Sec. 4): the mean, over test experiences, of the
    accuracy just before training them minus that of the model at random initialisation.

    Computed by :func:`forward_transfer` from ``strategy.metrics.matrix``. Test experience j is learned at the row
    of the first trained experience that covers it (``Experience.covers``; row j in a plain stream, as in GEM).

    ``b[j]`` is the accuracy on test experience j of the model at random initialisation: a frozen copy of
    ``strategy.model`` taken at the first ``before_training_exp`` (after the first ``adapt_model``, before any
    update; it costs a model's memory), run through the engine's forward (``strategy.forward(batch, model=...)``,
    every ``adapt_logits`` applied, as the engine's evaluation) the first time j is evaluated for the matrix.

    Logs ``forward_transfer`` at the matrix row (axis ``"experience"``) once defined. Results:
    ``forward_transfer`` (``None`` until a test experience was measured before it was learned) and
    ``random_init_accuracy`` (``b`` per test experience, ``None`` where not measured). A metric: it owns no role.
    """

    metric = True  # observes only; the generic pair and resume tests leave metrics out (tests/reliability.py)

    def __init__(self):
        self.model: torch.nn.Module | None = None  # the model at random initialisation
        self.b: dict[int, float] = {}

    @hookimpl
    def before_training_exp(self, strategy) -> None:
        if self.model is None:
            self.model = frozen(strategy.model)  # the plain module, never a DDP wrapper

    @staticmethod
    def _measures(strategy) -> bool:
        return recording(strategy) and strategy.correcting and bool(strategy.trained)

    @hookimpl
    def after_eval_exp(self, strategy) -> None:
        exp = strategy.experience
        if self.model is None or exp.index in self.b or not self._measures(strategy):
            return
        model = self.model.to(strategy.device)
        hits = torch.zeros((), dtype=torch.long, device=strategy.device)
        total = 0
        with torch.no_grad():
            for batch in strategy.batches(exp.dataset, strategy.eval_batch_size, local=True):  # every rank: all
                batch = batch.to(strategy.device)
                hits += (strategy.forward(batch, model=model).logits.argmax(1) == batch.y).sum()
                total += len(batch)
        self.b[exp.index] = int(hits) / total if total else float("nan")

    def value(self, strategy) -> float | None:
        """FWT now, from ``strategy.metrics.matrix`` and the experiences trained."""
        learned: dict[int, int] = {}
        for k, exp in enumerate(strategy.trained):
            for j in exp.covers:
                learned.setdefault(j, k)
        return forward_transfer(strategy.metrics.matrix, self.b, learned)

    @hookimpl
    def after_eval(self, strategy) -> None:
        fwt = self.value(strategy) if self._measures(strategy) else None  # uses rows before this one only
        if fwt is not None:
            strategy.log("forward_transfer", fwt, step=len(strategy.trained) - 1, axis="experience")

    @hookimpl
    def results(self, strategy) -> dict:
        width = max(self.b, default=-1) + 1
        return {"forward_transfer": self.value(strategy), "random_init_accuracy": [self.b.get(j) for j in range(width)]}

    def state_dict(self) -> dict:
        return {"model": self.model, "model_state": None if self.model is None else self.model.state_dict(),
                "b": dict(self.b)}

    def load_state_dict(self, state: dict) -> None:
        self.model = None if state["model"] is None else frozen(state["model"], state["model_state"])
        self.b = dict(state["b"])
