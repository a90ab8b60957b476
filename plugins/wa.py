"""Weight aligning: the new classes' classifier rows rescaled to the old classes' mean norm after each experience."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from streamcl import Plugin, hookimpl
from streamcl.errors import ConfigError
from streamcl.plugin import warn


def head_rows(strategy, who: str) -> nn.Parameter:
    """The weight of ``strategy.head``, one row per class (an ``nn.Parameter`` of shape (out_features, features)),
    else a ConfigError naming what the head lacks."""
    head = strategy.head
    weight = getattr(head, "weight", None)
    if not (isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[0] == head.out_features):
        found = "no .weight" if weight is None else f"a .weight of type {type(weight).__name__}" + (
            f" and shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else "")
        raise ConfigError(f"{who} works on the rows of the classifier head's weight (one row per class), and the "
                          f"head at {strategy.head_path!r} ({type(head).__name__}, {head.out_features} outputs) has "
                          f"{found}; use a head with a weight parameter of shape (classes, features), such as "
                          "nn.Linear, or name another layer with Strategy(head=...)")
    return weight


def aligning_factor(weight: Tensor, old: list[int], new: list[int]) -> float:
    """Eq. 4: ``gamma = mean_{i old} ||w_i|| / mean_{j new} ||w_j||`` over the rows of ``weight``."""
    with torch.no_grad():
        norms = weight.detach().double().norm(dim=1)
        return (norms[old].mean() / norms[new].mean()).item()


class WA(Plugin):
    """Weight aligning (Zhao et al. 2020, "Maintaining Discrimination and Fairness in Class Incremental
    Learning", CVPR, eq. 4-5).

    After each experience that brings classes not seen before (``new``) beside classes of earlier
    experiences (``old``), the new classes' rows of the classifier head's weight (``strategy.head``: the
    model's linear head, whatever the model — ``nn.Linear``, :class:`~streamcl.models.IncrementalLinear`, or
    any head with a ``weight`` parameter of one row per class) are multiplied by

        gamma = mean_{i in old} ||W_i|| / mean_{j in new} ||W_j||            (eq. 4, 5: W_new <- gamma W_new)

    so that new classes' logits no longer dominate because their weight vectors grew longer. Rows of
    classes not seen yet and the bias are left as they are (the paper's FC layer has no bias; here the
    bias of a new class is not rescaled, its logit is ``gamma <W_j, f> + b_j``). The first experience
    has no old classes, so nothing is aligned; a class that recurs (domain-incremental) counts as old.
    A model whose head has no such weight is refused when the Strategy is built.

    ``clip=True`` (the paper's weight clipping, its default): after every optimizer step the head's weights
    are clipped to be non-negative (the features after a ReLU are), from the first experience on. It is
    what makes the norms comparable: without it the old rows, trained longer, grow longer than the new
    ones, gamma > 1 and the alignment favours the new classes further. Measured on SFM-5 (``wa`` recipe,
    Replay 500 + LwFDistill(weight=1), seeds 0-2): clip 0.801 (0.793 with the alignment undone, gammas
    0.69-0.95), no clip 0.781 (0.793 undone, gammas 0.82-1.12). Distillation (the paper's ``L_KD``) is
    another plugin's: the ``wa`` recipe lists :class:`~streamcl.plugins.distill.LwFDistill` with ``replayed=True``
    (every sample, new and exemplars, as the paper; ``wa:distill_on="new"`` the experience's own only: SFM-5 0.799
    against 0.808, seeds 0-2).

    ``set_correction(active=False)`` (the runner's evaluation of the uncorrected model, through
    ``strategy.uncorrected()``) undoes the last alignment (the new rows divided by the last gamma);
    ``active=True`` puts the aligned rows back exactly. Every gamma applied is kept in ``gammas``
    (experience index, gamma) and logged as ``wa/factor``. It owns the role ``architecture``: plugins that
    replace the model or generate its head (hypernetwork, progress & compress, cosine_head, DER) cannot run
    beside it.
    """

    owns = frozenset({"architecture", "head_rows"})
    requires = frozenset({"head"})

    def __init__(self, clip: bool = True):
        if not isinstance(clip, bool):
            raise ConfigError(f"wa clip={clip!r}: use true (clip the head's weights to >= 0 after every step, "
                              "as the paper) or false")
        self.clip = clip
        self.gammas: list[tuple[int, float]] = []  # (experience index, gamma) of every alignment
        self.last: dict | None = None  # the latest alignment: {"rows": new classes, "gamma": gamma}
        self._undone: tuple[nn.Parameter, Tensor, Tensor] | None = None  # (weight, rows, their aligned values)
        self._warned_no_new = False

    @hookimpl
    def setup(self, strategy) -> None:
        head_rows(strategy, "wa")  # refuse a head without weight rows before any step

    # ------------------------------------------------------------------------------ training
    @hookimpl
    def after_update(self, strategy) -> None:
        if self.clip:
            with torch.no_grad():
                head_rows(strategy, "wa").clamp_(min=0)

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        weight = head_rows(strategy, "wa")
        seen = {c for e in strategy.trained[:-1] for c in e.classes}  # trained[-1] is this experience
        width = weight.shape[0]
        old = sorted(c for c in seen if c < width)
        new = sorted(c for c in set(strategy.experience.classes) - seen if c < width)
        if old and not new and not self._warned_no_new:
            self._warned_no_new = True  # once per plugin
            warn(f"wa: experience {strategy.experience.index} brings no class not seen before (a domain-incremental "
                 "stream?): there are no new classes' weights to align, and nothing is rescaled")
        if not old or not new:
            return
        gamma = aligning_factor(weight, old, new)
        if not (0 < gamma < float("inf")):  # the new rows are all zero (clipped away): there is nothing to scale
            return
        with torch.no_grad():
            rows = torch.tensor(new, device=weight.device)
            weight[rows] = weight[rows] * gamma
        self.gammas.append((strategy.experience.index, gamma))
        self.last = {"rows": new, "gamma": gamma}
        strategy.log("wa/factor", gamma)

    # ------------------------------------------------------------------------------ without the correction
    @hookimpl
    def set_correction(self, strategy, active: bool) -> None:
        """Off: the head predicts as before the last alignment (its new rows divided by the last gamma).
        On: the aligned rows are put back exactly."""
        if not active:
            if self._undone is not None or self.last is None:
                return
            weight = head_rows(strategy, "wa")
            rows = torch.tensor(self.last["rows"], device=weight.device)
            with torch.no_grad():
                aligned = weight[rows].clone()
                weight[rows] = aligned / self.last["gamma"]
            self._undone = (weight, rows, aligned)
        elif self._undone is not None:
            weight, rows, aligned = self._undone
            with torch.no_grad():
                weight[rows] = aligned
            self._undone = None

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"gammas": list(self.gammas), "last": None if self.last is None else
                {"rows": list(self.last["rows"]), "gamma": self.last["gamma"]}}

    def load_state_dict(self, state: dict) -> None:
        self.gammas = [tuple(g) for g in state["gammas"]]
        self.last = None if state["last"] is None else {"rows": list(state["last"]["rows"]),
                                                        "gamma": state["last"]["gamma"]}
