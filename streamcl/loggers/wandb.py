"""Weights & Biases: the run's event stream, its config and final metrics (``pip install 'streamcl[wandb]'``)."""
from __future__ import annotations

from pathlib import Path

import torch

from streamcl.extras import require
from streamcl.plugin import hookimpl


class WandbLogger:
    """Engine-owned plugin writing every scalar and image sent with ``strategy.log`` / ``log_image`` to a W&B run:
    each name is charted against its own axis (``step``, ``experience``, a private loop's epochs), the values of
    one axis and step go in one row. The config is the run's; its final accuracy, average incremental accuracy and
    forgetting go in the run summary. ``mode="offline"`` writes under ``dir`` for a later ``wandb sync``."""

    name = "wandb"

    def __init__(self, project: str = "streamcl", mode: str = "offline", dir: str | Path | None = None,
                 config: dict | None = None, name: str | None = None, **init):
        self.wandb = require("wandb", "wandb", "the Weights & Biases logger")
        self.options = {"project": project, "mode": mode, "config": config, "name": name, **init,
                        **({"dir": str(dir)} if dir is not None else {})}
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(**self.options)
        self.named: set[str] = set()
        self.pending: dict[str, tuple[int, dict]] = {}  # axis -> (step, values not yet sent)

    def _put(self, name: str, value, step: int, axis: str) -> None:
        if name not in self.named:
            if axis not in self.named:
                self.run.define_metric(axis, hidden=True)
                self.named.add(axis)
            self.run.define_metric(name, step_metric=axis)
            self.named.add(name)
        held = self.pending.get(axis)
        if held is not None and (held[0] != step or name in held[1]):
            self._send(axis)
        self.pending.setdefault(axis, (step, {}))[1][name] = value

    def _send(self, axis: str | None = None) -> None:
        for key in [axis] if axis is not None else list(self.pending):
            step, values = self.pending.pop(key)
            self.run.log({**values, key: step})

    @hookimpl
    def log_value(self, name: str, value: float, step: int, axis: str) -> None:
        self._put(name, value, step, axis)

    @hookimpl
    def log_image(self, name: str, image: torch.Tensor, step: int, axis: str) -> None:
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        self._put(name, self.wandb.Image(pixels), step, axis)

    @hookimpl
    def after_training_iteration(self) -> None:
        self._send()

    @hookimpl
    def after_eval(self) -> None:
        self._send()

    def state_dict(self) -> dict:
        self._send()
        return {"id": self.run.id}

    def load_state_dict(self, state: dict) -> None:
        """Go on in the run the checkpoint's run wrote (same id), not in a new one."""
        if state["id"] != self.run.id:
            self.run.finish()
            self.run = self.wandb.init(**{**self.options, "id": state["id"], "resume": "allow"})
            self.named = set()

    def close(self, strategy) -> None:
        self._send()
        summary = strategy.metrics.summary()
        self.run.summary.update({k: summary[k] for k in ("final_accuracy", "avg_incremental_accuracy", "forgetting")
                                 if summary.get(k) is not None})
        self.run.finish()
