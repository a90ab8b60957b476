"""TensorBoard: every loss term per iteration, accuracy per experience, the accuracy matrix, the run's hyper-parameters."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import torch

from streamcl.loggers.base import run_hparams
from streamcl.metrics import recording
from streamcl.plugin import hookimpl

def matrix_markdown(R: list[list[float | None]]) -> str:
    """R as a markdown table, one row per trained experience; "-" where not measured."""
    head = "| after \\ on | " + " | ".join(f"exp {j}" for j in range(len(R[0]))) + " |"
    rule = "|---" * (len(R[0]) + 1) + "|"
    rows = [f"| exp {i} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in r) + " |" for i, r in enumerate(R)]
    return "\n".join([head, rule, *rows])


class TensorBoardLogger:
    """Engine-owned plugin writing the run's event stream to a TensorBoard run in ``log_dir``.

    Scalars and images: everything sent with ``strategy.log`` / ``strategy.log_image`` (see
    :class:`streamcl.loggers.events.Events` for the engine's own: ``loss/<term>``, ``accuracy/...``), each at its
    step. Text: the hyper-parameters, the plugin list and the accuracy matrix. HParams: the run's method and the
    settings it changed from the defaults, with its final metrics, when the run closes.
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
        self._step = strategy.global_step

    @hookimpl
    def log_value(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    @hookimpl
    def log_image(self, name: str, image: torch.Tensor, step: int) -> None:
        self.writer.add_image(name, image.clamp(0, 1), step)

    @hookimpl
    def after_eval(self, strategy) -> None:
        R = strategy.metrics.matrix
        if recording(strategy) and strategy.correcting and strategy.eval_results and strategy.trained and R:
            self.writer.add_text("accuracy_matrix", matrix_markdown(R), len(strategy.trained) - 1)
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
        hp = hparams(self.config, strategy)
        metrics = {f"hparam/{k}": summary[k] for k in ("final_accuracy", "avg_incremental_accuracy", "forgetting")
                   if summary.get(k) is not None}
        if metrics:
            self.writer.add_hparams(hp, metrics, run_name=".")
        self.writer.close()


def hparams(config: dict | None, strategy) -> dict:
    """What tells runs apart in the HParams tab: the method (``method.name``, else the plugin list), the
    benchmark, model and seed, and every config key set to other than its default; values as text or numbers."""
    from streamcl.config import parse

    ran = run_hparams(strategy)
    if config is None:
        chosen = ran
    else:
        flat, default = _flatten(config), _flatten(parse({}))
        always = ("method.name", "benchmark.name", "model.name", "seed")
        chosen = {k: v for k, v in flat.items() if k in always or default.get(k, object()) != v}
        chosen.setdefault("method.name", "(plugins)" if config.get("plugins") else "naive")
    chosen = {"plugins": ran["plugins"], **chosen}  # what ran, also when a recipe built the list
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in chosen.items()}


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
