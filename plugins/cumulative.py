"""Cumulative training: each experience is trained together with all data of the earlier ones."""
from __future__ import annotations

from streamcl import Plugin, TensorData, hookimpl
from streamcl.memory import Memory
from streamcl.scenarios import as_batch


class Cumulative(Plugin):
    """Joins every earlier experience's data to the current one (``train_data``).

    The rehearsal upper bound: a memory with an unbounded budget (re-allocated to the size of
    everything seen after each experience), so nothing is forgotten for lack of data, at a cost
    that grows with the stream (Lomonaco et al. 2021, Avalanche's "Cumulative" baseline). It owns
    the ``memory`` role: a bounded replay memory beside it would be redundant.
    """

    owns = frozenset({"memory"})

    def __init__(self):
        self.memory: Memory | None = None

    @hookimpl
    def train_data(self, strategy, experience):
        return None if self.memory is None else TensorData(*self.memory.batch())

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        new = as_batch(strategy.experience.dataset, strategy.device)
        pool = new if self.memory is None else self.memory.batch().cat(new)
        self.memory = Memory(len(pool))
        self.memory.append(*pool)

    def state_dict(self) -> dict:
        return {"memory": None if self.memory is None else self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.memory = None
        if state["memory"] is not None:
            self.memory = Memory(state["memory"]["size"])
            self.memory.load_state_dict(state["memory"])
