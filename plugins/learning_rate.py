"""Learning rate: each optimizer parameter group's current rate, every training step."""
from __future__ import annotations

from streamcl import Plugin, hookimpl


class LearningRate(Plugin):
    """Logs ``lr/group<i>``, the ``lr`` of the i-th group of ``strategy.optimizer.param_groups`` (as the
    schedule set it for this step), after every training iteration (axis ``"step"``). Reads host numbers only
    (no device sync); does nothing unless a logger takes scalars. No results, no state. A metric: it owns no role.
    """

    metric = True  # observes only; the generic pair and resume tests leave metrics out (tests/reliability.py)

    @hookimpl
    def after_training_iteration(self, strategy) -> None:
        if strategy.logs_values:
            for i, group in enumerate(strategy.optimizer.param_groups):
                strategy.log(f"lr/group{i}", float(group["lr"]))
