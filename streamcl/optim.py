"""Keeping an optimizer in step with a model whose parameters change (grown heads, new columns)."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from streamcl.errors import PluginError


def sync_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, groups: list[dict] = ()) -> bool:
    """Point ``optimizer`` at ``model``'s parameters, in place; return whether anything changed.

    ``groups`` (from ``param_groups`` hooks) set their own options for some parameters; the rest
    keep the options of the optimizer's first group that no hook made (marked ``from_plugin``). State (momentum) carries over for every
    parameter that is still there. Nothing changes if the parameters and groups are the same.
    """
    params = list(model.parameters())
    claimed: dict[int, dict] = {}
    for group in groups:
        for p in group["params"]:
            if id(p) in claimed:
                raise PluginError("a parameter was put in two optimizer groups by param_groups hooks")
            claimed[id(p)] = group
    current = [p for g in optimizer.param_groups for p in g["params"]]
    if not groups and [id(p) for p in current] == [id(p) for p in params]:
        return False
    own = [g for g in optimizer.param_groups if not g.get("from_plugin")]
    base = {k: v for k, v in (own[0] if own else optimizer.defaults).items() if k not in ("params", "from_plugin")}
    rest = [p for p in params if id(p) not in claimed]
    new_groups = ([{**base, "params": rest}] if rest else []) + [
        {**base, **{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"]), "from_plugin": True}
        for g in groups]
    old_state = optimizer.state
    optimizer.param_groups.clear()
    optimizer.state = defaultdict(dict)
    for group in new_groups:
        optimizer.add_param_group(group)
    for p in params:
        if p in old_state:
            optimizer.state[p] = old_state[p]
    return True
