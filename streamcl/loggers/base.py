"""What every logger shares: the run's description and the results dictionary."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    import numpy
    import pluggy
    import torch

    import streamcl
    return {"streamcl": streamcl.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "pluggy": pluggy.__version__, "python": platform.python_version()}


def run_hparams(strategy) -> dict[str, Any]:
    """The run's hyper-parameters: loop settings, optimizer options, and the plugin list in order."""
    group = strategy.optimizer.param_groups[0] if strategy.optimizer.param_groups else {}
    opt = {f"optimizer.{k}": v for k, v in group.items() if k != "params" and isinstance(v, (int, float, str, bool))}
    return {"epochs": strategy.epochs, "batch_size": strategy.batch_size, "eval_batch_size": strategy.eval_batch_size,
            "seed": strategy.seed, "optimizer": type(strategy.optimizer).__name__, **opt,
            "model": type(strategy.model).__name__, "plugins": ", ".join(map(repr, strategy.plugins)) or "(none)"}


def results(strategy, config: dict | None = None) -> dict[str, Any]:
    """The ``results.json`` content: metrics so far, timings, plugins, config and versions."""
    extra = {k: v for piece in strategy._contributions("results") for k, v in piece.items()}  # metric plugins
    return {**strategy.metrics.summary(), **extra, "train_seconds": strategy.train_seconds,
            "eval_seconds": strategy.eval_seconds, "plugins": strategy.plugin_names,
            "config": config if config is not None else run_hparams(strategy), "versions": versions()}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to a temporary file, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
