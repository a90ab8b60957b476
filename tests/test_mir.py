
import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, Strategy, hookimpl
from streamcl.memory import Memory
from streamcl.models import MLP
from streamcl.plugins.mir import MIR, interference
from tests.synthetic import tiny_benchmark


def linear_strategy(lr=0.5, plugins=()):
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), plugins=list(plugins),
                    batch_size=4, seed=0)


def hand_scores(W, b, lr, batch: Batch, cand: Batch):
    """Eq. 1-3 written out for softmax regression: the mean cross-entropy's gradient is (p - onehot)^T x / n."""
    def ce(W, b, x, y):  # per-sample cross-entropy, by hand
        z = x @ W.T + b
        return torch.logsumexp(z, 1) - z[torch.arange(len(y)), y]

    z = batch.x @ W.T + b
    dz = (torch.softmax(z, 1) - torch.eye(W.shape[0])[batch.y]) / len(batch.y)
    W1, b1 = W - lr * dz.T @ batch.x, b - lr * dz.sum(0)
    return ce(W1, b1, cand.x, cand.y) - ce(W, b, cand.x, cand.y)


def tiny_batches():
    g = torch.Generator().manual_seed(3)
    batch = Batch(torch.randn(4, 3, generator=g), torch.tensor([0, 1, 1, 2]), torch.zeros(4, dtype=torch.long))
    cand = Batch(torch.randn(7, 3, generator=g), torch.tensor([0, 0, 1, 2, 2, 1, 0]), torch.zeros(7, dtype=torch.long))
    return batch, cand


def test_scores_are_the_loss_after_a_virtual_step_minus_before_and_touch_nothing():
    s = linear_strategy(lr=0.5)
    batch, cand = tiny_batches()
    W, b = s.model.weight.detach().clone(), s.model.bias.detach().clone()
    scores = interference(s, batch, cand)
    assert torch.allclose(scores, hand_scores(W, b, 0.5, batch, cand), atol=1e-6)
    assert torch.equal(s.model.weight, W) and torch.equal(s.model.bias, b)  # real parameters untouched
    assert s.model.weight.grad is None and s.model.bias.grad is None
    assert not s.optimizer.state  # no momentum buffer created


def test_the_virtual_step_uses_the_optimizer_current_lr():
    s = linear_strategy(lr=0.5)
    s.optimizer.param_groups[0]["lr"] = 0.125  # e.g. a scheduler moved it
    batch, cand = tiny_batches()
    expected = hand_scores(s.model.weight.detach(), s.model.bias.detach(), 0.125, batch, cand)
    assert torch.allclose(interference(s, batch, cand), expected, atol=1e-6)


def test_replay_batch_returns_the_most_interfered_candidates():
    plugin = MIR(memory=7, batch_size=3, subsample=7)  # every stored sample is a candidate
    s = linear_strategy(lr=0.5, plugins=[plugin])
    batch, cand = tiny_batches()
    plugin.memory = Memory(7)
    plugin.memory.append(*cand)
    scores = hand_scores(s.model.weight.detach(), s.model.bias.detach(), 0.5, batch, cand)
    out = plugin.replay_batch(s, batch)
    top = scores.argsort(descending=True)[:3]
    assert torch.equal(out.x, cand.x[top]) and torch.equal(out.y, cand.y[top])


def test_mi2_scores_against_the_lowest_loss_each_stored_sample_had():
    """MI-2 (Aljundi et al. 2019, sec. 3): after - min(now, the lowest loss the sample had when scored); a slot
    written anew forgets its lowest loss."""
    plugin = MIR(memory=7, batch_size=3, subsample=7, score="mi2")
    s = linear_strategy(lr=0.5, plugins=[plugin])
    batch, cand = tiny_batches()
    plugin.memory = Memory(7)
    plugin.memory.append(*cand)
    W, b = s.model.weight.detach(), s.model.bias.detach()
    now = torch.nn.functional.cross_entropy(cand.x @ W.T + b, cand.y, reduction="none")
    after = hand_scores(W, b, 0.5, batch, cand) + now
    plugin.replay_batch(s, batch)  # first scoring: the lowest loss is the loss now
    assert torch.allclose(plugin.lowest, now, atol=1e-6)
    plugin.lowest = now - torch.arange(7.0)  # as if sample i once had a loss i lower
    out = plugin.replay_batch(s, batch)
    top = (after - (now - torch.arange(7.0))).argsort(descending=True)[:3]
    assert torch.equal(out.y, cand.y[top]) and torch.allclose(plugin.lowest, now - torch.arange(7.0))
    plugin._rewritten(torch.tensor([1, 4]))
    assert plugin.lowest[[1, 4]].isinf().all() and plugin.lowest.isfinite().sum() == 5
    with pytest.raises(ConfigError, match="mi1"):
        MIR(score="mi3")


def test_subsample_draws_that_many_distinct_candidates():
    plugin = MIR(memory=7, batch_size=7, subsample=4)
    s = linear_strategy(plugins=[plugin])
    batch, cand = tiny_batches()
    plugin.memory = Memory(7)
    plugin.memory.append(*cand)
    out = plugin.replay_batch(s, batch)
    assert len(out) == 4 and len({tuple(r.tolist()) for r in out.x}) == 4


