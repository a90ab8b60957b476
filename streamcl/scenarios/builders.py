"""Class-, task- and domain-incremental benchmarks over any labelled dataset."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from streamcl.errors import DataError
from streamcl.scenarios.data import TensorData, as_dataset, join, subset, targets_of
from streamcl.scenarios.stream import Benchmark, Experience, Stream, make_stream


def split_classes(classes: Sequence[int], n_experiences: int | None = None,
                  classes_per_exp: int | Sequence[int] | None = None, first: int | None = None) -> list[list[int]]:
    """Cut an ordered class list into experiences.

    ``first`` classes go to experience 0 (the "B50-Inc10" protocol); the rest are cut into
    ``n_experiences`` equal parts, or into parts of ``classes_per_exp``: an int, or a list of ints for
    experiences of unequal sizes, in order (e.g. ``[5, 3, 2]``), which must add up to the classes left.
    """
    classes = list(classes)
    head, rest = ([], classes) if first is None else (classes[:first], classes[first:])
    if first is not None and not 0 < first <= len(classes):
        raise DataError(f"first experience of {first} classes; the stream has {len(classes)}")
    n_rest = None if n_experiences is None else n_experiences - (first is not None)
    if classes_per_exp is not None and not isinstance(classes_per_exp, int):
        sizes = [int(k) for k in classes_per_exp]
        if not sizes or min(sizes) <= 0 or sum(sizes) != len(rest):
            raise DataError(f"classes_per_exp = {sizes} must be positive sizes that add up to the {len(rest)} "
                            f"classes {'after the first experience' if head else 'of the stream'}")
        if n_rest is not None and len(sizes) != n_rest:
            raise DataError(f"classes_per_exp = {sizes} makes {len(sizes) + bool(head)} experiences, "
                            f"not n_experiences = {n_experiences}")
        ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
        return ([head] if head else []) + [rest[e - k:e] for e, k in zip(ends, sizes)]
    if classes_per_exp is None:
        if not n_rest or n_rest < 0 or len(rest) % n_rest:
            raise DataError(f"{len(rest)} classes do not split into {n_rest} equal experiences; "
                            "give classes_per_exp or a different n_experiences")
        classes_per_exp = len(rest) // n_rest
    if classes_per_exp <= 0 or len(rest) % classes_per_exp:
        raise DataError(f"{len(rest)} classes do not split into experiences of {classes_per_exp}")
    if n_rest is not None and len(rest) // classes_per_exp != n_rest:
        raise DataError(f"{len(rest)} classes in parts of {classes_per_exp} make "
                        f"{len(rest) // classes_per_exp} experiences, not {n_rest}")
    parts = [rest[i:i + classes_per_exp] for i in range(0, len(rest), classes_per_exp)]
    return ([head] if head else []) + parts


def class_incremental(train, test, n_experiences: int | None = None, *,
                      classes_per_exp: int | Sequence[int] | None = None,
                      class_order: Sequence[int] | None = None, seed: int | None = None,
                      first_exp_classes: int | None = None, task_labels: bool = False) -> Benchmark:
    """Split a labelled dataset by class: experience i holds the i-th group of ``class_order``.

    ``class_order`` defaults to the sorted labels, or to a permutation drawn from ``seed``.
    With ``task_labels`` experience i is task i at train and test time (task-incremental).
    """
    train, test = as_dataset(train), as_dataset(test)
    y_train, y_test = targets_of(train), targets_of(test)
    present = sorted(set(y_train.tolist()))
    if class_order is None:
        class_order = present
        if seed is not None:
            perm = torch.randperm(len(present), generator=torch.Generator().manual_seed(seed))
            class_order = [present[i] for i in perm]
    class_order = [int(c) for c in class_order]
    if sorted(class_order) != present:
        raise DataError(f"class_order {class_order} is not a permutation of the labels present {present}")
    n_classes = max(present) + 1
    groups = split_classes(class_order, n_experiences, classes_per_exp, first_exp_classes)

    def parts(data: Dataset, y: Tensor):
        out = []
        for i, group in enumerate(groups):
            index = torch.nonzero(torch.isin(y, torch.tensor(group))).flatten()
            out.append((subset(data, index, i if task_labels else None), tuple(group), i if task_labels else None))
        return out

    scenario = "task" if task_labels else "class"
    return Benchmark(make_stream(parts(train, y_train), n_classes, "train"),
                     make_stream(parts(test, y_test), n_classes, "test"), n_classes, scenario,
                     {"class_order": class_order})


def task_incremental(train, test, n_experiences: int | None = None, **kwargs) -> Benchmark:
    """:func:`class_incremental` with task labels given at train and test time."""
    return class_incremental(train, test, n_experiences, task_labels=True, **kwargs)


def pixel_permutation(k: int, n_features: int) -> Tensor | None:
    """Experience k's fixed permutation: none for k = 0, else ``randperm`` seeded with k (PFM-5)."""
    if k == 0:
        return None
    return torch.randperm(n_features, generator=torch.Generator().manual_seed(k))


