"""The task loss over the current experience's classes only: the logits of every other class masked in training."""
from __future__ import annotations

import torch
from torch import Tensor

from streamcl import Plugin, hookimpl


def current_classes_loss(strategy, logits: Tensor, y: Tensor) -> Tensor:
    """``strategy.criterion`` on ``logits`` with every class outside the training experience's classes set to -inf;
    the minibatch's own labels stay (a replayed sample keeps its class)."""
    allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    allowed[[int(c) for c in strategy.experience.classes if int(c) < logits.shape[1]]] = True
    allowed[y] = True
    return strategy.criterion(logits.masked_fill(~allowed, float("-inf")), y)


class CurrentClassesLoss(Plugin):
    """The cross-entropy of each training minibatch over the classes of the experience being trained: the other
    classes' logits are masked (-inf), so the head rows of earlier classes are not pushed down by samples they
    never see again. The classifier of the SLCA authors' code (Zhang et al. 2023: ``cross_entropy(logits[:,
    known:], targets - known)``, a head grown per task), and L2P's and DualPrompt's ``train_mask`` (Wang et al.
    2022). Evaluation scores every class. Owns ``criterion``."""

    owns = frozenset({"criterion"})

    @hookimpl
    def task_loss(self, strategy, output, batch) -> Tensor:
        return current_classes_loss(strategy, output.logits, batch.y)
