"""Keeping the user's optimizer in step with a model whose parameters change (grown heads, new columns).

The optimizer the user built is the contract: only its parameters train, each with its group's
settings. A parameter the engine or a plugin adds joins the group of the parameter it replaces (the
same name) or extends (the nearest name: ``heads.3.weight`` follows ``heads.2.weight``); one that
replaces or extends a parameter the user left out stays out.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from streamcl.errors import ConfigError

OUT = -1  # the "group" of a model parameter the user's optimizer does not train


class ParamGroups:
    """Which of the user's optimizer groups (or ``OUT``) each named parameter of the model belongs to.

    The user's groups stay the optimizer's first groups, in place (a learning-rate scheduler keeps
    working); groups from ``param_groups`` hooks follow them, marked ``from_plugin``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self.n_user = len(optimizer.param_groups)
        self.names = {n: group_of.get(id(p), OUT) for n, p in model.named_parameters()}
        if not self.names:
            raise ConfigError(f"{type(model).__name__} has no parameters: there is nothing to train")
        if all(g == OUT for g in self.names.values()):
            raise ConfigError(f"the optimizer holds none of the parameters of {type(model).__name__}: build it "
                              "from the model's parameters, e.g. torch.optim.SGD(model.parameters(), lr=0.01)")
        model_ids = {id(p) for p in model.parameters()}
        self.outside = [[p for p in g["params"] if id(p) not in model_ids] for g in optimizer.param_groups]

    def trains(self, name: str) -> bool:
        return self.names.get(name, OUT) != OUT

    def group_of(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """The user group of every named parameter of ``model`` now (and remember it)."""
        held = {id(p): g.get("user_group", i) for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        old, new = self.names, {}
        for name, p in model.named_parameters():
            if id(p) in held:
                new[name] = held[id(p)]
            elif name in old:
                new[name] = old[name]
            else:
                new[name] = old[max(old, key=lambda known: _kinship(name, known))] if old else 0
        self.names = new
        return new

    def sync(self, optimizer: torch.optim.Optimizer, model: nn.Module, groups: list[dict] = ()) -> bool:
        """Point ``optimizer`` at ``model``'s parameters, in place; return whether anything changed.

        ``groups`` (from ``param_groups`` hooks) set their own options for some parameters, on top of
        the options of the user group each parameter belongs to. Momentum and other state carry over
        for every parameter still there.
        """
        assigned = self.group_of(model, optimizer)
        named = dict(model.named_parameters())
        claimed: dict[int, dict] = {}
        for group in groups:  # in plugin order: a later plugin's group takes a parameter an earlier one named
            for p in group["params"]:
                claimed[id(p)] = group
        user = [list(self.outside[i]) for i in range(self.n_user)]
        extra: dict[tuple[int, int], list] = {}
        for name, p in named.items():
            g = assigned[name]
            if g == OUT:
                continue
            if id(p) in claimed:
                extra.setdefault((id(claimed[id(p)]), g), []).append(p)
            else:
                user[g].append(p)
        by_id = {id(g): g for g in groups}
        plugin_groups = [{**_options(optimizer.param_groups[g]), **_options(by_id[gid]), "params": ps,
                          "from_plugin": True, "user_group": g} for (gid, g), ps in extra.items()]
        before = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
        if before == [[id(p) for p in ps] for ps in user] + [[id(p) for p in g["params"]] for g in plugin_groups]:
            return False
        keep = {p: optimizer.state[p] for ps in user for p in ps if p in optimizer.state}
        keep.update({p: optimizer.state[p] for g in plugin_groups for p in g["params"] if p in optimizer.state})
        del optimizer.param_groups[self.n_user:]
        for group, ps in zip(optimizer.param_groups, user):
            group["params"] = ps
        optimizer.state = defaultdict(dict, keep)
        for group in plugin_groups:
            optimizer.add_param_group(group)
        return True


def _options(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "from_plugin", "user_group")}


def _kinship(a: str, b: str) -> tuple[int, int]:
    """How close two parameter names are: shared leading, then shared trailing, dotted components."""
    x, y = a.split("."), b.split(".")
    lead = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
    trail = next((i for i, (u, v) in enumerate(zip(reversed(x), reversed(y))) if u != v), min(len(x), len(y)))
    return lead, trail
