"""Record the three-seed accuracy runs the tests check (tests/accuracy.py): one JSON file per run
under benchmarks/accuracy/, holding the run's config part and the final accuracy of seeds 0, 1, 2.

    python benchmarks/accuracy.py [pytest arguments, e.g. -n 2 or -k SFM-5-TIL]

Runs every slow accuracy test with ``STREAMCL_RECORD_ACCURACY=1``: all three seeds, bars checked on
their mean. Commit the files it writes; a test then runs seed 0 alone and compares it with the record.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_accuracy.py", "tests/test_replay.py"]


def main() -> int:
    env = {**os.environ, "STREAMCL_RECORD_ACCURACY": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow", *TESTS, *sys.argv[1:]]
    return subprocess.call(cmd, env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
