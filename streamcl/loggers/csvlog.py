"""``scalars.csv``: the run's event stream as rows ``name, axis, step, value``, one per logged scalar."""
from __future__ import annotations

import csv
from pathlib import Path

from streamcl.plugin import hookimpl

HEADER = ("name", "axis", "step", "value")


class CSVLogger:
    """Engine-owned plugin appending every scalar sent with ``strategy.log`` to ``path`` (flushed at each
    evaluation and checkpoint). A resumed run first cuts the rows written after its checkpoint, so the file
    holds each value once."""

    name = "csv"

    def __init__(self, path: str | Path = "scalars.csv"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.file = open(self.path, "a", newline="")
        self.writer = csv.writer(self.file)
        self.rows = 0 if new else _count(self.path)
        if new:
            self.writer.writerow(HEADER)

    @hookimpl
    def log_value(self, name: str, value: float, step: int, axis: str) -> None:
        self.writer.writerow((name, axis, step, repr(value)))
        self.rows += 1

    @hookimpl
    def after_eval(self) -> None:
        self.file.flush()

    def state_dict(self) -> dict:
        self.file.flush()
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.file.close()
        with open(self.path, newline="") as f:
            kept = [row for _, row in zip(range(state["rows"] + 1), csv.reader(f))]  # the header and the rows
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        self.file = open(self.path, "a", newline="")
        self.writer, self.rows = csv.writer(self.file), len(kept) - 1

    def close(self, strategy) -> None:
        self.file.close()


def _count(path: Path) -> int:
    with open(path, newline="") as f:
        return sum(1 for _ in csv.reader(f)) - 1


def read(path: str | Path) -> list[dict]:
    """The rows of a ``scalars.csv``: ``name``, ``axis``, ``step`` (int), ``value`` (float)."""
    with open(path, newline="") as f:
        return [{"name": r["name"], "axis": r["axis"], "step": int(r["step"]), "value": float(r["value"])}
                for r in csv.DictReader(f)]
