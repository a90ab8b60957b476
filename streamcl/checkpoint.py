"""Checkpoints: everything a run needs to go on exactly where it stopped, written atomically.

A checkpoint holds the model (weights, and the module itself when it can be pickled, so grown or
expanded architectures come back), the optimizer (state and groups, by parameter name), every
plugin's and logger's ``state_dict()``, the metrics so far, every random generator, the
experiences trained (without their data), counters, and, when taken inside an experience, the
position there: epoch, next iteration, this epoch's sample order and the joined training data.
Loading needs a strategy built as the one that wrote it (same plugin classes in the same order).
"""
from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from streamcl.errors import StreamclError
from streamcl.models.heads import grow_heads
from streamcl.scenarios import Experience

FORMAT = 1


class CheckpointError(StreamclError):
    """A checkpoint is missing, unreadable, or was written by a different run."""


@dataclass
class Position:
    """Where inside an experience a checkpoint was taken: training resumes at ``iteration`` of ``epoch``."""

    experience: int
    epoch: int
    iteration: int
    order: torch.Tensor
    data: Dataset | None  # the joined training data, when plugins added to the experience's own

    def check(self, exp: Experience) -> None:
        if exp.index != self.experience:
            raise CheckpointError(f"the checkpoint was taken inside experience {self.experience}; "
                                  f"resume by training that experience, not {exp.index}")


def _plugin_id(p: object) -> str:
    return f"{type(p).__module__}.{type(p).__qualname__}"


def _states(objects) -> list:
    return [p.state_dict() if callable(getattr(p, "state_dict", None)) else None for p in objects]


def _rng_state(strategy) -> dict:
    state = {"generator": strategy.generator.get_state(), "torch": torch.get_rng_state(),
             "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(strategy, state: dict) -> None:
    strategy.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_of(strategy, position: bool = False) -> dict:
    names = {id(p): n for n, p in strategy.model.named_parameters()}
    exp = strategy.experience
    return {
        "format": FORMAT,
        "meta": strategy.checkpoint_meta,
        "settings": {"epochs": strategy.epochs, "batch_size": strategy.batch_size},
        "plugins": [_plugin_id(p) for p in strategy.plugins],
        "model": strategy.model.state_dict(),
        "module": strategy.model,
        "frozen": [n for n, p in strategy.model.named_parameters() if not p.requires_grad],
        "optimizer": strategy.optimizer.state_dict(),
        "optimizer_params": [[names[id(p)] for p in g["params"]] for g in strategy.optimizer.param_groups],
        "plugin_states": _states(strategy.plugins),
        "logger_states": _states(strategy.loggers),
        "metrics": strategy.metrics.state_dict(),
        "rng": _rng_state(strategy),
        "trained": [{k: getattr(e, k) for k in ("index", "classes", "n_classes", "task", "origin", "covers")}
                    for e in strategy.trained],
        "counters": {"global_step": strategy.global_step, "train_seconds": strategy.train_seconds,
                     "eval_seconds": strategy.eval_seconds},
        "position": None if not position else {
            "experience": exp.index, "epoch": strategy.epoch, "iteration": strategy.iteration + 1,
            "order": strategy.order, "data": _cpu(strategy.train_dataset) if strategy._joined_data else None},
    }


def _cpu(data):
    return data.to("cpu") if hasattr(data, "to") else data


def save(strategy, path: Path, position: bool = False) -> Path:
    """Write the checkpoint to a temporary file beside ``path``, then rename it over ``path``."""
    state = state_of(strategy, position)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write(state, tmp)
    except (pickle.PicklingError, AttributeError, TypeError):
        state["module"] = None  # a model class that cannot be pickled (defined in a function): weights only
        _write(state, tmp)
    os.replace(tmp, path)
    return path


def _write(state: dict, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load(strategy, path: Path) -> dict:
    """Restore ``path`` into ``strategy``; returns the checkpoint's ``meta``."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=strategy.device, weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable streamcl checkpoint: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a streamcl checkpoint of format {FORMAT}")
    mine = [_plugin_id(p) for p in strategy.plugins]
    if state["plugins"] != mine:
        raise CheckpointError(f"{path} was written with plugins {state['plugins']}; this strategy has {mine}")
    settings = {"epochs": strategy.epochs, "batch_size": strategy.batch_size}
    if state["settings"] != settings:
        raise CheckpointError(f"{path} was written with {state['settings']}; this strategy has {settings}")
    _restore_model(strategy, state)
    _restore_optimizer(strategy, state)
    for objects, states in ((strategy.plugins, state["plugin_states"]), (strategy.loggers, state["logger_states"])):
        for obj, s in zip(objects, states):
            if s is not None:
                obj.load_state_dict(s)
    strategy.metrics.load_state_dict(state["metrics"])
    strategy.trained = [Experience(dataset=None, **e) for e in state["trained"]]
    for key, value in state["counters"].items():
        setattr(strategy, key, value)
    pos = state["position"]
    if pos is not None:
        strategy._resume_at = Position(**pos)
        strategy.order = pos["order"]
        strategy._joined_data = pos["data"] is not None
        strategy.train_dataset = strategy._on_device(pos["data"]) if pos["data"] is not None else None
    _set_rng_state(strategy, state["rng"])
    return state["meta"]


def _restore_model(strategy, state: dict) -> None:
    """Weights into the strategy's own model when the shapes agree (heads grown first), else the saved module."""
    model = strategy.model
    n_seen = max((c for e in state["trained"] for c in e["classes"]), default=-1) + 1
    grow_heads(model, n_seen)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        if state["module"] is None:
            raise CheckpointError(f"the checkpoint's weights do not fit this model and its module could not be "
                                  f"saved: {err}") from None
        strategy.model = state["module"].to(strategy.device)
    frozen = set(state["frozen"])
    for name, param in strategy.model.named_parameters():  # plugins freeze in hooks a resume may not re-run
        param.requires_grad_(name not in frozen)
    strategy._inspect_model()


def _restore_optimizer(strategy, state: dict) -> None:
    opt = strategy.optimizer
    params = dict(strategy.model.named_parameters())
    saved = state["optimizer"]
    opt.param_groups.clear()
    opt.state.clear()
    for group, names in zip(saved["param_groups"], state["optimizer_params"]):
        opt.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                             "params": [params[n] for n in names]})
    opt.load_state_dict(saved)
