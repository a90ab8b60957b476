"""The engine's part of the run's one event stream: loss terms and accuracies sent with ``strategy.log``, which every
logger writes (TensorBoard, CSV, Weights & Biases, the console), beside what plugins log themselves."""
from __future__ import annotations

import torch

from streamcl.metrics import recording
from streamcl.plugin import hookimpl


class Events:
    """Engine-owned plugin that logs, when some logger takes scalars:

    * ``loss/<term>`` for every loss term and ``loss/total``, after every training iteration (axis ``step``);
    * after an evaluation that records (axis ``experience``: the matrix row, experiences trained minus one):
      ``accuracy/exp<j>`` for each cell measured, ``accuracy/mean``, ``accuracy/seen``, ``accuracy/old``,
      ``accuracy/new``; the same under ``uncorrected/`` for the evaluation with bias corrections switched off
      (``strategy.uncorrected()``); and the images ``accuracy_matrix`` (a labelled heat map) and
      ``old_new_accuracy`` (old, new and seen accuracy per experience, readable where 5-point curves are not);
    * ``periodic/exp<j>`` and ``periodic/mean`` for an evaluation that does not record (axis ``step``).
    """

    name = "events"

    @hookimpl
    def after_training_iteration(self, strategy) -> None:
        if not strategy.logs_values or not strategy.loss_terms:
            return
        terms = strategy.loss_terms
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).tolist()  # one sync
        for name, value in zip(terms, values):
            strategy.log(f"loss/{name}", value)
        strategy.log("loss/total", sum(values))

    @hookimpl
    def after_eval(self, strategy) -> None:
        if not recording(strategy):
            accuracy = {c.experience: c.accuracy for c in strategy.eval_results}
            for j, acc in sorted(accuracy.items()):
                strategy.log(f"periodic/exp{j}", acc)
            if accuracy:
                strategy.log("periodic/mean", sum(accuracy.values()) / len(accuracy))
            return
        summary = strategy.metrics.summary()
        R = summary["accuracy_matrix"]
        row = len(strategy.trained) - 1
        if not strategy.eval_results or not 0 <= row < len(R):
            return
        prefix = "" if strategy.correcting else "uncorrected/"
        known = [(j, acc) for j, acc in enumerate(R[row]) if acc is not None]
        for j, acc in known:
            strategy.log(f"{prefix}accuracy/exp{j}", acc, step=row, axis="experience")
        strategy.log(f"{prefix}accuracy/mean", sum(acc for _, acc in known) / len(known), step=row, axis="experience")
        for key in ("seen", "old", "new"):
            value = summary[f"{key}_accuracy"][row]
            if value is not None:
                strategy.log(f"{prefix}accuracy/{key}", value, step=row, axis="experience")
        if strategy.correcting and strategy.logs_images:
            from streamcl.report import matrix_figure, old_new_figure
            for name, figure in (("accuracy_matrix", matrix_figure(R)), ("old_new_accuracy", old_new_figure(summary))):
                image = torch.from_numpy(figure).permute(2, 0, 1).float() / 255
                strategy.log_image(name, image, step=row, axis="experience")