def domain_incremental(train, test, n_experiences: int,
                       transform: Callable[[int, Tensor], Tensor] | None = None,
                       split: bool = True, task_labels: bool = False) -> Benchmark:
    """Same classes, new input distribution: experience k applies ``transform(k, x)`` to its inputs.

    ``transform`` defaults to the fixed pixel permutation of :func:`pixel_permutation`. With
    ``split`` experience k holds the k-th disjoint chunk of the data in dataset order (PFM-5);
    otherwise every experience holds all of it. With ``task_labels`` experience k is task k at train and
    test time (the setting of methods that need the task label, e.g. PackNet and HAT on permuted data).
    Needs tensor data (``TensorData`` or ``(x, y)``).
    """
    train, test = as_dataset(train), as_dataset(test)
    if not isinstance(train, TensorData) or not isinstance(test, TensorData):
        raise DataError("domain_incremental needs tensor data: pass (x, y) or TensorData")
    if transform is None:
        def transform(k: int, x: Tensor) -> Tensor:
            perm = pixel_permutation(k, x[0].numel())
            flat = x.reshape(x.shape[0], -1)
            return (flat if perm is None else flat[:, perm]).reshape(x.shape)
    n_classes = int(max(train.y.max(), test.y.max())) + 1

    def parts(data: TensorData):
        size = len(data) // n_experiences if split else len(data)
        out = []
        for k in range(n_experiences):
            lo = k * size if split else 0
            index = torch.arange(lo, lo + size)
            part = data.subset(index)
            part.x = transform(k, part.x)
            if task_labels:
                part.t = torch.full_like(part.t, k)
            out.append((part, tuple(sorted(set(part.y.tolist()))), k if task_labels else None))
        return out

    return Benchmark(make_stream(parts(train), n_classes, "train"), make_stream(parts(test), n_classes, "test"),
                     n_classes, "domain", {"split": split})


def split_online(benchmark: Benchmark, experience_size: int, *, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False) -> Benchmark:
    """The online setting: each training experience cut into consecutive experiences of ``experience_size``
    samples, trained one after the other in a single pass (Avalanche's ``split_online_stream``; Aljundi et al.
    2019, Mai et al. 2022 train online with one epoch). Each small experience keeps its parent's task label,
    lists the classes present in it, and ``covers`` the parent's test experience, so the accuracy matrix keeps
    one column per original experience. ``shuffle`` permutes each experience's samples first (seeded with
    ``seed`` and the experience's index); ``drop_last`` drops a last part shorter than ``experience_size``.
    The test stream is unchanged; ``info["online"]`` gives the size and each small experience's parent."""
    if not isinstance(experience_size, int) or experience_size < 1:
        raise DataError(f"experience_size must be a positive number of samples, got {experience_size!r}")
    out, parents = [], []
    for exp in benchmark.train_stream:
        n = len(exp.dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + exp.index)) if shuffle \
            else torch.arange(n)
        for lo in range(0, n, experience_size):
            index = order[lo:lo + experience_size]
            if drop_last and len(index) < experience_size:
                break
            part = subset(exp.dataset, index)
            present = tuple(sorted(set(targets_of(part).tolist())))
            out.append(Experience(len(out), part, present, exp.n_classes, exp.task, exp.origin, exp.covers))
            parents.append(exp.index)
    info = {**benchmark.info, "online": {"experience_size": experience_size, "parents": parents}}
    return Benchmark(Stream(out, benchmark.train_stream.name), benchmark.test_stream, benchmark.n_classes,
                     benchmark.scenario, info)


