"""Progress bars while training, the accuracy-matrix row after each evaluation (``-`` where not measured),
and a line per periodic or validation evaluation, on the terminal."""
from __future__ import annotations

import math
import sys

from tqdm import tqdm

from streamcl.metrics import recording
from streamcl.plugin import hookimpl


class ConsoleLogger:
    """Engine-owned plugin: a tqdm bar per training experience, a line per evaluation."""

    name = "console"

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.bar: tqdm | None = None

    @hookimpl
    def before_training_exp(self, strategy) -> None:
        n = len(strategy.train_dataset)
        total = strategy.epochs * math.ceil(n / strategy.batch_size)
        self.bar = tqdm(total=total, file=self.stream, leave=False, mininterval=0.5,
                        desc=f"exp {strategy.experience.index} ({n} samples)")

    @hookimpl
    def after_training_iteration(self, strategy) -> None:
        if self.bar is None:  # resumed inside an experience
            self.before_training_exp(strategy)
        self.bar.update()

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        if self.bar is None:
            self.before_training_exp(strategy)
        seconds = self.bar.format_dict["elapsed"]
        self.bar.close()
        self.bar = None
        exp = strategy.experience
        print(f"trained experience {exp.index} (classes {list(exp.classes)}) in {seconds:.1f} s",
              file=self.stream)

    @hookimpl
    def after_eval(self, strategy) -> None:
        results = strategy.eval_results
        if not recording(strategy):  # a periodic or validation evaluation: its own line, not the matrix's
            mean = sum(c.accuracy for c in results) / max(len(results), 1)
            tqdm.write(f"  periodic evaluation (epoch {strategy.epoch}, step {strategy.global_step}): "
                       + " ".join(f"exp {c.experience} {c.accuracy:.3f}" for c in results)
                       + f"  (mean {mean:.3f})", file=self.stream)
            return
        R = strategy.metrics.matrix
        n = len(strategy.trained)
        values = R[n - 1] if results and 0 < n <= len(R) else [c.accuracy for c in results]
        known = [v for v in values if v is not None]
        row = " ".join("-" if v is None else f"{v:.3f}" for v in values)
        print(f"  accuracy per experience: {row}  (mean {sum(known) / max(len(known), 1):.3f})", file=self.stream)

    def close(self, strategy) -> None:
        summary = strategy.metrics.summary()
        if "final_accuracy" in summary:
            print(summary_line(summary, strategy.train_seconds), file=self.stream)


def summary_line(summary: dict, train_seconds: float) -> str:
    """The run's one summary: final and average incremental accuracy, forgetting, training time."""
    return (f"final accuracy {_fmt(summary['final_accuracy'])} | average incremental accuracy "
            f"{_fmt(summary['avg_incremental_accuracy'])} | forgetting {_fmt(summary.get('forgetting'))} | "
            f"train {train_seconds:.1f} s")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
