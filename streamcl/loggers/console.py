"""The terminal: a progress bar per training experience (epoch, running loss, last accuracy), the accuracy-matrix
row after each evaluation (``-`` where not measured), a line per periodic evaluation, one summary. Everything goes
through Python's ``logging`` (logger ``streamcl``), so ``-v``/``-q`` or the user's own configuration set how much."""
from __future__ import annotations

import logging
import math
import sys

from tqdm import tqdm

from streamcl.metrics import recording
from streamcl.plugin import hookimpl

log = logging.getLogger("streamcl")


class TqdmHandler(logging.StreamHandler):
    """Writes records above the progress bar, not through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # pragma: no cover - logging's own policy
            self.handleError(record)


def configure(verbosity: int = 0, stream=None) -> None:
    """Send the ``streamcl`` logger and Python warnings to ``stream`` (stderr): ``verbosity`` -1 warnings and
    errors only, 0 progress and results, 1 also a line per epoch and every value plugins log."""
    handler = TqdmHandler(stream or sys.stderr)
    handler.setFormatter(_Format())
    handler._streamcl = True
    for name in ("streamcl", "py.warnings"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, "_streamcl", False)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
    log.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))
    logging.captureWarnings(True)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.name == "py.warnings":  # "file:line: Category: message" from the warnings module
            return "warning: " + text.strip()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class ConsoleLogger:
    """Engine-owned plugin: a tqdm bar per training experience, a line per evaluation, the summary at the end.
    If nothing configured the ``streamcl`` logger, it is sent to ``stream`` (stderr) at level INFO."""

    name = "console"
    every = 20  # iterations between two readings of the loss (each one waits for the device)

    def __init__(self, stream=None):
        if not log.handlers or stream is not None:
            level = log.level or logging.INFO
            configure(0 if level == logging.INFO else (-1 if level > logging.INFO else 1), stream)
        self.stream = next((h.stream for h in log.handlers if hasattr(h, "stream")), stream or sys.stderr)
        self.bar: tqdm | None = None
        self.per_epoch = 0
        self.loss: float | None = None
        self.accuracy: float | None = None

    def _open(self, strategy) -> None:
        n = len(strategy.train_dataset)
        per_epoch = math.ceil(n / strategy.batch_size)
        self.bar = tqdm(total=strategy.epochs * per_epoch, file=self.stream, leave=False, mininterval=0.5,
                        disable=not log.isEnabledFor(logging.INFO), desc=f"exp {strategy.experience.index}")
        self.per_epoch = per_epoch

    @hookimpl
    def before_training_exp(self, strategy) -> None:
        self._open(strategy)

    @hookimpl
    def log_value(self, name: str, value: float, step: int, axis: str) -> None:
        if name == "loss/total":
            self.loss = value if self.loss is None else 0.9 * self.loss + 0.1 * value  # running mean
        elif name == "accuracy/mean":
            self.accuracy = value
        elif name != "periodic/mean" and not name.startswith(("loss/", "accuracy/", "periodic/", "uncorrected/")):
            log.debug("  %s = %.6g (%s %d)", name, value, axis, step)

    @hookimpl
    def after_training_iteration(self, strategy) -> None:
        if self.bar is None:  # resumed inside an experience: the steps before this one were done
            self._open(strategy)
            self.bar.update(strategy.epoch * self.per_epoch + strategy.iteration)
        self.bar.update()
        if strategy.iteration % self.every == 0 and not self.bar.disable:
            self.bar.set_postfix_str(self._postfix(strategy), refresh=False)

    def _postfix(self, strategy) -> str:
        parts = [f"epoch {strategy.epoch + 1}/{strategy.epochs}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.accuracy is not None:
            parts.append(f"last acc {self.accuracy:.3f}")
        return ", ".join(parts)

    @hookimpl
    def after_training_epoch(self, strategy) -> None:
        if self.loss is not None:
            log.debug("  exp %d epoch %d/%d: loss %.4f", strategy.experience.index, strategy.epoch + 1,
                      strategy.epochs, self.loss)

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        if self.bar is None:
            self._open(strategy)
        seconds = self.bar.format_dict["elapsed"]
        self.bar.close()
        self.bar = None
        exp = strategy.experience
        log.info("trained experience %d (classes %s) in %.1f s", exp.index, list(exp.classes), seconds)

    @hookimpl
    def after_eval(self, strategy) -> None:
        results = strategy.eval_results
        if not recording(strategy):  # a periodic or validation evaluation: its own line, not the matrix's
            mean = sum(c.accuracy for c in results) / max(len(results), 1)
            log.info("  periodic evaluation (epoch %d, step %d): %s  (mean %.3f)", strategy.epoch,
                     strategy.global_step, " ".join(f"exp {c.experience} {c.accuracy:.3f}" for c in results), mean)
            return
        R = strategy.metrics.matrix
        n = len(strategy.trained)
        values = R[n - 1] if results and 0 < n <= len(R) else [c.accuracy for c in results]
        known = [v for v in values if v is not None]
        row = " ".join("-" if v is None else f"{v:.3f}" for v in values)
        label = "accuracy per experience" if strategy.correcting else "before bias correction"
        log.info("  %s: %s  (mean %.3f)", label, row, sum(known) / max(len(known), 1))

    def close(self, strategy) -> None:
        summary = strategy.metrics.summary()
        if "final_accuracy" in summary:
            log.info("%s", summary_line(summary, strategy.train_seconds))


def summary_line(summary: dict, train_seconds: float) -> str:
    """The run's one summary: final and average incremental accuracy, forgetting, training time."""
    return (f"final accuracy {_fmt(summary['final_accuracy'])} | average incremental accuracy "
            f"{_fmt(summary['avg_incremental_accuracy'])} | forgetting {_fmt(summary.get('forgetting'))} | "
            f"train {train_seconds:.1f} s")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
