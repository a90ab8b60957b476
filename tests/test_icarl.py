"""iCaRL on SFM-5: herding memory of 500, BCE distillation of the old classes, nearest-mean-of-exemplars."""
import statistics

import pytest

from tests.accuracy import finals


@pytest.fixture(scope="module")
def icarl_runs():
    # the recipe: Replay(memory=500, selection="herding"), Distill(kind="bce"), NMEClassifier()
    return finals({"method": {"name": "icarl", "memory": 500}})


@pytest.mark.slow
def test_icarl_500_on_sfm5(icarl_runs):
    # reference: Avalanche 0.6.0 iCaRL-500 reaches 0.668 on this protocol
    assert statistics.mean(icarl_runs) >= 0.72, icarl_runs
