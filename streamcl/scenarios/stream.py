"""Experiences and streams: what ``Strategy.train`` and ``Strategy.eval`` consume."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

from torch.utils.data import Dataset

import torch

from streamcl.scenarios.data import join, subset


@dataclass
class Experience:
    """One step of a stream: a dataset plus what a learner may know about it.

    ``classes`` are the labels present; ``task`` is the task label (``None`` when the scenario
    gives none at test time); ``n_classes`` is the size of the whole stream's label space;
    ``covers`` numbers the stream experiences it holds (itself, or all of them once joined);
    ``ordered`` trains its samples in dataset order instead of shuffled (an online stream's piece).
    """

    index: int
    dataset: Dataset
    classes: tuple[int, ...]
    n_classes: int
    task: int | None = None
    origin: str = "train"
    covers: tuple[int, ...] = ()
    ordered: bool = False

    def __post_init__(self):
        self.covers = self.covers or (self.index,)

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        task = "" if self.task is None else f", task={self.task}"
        return f"Experience({self.origin} #{self.index}, {len(self)} samples, classes={list(self.classes)}{task})"


@dataclass
class Stream:
    """An ordered sequence of experiences."""

    experiences: list[Experience]
    name: str = "train"

    def __iter__(self) -> Iterator[Experience]:
        return iter(self.experiences)

    def __len__(self) -> int:
        return len(self.experiences)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Stream(self.experiences[i], self.name)
        return self.experiences[i]

    def joined(self) -> Experience:
        """All experiences as one (Joint training's offline upper bound)."""
        exps = self.experiences
        classes = tuple(sorted({c for e in exps for c in e.classes}))
        tasks = {e.task for e in exps}
        return Experience(0, join([e.dataset for e in exps]), classes, exps[0].n_classes,
                          tasks.pop() if len(tasks) == 1 else None, self.name,
                          tuple(j for e in exps for j in e.covers))


@dataclass
class Benchmark:
    """A train stream and the test stream that mirrors it, experience for experience."""

    train_stream: Stream
    test_stream: Stream
    n_classes: int
    scenario: str
    info: dict = field(default_factory=dict)

    @property
    def classes_per_experience(self) -> list[tuple[int, ...]]:
        return [e.classes for e in self.train_stream]

    def __repr__(self) -> str:
        sizes = [len(e) for e in self.train_stream]
        return f"Benchmark({self.scenario}, {len(sizes)} experiences, {self.n_classes} classes, train sizes {sizes})"


def make_stream(parts: Sequence[tuple[Dataset, tuple[int, ...], int | None]], n_classes: int, name: str) -> Stream:
    return Stream([Experience(i, d, c, n_classes, t, name) for i, (d, c, t) in enumerate(parts)], name)


def hold_out(experience: Experience, fraction: float, seed: int = 0) -> tuple[Experience, Experience]:
    """``experience`` cut in two at random (``seed``): the training part, and a validation part of
    ``fraction`` of its samples (at least one, at most all but one) with the same classes, task and index."""
    n = len(experience)
    k = min(n - 1, max(1, round(n * fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = []
    for index, origin in ((order[k:].sort().values, experience.origin), (order[:k].sort().values, "validation")):
        parts.append(Experience(experience.index, subset(experience.dataset, index), experience.classes,
                                experience.n_classes, experience.task, origin, experience.covers))
    return parts[0], parts[1]
