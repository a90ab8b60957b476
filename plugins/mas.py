"""Memory aware synapses: importance from the sensitivity of the output's squared L2 norm, without labels."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from streamcl import Plugin, TensorData, hookimpl
from streamcl.errors import ConfigError
from streamcl.penalty import Anchors, sample_gradients
from streamcl.plugins.si import accumulate


def squared_norm(logits: Tensor, batch) -> Tensor:
    """``||F(x)||_2^2`` of the (adapted) logits; masked (non-finite) entries count as 0."""
    return torch.where(torch.isfinite(logits), logits, 0).square().sum()


class MAS(Plugin):
    """Memory aware synapses (Aljundi et al. 2018, "Memory Aware Synapses: Learning what (not) to forget").

    After each experience, the importance of every trainable parameter is
    ``mean_x |d ||F(x)||_2^2 / d theta|`` over the experience's training samples (eq. 2 with the
    gradient of eq. 4), ``F(x)`` the logits after every ``adapt_logits`` (the task's own head under
    :class:`TaskMask`: masked logits count as 0); no label is used. Importances are summed over
    experiences (as the authors' code accumulates them) and later experiences get
    ``lambda_ * sum Omega (theta - theta*)^2`` (eq. 3), ``theta*`` the parameters at the end of the
    last experience, logged as ``loss/mas``. Coefficients go through :class:`streamcl.penalty.Anchors`,
    capped at half the SGD stability limit, so no ``lambda_`` can make a run diverge.

    Default ``lambda_ = 0.03`` rather than the paper's 1 (object recognition, the authors' code), measured
    on the protocols of ``docs/protocols.md`` (seed 0; MLP, SGD with momentum 0.9): ``lambda_ = 1`` gives
    SFM-5-TIL 0.990 but PFM-5 0.709, below Naive's 0.758; 0.1 gives 0.987 and 0.779; 0.03 gives 0.980
    and 0.788 (seeds 0-2: 0.974 and 0.783); 0.01 gives 0.970 and 0.790.
    It owns the role ``mas_penalty``: a second MAS in one strategy is refused.
    """

    term = "mas"
    owns = frozenset({"mas_penalty"})

    def __init__(self, lambda_: float = 0.03):
        bad = isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) or not math.isfinite(lambda_)
        if bad or lambda_ < 0:
            raise ConfigError(f"MAS lambda_={lambda_!r}: it must be a finite number >= 0")
        self.lambda_ = float(lambda_)
        self.importance: dict[str, Tensor] = {}  # Omega, summed over experiences
        self.anchors = Anchors("MAS")

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        data = strategy.experience.dataset
        data = data.to(strategy.device) if isinstance(data, TensorData) else data
        for n, omega in sample_gradients(strategy, data, squared_norm, "abs").items():
            self.importance[n] = accumulate(self.importance.get(n), omega)
        self.anchors.reset(self.lambda_, self.importance, strategy.model, strategy.optimizer)

    @hookimpl
    def loss_terms(self, strategy) -> dict[str, Tensor] | None:
        if not self.anchors:
            return None
        return {self.term: self.anchors.penalty(strategy.model)}

    def state_dict(self) -> dict:
        return {"importance": {n: t.clone() for n, t in self.importance.items()}, "anchors": self.anchors.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.importance = {n: t.clone() for n, t in state["importance"].items()}
        self.anchors.load_state_dict(state["anchors"])
