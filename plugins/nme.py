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

    For every class y with exemplars in the replay memory (the ``.memory`` of the plugin that owns
    the ``memory`` role, e.g. :class:`~streamcl.plugins.replay.Replay`), the class mean is
    ``mu_y = normalise(mean_{p in P_y} normalise(phi(p)))`` with ``phi`` the model's features
    (``model(x, return_features=True)[1]``). In evaluation only, the logits become
    ``-|| normalise(phi(x)) - mu_y ||^2`` for classes with a mean and ``-inf`` for the others, so the
    prediction is ``argmin_y || phi(x) - mu_y ||``; training keeps the head's logits.

    The means are computed at ``before_eval`` from the model and memory as they are then, i.e.
    after each experience, whatever the plugin order (the memory is updated in ``after_training_exp``
    hooks). No flipped copies of exemplars (the paper's CIFAR trick does not apply to flat inputs).
    Distributed-safe: the memory and the model are the same on every rank, so are the means.
    """

    owns = frozenset({"classifier"})
    needs = frozenset({"memory"})  # a plugin that owns "memory" and exposes a streamcl.memory.Memory

    def __init__(self):
        self.classes: Tensor | None = None  # the classes that have a mean, ascending
        self.means: Tensor | None = None  # (len(classes), feature_dim), unit norm

    @hookimpl
    def before_training(self, strategy) -> None:
        self._memory_owner(strategy)  # refuse a strategy without a memory before any training

    @hookimpl
    def before_eval(self, strategy) -> None:
        memory = getattr(self._memory_owner(strategy), "memory", None)
        if memory is None or len(memory) == 0:
            self.classes = self.means = None
            return
        self.classes, self.means = class_means(strategy.model, memory.batch())

    @hookimpl
    def adapt_logits(self, strategy, logits: Tensor, features: Tensor | None) -> Tensor | None:
        if strategy.is_training or self.means is None:
            return None  # before any memory there is nothing to compare with: keep the head's logits
        if features is None:
            raise ConfigError(f"NMEClassifier needs the model's features: {type(strategy.model).__name__}.forward "
                              "must take return_features=True and return (logits, features)")
        return nme_logits(features, self.means.to(features.device), self.classes.to(features.device),
                          logits.shape[1])

    @staticmethod
    def _memory_owner(strategy):
        owner = strategy.owner("memory")
        if owner is None or not hasattr(owner, "memory"):
            found = "no plugin owns the 'memory' role" if owner is None else \
                f"{owner!r} owns 'memory' but keeps no replay memory (.memory)"
            raise ConfigError(f"NMEClassifier classifies by the means of the exemplars in a replay memory, and "
                              f"{found}; list a replay plugin with it, e.g. plugins=[Replay(memory=500, "
                              "selection='herding'), ..., NMEClassifier()]")
        return owner

    def state_dict(self) -> dict:
        return {"classes": self.classes, "means": self.means}

    def load_state_dict(self, state: dict) -> None:
        self.classes, self.means = state["classes"], state["means"]


@torch.no_grad()
def class_means(model: torch.nn.Module, exemplars, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """The classes present in ``exemplars`` (a Batch) and their normalised means of normalised features."""
    was_training = model.training
    model.eval()
    try:
        feats = torch.cat([model(exemplars.x[i:i + chunk], return_features=True)[1]
                           for i in range(0, len(exemplars), chunk)])
    finally:
        model.train(was_training)
    phi = F.normalize(feats.float().flatten(1), dim=1)
    classes, index = torch.unique(exemplars.y, sorted=True, return_inverse=True)
    sums = torch.zeros(len(classes), phi.shape[1], device=phi.device).index_add_(0, index, phi)
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
