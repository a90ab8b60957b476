"""LUCIR's inter-class separation: a margin ranking loss between old-class samples' true and new-class scores."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from streamcl import Plugin, hookimpl
from streamcl.plugin import warn
from streamcl.errors import ConfigError
from streamcl.plugins.cosine_head import CosineLinear


class MarginRanking(Plugin):
    """The margin ranking loss (Hou et al. 2019, "Learning a Unified Classifier Incrementally via
    Rebalancing" (LUCIR), CVPR, inter-class separation, eq. 8-9).

    On every training minibatch, for each sample ``x`` of an old class (a class of an experience trained
    before; in class-incremental streams these are the replayed samples), with ``s_c(x)`` its score for
    class ``c`` and ``s_1(x) >= ... >= s_K(x)`` its ``K`` highest scores among the new classes (those of
    the current experience not seen before; all of them when there are fewer than ``K``):

        L_mr(x) = sum_{k=1..K} max(0, m - s_y(x) + s_k(x))                  (eq. 8)

    and the term, logged as ``loss/margin_ranking``, is ``weight * mean_{x old} L_mr(x)`` (eq. 9 averages
    over the old-class samples ``N_o`` of the batch; the authors' code averages over the ``|N_o| K`` pairs,
    i.e. ``weight = 1 / K``). No old-class sample in the batch, or no new class: no term (an experience with no
    new class, as in a domain-incremental stream, is warned about once).

    Scores: when the classifier head (``strategy.head``) is a :class:`~streamcl.plugins.cosine_head.CosineLinear`
    (:class:`~streamcl.plugins.cosine_head.CosineHead`), the cosine scores ``<w_bar_c, f_bar(x)>`` of the features
    (``output.features``, the head's input) before the scale eta, in [-1, 1], as in the paper; with any other head,
    or a model without one, the model's own logits (``output.raw``, before ``adapt_logits``), where the margin
    ``m`` is in logit units. So it runs on any model. Defaults from the paper: ``K = 2``,
    ``m = 0.5``, weight 1. It needs a plugin owning ``memory`` (the samples of old classes come from it)
    and owns ``margin_ranking``.
    """

    term = "margin_ranking"
    owns = frozenset({"margin_ranking"})
    needs = frozenset({"memory"})

    def __init__(self, margin: float = 0.5, k: int = 2, weight: float = 1.0):
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
            raise ConfigError(f"margin_ranking margin={margin!r}: it must be a finite number >= 0 (cosine scores "
                              "lie in [-1, 1], so a margin above 2 can never be met)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"margin_ranking k={k!r}: the number of hardest new classes, a whole number >= 1")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"margin_ranking weight={weight!r}: it must be a finite number >= 0")
        self.margin, self.k, self.weight = float(margin), k, float(weight)
        self.old_classes: list[int] = []  # classes of the experiences trained so far, in order of arrival
        self._warned_no_new = False

    @hookimpl
    def before_training_exp(self, strategy) -> None:
        exp = strategy.experience
        if self.old_classes and all(c in self.old_classes for c in exp.classes) and not self._warned_no_new:
            self._warned_no_new = True  # once per plugin
            warn(f"margin_ranking: experience {exp.index} brings no class not seen before (a domain-incremental "
                 "stream?): there are no new classes to rank the old samples' scores above, and the loss does nothing")

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        self.old_classes += [c for c in strategy.experience.classes if c not in self.old_classes]

    @hookimpl
    def loss_terms(self, strategy, batch, output) -> dict[str, Tensor] | None:
        new = [c for c in strategy.experience.classes if c not in self.old_classes]
        if not self.old_classes or not new or self.weight == 0:
            return None
        y = batch.y
        old = torch.isin(y, torch.tensor(self.old_classes, device=y.device))
        if not bool(old.any()):
            return None
        scores = self.scores(strategy, output)
        new = torch.tensor([c for c in new if c < scores.shape[1]], dtype=torch.long, device=scores.device)
        if not len(new):
            return None
        return {self.term: self.weight * margin_ranking(scores[old], y[old], new, self.k, self.margin)}

    @staticmethod
    def scores(strategy, output) -> Tensor:
        """The cosine scores of a :class:`CosineLinear` head on ``output.features``, else the model's own logits."""
        if output.features is not None and strategy.head_path is not None:
            try:
                head = strategy.head
            except ConfigError:  # a module named as the head that is not linear: no cosine scores
                head = None
            if isinstance(head, CosineLinear):
                return head.cosine(output.features)
        return output.logits if output.raw is None else output.raw

    def state_dict(self) -> dict:
        return {"old_classes": list(self.old_classes)}

    def load_state_dict(self, state: dict) -> None:
        self.old_classes = list(state["old_classes"])


def margin_ranking(scores: Tensor, y: Tensor, new: Tensor, k: int, margin: float) -> Tensor:
    """``mean_n sum_{k} max(0, margin - scores[n, y_n] + top_k(scores[n, new]))`` (eq. 8 averaged over ``n``)."""
    gt = scores.gather(1, y[:, None])
    top = scores[:, new].topk(min(k, len(new)), dim=1).values
    return F.relu(margin - gt + top).sum(1).mean()
