"""Loggers: TensorBoard, console progress, ``results.json``. Each is an engine-owned plugin."""
from __future__ import annotations

from typing import Sequence

from streamcl.errors import ConfigError
from streamcl.loggers.console import ConsoleLogger
from streamcl.loggers.jsonlog import JSONLogger
from streamcl.loggers.tensorboard import TensorBoardLogger

LOGGERS = {"tensorboard": TensorBoardLogger, "console": ConsoleLogger, "json": JSONLogger}


def resolve_loggers(loggers: Sequence[object]) -> list[object]:
    """Logger instances from a list that may name loggers ("tensorboard", "console", "json")."""
    out = []
    for logger in loggers:
        if isinstance(logger, str):
            if logger not in LOGGERS:
                raise ConfigError(f"unknown logger '{logger}'; known loggers: {', '.join(LOGGERS)}")
            logger = LOGGERS[logger]()
        out.append(logger)
    return out


__all__ = ["ConsoleLogger", "JSONLogger", "LOGGERS", "TensorBoardLogger", "resolve_loggers"]
