"""ExStream: per-class buffers of feature prototypes kept by streaming clustering, replayed through the head."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from streamcl import Batch, ConfigError, Plugin, PluginError, distributed as dist, hookimpl
from streamcl.memory import random_pick

MERGES = ("stored", "with_new")
INF = float("inf")


class ExStream(Plugin):
    """Exemplar streaming (ExStream; Hayes, Cahill & Kanan 2019, "Memory Efficient Experience Replay for Streaming
    Learning", ICRA, Alg. 1; authors' code: github.com/tyler-hayes/ExStream).

    A buffer per class holds at most ``b = memory // n_classes`` prototypes (``n_classes``: the stream's classes,
    read at the first experience; ``b = 0`` is refused) in feature space, the input of the classifier head
    (``strategy.output.features``), each with a count. After every training step each of the step's own samples
    (replayed rows left out; every rank's, in order) enters its class's buffer in turn: while the buffer has room,
    as a new prototype of count 1; once it is full, the two nearest prototypes (Euclidean) are merged into their
    count-weighted mean, counts summed, and the sample takes the freed slot with count 1 (``merge="stored"``, the
    authors' code; at ``b = 1`` the sample is merged into the one prototype). ``merge="with_new"`` adds the sample
    first and merges the nearest pair of the ``b + 1``, so the sample itself may be merged. A class's counts sum to
    the samples it offered (once per epoch when ``epochs`` > 1).

    Each training step then adds

        L_exstream = weight * CE(head(p), y_p)

    over ``replay_batch`` prototypes drawn uniformly without replacement from all buffers with
    ``strategy.generator`` (``None``: every prototype), logged as ``loss/exstream``. Prototypes go through the
    head only (``strategy.head``, then every ``adapt_logits``, with their task labels): any model with a linear
    head works (``requires = {"head"}``: a model without one is refused when the Strategy is built).

    Defaults: ``memory=500`` (the protocol's replay budget: 50 prototypes per class on 10 classes; the authors'
    code runs 2, 4, 8 and 16 per class), ``replay_batch=100`` (the authors' minibatch), ``weight=1``. Departures
    (docs/methods.md): the paper's features come from a fixed pre-trained network and its learner trains an epoch
    over the buffers after every sample; here the backbone goes on learning from the minibatch, so a stored
    prototype goes stale (it is never recomputed), and each step replays one draw.
    """

    name = "exstream"
    # the replay trains the head's rows on stored features, so the head must stay one linear map of features of one
    # width: not beside a plugin that widens, replaces or generates it (DER, Ensemble, HyperNetwork, P&C)
    owns = frozenset({"head_rows"})
    requires = frozenset({"head"})

    def __init__(self, memory: int = 500, replay_batch: int | None = 100, weight: float = 1.0,
                 merge: str = "stored"):
        if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
            raise ConfigError(f"ExStream(memory={memory!r}): a positive whole number of prototypes, split evenly "
                              "over the stream's classes")
        if replay_batch is not None and (isinstance(replay_batch, bool) or not isinstance(replay_batch, int)
                                         or replay_batch <= 0):
            raise ConfigError(f"ExStream(replay_batch={replay_batch!r}): a positive whole number, or None for "
                              "every prototype")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"ExStream(weight={weight!r}): a finite number >= 0")
        if merge not in MERGES:
            raise ConfigError(f"ExStream(merge={merge!r}): use one of {', '.join(MERGES)}")
        self.memory, self.replay_batch, self.weight, self.merge = memory, replay_batch, float(weight), merge
        self.capacity: int | None = None  # b, prototypes per class
        self.protos: Tensor | None = None  # (classes, b, *feature shape), float32
        self.counts: Tensor | None = None  # (classes, b): samples merged into each prototype, 0 for an empty slot
        self.tasks: Tensor | None = None  # (classes, b): a prototype's task label
        self.n_classes = 0  # the stream's classes, as far as known
        self._dist: Tensor | None = None  # (classes, b, b): distances between a buffer's prototypes (not saved)

    def reserve(self, n_classes: int) -> None:
        """Fix ``b`` for a stream of ``n_classes`` classes (once; a later, larger stream adds buffers of ``b``)."""
        if self.capacity is None:
            if self.memory // n_classes == 0:
                raise ConfigError(f"{self!r}: memory={self.memory} split over the stream's {n_classes} classes leaves "
                                  f"no prototype per class; raise memory to at least {n_classes}")
            self.capacity = self.memory // n_classes
        if self.protos is not None and n_classes > len(self.protos):
            more = n_classes - len(self.protos)
            self.protos = torch.cat([self.protos, self.protos.new_zeros((more, *self.protos.shape[1:]))])
            self.counts = torch.cat([self.counts, self.counts.new_zeros((more, self.capacity))])
            self.tasks = torch.cat([self.tasks, self.tasks.new_zeros((more, self.capacity))])
        self.n_classes = max(n_classes, self.n_classes)

    # ------------------------------------------------------------------------------ the buffers (Alg. 1)
    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor, t: Tensor | None = None) -> None:
        """Offer the features ``x`` of classes ``y`` (task labels ``t``) to their buffers, one after another."""
        x = x.detach().float()
        if self.protos is None:
            rows = max(self.n_classes, int(y.max()) + 1 if len(y) else 0)
            self.protos = x.new_zeros((rows, self.capacity, *x.shape[1:]))
            self.counts = torch.zeros((rows, self.capacity), dtype=torch.long, device=x.device)
            self.tasks = torch.zeros_like(self.counts)
        elif x.shape[1:] != self.protos.shape[2:]:
            raise PluginError(f"{self!r} keeps prototypes of features of shape {tuple(self.protos.shape[2:])}, and "
                              f"the model's features are now {tuple(x.shape[1:])}: a plugin changed them")
        labels = y.tolist()
        if labels and max(labels) >= len(self.protos):
            self.reserve(max(labels) + 1)
        if self._dist is None or len(self._dist) != len(self.protos):
            self._dist = self._distances()
        tasks = [0] * len(labels) if t is None else t.tolist()
        sizes = (self.counts > 0).sum(1).tolist()
        for i, (c, task) in enumerate(zip(labels, tasks)):
            if sizes[c] < self.capacity:
                self._put(c, sizes[c], x[i], 1, task)
                sizes[c] += 1
            else:
                self._merge(c, x[i], task)

    def _merge(self, c: int, x: Tensor, task: int) -> None:
        """Class ``c``'s buffer is full: merge its nearest pair (with ``x`` among the candidates for ``with_new``)."""
        protos, counts, d, b = self.protos[c], self.counts[c], self._dist[c], self.capacity
        points, weights = protos, counts
        if self.merge == "with_new" or b == 1:  # x is point b
            row = distances_to(protos, x)
            d = torch.cat([torch.cat([d, row[:, None]], 1), torch.cat([row, row.new_full((1,), INF)])[None]])
            points, weights = torch.cat([protos, x[None]]), torch.cat([counts, counts.new_ones(1)])
        i, j = divmod(int(d.argmin()), len(d))  # d is symmetric: the first minimum has i < j
        merged = (weights[i] * points[i] + weights[j] * points[j]) / (weights[i] + weights[j])
        self._put(c, i, merged, weights[i] + weights[j], self.tasks[c, i])
        if j < b:  # a stored pair merged: the sample takes the freed slot
            self._put(c, j, x, 1, task)

    def _put(self, c: int, slot: int, x: Tensor, count, task) -> None:
        """Store prototype ``x`` in ``slot`` of class ``c``'s buffer and refresh its distances to the others."""
        self.protos[c, slot], self.counts[c, slot], self.tasks[c, slot] = x, count, task
        row = distances_to(self.protos[c], x)
        row[slot] = INF
        self._dist[c, slot], self._dist[c, :, slot] = row, row

    def _distances(self) -> Tensor:
        """Every buffer's matrix of distances between its prototypes (``inf`` on the diagonal), row by row as
        :meth:`_put` computes them, so that a resumed run merges exactly as an uninterrupted one."""
        rows, b = self.counts.shape
        d = torch.full((rows, b, b), INF, device=self.protos.device)
        for c in range(rows):
            for slot in range(b):
                row = distances_to(self.protos[c], self.protos[c, slot])
                row[slot] = INF
                d[c, slot] = row
        return d

    # ------------------------------------------------------------------------------ hooks
    @hookimpl
    def before_training_exp(self, strategy) -> None:
        self.reserve(strategy.experience.n_classes)

    @hookimpl
    def loss_terms(self, strategy) -> dict[str, Tensor] | None:
        if self.counts is None or self.weight == 0:
            return None
        slots = torch.nonzero(self.counts.flatten() > 0).flatten()
        if len(slots) == 0:
            return None
        if self.replay_batch is not None and self.replay_batch < len(slots):
            slots = slots[random_pick(len(slots), self.replay_batch, strategy.generator).to(slots.device)]
        head = strategy.head
        x = self.protos.flatten(0, 1)[slots]
        x = x.to(next(head.parameters(), x).dtype)
        y, t = torch.div(slots, self.capacity, rounding_mode="floor"), self.tasks.flatten()[slots]
        logits = strategy.forward(Batch(x, y, t), net=lambda z, **_: head(z)).logits
        return {"exstream": self.weight * strategy.criterion(logits, y)}

    @hookimpl
    def after_training_iteration(self, strategy) -> None:
        n, features = strategy.n_current, strategy.output.features
        if features is None:
            raise ConfigError(f"{self!r} stores the model's features, the input of the classifier head at "
                              f"{strategy.head_path!r}, and {type(strategy.model).__name__}'s forward does not call "
                              "it; name the classifier layer with Strategy(head=...)")
        # every rank offers the same samples, in rank order (each holds its share of the minibatch)
        x, y, t = (dist.all_gather(v) for v in (features[:n].detach(), strategy.batch.y[:n], strategy.batch.t[:n]))
        self.add(x, y, t)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "n_classes": self.n_classes, "protos": self.protos,
                "counts": self.counts, "tasks": self.tasks}

    def load_state_dict(self, state: dict) -> None:
        self.capacity, self.n_classes = state["capacity"], state["n_classes"]
        self.protos, self.counts, self.tasks = (None if state[k] is None else state[k].clone()
                                                for k in ("protos", "counts", "tasks"))
        self._dist = None


def distances_to(points: Tensor, x: Tensor) -> Tensor:
    """The Euclidean distance of each row of ``points`` to ``x`` (the same numbers whichever of two is ``x``)."""
    return (points - x).flatten(1).pow(2).sum(1).sqrt()
