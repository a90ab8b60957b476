"""Same config and seed, same numbers; another seed, other numbers (data order, memory, initialisation)."""
import pytest

from streamcl import config, runner
from tests.reliability import UNITS, numbers, tiny_run


@pytest.mark.parametrize("label,part", UNITS, ids=[u[0] for u in UNITS])
def test_tiny_runs_repeat_exactly(label, part):
    a, b = tiny_run(part), tiny_run(part)
    assert numbers(a) == numbers(b)
    assert numbers(tiny_run(part, seed=1)) != numbers(a)


@pytest.mark.slow
def test_real_sfm5_run_repeats_exactly(tmp_path):
    cfg = config.parse({"seed": 3, "train": {"epochs": 1}, "log": {"console": False}})
    a = runner.run(cfg, tmp_path / "a")
    b = runner.run(cfg, tmp_path / "b")
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["final_accuracy"] == b["final_accuracy"]
