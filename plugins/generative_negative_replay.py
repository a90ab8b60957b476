"""Generative negative replay: generated samples of old classes train only the current classes' outputs, as
negatives."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from streamcl import hookimpl
from streamcl.parts import detached_input
from streamcl.plugins.generative_replay import GenerativeReplay


class GenerativeNegativeReplay(GenerativeReplay):
    """Generative negative replay (Graffieti et al. 2023, "Generative negative replay for continual learning",
    Neural Networks 162, Sec. 3: generated data as negatives, "antagonists", of the new classes).

    The generator, its training, the frozen copies, the ratio ``m / n`` and the labels are
    :class:`GenerativeReplay`'s (same arguments). The generated samples do not join the minibatch as positives:
    they are scored in a term ``loss/gnr``, ``(m / n)`` times the cross-entropy, with the frozen solver's labels, of
    the head's logits on the samples' features in which only the current experience's classes carry gradients, and
    only to their own head rows:

        gnr = (m / n) * mean_i CE(l_i, y_i),  l_ic = head_c(stop_grad(f_i)) for c current, stop_grad(...) otherwise,

    so a sample labelled with an old class sends ``(m / n) p_ic / N`` to each current class's logit and nothing to
    the old classes' outputs nor to the layers below the head: the new classes' outputs learn not to claim old-
    looking inputs, and no output or feature is trained on poor samples. (Gradients into the features as well
    diverge on SFM-5 within the second experience: nothing holds the detached old logits, so the features grow.)
    With ``distill`` the old classes' outputs keep the frozen solver's function on the same samples: a term
    ``loss/gnr_distill``, ``(m / n) T^2`` times the cross-entropy between the solver's and the classifier's softened
    outputs over the old classes only (no old class is told to beat a new one). Positive replay is otherwise
    another plugin's, or none: list a ``Replay`` before it. Needs a linear head; owns the role ``generator``.
    """

    def __init__(self, *args, distill: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill = bool(distill)

    @hookimpl
    def setup(self, strategy) -> None:
        strategy.require_head("a classifier head (negatives train its current rows)", self)

    @hookimpl
    def replay_batch(self, strategy, batch) -> None:
        return None

    @hookimpl
    def loss_terms(self, strategy) -> dict[str, Tensor] | None:
        rows = self.replayed_outside(strategy)
        if rows is None:
            return None
        batch, teacher, weight = rows
        with detached_input(strategy.head):  # the head's rows learn, nothing below it
            logits = strategy.forward(batch).logits
        terms = {"gnr": negative_cross_entropy(logits, batch.y, strategy.experience.classes) * weight}
        if self.distill:
            logits = strategy.forward(batch).logits
            terms["gnr_distill"] = self.soft_cross_entropy(logits, teacher, self.old_classes, self.old_classes,
                                                           self.temperature) * weight
        return terms


def negative_cross_entropy(logits: Tensor, y: Tensor, current) -> Tensor:
    """The mean cross-entropy of ``logits`` with labels ``y`` whose gradient flows only through the columns
    ``current`` (every other column held fixed)."""
    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[torch.as_tensor([c for c in current if c < logits.shape[1]], dtype=torch.long, device=logits.device)] = True
    return F.cross_entropy(torch.where(keep, logits, logits.detach()), y)
