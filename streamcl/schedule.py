"""Learning-rate schedules restarted at every experience (``Strategy(schedule=...)``, config ``train.schedule``).

A schedule maps ``(step, total)``, the optimizer step within the experience (or within a private training
loop, :meth:`Strategy.fit`) and the number of steps it has, to a factor; each parameter group's learning
rate is its own base rate times the factor. Base rates are the groups' rates between experiences, so
plugins' groups (a slow backbone, a fast head) keep their ratios.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from streamcl.errors import ConfigError


@dataclass(frozen=True)
class Cosine:
    """Half a cosine from 1 to ``final`` over the steps (Loshchilov & Hutter 2017, SGDR without restarts
    inside an experience), after ``warmup`` steps rising linearly from 0."""

    final: float = 0.0
    warmup: int = 0

    def __call__(self, step: int, total: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        span = max(1, total - self.warmup)
        return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * min(step - self.warmup, span) / span))


@dataclass(frozen=True)
class MultiStep:
    """The factor is multiplied by ``gamma`` at each milestone, a fraction of the experience's steps (PyCIL's
    iCaRL: x0.1 at epochs 80 and 120 of 170, milestones 80/170 and 120/170), after an optional linear ``warmup``."""

    milestones: Sequence[float] = (0.5, 0.75)
    gamma: float = 0.1
    warmup: int = 0

    def __post_init__(self):
        if not all(0 < m < 1 for m in self.milestones):
            raise ConfigError(f"milestones {list(self.milestones)!r}: fractions of the experience, each in (0, 1)")

    def __call__(self, step: int, total: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return self.gamma ** sum(step >= m * total for m in self.milestones)


@dataclass(frozen=True)
class Constant:
    """The base rate throughout, after an optional linear ``warmup`` of that many steps."""

    warmup: int = 0

    def __call__(self, step: int, total: int) -> float:
        return (step + 1) / (self.warmup + 1) if step < self.warmup else 1.0


SCHEDULES = {"cosine": Cosine, "multistep": MultiStep, "constant": Constant}


def build(name: str | None, warmup: int = 0, milestones: Sequence[float] | None = None, gamma: float = 0.1):
    """The schedule a config names (``train.schedule``; ``None``: none, the optimizer's rates as they are)."""
    if name is None:
        return None if not warmup else Constant(warmup)
    if name not in SCHEDULES:
        raise ConfigError(f"train.schedule = {name!r}: use one of {', '.join(SCHEDULES)}")
    if name == "multistep":
        return MultiStep(tuple(milestones) if milestones is not None else (0.5, 0.75), gamma, warmup)
    if milestones is not None:
        raise ConfigError("train.milestones are for train.schedule = 'multistep'")
    return SCHEDULES[name](warmup=warmup)


def apply(optimizer, factor: float) -> None:
    """Set every group's rate to its base rate (remembered as ``base_lr``) times ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor


def restore(optimizer) -> None:
    """Put every group's base rate back (between experiences the optimizer holds its own rates)."""
    for group in optimizer.param_groups:
        if "base_lr" in group:
            group["lr"] = group.pop("base_lr")
