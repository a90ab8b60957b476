"""Experience replay: a bounded memory of past samples, replayed beside every training minibatch."""
from __future__ import annotations

import torch
from torch import Tensor

from streamcl import Batch, Plugin, hookimpl
from streamcl import distributed as dist
from streamcl.errors import ConfigError
from streamcl.memory import Budget, Codec, Memory, balanced, check_room, herding, random_pick, reservoir
from streamcl.scenarios import TensorData, as_batch

SELECTIONS = ("class_balanced", "herding", "experience_balanced", "random", "reservoir")


class Replay(Plugin):
    """Experience replay (ER; Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning", Alg. 1).

    Each training minibatch is joined by ``batch_size`` samples drawn uniformly from memory (default:
    the strategy's batch size). The memory holds ``memory`` samples in total (or ``per_class`` per
    class, or as many as fit in ``memory_bytes``) and is updated after each experience:

    * ``class_balanced`` (default): the total split evenly over the classes seen (those with samples), random
      samples (a class that recurs, as in domain-incremental streams, split again evenly over its experiences, and
      once there are more of them than its quota, from as many of them spread evenly over the stream);
      a memory smaller than the stream's classes is refused before the first experience trains;
    * ``herding``: the same split, samples picked by herding on the model's features (iCaRL, Alg. 4;
      ``strategy.embed``, the input of the classifier head: a model without a linear head is refused
      when the Strategy is built);
    * ``experience_balanced``: the total split evenly over the experiences seen, random samples;
    * ``random``: a uniform sample of everything seen (reservoir sampling over each experience);
    * ``reservoir``: reservoir sampling online, after every minibatch (Vitter 1985).

    ``compress="uint8"`` stores inputs as 8-bit values (and ``downsample`` pools images of
    ``image_shape``), so ``memory_bytes`` holds more samples; ``capacity`` tells how many.

    ``join=True`` joins the memory to the experience's training data (``train_data``) instead: minibatches are
    drawn from their union, each sample once an epoch (iCaRL's training set, Alg. 3: the new data and the
    exemplars), and nothing is replayed beside them.
    """

    owns = frozenset({"memory"})

    def __init__(self, memory: int | None = 500, selection: str = "class_balanced", per_class: int | None = None,
                 batch_size: int | None = None, memory_bytes: int | None = None, compress: str | None = None,
                 downsample: int = 1, image_shape: list[int] | None = None, join: bool = False):
        if selection not in SELECTIONS:
            raise ConfigError(f"selection={selection!r}: use one of {', '.join(SELECTIONS)}")
        if not isinstance(join, bool) or (join and selection == "reservoir"):
            raise ConfigError(f"join={join!r}: true or false; a joined memory is fixed for the experience, so it "
                              "cannot be the reservoir, which changes after every minibatch")
        self.join = join
        if memory_bytes is not None:
            if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0:
                raise ConfigError(f"memory budget memory_bytes={memory_bytes!r}: it must be a positive number of bytes")
            memory = None
        elif per_class is not None:
            memory = None
        self.budget = None if memory_bytes else Budget(total=memory, per_class=per_class)
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
            raise ConfigError(f"replay batch_size={batch_size!r}: it must be a positive whole number")
        self.selection, self.batch_size, self.memory_bytes = selection, batch_size, memory_bytes
        self.codec = Codec(compress, downsample, image_shape)
        self.memory: Memory | None = None
        self.classes: list[int] = []  # in order of arrival
        self.experiences = 0
        self.seen = 0  # samples offered to reservoir sampling so far

    @property
    def capacity(self) -> int | None:
        """How many samples the memory holds at most (known once the first samples arrive)."""
        return None if self.memory is None else self.memory.capacity

    def _memory_for(self, x: Tensor, n_classes: int) -> Memory:
        if self.memory is None:
            if self.memory_bytes is not None:
                per_sample = self.codec.bytes_per_sample(tuple(x.shape[1:]), x.dtype)
                capacity = self.memory_bytes // per_sample
                if capacity <= 0:
                    raise ConfigError(f"memory_bytes={self.memory_bytes} holds no sample of {per_sample} bytes")
                self.budget = Budget(total=capacity)
            capacity = self.budget.total or self.budget.per_class * n_classes
            self.memory = Memory(capacity, self.codec)
        return self.memory

    @hookimpl
    def setup(self, strategy) -> None:
        if self.selection == "herding":
            strategy.require_head("the features that herding selection picks exemplars by", self)

    @hookimpl
    def before_training_exp(self, strategy) -> None:
        """Refuse, before training, a class-balanced memory smaller than the stream's classes."""
        if self.selection in ("class_balanced", "herding"):
            exp = strategy.experience
            memory = self._memory_for(torch.as_tensor(exp.dataset[0][0])[None], exp.n_classes)
            check_room(memory.capacity, exp.n_classes, repr(self), ", or use selection='random' or 'reservoir'")

    # ------------------------------------------------------------------------------ replay
    @hookimpl
    def replay_batch(self, strategy, batch: Batch) -> Batch | None:
        if self.join or self.memory is None or len(self.memory) == 0:
            return None
        return self.memory.sample(self.batch_size or strategy.batch_size, strategy.generator)[1]

    @hookimpl
    def train_data(self, strategy, experience) -> TensorData | None:
        if not self.join or self.memory is None or len(self.memory) == 0:
            return None
        return TensorData(*self.memory.batch())

    @hookimpl
    def after_training_iteration(self, strategy) -> None:
        if self.selection != "reservoir":
            return
        current = strategy.unaugmented.select(slice(0, strategy.n_current))  # stored clean
        x, y, t = (dist.all_gather(v) for v in current)  # every rank offers the same samples
        memory = self._memory_for(x, strategy.experience.n_classes)
        slots, items = reservoir(self.seen, len(y), memory.capacity, strategy.generator)
        memory.write(slots, x[items], y[items], t[items])
        self.seen += len(y)
        self._rewritten(slots)

    def _rewritten(self, slots: Tensor | None) -> None:
        """Called once memory ``slots`` hold new samples (``None``: the whole memory was rebuilt), for a
        subclass that keeps state per slot (MIR's MI-2 losses)."""

    # ------------------------------------------------------------------------------ memory update
    @hookimpl
    def after_training_exp(self, strategy) -> None:
        exp = strategy.experience
        new = as_batch(exp.dataset, strategy.device)
        memory = self._memory_for(new.x, exp.n_classes)
        present = set(new.y.unique().tolist())  # a class of the experience without samples takes no quota
        self.classes += [c for c in exp.classes if c in present and c not in self.classes]
        self.experiences += 1
        if self.selection == "reservoir":
            return
        if self.selection == "random":
            slots, items = reservoir(self.seen, len(new), memory.capacity, strategy.generator)
            memory.write(slots, *new.select(items.to(new.y.device)))
            self.seen += len(new)
            self._rewritten(slots)
            return
        n_stored = len(memory)
        pool = memory.batch().cat(new) if n_stored else new
        pool_origin = torch.full_like(pool.y, self.experiences - 1)
        if n_stored:
            pool_origin[:n_stored] = memory.extras["experience"][:n_stored]
        if self.selection == "experience_balanced":
            keep = self._by_experience(pool_origin, n_stored, strategy.generator)
        else:
            keep = self._by_class(strategy, pool, pool_origin, n_stored, present)
        memory.size = 0
        memory.append(*pool.select(keep), experience=pool_origin[keep])
        self._rewritten(None)

    def _by_class(self, strategy, pool: Batch, origin: Tensor, n_stored: int, new_classes: set) -> Tensor:
        """Keep each class's quota: stored order for classes not in the experience, else a fresh pick.

        A class seen in earlier experiences too (domain-incremental streams) splits its quota
        over the experiences it came in (:meth:`_shares`), keeping the stored samples of the earlier ones.
        """
        quotas, newest = self.budget.quotas(self.classes), self.experiences - 1
        keep = [balanced(pool.y[:n_stored], {c: q for c, q in quotas.items() if c not in new_classes})]
        for c in self.classes:
            if c in new_classes:
                members = torch.nonzero(pool.y == c).flatten()
                came = origin[members]
                share = self._shares(sorted(set(came.tolist())), quotas[c])
                if len(share) > 1:  # earlier experiences' samples of this class, in stored order
                    keep.append(members[balanced(came, {e: q for e, q in share.items() if e != newest})])
                    members = members[came == newest]
                if self.selection == "herding":
                    pick = herding(strategy.embed(pool.select(members)), share[newest])
                else:
                    pick = random_pick(len(members), share[newest], strategy.generator).to(members.device)
                keep.append(members[pick])
        return torch.cat(keep)

    @staticmethod
    def _shares(experiences: list[int], quota: int) -> dict[int, int]:
        """A class's quota split over the experiences it came in (the newest last): evenly while each can keep a
        sample; past that, one sample each for ``quota`` of them, thinned so they stay spread over the whole stream:
        the newest enters, and while too many remain, the stored one whose removal leaves the smallest gap between
        its neighbours leaves (the first is kept)."""
        if len(experiences) <= quota:
            return Budget(total=quota).quotas(experiences)
        kept = list(experiences)
        while len(kept) > quota:
            gaps = [kept[i + 1] - kept[i - 1] for i in range(1, len(kept) - 1)]
            del kept[1 + gaps.index(min(gaps))]
        return {e: int(e in kept) for e in experiences}

    def _by_experience(self, origin: Tensor, n_stored: int, generator) -> Tensor:
        quotas = Budget(total=self.memory.capacity).quotas(list(range(self.experiences)))
        newest = self.experiences - 1
        keep = balanced(origin[:n_stored], {e: q for e, q in quotas.items() if e != newest})
        members = torch.nonzero(origin == newest).flatten()
        return torch.cat([keep, members[random_pick(len(members), quotas[newest], generator).to(members.device)]])

    def state_dict(self) -> dict:
        return {"memory": None if self.memory is None else self.memory.state_dict(),
                "capacity": self.capacity, "budget": self.budget, "classes": list(self.classes),
                "experiences": self.experiences, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.budget, self.classes = state["budget"], list(state["classes"])
        self.experiences, self.seen = state["experiences"], state["seen"]
        self.memory = None
        if state["memory"] is not None:
            self.memory = Memory(state["capacity"], self.codec)
            self.memory.load_state_dict(state["memory"])

