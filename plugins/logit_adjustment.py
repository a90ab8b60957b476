"""Logit-adjusted cross-entropy: the training softmax offset by the log label frequencies of the minibatches."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from streamcl import Plugin, distributed as dist, hookimpl
from streamcl.errors import ConfigError


class LogitAdjustment(Plugin):
    """The logit-adjusted loss (Menon et al. 2021, "Long-tail learning via logit adjustment", ICLR, eq. 10) as
    the task loss of a rehearsal method, against the recency bias of class-incremental training:

        - mean_n log softmax(z_n + tau * log pi)_{y_n},

    ``z`` the model's logits (after ``adapt_logits``), ``pi`` the label frequencies of the training rows seen so
    far in this experience, replayed rows included (the minibatch at hand counted too, on every process), so the old classes, rare
    beside the new ones, are not pushed down by their rarity alone. Prediction uses the plain logits.
    Classes not trained yet in the experience (``pi = 0``) take no part in the softmax, as a growing head's
    missing outputs. ``tau = 1`` is the paper's. It owns the role ``criterion``.
    """

    owns = frozenset({"criterion"})

    def __init__(self, tau: float = 1.0):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
            raise ConfigError(f"logit_adjustment tau={tau!r}: a finite number >= 0")
        self.tau = float(tau)
        self.counts: Tensor | None = None

    @hookimpl
    def before_training_exp(self, strategy) -> None:
        self.counts = None

    @hookimpl
    def task_loss(self, strategy, output, batch) -> Tensor:
        logits = output.logits
        n = logits.shape[1]
        seen = dist.all_reduce(torch.bincount(batch.y, minlength=n)[:n].to(logits.dtype))  # every rank's rows
        self.counts = seen if self.counts is None or len(self.counts) != n else self.counts + seen
        return F.cross_entropy(logits + adjustment(self.counts, self.tau), batch.y)

    def state_dict(self) -> dict:
        return {"counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        self.counts = state["counts"]


def adjustment(counts: Tensor, tau: float) -> Tensor:
    """``tau * log(counts / counts.sum())``, ``-inf`` where a count is 0 (for any ``tau``, 0 included)."""
    log_prior = torch.log(counts.clamp_min(1) / counts.sum())
    return torch.where(counts > 0, tau * log_prior, torch.full_like(log_prior, -math.inf))
