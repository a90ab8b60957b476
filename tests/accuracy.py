"""Accuracy on the real protocols of docs/protocols.md: the mean over seeds 0, 1, 2.

The three-seed runs are long, so they are recorded (``python benchmarks/accuracy.py`` runs every
accuracy test with ``STREAMCL_RECORD_ACCURACY=1``, writing one file per run under
``benchmarks/accuracy/``) and a test runs seed 0 only: its live result replaces the recorded seed 0
in the mean the bar is checked on, and must agree with the record within ``REPRODUCE`` (else the
record is stale and the test fails, asking for it to be regenerated). A run with no record runs
all three seeds. PT-SFM-5 runs need its pre-trained backbone (``python benchmarks/pretrain.py``, about five
minutes); where it has not been built (a fresh CI machine) their records are checked without a live run, and
tests/test_pretrained.py runs the protocol's short form live on a small backbone.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
from functools import lru_cache
from pathlib import Path

from streamcl import config, runner
from streamcl.config import PROTOCOLS  # noqa: F401  (the tests' way to name a protocol)

SEEDS = (0, 1, 2)
REPRODUCE = 0.01  # final accuracy of seed 0, live vs. recorded: other CPUs may round differently
RECORDS = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy"
RECORDING = os.environ.get("STREAMCL_RECORD_ACCURACY") == "1"


@lru_cache(maxsize=None)
def _run(part: str, seed: int, overrides: tuple) -> float:
    cfg = config.parse({**json.loads(part), "seed": seed, "log": {"tensorboard": False, "console": False}},
                       list(overrides))
    return runner.run(cfg)["final_accuracy"]


def _record_path(key: str) -> Path:
    return RECORDS / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def finals(part: dict, overrides: tuple = ()) -> list[float]:
    """The final average accuracy of seeds 0, 1, 2 of the SFM-5 protocol (or what ``part`` and
    ``overrides`` change): seed 0 run now, seeds 1 and 2 from the record (see the module's docstring)."""
    text = json.dumps(part, sort_keys=True)
    key = json.dumps({"part": part, "overrides": list(overrides)}, sort_keys=True)
    path = _record_path(key)
    if RECORDING or not path.exists():
        values = [_run(text, s, tuple(overrides)) for s in SEEDS]
        if RECORDING:
            RECORDS.mkdir(exist_ok=True)
            path.write_text(json.dumps({"run": json.loads(key), "seeds": list(SEEDS), "finals": values}, indent=1))
        return values
    recorded = json.loads(path.read_text())["finals"]
    if _needs_missing_backbone(part):
        return recorded
    live = _run(text, SEEDS[0], tuple(overrides))
    assert abs(live - recorded[0]) <= REPRODUCE, (
        f"seed 0 of {key} gives {live:.4f}, the record {recorded[0]:.4f}: the code changed what it learns; "
        "regenerate the record with `python benchmarks/accuracy.py` and check the new numbers")
    return [live, *recorded[1:]]


def _needs_missing_backbone(part: dict) -> bool:
    from streamcl.models.backbones import PT_SFM_5, checkpoint_file
    return part.get("model", {}).get("checkpoint") == PT_SFM_5 and not checkpoint_file(PT_SFM_5).is_file()


def mean_final(part: dict, overrides: tuple = ()) -> float:
    return statistics.mean(finals(part, overrides))
