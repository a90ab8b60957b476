"""Packages only one plugin needs are optional extras (``pip install 'streamcl[gem]'``); the plugin asks for them
when it is built, so a missing one is refused at construction with the command that installs it."""
from __future__ import annotations

import importlib
from types import ModuleType

from streamcl.errors import ConfigError


def require(module: str, extra: str, who: str, package: str | None = None) -> ModuleType:
    """Import ``module``, or raise a :class:`ConfigError` saying that ``who`` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{who} needs the package {package or module} ({err}); install it with "
                          f"pip install 'streamcl[{extra}]' (or pip install {package or module})") from None