def test_beside_er_ace_the_scores_are_of_the_plain_cross_entropy():
    """ER-ACE's masked loss is the task loss only (task_loss); the virtual step and the scores keep the plain
    criterion, as eq. 1-3 have it."""
    from streamcl.plugins.er_ace import ERACE

    checked = []

    class Check:
        @hookimpl
        def before_forward(self, strategy):  # while ER-ACE's loss is the task loss of this minibatch
            if len(strategy.batch) == strategy.n_current:
                return
            current = strategy.batch.select(slice(0, strategy.n_current))
            cand = plugin.memory.batch()
            W, b = strategy.model.weight.detach(), strategy.model.bias.detach()
            assert torch.allclose(interference(strategy, current, cand), hand_scores(W, b, 0.1, current, cand),
                                  atol=1e-6)
            checked.append(True)

    torch.manual_seed(0)
    bench = tiny_benchmark(4, 2)
    model, plugin = nn.Linear(8, 4), MIR(memory=6, batch_size=3, selection="class_balanced")
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin, ERACE(), Check()],
                 batch_size=16, seed=0)
    s.train(bench.train_stream)
    assert len(checked) == 3


def test_the_scores_see_the_logits_as_the_training_loss_does_a_task_mask_included():
    class HideLast:  # a task mask that leaves classes 0 and 1
        @hookimpl
        def adapt_logits(self, strategy, logits):
            return logits.masked_fill(torch.arange(logits.shape[1]) == 2, float("-inf"))

    s = linear_strategy(lr=0.5, plugins=[HideLast()])
    batch, cand = tiny_batches()
    batch, cand = (Batch(b.x, b.y.clamp(max=1), b.t) for b in (batch, cand))
    W, b = s.model.weight.detach().clone(), s.model.bias.detach().clone()
    # the masked softmax regression is the one on rows 0 and 1 alone (row 2 gets no gradient)
    assert torch.allclose(interference(s, batch, cand), hand_scores(W[:2], b[:2], 0.5, batch, cand), atol=1e-6)
    assert not torch.allclose(hand_scores(W, b, 0.5, batch, cand), hand_scores(W[:2], b[:2], 0.5, batch, cand))


def test_with_a_reservoir_replay_starts_in_the_first_experience_and_later_draws_only_old_classes():
    spy, plugin = ReplayedLabels(), MIR(memory=12, batch_size=8, selection="reservoir")
    s, bench = train([plugin, spy])
    s.train(bench.train_stream[0])
    assert len(plugin.memory) == 12 and set(plugin.memory.labels.tolist()) <= {0, 1}
    assert sum(len(y) for y in spy.labels) > 0  # every stored sample is of a current class: drawn from all
    spy.labels.clear()
    s.train(bench.train_stream[1])
    assert {2, 3} & set(plugin.memory.labels.tolist())  # the memory takes the current samples every step
    assert set(torch.cat(spy.labels).tolist()) <= {0, 1}  # candidates of the other experiences only (exclude_task)


def train(plugins, n_exp=3):
    torch.manual_seed(0)
    bench = tiny_benchmark(2 * n_exp, n_exp)
    model = MLP(8, [16], 2 * n_exp)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=plugins, batch_size=16, seed=0)
    return s, bench


class ReplayedLabels:
    def __init__(self):
        self.labels = []

    @hookimpl
    def before_forward(self, strategy):
        self.labels.append(strategy.batch.y[strategy.n_current:].clone())


def test_the_previous_experience_is_replayed():
    spy, plugin = ReplayedLabels(), MIR(memory=12, batch_size=8)
    s, bench = train([plugin, spy])
    s.train(bench.train_stream[0])
    s.train(bench.train_stream[1])
    spy.labels.clear()
    s.train(bench.train_stream[2])
    replayed = torch.cat(spy.labels)
    assert set(replayed.tolist()) <= {0, 1, 2, 3}
    assert {2, 3} & set(replayed.tolist())  # the last experience's classes (2, 3) are retrieved


def test_samples_of_the_current_batch_classes_stay_candidates():
    plugin = MIR(memory=12, batch_size=8)
    s, bench = train([plugin])
    s.train(bench.train_stream[1])  # memory: classes 2 and 3 only
    data = bench.train_stream[1].dataset
    batch = Batch(data.x[:16], data.y[:16], data.t[:16])  # a minibatch of those same classes
    out = plugin.replay_batch(s, batch)
    assert len(out) == 8 and set(out.y.tolist()) <= {2, 3}


@pytest.mark.parametrize("kwargs", [dict(subsample=0), dict(subsample=-3), dict(subsample=2.5), dict(subsample=True),
                                    dict(memory=0), dict(batch_size=0), dict(selection="best")])
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        MIR(**kwargs)


def test_tiny_run_and_a_checkpoint_round_trip_continue_identically(tmp_path):
    full, bench = train([MIR(memory=10)])
    for exp in bench.train_stream:
        full.train(exp)
        expected = full.eval(bench.test_stream)

    s, _ = train([MIR(memory=10)])
    for exp in bench.train_stream[:2]:
        s.train(exp)
        s.eval(bench.test_stream)
    s.save_checkpoint(tmp_path / "c.pt")
    resumed, _ = train([MIR(memory=10)])
    resumed.load_checkpoint(tmp_path / "c.pt")
    resumed.train(bench.train_stream[2])
    assert resumed.eval(bench.test_stream) == expected
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
