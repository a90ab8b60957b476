"""Nearest-mean-of-exemplars classification: predict the class whose exemplar mean is closest."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from streamcl import Plugin, hookimpl
from streamcl.errors import ConfigError


class NMEClassifier(Plugin):
    """iCaRL's nearest-mean-of-exemplars classifier (Rebuffi et al. 2017, "iCaRL: Incremental
    Classifier and Representation Learning", Alg. 1).

    For every class y with exemplars in the replay memory (``strategy.memory``: the ``.memory`` of
    the plugin that owns the ``memory`` role, e.g. :class:`~streamcl.plugins.replay.Replay`), the
    class mean is ``mu_y = normalise(mean_{p in P_y} normalise(phi(p)))`` with ``phi`` the model's
    features (``strategy.embed``: the input of its classifier head, so any model with a linear head
    works; ``requires = {"head"}``). In evaluation only, the logits become
    ``-|| normalise(phi(x)) - mu_y ||^2`` for classes with a mean and ``-inf`` for the others, so the
    prediction is ``argmin_y || phi(x) - mu_y ||``; training keeps the head's logits.

    A logit that is ``-inf`` when it reaches this plugin stays ``-inf``: a task mask listed before
    (:class:`~streamcl.plugins.task_mask.TaskMask`, which the runner puts first on task-incremental
    streams) keeps the prediction among the task's classes, as Alg. 1 restricted to the task's means.

    The means are computed at ``before_eval`` from the model and memory as they are then, i.e.
    after each experience, whatever the plugin order (the memory is updated in ``after_training_exp``
    hooks). No flipped copies of exemplars (the paper's CIFAR trick does not apply to flat inputs).
    Distributed-safe: the memory and the model are the same on every rank, so are the means.
    """

    owns = frozenset({"classifier"})
    needs = frozenset({"memory"})  # a plugin that owns "memory" and exposes a streamcl.memory.Memory
    requires = frozenset({"head"})  # the features are the head's input

    def __init__(self):
        self.classes: Tensor | None = None  # the classes that have a mean, ascending
        self.means: Tensor | None = None  # (len(classes), feature_dim), unit norm

    @hookimpl
    def setup(self, strategy) -> None:
        strategy.require_memory(self, "classifies by the means of the exemplars in a replay memory")

    @hookimpl
    def before_eval(self, strategy) -> None:
        memory = strategy.memory
        if memory is None or len(memory) == 0:
            self.classes = self.means = None
            return
        exemplars = memory.batch()
        self.classes, self.means = class_means(strategy.embed(exemplars), exemplars.y)

    @hookimpl
    def adapt_logits(self, strategy, logits: Tensor, features: Tensor | None) -> Tensor | None:
        if strategy.is_training or self.means is None:
            return None  # before any memory there is nothing to compare with: keep the head's logits
        if features is None:
            raise ConfigError(f"NMEClassifier needs the model's features, the input of its classifier head at "
                              f"{strategy.head_path!r}, and {type(strategy.model).__name__}'s forward does not "
                              "call it; name the classifier layer with Strategy(head=...)")
        out = nme_logits(features, self.means.to(features.device), self.classes.to(features.device),
                         logits.shape[1])
        return out.masked_fill(torch.isneginf(logits), float("-inf"))  # a task mask before this one holds

    def state_dict(self) -> dict:
        return {"classes": self.classes, "means": self.means}

    def load_state_dict(self, state: dict) -> None:
        self.classes, self.means = state["classes"], state["means"]


def class_means(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The classes in ``labels`` (ascending) and, for each, the normalised mean of the normalised ``features``
    of its samples (iCaRL, Alg. 1: ``mu_y``)."""
    phi = F.normalize(features.float().flatten(1), dim=1)
    classes, index = torch.unique(labels, sorted=True, return_inverse=True)
    sums = torch.zeros(len(classes), phi.shape[1], device=phi.device).index_add_(0, index.to(phi.device), phi)
    counts = torch.bincount(index, minlength=len(classes)).to(phi)
    return classes, F.normalize(sums / counts[:, None], dim=1)


def nme_logits(features: Tensor, means: Tensor, classes: Tensor, n_outputs: int) -> Tensor:
    """``-|| normalise(features) - means_c ||^2`` in column ``classes[c]``, ``-inf`` in the other columns."""
    phi = F.normalize(features.float().flatten(1), dim=1)
    dist = phi.pow(2).sum(1, keepdim=True) + means.pow(2).sum(1) - 2 * phi @ means.T
    out = torch.full((len(phi), n_outputs), float("-inf"), device=phi.device, dtype=phi.dtype)
    keep = classes < n_outputs
    out[:, classes[keep]] = -dist[:, keep]
    return out
