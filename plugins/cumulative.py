"""Cumulative training: each experience is trained together with all data of the earlier ones."""
from __future__ import annotations

from streamcl import Plugin, hookimpl
from streamcl.scenarios import join


class Cumulative(Plugin):
    """Joins every earlier experience's data to the current one (``train_data``).

    The rehearsal upper bound with an unbounded memory: no forgetting from lack of data, at a
    cost that grows with the stream (Lomonaco et al. 2021, Avalanche's "Cumulative" baseline).
    It owns the ``memory`` role: a bounded replay memory beside it would be redundant.
    """

    owns = frozenset({"memory"})

    def __init__(self):
        self.past: list = []

    @hookimpl
    def train_data(self, strategy, experience):
        return join(self.past) if self.past else None

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        self.past.append(strategy.experience.dataset)

    def state_dict(self) -> dict:
        return {"past": list(self.past)}

    def load_state_dict(self, state: dict) -> None:
        self.past = list(state["past"])
