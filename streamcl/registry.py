"""Finding plugins, benchmarks and models by name: built-in and third-party ones alike, through the entry-point
groups ``streamcl.plugins``, ``streamcl.benchmarks`` and ``streamcl.models``."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any, Callable, Sequence

from streamcl.errors import ConfigError, PluginError, StreamclError
from streamcl.plugin import init_signature

GROUP = "streamcl.plugins"
GROUPS = {"plugin": GROUP, "benchmark": "streamcl.benchmarks", "model": "streamcl.models"}


@dataclass(frozen=True)
class PluginInfo:
    """One installed plugin (or benchmark, or model): its name, the object path, and the distribution that
    provides it."""

    name: str
    target: str
    distribution: str
    version: str

    @property
    def builtin(self) -> bool:
        return self.distribution == "streamcl"

    def load(self) -> Callable[..., Any]:
        """The registered object; a target that cannot be imported raises :class:`PluginError` naming the entry,
        its target and the distribution that registered it."""
        module, _, attr = self.target.partition(":")
        try:
            obj = __import__(module, fromlist=[attr or "_"])
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as err:
            raise PluginError(f"'{self.name}' is registered by {self.distribution} {self.version} as {self.target}, "
                              f"which cannot be loaded ({type(err).__name__}: {err}); reinstall or fix that "
                              "package") from None
        return obj


def entries(kind: str) -> dict[str, PluginInfo]:
    """Everything registered under the entry-point group of ``kind`` ("plugin", "benchmark", "model"), by name,
    read afresh (the ``available_*`` functions keep what they read)."""
    group = GROUPS[kind]
    found: dict[str, PluginInfo] = {}
    for ep in entry_points(group=group):
        dist = getattr(ep, "dist", None)
        info = PluginInfo(ep.name, ep.value, dist.metadata["Name"] if dist else "?", dist.version if dist else "?")
        if ep.name in found and found[ep.name].target != info.target:
            raise ConfigError(f"{kind} name '{ep.name}' is claimed by {found[ep.name].distribution} "
                              f"({found[ep.name].target}) and {info.distribution} ({info.target})")
        found[ep.name] = info
    return dict(sorted(found.items()))


@lru_cache(maxsize=1)
def available_plugins() -> dict[str, PluginInfo]:
    """Every plugin registered under the ``streamcl.plugins`` entry-point group, by name."""
    return entries("plugin")


@lru_cache(maxsize=1)
def available_benchmarks() -> dict[str, PluginInfo]:
    """Every benchmark registered under ``streamcl.benchmarks``, by name."""
    return entries("benchmark")


@lru_cache(maxsize=1)
def available_models() -> dict[str, PluginInfo]:
    """Every model registered under ``streamcl.models``, by name."""
    return entries("model")


def build_plugin(name: str, **kwargs) -> object:
    """A plugin instance from its registered name and constructor arguments, checked by name."""
    plugins = available_plugins()
    if name not in plugins:
        raise ConfigError(f"unknown plugin '{name}'; known plugins: {', '.join(plugins) or '(none installed)'}")
    factory = plugins[name].load()
    check_arguments(factory, kwargs, f"plugin '{name}'")
    try:
        return factory(**kwargs)
    except (ValueError, TypeError) as err:  # a plugin's own check of its arguments (ours raise ConfigError)
        if isinstance(err, StreamclError):
            raise
        info = plugins[name]
        raise ConfigError(f"plugin '{name}' ({'built-in' if info.builtin else info.distribution}) refused "
                          f"{kwargs or 'its defaults'}: {err}") from None


def check_arguments(factory: Callable, kwargs: dict, what: str, fixed: Sequence[str] = ()) -> None:
    """Raise :class:`ConfigError` naming any argument ``factory`` does not take, and the ones it does; ``fixed``
    arguments are given by the caller, never in ``kwargs``."""
    params = init_signature(factory).parameters
    allowed = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
               and n not in fixed]
    anything = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k in fixed or not (anything or k in allowed)]
    if unknown:
        raise ConfigError(f"{what} has no argument {', '.join(map(repr, unknown))}; "
                          f"it takes: {', '.join(allowed) or '(no arguments)'}")


def resolve_plugins(plugins: Sequence[object]) -> list[object]:
    """Plugin instances from a list that may mix instances and registered names; a class is refused."""
    for p in plugins:
        if isinstance(p, type):
            raise PluginError(f"{p.__name__} is a plugin class, not a plugin; pass an instance: {p.__name__}()")
    return [build_plugin(p) if isinstance(p, str) else p for p in plugins]
