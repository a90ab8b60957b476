"""The loss over the current experience's classes: the masked cross-entropy by hand, replayed labels kept, the
head rows of earlier classes untouched by training, evaluation over every class."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from streamcl import PluginError, Strategy
from streamcl.models import MLP
from streamcl.plugins.current_classes import CurrentClassesLoss, current_classes_loss
from streamcl.plugins.er_ace import ERACE
from tests.synthetic import tiny_benchmark


def test_the_masked_cross_entropy_by_hand():
    strategy = SimpleNamespace(experience=SimpleNamespace(classes=(2, 3)), criterion=F.cross_entropy)
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    # row 0, label 2: over classes 2, 3 only: log(e^3 + e^4) - 3 = log(1 + e)
    assert current_classes_loss(strategy, logits[:1], torch.tensor([2])).item() == pytest.approx(math.log(1 + math.e))
    # a replayed label (0) keeps its class: the row of label 2 is then scored over classes 0, 2, 3
    both = current_classes_loss(strategy, logits, torch.tensor([2, 0])).item()
    over = [math.log(math.exp(1) + math.exp(3) + math.exp(4)) - 3, math.log(math.exp(1) + math.exp(3) + math.exp(4)) - 1]
    assert both == pytest.approx(sum(over) / 2)


def test_earlier_classes_rows_get_no_gradient_and_evaluation_scores_every_class():
    torch.manual_seed(0)
    model = MLP(8, [16], 4)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, batch_size=8,
                        plugins=[CurrentClassesLoss()])
    bench = tiny_benchmark()
    strategy.train(bench.train_stream[0])
    rows = model.head.weight.detach().clone()
    strategy.train(bench.train_stream[1])  # classes 2, 3
    assert torch.equal(model.head.weight[:2], rows[:2]) and not torch.equal(model.head.weight[2:], rows[2:])
    assert strategy.predict(bench.test_stream[0].dataset.x).shape == (len(bench.test_stream[0].dataset), 4)


def test_it_owns_the_criterion():
    model = MLP(8, [16], 4)
    with pytest.raises(PluginError, match="criterion"):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[CurrentClassesLoss(), ERACE()])
