"""Model size: parameter counts and the bytes the model and the plugins hold, after each experience."""
from __future__ import annotations

import itertools

import torch

from streamcl import Plugin, hookimpl


def tensor_bytes(value, seen: set[int] | None = None) -> int:
    """The ``nbytes`` of every tensor in ``value``, through dicts, lists and tuples (each tensor counted once;
    modules and other objects are not looked into)."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return value.nbytes
    if isinstance(value, dict):
        return sum(tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in value)
    return 0


class ModelSize(Plugin):
    """After each experience (after every plugin's ``after_training_exp``, memories updated): the model's
    parameter count (all, and those with ``requires_grad``), the bytes of its parameters and buffers, and the
    bytes of the tensors in every plugin's ``state_dict()`` (:func:`tensor_bytes`: a replay memory, a teacher's
    weights). Logs ``model/parameters``, ``model/trainable_parameters``, ``model/bytes`` and ``plugins/bytes`` at
    the experience's row (axis ``"experience"``). Results: ``model_parameters``, ``model_trainable_parameters``,
    ``model_bytes`` and ``plugin_bytes``, lists in training order. A metric: it owns no role.
    """

    metric = True  # observes only; the generic pair and resume tests leave metrics out (tests/reliability.py)
    KEYS = {"model_parameters": "model/parameters", "model_trainable_parameters": "model/trainable_parameters",
            "model_bytes": "model/bytes", "plugin_bytes": "plugins/bytes"}

    def __init__(self):
        self.sizes: dict[str, list[int]] = {key: [] for key in self.KEYS}

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        model = strategy.model
        params = list(model.parameters())
        now = {"model_parameters": sum(p.numel() for p in params),
               "model_trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
               "model_bytes": sum(t.nbytes for t in itertools.chain(params, model.buffers())),
               "plugin_bytes": sum(tensor_bytes(p.state_dict()) for p in strategy.plugins
                                   if callable(getattr(p, "state_dict", None)))}
        row = len(strategy.trained) - 1
        for key, name in self.KEYS.items():
            self.sizes[key].append(now[key])
            strategy.log(name, now[key], step=row, axis="experience")

    @hookimpl
    def results(self) -> dict:
        return {key: list(values) for key, values in self.sizes.items()}

    def state_dict(self) -> dict:
        return {key: list(values) for key, values in self.sizes.items()}

    def load_state_dict(self, state: dict) -> None:
        self.sizes = {key: list(state[key]) for key in self.KEYS}
