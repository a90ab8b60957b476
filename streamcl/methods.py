"""Named recipes: a method name -> the plugin list that makes it (``[method] name = "..."`` in a config)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from streamcl.errors import ConfigError
from streamcl.registry import build_plugin, check_arguments


@dataclass(frozen=True)
class Recipe:
    """``plugins(**kwargs)`` builds the list; ``offline`` recipes train once on the joined stream."""

    name: str
    summary: str
    plugins: Callable[..., list]
    offline: bool = False


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("naive", "fine-tune on each experience in turn, nothing against forgetting (lower bound)", lambda: []),
    Recipe("cumulative", "each experience trained with all earlier data (unbounded rehearsal)",
           lambda: [build_plugin("cumulative")]),
    Recipe("joint", "one offline training on the whole stream joined (upper bound)", lambda: [], offline=True),
    Recipe("replay", "experience replay: a class-balanced memory replayed beside every minibatch (ER)",
           lambda memory=500, selection="class_balanced": [build_plugin("replay", memory=memory, selection=selection)]),
)}


def build_method(name: str, **kwargs) -> tuple[list, Recipe]:
    """The plugin list of recipe ``name`` with its arguments, and the recipe."""
    if name not in RECIPES:
        raise ConfigError(f"unknown method '{name}'; known methods: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    check_arguments(recipe.plugins, kwargs, f"method '{name}'")
    return recipe.plugins(**kwargs), recipe
