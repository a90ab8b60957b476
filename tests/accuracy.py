"""Accuracy on the real protocols of docs/protocols.md, mean over seeds 0, 1, 2, each run once per session."""
from __future__ import annotations

import statistics
from functools import lru_cache

from streamcl import config, runner
from streamcl.config import PROTOCOLS  # noqa: F401  (the tests' way to name a protocol)

SEEDS = (0, 1, 2)


@lru_cache(maxsize=None)
def _run(part: str, seed: int, overrides: tuple) -> dict:
    import json
    cfg = config.parse({**json.loads(part), "seed": seed, "log": {"tensorboard": False, "console": False}},
                       list(overrides))
    return runner.run(cfg)


def protocol_runs(part: dict, overrides: tuple = ()) -> list[dict]:
    """One run per seed of the SFM-5 protocol (or what ``part`` / ``overrides`` change)."""
    import json
    return [_run(json.dumps(part, sort_keys=True), s, tuple(overrides)) for s in SEEDS]


def mean_final(part: dict, overrides: tuple = ()) -> float:
    return statistics.mean(r["final_accuracy"] for r in protocol_runs(part, overrides))


def finals(part: dict, overrides: tuple = ()) -> list[float]:
    """The final average accuracy of each seed's run."""
    return [r["final_accuracy"] for r in protocol_runs(part, overrides)]
