"""Weight aligning: the new classes' classifier rows rescaled to the old classes' mean norm after each experience."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from streamcl import Plugin, hookimpl
from streamcl.errors import ConfigError
from streamcl.models.heads import IncrementalLinear


def linear_head(model: nn.Module, who: str) -> nn.Module:
    """``model.head`` if it is a linear layer (``nn.Linear`` or a growing ``IncrementalLinear``), else a ConfigError."""
    head = getattr(model, "head", None)
    if not isinstance(head, (nn.Linear, IncrementalLinear)):
        found = "no .head" if head is None else f"a {type(head).__name__} .head"
        raise ConfigError(f"{who} works on the rows of a linear classifier head, and {type(model).__name__} has "
                          f"{found}; use a streamcl.models.Classifier (mlp or cnn) whose head is nn.Linear or "
                          "IncrementalLinear")
    return head


def aligning_factor(weight: Tensor, old: list[int], new: list[int]) -> float:
    """Eq. 4: ``gamma = mean_{i old} ||w_i|| / mean_{j new} ||w_j||`` over the rows of ``weight``."""
    with torch.no_grad():
        norms = weight.detach().double().norm(dim=1)
        return (norms[old].mean() / norms[new].mean()).item()


class WA(Plugin):
    """Weight aligning (Zhao et al. 2020, "Maintaining Discrimination and Fairness in Class Incremental
    Learning", CVPR, eq. 4-5).

    After each experience that brings classes not seen before (``new``) beside classes of earlier
    experiences (``old``), the new classes' rows of the classifier head ``strategy.model.head`` (an
    ``nn.Linear`` or :class:`~streamcl.models.IncrementalLinear`) are multiplied by

        gamma = mean_{i in old} ||W_i|| / mean_{j in new} ||W_j||            (eq. 4, 5: W_new <- gamma W_new)

    so that new classes' logits no longer dominate because their weight vectors grew longer. Rows of
    classes not seen yet and the bias are left as they are (the paper's FC layer has no bias; here the
    bias of a new class is not rescaled, its logit is ``gamma <W_j, f> + b_j``). The first experience
    has no old classes, so nothing is aligned; a class that recurs (domain-incremental) counts as old.

    ``clip=True`` (the paper's weight clipping, its default): after every optimizer step the head's weights
    are clipped to be non-negative (the features after a ReLU are), from the first experience on. It is
    what makes the norms comparable: without it the old rows, trained longer, grow longer than the new
    ones, gamma > 1 and the alignment favours the new classes further. Measured on SFM-5 (``wa`` recipe,
    Replay 500 + LwFDistill(weight=1), seeds 0-2): clip 0.801 (0.793 with the alignment undone, gammas
    0.69-0.95), no clip 0.781 (0.793 undone, gammas 0.82-1.12). Distillation (the paper's ``L_KD``) is
    another plugin's: the ``wa`` recipe lists :class:`~streamcl.plugins.distill.LwFDistill`.

    :meth:`uncorrected` gives a context in which the last alignment is undone (the new rows divided by
    the last gamma), restored exactly on exit. Every gamma applied is kept in ``gammas`` (experience
    index, gamma), e.g. for logs. It owns the role ``architecture``: it reads and rescales the model's own
    head as a plain linear layer, which plugins that replace the model or its head (hypernetwork,
    progress & compress, cosine_head) take away.
    """

    owns = frozenset({"architecture"})

    def __init__(self, clip: bool = True):
        if not isinstance(clip, bool):
            raise ConfigError(f"wa clip={clip!r}: use true (clip the head's weights to >= 0 after every step, "
                              "as the paper) or false")
        self.clip = clip
        self.gammas: list[tuple[int, float]] = []  # (experience index, gamma) of every alignment
        self.last: dict | None = None  # the latest alignment: {"rows": new classes, "gamma": gamma}
        self._strategy = None  # the strategy the hooks last saw, for uncorrected()
        self._off = False  # inside uncorrected()
        self._undone: tuple[nn.Module, Tensor, Tensor] | None = None  # (head, rows, their aligned values)

    # ------------------------------------------------------------------------------ training
    @hookimpl
    def before_training_exp(self, strategy) -> None:
        self._strategy = strategy
        linear_head(strategy.model, "wa")  # refuse a model without a linear head before any step

    @hookimpl
    def after_update(self, strategy) -> None:
        if self.clip:
            head = linear_head(strategy.model, "wa")
            with torch.no_grad():
                head.weight.clamp_(min=0)

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        self._strategy = strategy
        head = linear_head(strategy.model, "wa")
        seen = {c for e in strategy.trained[:-1] for c in e.classes}  # trained[-1] is this experience
        width = head.weight.shape[0]
        old = sorted(c for c in seen if c < width)
        new = sorted(c for c in set(strategy.experience.classes) - seen if c < width)
        if not old or not new:
            return
        gamma = aligning_factor(head.weight, old, new)
        if not (0 < gamma < float("inf")):  # the new rows are all zero (clipped away): there is nothing to scale
            return
        with torch.no_grad():
            rows = torch.tensor(new, device=head.weight.device)
            head.weight[rows] = head.weight[rows] * gamma
        self.gammas.append((strategy.experience.index, gamma))
        self.last = {"rows": new, "gamma": gamma}

    # ------------------------------------------------------------------------------ without the correction
    @contextmanager
    def uncorrected(self) -> Iterator[WA]:
        """Within the context the head predicts as before the last alignment: its new rows divided by the
        last gamma (from the strategy the hooks last saw, or at the next evaluation's ``before_eval``);
        on exit the aligned rows are put back exactly."""
        self._off = True
        try:
            if self._strategy is not None:
                self._undo(self._strategy)
            yield self
        finally:
            self._off = False
            if self._undone is not None:
                head, rows, aligned = self._undone
                with torch.no_grad():
                    head.weight[rows] = aligned
                self._undone = None

    @hookimpl
    def before_eval(self, strategy) -> None:
        self._strategy = strategy
        if self._off:
            self._undo(strategy)

    def _undo(self, strategy) -> None:
        if self._undone is not None or self.last is None:
            return
        head = linear_head(strategy.model, "wa")
        rows = torch.tensor(self.last["rows"], device=head.weight.device)
        with torch.no_grad():
            aligned = head.weight[rows].clone()
            head.weight[rows] = aligned / self.last["gamma"]
        self._undone = (head, rows, aligned)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"gammas": list(self.gammas), "last": None if self.last is None else
                {"rows": list(self.last["rows"]), "gamma": self.last["gamma"]}}

    def load_state_dict(self, state: dict) -> None:
        self.gammas = [tuple(g) for g in state["gammas"]]
        self.last = None if state["last"] is None else {"rows": list(state["last"]["rows"]),
                                                        "gamma": state["last"]["gamma"]}
