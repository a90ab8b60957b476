"""ER-ACE: experience replay with the asymmetric cross-entropy (Caccia et al. 2022)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from streamcl import ConfigError, Plugin, hookimpl

INCOMING = ("experience", "batch")


class ERACE(Plugin):
    """The asymmetric cross-entropy of ER-ACE (Caccia et al. 2022, "New Insights on Reducing Abrupt
    Representation Change in Online Continual Learning", ICLR; eq. 4-5).

    Gives the task loss ``CE_in + CE_replay`` through the ``task_loss`` transform (``strategy.criterion``
    stays the plain one, so a plugin that needs the plain loss, such as GEM's memory gradients or MIR's
    virtual step, keeps it whatever the plugin list): the incoming samples (the first
    ``strategy.n_current`` of the minibatch) are scored only against the logits of the incoming
    classes, so learning new classes does not push the old classes' logits (and representations)
    away; the replayed samples (the rest of the minibatch, joined by a memory plugin's
    ``replay_batch``) are scored against every class seen so far. Each term is the mean over its
    own samples. Without replayed samples it is the masked cross-entropy alone. The logits are
    ``output.logits`` (after ``adapt_logits``: a task mask's ``-inf`` only removes classes further).

    The memory must hold samples of the incoming classes too, as the paper's does (its ER memory is
    a reservoir updated after every incoming minibatch, and so is the official code's): the
    replayed term is the only one that scores new classes against old ones. Use
    ``[Replay(memory=500, selection="reservoir"), ERACE()]``.
    With a memory updated only after each experience (``Replay``'s default ``class_balanced``) the
    current classes are never contrasted with the old ones and are never predicted: on SFM-5 the
    last experience scores 0 and the final accuracy drops to 0.61 (0.785 with reservoir).

    Which classes count as incoming: the paper (online, task-free) takes the classes present in
    the incoming minibatch, and so does the official code (github.com/pclucas14/AML, methods/er_ace.py,
    which also leaves not-yet-seen classes unmasked and scores replay over the whole head).
    ``incoming="experience"`` (default) takes the classes of the current experience, the natural
    choice in the offline class-incremental setting of SFM-5 where the experience is known (with
    2 classes per experience and minibatches of 128 the two choices coincide in practice);
    ``incoming="batch"`` takes the classes in the minibatch, as the paper does. A sample's own
    class is always among the classes it is scored against (data that ``train_data`` joins to an
    experience may hold older classes). The plugin has no hyper-parameter of its own; the memory
    (size, replay batch) is the memory plugin's.
    """

    owns = frozenset({"criterion"})  # the one plugin that gives the task loss

    def __init__(self, incoming: str = "experience"):
        if incoming not in INCOMING:
            raise ConfigError(f"ER-ACE incoming={incoming!r}: use one of {', '.join(INCOMING)}")
        self.incoming = incoming
        self._key, self._masks = None, None  # a cache of the class masks, rebuilt from the strategy
        self._parts: tuple | None = None  # the last training minibatch's two terms, logged after its iteration

    @hookimpl
    def task_loss(self, strategy, output, batch) -> Tensor:
        parts = self._parts = self.terms(strategy, output.logits, batch.y)
        return parts[0] if parts[1] is None else parts[0] + parts[1]

    def loss(self, strategy, logits: Tensor, y: Tensor) -> Tensor:
        """The ER-ACE loss of a minibatch whose first ``strategy.n_current`` samples are incoming."""
        first, replayed = self.terms(strategy, logits, y)
        return first if replayed is None else first + replayed

    def terms(self, strategy, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """The incoming and the replayed term of :meth:`loss` (``None`` without replayed samples)."""
        n, exp, width = strategy.n_current, strategy.experience, logits.shape[1]
        key = (exp.index, tuple(exp.classes), len(strategy.trained), width, logits.device)
        if self._key != key:  # the class masks change once per experience: build them once
            seen = [c for e in (*strategy.trained, exp) for c in e.classes]
            self._key = key
            self._masks = (_mask(exp.classes, width, logits.device), _mask(seen, width, logits.device))
        incoming, seen = self._masks
        if self.incoming == "batch":
            incoming = torch.zeros_like(incoming)
        return ace_terms(logits, y, n, incoming, seen)

    @hookimpl
    def after_training_iteration(self, strategy) -> None:
        """Log the two terms of the task loss apart: ``loss/ace_incoming`` and ``loss/ace_replay``."""
        if strategy.logs_values and self._parts is not None:
            strategy.log("loss/ace_incoming", float(self._parts[0].detach()))
            if self._parts[1] is not None:
                strategy.log("loss/ace_replay", float(self._parts[1].detach()))
        self._parts = None


def ace(logits: Tensor, y: Tensor, n_incoming: int, incoming: Tensor, seen: Tensor) -> Tensor:
    """CE of the first ``n_incoming`` rows over the classes ``incoming`` marks, plus CE of the other
    rows over the classes ``seen`` marks (boolean masks over the columns; each CE a mean over its
    rows, the second 0 without rows). The classes of the rows' own labels are always included."""
    incoming_term, replay_term = ace_terms(logits, y, n_incoming, incoming, seen)
    return incoming_term if replay_term is None else incoming_term + replay_term


def ace_terms(logits: Tensor, y: Tensor, n_incoming: int, incoming: Tensor,
              seen: Tensor) -> tuple[Tensor, Tensor | None]:
    """The two terms of :func:`ace`: the incoming rows' and the replayed rows' (``None`` without replayed rows)."""
    y_in, y_re = y[:n_incoming], y[n_incoming:]
    first = F.cross_entropy(_only(logits[:n_incoming], incoming, y_in), y_in)
    if not len(y_re):
        return first, None
    return first, F.cross_entropy(_only(logits[n_incoming:], seen, y_re), y_re)


def _mask(classes, width: int, device) -> Tensor:
    keep = torch.zeros(width, dtype=torch.bool, device=device)
    keep[torch.as_tensor([c for c in classes if c < width], dtype=torch.long, device=device)] = True
    return keep


def _only(logits: Tensor, keep: Tensor, y: Tensor) -> Tensor:
    """``logits`` with every column that ``keep`` does not mark, nor ``y`` names, set to -inf."""
    keep = keep.index_fill(0, y, True)  # out of place: the mask is cached and shared by every minibatch
    return logits.masked_fill(~keep, float("-inf"))
