"""Piggyback: thresholded masks with the straight-through gradient by hand, the fixed backbone, the head's new rows."""
import pytest
import torch
from torch import nn

from streamcl import ConfigError, Strategy
from streamcl.models import MLP
from streamcl.plugins.piggyback import Piggyback, PiggybackNet
from tests.synthetic import keeps_first_task, task_benchmark


def piggyback_strategy(**kwargs):
    model = MLP(8, [16], 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Strategy(model, opt, plugins=[Piggyback(**kwargs)], epochs=2, batch_size=16, seed=0)


def test_the_mask_thresholds_the_scores_and_passes_the_gradient_straight_through_by_hand():
    layer = nn.Linear(3, 1, bias=False)
    net = PiggybackNet(nn.Sequential(layer), head_path="0", names=["0.weight"], threshold=5e-3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 3.0, 5.0]]))
    net.add_slot([0], dense=True, init=1e-2)
    net.add_slot([1], dense=False, init=1e-2)
    with torch.no_grad():
        net.scores[1][0].copy_(torch.tensor([[1e-2, 1e-3, 6e-3]]))  # keeps w0 and w2
    x = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    out = net(x, torch.tensor([0, 1]))
    assert out.flatten().tolist() == [10.0, 2.0 + 15.0]  # task 0 dense; task 1 with W * [1, 0, 1]
    net(x[1:], torch.tensor([1])).sum().backward()
    # dL/dm = W * x = [2, 6, 15]: straight through to every score, the masked-out one too
    assert net.scores[1][0].grad.tolist() == [[2.0, 6.0, 15.0]]


def test_the_backbone_is_fixed_after_the_first_task_and_only_new_head_rows_train():
    strategy = piggyback_strategy()
    stream = task_benchmark().train_stream
    strategy.train(stream[0])
    net = strategy.model
    before = {n: p.detach().clone() for n, p in net.model.named_parameters()}
    strategy.train(stream[1])
    for n, p in net.model.named_parameters():
        if "head" in n:  # rows of classes 0, 1 (task 0) and 4, 5 (not yet trained) held; 2, 3 trained
            assert torch.equal(p[[0, 1, 4, 5]], before[n][[0, 1, 4, 5]]) and not torch.equal(p[2:4], before[n][2:4])
        else:
            assert torch.equal(p, before[n]), n
    assert len(net.scores[0]) == 0 and len(net.scores[1]) == len(net.names)
    assert strategy.plugins[0].bits == [0, sum(p.numel() for p in net.params())]
    assert 0 < Piggyback.kept_share(strategy, 1) <= 1 and Piggyback.kept_share(strategy, 0) == 1


def test_task_zero_scores_the_same_after_later_tasks():
    assert keeps_first_task(piggyback_strategy(), task_benchmark())


def test_without_train_first_every_task_learns_a_mask_over_the_given_model():
    strategy = piggyback_strategy(train_first=False)
    before = {n: p.detach().clone() for n, p in strategy.model.named_parameters() if "head" not in n}
    strategy.train(task_benchmark(2).train_stream)
    net = strategy.model
    assert all(len(s) == len(net.names) for s in net.scores)
    assert all(torch.equal(p, before[n]) for n, p in net.model.named_parameters() if n in before)


@pytest.mark.parametrize("kwargs,match", [({"mask_lr": 0}, "mask_lr"), ({"threshold": float("nan")}, "threshold"),
                                          ({"train_first": 1}, "train_first")])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Piggyback(**kwargs)
