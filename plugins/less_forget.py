"""LUCIR's less-forget constraint: the normalised features kept close to those of the model before the experience."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from streamcl import hookimpl
from streamcl.errors import ConfigError
from streamcl.plugins.distill import Distill


class LessForget(Distill):
    """The less-forget constraint (Hou et al. 2019, "Learning a Unified Classifier Incrementally via
    Rebalancing" (LUCIR), CVPR, eq. 6-7): feature-level distillation from the model as it was
    before the current experience.

    The teacher is a frozen copy of ``strategy.model`` taken at ``before_training_exp`` of every
    experience after the first (as :class:`~streamcl.plugins.distill.Distill` takes it). On every
    training minibatch, replayed samples included (as in the authors' code), with ``f`` the model's
    features (``output.features``: the input of the classifier head, ``strategy.head``) and ``f*`` the
    teacher's (``strategy.forward(batch, model=teacher)``: the same head's input in the copy),

        L_less_forget = lambda * mean_x (1 - <f*_bar(x), f_bar(x)>)      (eq. 6, bars: L2-normalised)

    logged as ``loss/less_forget``, with the adaptive weight of eq. 7

        lambda = lambda_base * sqrt(|C_old| / |C_new|),

    ``|C_old|`` the number of classes of the experiences trained before, ``|C_new|`` the number of classes
    of the current one (``adaptive=False``: ``lambda = lambda_base``). Default ``lambda_base = 5``, the
    paper's CIFAR-100 value. The term lies in ``[0, 2 lambda]`` and its gradient in the features is
    ``lambda / |f|`` at most, so no ``lambda_base`` in the allowed range (finite, >= 0) makes it infinite.

    Works with any model in which the engine finds a linear classifier head (``requires = {"head"}``: a model
    without one is refused when the Strategy is built), with or without
    :class:`~streamcl.plugins.cosine_head.CosineHead`. It owns the role ``feature_distillation``; it may
    run beside a distiller of the logits (``logit_distillation``: LwF, iCaRL's BCE).
    """

    term = "less_forget"
    owns = frozenset({"feature_distillation"})
    requires = frozenset({"head"})

    def __init__(self, lambda_base: float = 5.0, adaptive: bool = True):
        if (isinstance(lambda_base, bool) or not isinstance(lambda_base, (int, float)) or not math.isfinite(lambda_base)
                or lambda_base < 0):
            raise ConfigError(f"less_forget lambda_base={lambda_base!r}: it must be a finite number >= 0")
        if not isinstance(adaptive, bool):
            raise ConfigError(f"less_forget adaptive={adaptive!r}: use true (lambda_base * sqrt(old classes / new "
                              "classes), eq. 7) or false (lambda_base)")
        super().__init__()  # the teacher and the old classes; nothing of the logit distillation is used
        self.lambda_base, self.adaptive = float(lambda_base), adaptive

    def weight_for(self, n_new: int) -> float:
        """Eq. 7's ``lambda`` for an experience of ``n_new`` classes after ``len(self.old_classes)`` old ones."""
        if not self.adaptive:
            return self.lambda_base
        return self.lambda_base * math.sqrt(len(self.old_classes) / max(n_new, 1))

    @hookimpl
    def loss_terms(self, strategy, batch, output) -> dict[str, Tensor] | None:
        if self.teacher is None or self.lambda_base == 0:
            return None
        with torch.no_grad():
            target = strategy.forward(batch, model=self.teacher, adapt=False).features
        if output.features is None or target is None:
            raise ConfigError(f"less_forget distils the features, the input of the classifier head at "
                              f"{strategy.head_path!r}, and {type(strategy.model).__name__}'s forward does not call "
                              "it; name the classifier layer with Strategy(head=...)")
        weight = self.weight_for(len(strategy.experience.classes))
        return {self.term: weight * less_forget(output.features, target)}


def less_forget(features: Tensor, teacher: Tensor) -> Tensor:
    """``mean_n (1 - cos(features_n, teacher_n))``, the unweighted term of eq. 6."""
    return (1 - F.cosine_similarity(features.flatten(1), teacher.flatten(1), dim=1)).mean()