def check_online(blurry: float = 0.0, boundaries: bool = True, chunk: int | None = None) -> None:
    """Raise :class:`DataError` for options :func:`online` cannot take."""
    if isinstance(blurry, bool) or not isinstance(blurry, (int, float)) or not 0 <= blurry < 1:
        raise DataError(f"blurry is the fraction of each experience's samples moved to the others, in [0, 1); "
                        f"got {blurry!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise DataError(f"chunk must be a positive number of samples, got {chunk!r}")
    if chunk is not None and boundaries:
        raise DataError("chunk cuts a stream without boundaries (boundaries=False); with boundaries the experiences "
                        "are the stream's")


def online(benchmark: Benchmark, *, blurry: float = 0.0, boundaries: bool = True, chunk: int | None = None,
           seed: int = 0) -> Benchmark:
    """The online setting: each training sample seen once, in stream order; train it with ``epochs=1`` and
    minibatches of a few samples (``batch_size=10``; MIR, ER-ACE and DER++'s online experiments).

    ``blurry`` moves that fraction of each experience's samples into the others, each to one drawn
    uniformly, so classes leak across task ends (Bang et al. 2021, "Rainbow Memory", sec. 4.1: Blurry-M
    with M = 100 · blurry). With ``boundaries`` the experiences are the stream's. Without, the samples
    (each experience's shuffled, then concatenated) are cut into experiences of ``chunk`` samples trained
    in order (``Experience.ordered``): their ends fall every ``chunk`` samples wherever the tasks change,
    so the experience events tell plugins nothing about the tasks; each lists the classes present and
    ``covers`` the test experiences whose samples it holds. ``chunk`` defaults to a quarter of the mean
    experience. Draws are seeded with ``seed``; the test stream is unchanged; ``info["online"]`` records
    the options and each new experience's sample count per stream experience."""
    check_online(blurry, boundaries, chunk)
    exps = list(benchmark.train_stream)
    if (blurry or not boundaries) and any(e.task is not None for e in exps):
        raise DataError("a stream with task labels keeps its task boundaries: online(..., blurry=0, boundaries=True)")
    if blurry and len(exps) < 2:
        raise DataError("blurry boundaries move samples between experiences: the stream has only one")
    gen = torch.Generator().manual_seed(seed)
    starts = [0]
    for e in exps:
        starts.append(starts[-1] + len(e))
    parts = [starts[i] + torch.randperm(len(e), generator=gen) for i, e in enumerate(exps)]
    if blurry:
        moving = [p[:round(len(p) * blurry)] for p in parts]
        parts = [p[round(len(p) * blurry):] for p in parts]
        gifts: list[list[Tensor]] = [[] for _ in exps]
        for i, m in enumerate(moving):
            to = torch.randint(len(exps) - 1, (len(m),), generator=gen)
            to += (to >= i).long()  # any experience but i
            for j in range(len(exps)):
                gifts[j].append(m[to == j])
        parts = [torch.cat([p, *g]) for p, g in zip(parts, gifts)]
        parts = [p[torch.randperm(len(p), generator=gen)] for p in parts]
    pool = join([e.dataset for e in exps])
    parent = torch.repeat_interleave(torch.arange(len(exps)), torch.tensor([len(e) for e in exps]))
    n_classes = exps[0].n_classes
    if boundaries:
        pieces, ordered = parts, False
    else:
        order = torch.cat(parts)
        size = -(-len(order) // (4 * len(exps))) if chunk is None else chunk
        pieces, ordered = list(order.split(size)), True
    out, counts = [], []
    for k, index in enumerate(pieces):
        part = subset(pool, index)
        present = tuple(sorted(set(targets_of(part).tolist())))
        holds = torch.bincount(parent[index], minlength=len(exps))
        covers = exps[k].covers if boundaries else tuple(j for i in holds.nonzero().flatten().tolist()
                                                          for j in exps[i].covers)
        task = exps[k].task if boundaries else None
        out.append(Experience(k, part, present, n_classes, task, exps[0].origin, covers, ordered))
        counts.append(holds.tolist())
    info = {**benchmark.info, "online": {"blurry": blurry, "boundaries": boundaries,
                                         "chunk": None if boundaries else size, "holds": counts}}
    return Benchmark(Stream(out, benchmark.train_stream.name), benchmark.test_stream, benchmark.n_classes,
                     benchmark.scenario, info)
