"""LogitAdjustment (Menon et al. 2021, eq. 10) by hand: the counts, the offsets, the loss, their reset and checkpoint."""
import math
from types import SimpleNamespace

import pytest
import torch

from streamcl import ConfigError, Output, Strategy
from streamcl.models import MLP
from streamcl.plugins.logit_adjustment import LogitAdjustment, adjustment
from streamcl.plugins.replay import Replay
from tests.synthetic import tiny_benchmark

LOGITS = torch.tensor([[1.0, 2.0, 0.5, -1.0],
                       [0.0, 1.0, 2.0, 1.0],
                       [2.0, -1.0, 0.0, 1.0]])


def hand_loss(logits, y, counts, tau):
    total = sum(counts)
    rows = []
    for z, label in zip(logits.tolist(), y.tolist()):
        adjusted = [v + tau * math.log(c / total) for v, c in zip(z, counts) if c > 0]
        mine = z[label] + tau * math.log(counts[label] / total)
        rows.append(-(mine - math.log(sum(math.exp(a) for a in adjusted))))
    return sum(rows) / len(rows)


def step(plugin, y, logits=LOGITS):
    return plugin.task_loss(strategy=None, output=Output(logits, None), batch=SimpleNamespace(y=y)).item()


def test_the_offsets_are_tau_log_frequencies_and_minus_infinity_for_classes_without_rows():
    off = adjustment(torch.tensor([3.0, 1.0, 0.0, 4.0]), 2.0)
    assert off[[0, 1, 3]].tolist() == pytest.approx([2 * math.log(3 / 8), 2 * math.log(1 / 8), 2 * math.log(4 / 8)])
    assert off[2] == -math.inf
    zero = adjustment(torch.tensor([3.0, 1.0, 0.0, 4.0]), 0.0)
    assert zero[[0, 1, 3]].tolist() == [0, 0, 0] and zero[2] == -math.inf  # tau 0: the unseen class still out


def test_the_loss_by_hand_with_counts_summed_over_the_experiences_minibatches():
    plugin = LogitAdjustment(tau=1.0)
    plugin.before_training_exp(strategy=None)
    first = torch.tensor([0, 0, 1])
    assert step(plugin, first) == pytest.approx(hand_loss(LOGITS, first, [2, 1, 0, 0], 1.0), rel=1e-6)
    second = torch.tensor([3, 0, 1])  # counts so far: 3, 2, 0, 1
    assert step(plugin, second) == pytest.approx(hand_loss(LOGITS, second, [3, 2, 0, 1], 1.0), rel=1e-6)
    plugin.before_training_exp(strategy=None)  # a new experience counts afresh
    assert step(plugin, second) == pytest.approx(hand_loss(LOGITS, second, [1, 1, 0, 1], 1.0), rel=1e-6)


def test_balanced_counts_leave_the_cross_entropy_over_the_classes_with_rows():
    plugin = LogitAdjustment(tau=1.5)
    y = torch.tensor([0, 1, 2])
    plain = torch.nn.functional.cross_entropy(LOGITS[:, :3], y).item()  # class 3 has no row: out of the softmax
    assert step(plugin, y) == pytest.approx(plain, rel=1e-6)


def test_a_bad_tau_is_refused():
    for tau in (-1, float("nan"), True, "1"):
        with pytest.raises(ConfigError, match="logit_adjustment tau"):
            LogitAdjustment(tau=tau)


def test_a_run_trains_with_it_and_predicts_with_the_plain_logits():
    torch.manual_seed(0)
    bench = tiny_benchmark(6, 3)
    model = MLP(8, [16], 6)
    plugin = LogitAdjustment()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=16, epochs=2, seed=0,
                 plugins=[Replay(memory=12), plugin])
    for exp in bench.train_stream:
        s.train(exp)
        # the last minibatch's task loss: its logits offset by the counts of the experience's rows so far
        counts, n_current = plugin.counts, 2 * len(exp.dataset)  # two epochs of the experience's rows
        assert counts.sum() == n_current if exp.index == 0 else counts.sum() > n_current  # replayed rows counted
        expected = torch.nn.functional.cross_entropy(s.output.logits.detach() + adjustment(counts, 1.0), s.batch.y)
        assert float(s.loss_terms["task"].detach()) == pytest.approx(float(expected), rel=1e-5)
        assert set(torch.nonzero(counts).flatten().tolist()) == set(range(exp.classes[-1] + 1))
    x = torch.randn(4, 8)
    assert torch.equal(s.predict(x).argmax(1), model(x).argmax(1))  # prediction: the model's own logits
    restored = LogitAdjustment()
    restored.load_state_dict(plugin.state_dict())
    assert torch.equal(restored.counts, plugin.counts)
