"""Loggers: TensorBoard, CSV, Weights & Biases, console progress, ``results.json``. Each is an engine-owned plugin
fed by the run's one event stream (``strategy.log``)."""
from __future__ import annotations

from typing import Sequence

from streamcl.errors import ConfigError
from streamcl.loggers.console import ConsoleLogger
from streamcl.loggers.csvlog import CSVLogger
from streamcl.loggers.jsonlog import JSONLogger
from streamcl.loggers.tensorboard import TensorBoardLogger

LOGGERS = {"tensorboard": TensorBoardLogger, "console": ConsoleLogger, "json": JSONLogger, "csv": CSVLogger}


def resolve_loggers(loggers: Sequence[object]) -> list[object]:
    """Logger instances from a list that may name loggers ("tensorboard", "console", "json", "csv", "wandb")."""
    out = []
    for logger in loggers:
        if logger == "wandb":
            from streamcl.loggers.wandb import WandbLogger
            logger = WandbLogger()
        if isinstance(logger, str):
            if logger not in LOGGERS:
                raise ConfigError(f"unknown logger '{logger}'; known loggers: {', '.join(LOGGERS)}")
            logger = LOGGERS[logger]()
        out.append(logger)
    return out


__all__ = ["CSVLogger", "ConsoleLogger", "JSONLogger", "LOGGERS", "TensorBoardLogger", "resolve_loggers"]
