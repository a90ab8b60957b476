"""iCaRL on SFM-5: herding memory of 500, BCE distillation of the old classes, nearest-mean-of-exemplars."""
import statistics

import pytest

from streamcl.plugins.distill import Distill
from streamcl.plugins.nme import NMEClassifier
from streamcl.plugins.replay import Replay
from tests.test_distill import sfm5_final_accuracy


def icarl():
    return [Replay(memory=500, selection="herding"), Distill(kind="bce"), NMEClassifier()]


@pytest.fixture(scope="module")
def icarl_runs():
    return [sfm5_final_accuracy(icarl, seed) for seed in (0, 1, 2)]


@pytest.mark.slow
def test_icarl_500_on_sfm5(icarl_runs):
    # reference: Avalanche 0.6.0 iCaRL-500 reaches 0.668 on this protocol
    assert statistics.mean(icarl_runs) >= 0.72, icarl_runs
