"""TensorBoard: every loss term per iteration, accuracy per experience, the accuracy matrix, the run's hyper-parameters."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import torch

from streamcl.loggers.base import run_hparams
from streamcl.metrics import recording
from streamcl.plugin import hookimpl

GREY = (0.5, 0.5, 0.5)  # a cell of the matrix that was not measured


def matrix_image(R: list[list[float | None]], cell: int = 24) -> torch.Tensor:
    """R as a 3 x H x W heat map in [0, 1]: dark blue at accuracy 0, yellow at 1, grey where not measured
    (``None``), one square per entry."""
    missing = torch.tensor([[v is None for v in r] for r in R], dtype=torch.bool)
    values = torch.tensor([[0.0 if v is None else v for v in r] for r in R], dtype=torch.float32).clamp(0, 1)
    low, high = torch.tensor([0.15, 0.05, 0.35]), torch.tensor([0.99, 0.9, 0.15])
    rgb = low[:, None, None] + (high - low)[:, None, None] * values[None]
    rgb = torch.where(missing[None], torch.tensor(GREY)[:, None, None], rgb)
    return rgb.repeat_interleave(cell, 1).repeat_interleave(cell, 2)


def matrix_markdown(R: list[list[float | None]]) -> str:
    """R as a markdown table, one row per trained experience; "-" where not measured."""
    head = "| after \\ on | " + " | ".join(f"exp {j}" for j in range(len(R[0]))) + " |"
    rule = "|---" * (len(R[0]) + 1) + "|"
    rows = [f"| exp {i} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in r) + " |" for i, r in enumerate(R)]
    return "\n".join([head, rule, *rows])


class TensorBoardLogger:
    """Engine-owned plugin writing a TensorBoard run to ``log_dir``.

    Scalars: ``loss/<term>`` and ``loss/total`` per iteration; ``accuracy/exp<j>`` (the cells
    measured), ``accuracy/mean`` (their mean), ``accuracy/seen``, ``accuracy/old`` and
    ``accuracy/new`` per trained experience (step: its row of the matrix); ``periodic/exp<j>`` and
    ``periodic/mean`` at the global step, for evaluations that do not record (during training, or
    ``record=False``); every scalar a plugin logs with ``strategy.log`` (``loss/vae_recon``, ``wa/factor``) at the
    global step. Images: ``accuracy_matrix``, and every image a plugin logs with ``strategy.log_image`` (a
    generator's samples). Text: the hyper-parameters, the plugin list and
    the matrix. HParams: the run's settings with its final metrics, when the run closes.
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | Path | None = None, config: dict | None = None, flush_secs: int = 10):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
        self.config = config
        self.flush_secs = flush_secs
        self.writer = SummaryWriter(str(self.log_dir), flush_secs=flush_secs)
        self._described = False
        self._step = 0

    @hookimpl
    def before_training(self, strategy) -> None:
        if self._described:
            return
        self._described = True
        hp = run_hparams(strategy)
        self.writer.add_text("run/plugins", hp["plugins"])
        self.writer.add_text("run/hparams", "```\n" + json.dumps(self.config or hp, indent=2, default=str) + "\n```")

    @hookimpl
    def after_training_iteration(self, strategy) -> None:
        terms = strategy.loss_terms
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).tolist()
        step = self._step = strategy.global_step
        for name, value in zip(terms, values):
            self.writer.add_scalar(f"loss/{name}", value, step)
        self.writer.add_scalar("loss/total", sum(values), step)

    @hookimpl
    def log_value(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    @hookimpl
    def log_image(self, name: str, image: torch.Tensor, step: int) -> None:
        self.writer.add_image(name, image.clamp(0, 1), step)

    @hookimpl
    def after_eval(self, strategy) -> None:
        if not recording(strategy):
            accuracy = {c.experience: c.accuracy for c in strategy.eval_results}
            for j, acc in sorted(accuracy.items()):
                self.writer.add_scalar(f"periodic/exp{j}", acc, strategy.global_step)
            if accuracy:
                self.writer.add_scalar("periodic/mean", sum(accuracy.values()) / len(accuracy), strategy.global_step)
            self.writer.flush()
            return
        summary = strategy.metrics.summary()
        R = summary["accuracy_matrix"]
        step = len(strategy.trained) - 1  # this evaluation's row
        if not strategy.eval_results or not 0 <= step < len(R):
            return
        known = [(j, acc) for j, acc in enumerate(R[step]) if acc is not None]
        for j, acc in known:
            self.writer.add_scalar(f"accuracy/exp{j}", acc, step)
        self.writer.add_scalar("accuracy/mean", sum(acc for _, acc in known) / len(known), step)
        for key in ("seen", "old", "new"):
            value = summary[f"{key}_accuracy"][step]
            if value is not None:
                self.writer.add_scalar(f"accuracy/{key}", value, step)
        self.writer.add_image("accuracy_matrix", matrix_image(R), step)
        self.writer.add_text("accuracy_matrix", matrix_markdown(R), step)
        self.writer.flush()

    def state_dict(self) -> dict:
        return {"step": self._step, "described": self._described}

    def load_state_dict(self, state: dict) -> None:
        """Go on after a checkpoint: loss points a killed run wrote past it are purged from the view."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer.close()
        self._described = state["described"]
        self.writer = SummaryWriter(str(self.log_dir), flush_secs=self.flush_secs, purge_step=state["step"] + 1)

    def close(self, strategy) -> None:
        summary = strategy.metrics.summary()
        hp = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
              for k, v in _flatten(self.config or run_hparams(strategy)).items()}
        hp["plugins"] = run_hparams(strategy)["plugins"]  # what ran, also when a recipe built the list
        metrics = {f"hparam/{k}": summary[k] for k in ("final_accuracy", "avg_incremental_accuracy", "forgetting")
                   if summary.get(k) is not None}
        if metrics:
            self.writer.add_hparams(hp, metrics, run_name=".")
        self.writer.close()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list):
            out[f"{prefix}{k}"] = json.dumps(v, default=str)
        else:
            out[f"{prefix}{k}"] = v
    return out
