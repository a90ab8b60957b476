"""Progress bars while training and the accuracy row after each evaluation, on the terminal."""
from __future__ import annotations

import math
import sys

from tqdm import tqdm

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
        row = " ".join(f"{c.accuracy:.3f}" for c in strategy.eval_results)
        mean = sum(c.accuracy for c in strategy.eval_results) / max(len(strategy.eval_results), 1)
        print(f"  accuracy per experience: {row}  (mean {mean:.3f})", file=self.stream)

    def close(self, strategy) -> None:
        summary = strategy.metrics.summary()
        if "final_accuracy" in summary:
            print(f"final accuracy {summary['final_accuracy']:.4f}, average incremental accuracy "
                  f"{summary['avg_incremental_accuracy']:.4f}", file=self.stream)
