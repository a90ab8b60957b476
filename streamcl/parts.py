"""The model contract: where any ``nn.Module`` keeps its classifier head, and the features that feed it.

The engine finds the head once per model (and again when a plugin changes the model):

1. the path the user gave (``Strategy(head="classifier.6")``);
2. timm's ``get_classifier()``;
3. an attribute ``head``, ``fc``, ``classifier`` or ``heads`` (torchvision, timm, streamcl): the module itself
   when it is linear, else the last linear module inside it;
4. for an ``nn.Sequential``, its last linear module; a model that is one linear layer is its own head (``""``).

A module is *linear* when it is an ``nn.Linear`` or has integer ``in_features`` and ``out_features``
(streamcl's growing and cosine heads). The features are the head's input, read by a forward pre-hook
for the duration of one call: no ``return_features`` argument is needed, and copies of the model
(teachers) carry no hook. The first training forward checks that the head's output is the model's.
"""
from __future__ import annotations

import copy

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

HEAD_NAMES = ("head", "fc", "classifier", "heads")


def is_linear(module: object) -> bool:
    """An ``nn.Linear``, or a module with integer ``in_features`` and ``out_features``."""
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Module) and isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int))


def _last_linear(module: nn.Module, prefix: str) -> str | None:
    if is_linear(module):
        return prefix
    found = None
    for name, sub in module.named_modules(prefix=prefix):
        if is_linear(sub) and not (found and name.startswith(found + ".")):
            found = name
    return found


def _path_of(model: nn.Module, target: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if m is target), None)


def find_head(model: nn.Module, path: str | None = None) -> str | None:
    """The dotted path of ``model``'s classifier head (``""`` for the model itself), or ``None``."""
    if path is not None:
        try:
            model.get_submodule(path)
        except AttributeError:
            from streamcl.errors import ConfigError
            names = [n for n, _ in model.named_modules() if n][:12]
            raise ConfigError(f"head={path!r}: {type(model).__name__} has no sub-module there; its modules include "
                              f"{', '.join(names)}") from None
        return path
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001 - a user's method of that name that is something else
            head = None
        if isinstance(head, nn.Module) and is_linear(head):
            return _path_of(model, head)
    for name in HEAD_NAMES:
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module):
            found = _last_linear(sub, name)
            if found is not None:
                return found
    if isinstance(model, nn.Sequential) or is_linear(model):  # "" when the model is a single linear layer
        return _last_linear(model, "")
    return None


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` inside ``model``."""
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if isinstance(owner, (nn.Sequential, nn.ModuleList)) and name.isdigit():
        owner[int(name)] = new
    else:
        setattr(owner, name, new)


@contextmanager
def capture_input(module: nn.Module) -> Iterator[list[Tensor]]:
    """Within the context, ``module``'s latest input lands in the yielded list (last call wins)."""
    box: list[Tensor] = []

    def keep(_module, args):
        if args:
            box[:] = [args[0]]

    handle = module.register_forward_pre_hook(keep)
    try:
        yield box
    finally:
        handle.remove()


@contextmanager
def detached_input(module: nn.Module) -> Iterator[None]:
    """Within the context, ``module`` sees its first input detached: gradients stop at it (they reach
    ``module``'s own parameters, nothing that computed its input)."""
    handle = module.register_forward_pre_hook(lambda _module, args: (args[0].detach(), *args[1:]) if args else None)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def grown_linear(head: nn.Linear, n: int) -> nn.Linear:
    """An ``nn.Linear`` with ``n`` outputs whose first rows are ``head``'s (the rest initialised as nn.Linear does)."""
    new = nn.Linear(head.in_features, n, bias=head.bias is not None).to(head.weight.device, head.weight.dtype)
    new.weight[:head.out_features] = head.weight
    if head.bias is not None:
        new.bias[:head.out_features] = head.bias
    new.weight.requires_grad_(head.weight.requires_grad)
    return new


def check_first(strategy, model: nn.Module, who: str, does: str) -> None:
    """In ``adapt_model``: refuse ``model`` (what the plugins before ``who`` returned) unless it is ``strategy.model``,
    which ``who`` ``does`` ("wraps", "replaces the head of")."""
    if model is not strategy.model:
        from streamcl.errors import ConfigError
        raise ConfigError(f"{who} {does} strategy.model, and a plugin before it in the list returned another model; "
                          f"list {who} first")


def model_as(strategy, kind: type, who: str, what: str) -> nn.Module:
    """``strategy.model`` when it is still the ``kind`` plugin ``who`` built (``what``), else a ConfigError."""
    if not isinstance(strategy.model, kind):
        from streamcl.errors import ConfigError
        raise ConfigError(f"{who}: strategy.model is no longer {what}; list {who} after plugins that replace the model")
    return strategy.model


def frozen(model: torch.nn.Module | None, state: dict | None = None) -> torch.nn.Module | None:
    """A deep copy of ``model`` (loaded with ``state`` if given) in evaluation mode, taking no gradient: a teacher,
    a solver, the model at initialisation."""
    if model is None:
        return None
    teacher = copy.deepcopy(model)  # never shared with the model (or with whoever holds ``state``)
    if state is not None:
        teacher.load_state_dict(state)
    for p in teacher.parameters():
        p.grad = None
        p.requires_grad_(False)
    return teacher.eval()
