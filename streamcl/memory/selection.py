"""Which samples a memory keeps: herding, reservoir sampling, and balancing over classes or experiences.

Every function is pure (tensors in, indices out) and draws randomness only from the generator it
is given, so a memory makes the same choices on every rank and after a resume.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def herding(features: Tensor, m: int) -> Tensor:
    """The first ``m`` herding picks over ``features``, in order (iCaRL, Rebuffi et al. 2017, Alg. 4).

    Features are L2-normalised; pick k is the sample that brings the mean of the k chosen closest
    to the mean of all: ``argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||``, without repeats.
    Expanded as ``||phi(x)||^2 - 2 phi(x) . (k mu - sum_{j<k} phi(p_j))`` plus a constant, so each pick
    is one matrix-vector product, in float64; gaps within the features' own rounding (8 machine epsilons of
    their dtype, times k) of the smallest are ties, won by the first index, as the distance rule's exact ties.
    """
    tie = 8 * torch.finfo(features.dtype if features.is_floating_point() else torch.float32).eps
    phi = F.normalize(features.double().flatten(1), dim=1)
    mu, norms = phi.mean(0), phi.pow(2).sum(1)  # norms: 1, or 0 for an all-zero row
    m = min(m, len(phi))
    chosen = torch.empty(m, dtype=torch.long, device=phi.device)
    running = torch.zeros_like(mu)
    taken = torch.zeros(len(phi), dtype=torch.bool, device=phi.device)
    for k in range(m):
        gap = norms - 2 * (phi @ (mu * (k + 1) - running))
        gap[taken] = float("inf")
        i = torch.nonzero(gap <= gap.min() + tie * (k + 1))[0, 0]
        chosen[k], taken[i] = i, True
        running += phi[i]
    return chosen


def reservoir(seen: int, n: int, capacity: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Reservoir sampling (Vitter 1985, Algorithm R) of ``n`` new items after ``seen`` earlier ones.

    Item i (the ``seen + i``-th of the stream) goes to slot ``seen + i`` while the memory fills,
    then to a uniform slot j in ``0 .. seen + i`` if j < capacity. Returns ``(slots, items)``: item
    ``items[k]`` is written to ``slots[k]``; when two items draw one slot only the later is kept,
    as if they were inserted one by one.
    """
    count = seen + torch.arange(n)
    draw = (torch.rand(n, generator=generator) * (count + 1)).long()
    slots = torch.where(count < capacity, count, draw)
    items = torch.arange(n)
    keep = slots < capacity
    slots, items = slots[keep], items[keep]
    key = slots * max(n, 1) + items
    order = key.argsort()
    slots, items = slots[order], items[order]
    last = torch.ones(len(slots), dtype=torch.bool)
    last[:-1] = slots[1:] != slots[:-1]
    return slots[last], items[last]


def random_pick(n: int, m: int, generator: torch.Generator) -> Tensor:
    """``m`` of ``n`` indices, uniformly without replacement, in random order."""
    return torch.randperm(n, generator=generator)[:m]


def balanced(groups: Tensor, quotas: dict[int, int], priority: Tensor | None = None) -> Tensor:
    """Indices to keep so that group g keeps at most ``quotas[g]`` members (0 for groups not named).

    Within a group the members come in ``priority`` order (default: index order), so a shrinking
    quota drops the members picked last (iCaRL's "reduce exemplar set", Alg. 5). The result lists the groups in
    the order of ``quotas``, each group's kept members in priority order; computed in one sort, whatever the
    number of groups.
    """
    device = groups.device
    order = priority if priority is not None else torch.arange(len(groups), device=device)
    if not quotas or not len(order):
        return torch.empty(0, dtype=torch.long, device=device)
    named = torch.tensor(list(quotas), dtype=torch.long, device=device)
    limit = torch.tensor(list(quotas.values()), dtype=torch.long, device=device)
    g = groups[order].long()
    ids, at = named.sort()  # the named groups sorted, and each one's position in ``quotas``
    slot = torch.searchsorted(ids, g).clamp(max=len(ids) - 1)
    position = torch.where(ids[slot] == g, at[slot], len(ids))  # unnamed groups last, then dropped
    by = torch.argsort(position, stable=True)  # quotas' order; priority order kept within a group
    pos = position[by]
    first = torch.searchsorted(pos, pos, right=False)  # index where each member's group starts
    rank = torch.arange(len(pos), device=device) - first
    cap = torch.cat([limit, limit.new_zeros(1)])[pos]
    return order[by[rank < cap]]
