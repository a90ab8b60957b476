"""``results.json``: rewritten (atomically) after every evaluation and when the run closes."""
from __future__ import annotations

from pathlib import Path

from streamcl.loggers.base import results, write_json_atomic
from streamcl.plugin import hookimpl


class JSONLogger:
    """Engine-owned plugin writing :func:`streamcl.loggers.base.results` to ``path``."""

    name = "json"

    def __init__(self, path: str | Path = "results.json", config: dict | None = None):
        self.path, self.config = Path(path), config

    @hookimpl
    def after_eval(self, strategy) -> None:
        if strategy.trained:
            write_json_atomic(self.path, results(strategy, self.config))

    def close(self, strategy) -> None:
        write_json_atomic(self.path, results(strategy, self.config))
