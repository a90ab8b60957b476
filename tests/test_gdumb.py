
import copy
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from streamcl import Batch, ConfigError, Strategy, hookimpl
from streamcl.models import MLP
from streamcl.plugins.gdumb import GDumb, greedy_balanced
from tests.synthetic import tiny_benchmark


def counts(slots_labels):
    return {c: slots_labels.count(c) for c in sorted(set(slots_labels))}


def apply(stored, labels, capacity, seed=0):
    """The memory's labels after Alg. 1 offers ``labels`` to a memory holding ``stored``."""
    slots, items = greedy_balanced(stored, labels, capacity, torch.Generator().manual_seed(seed))
    out = list(stored) + [None] * (max(slots, default=-1) + 1 - len(stored))
    for s, i in zip(slots, items):
        out[s] = labels[i]
    return out


def test_greedy_sampler_by_hand():
    # capacity 4: a a a a fill it; the 1st b (0 < 4 // 2) evicts an a, the 2nd b too, the 3rd (2 == 2) is skipped
    slots, items = greedy_balanced([], [0, 0, 0, 0, 1, 1, 1], 4, torch.Generator().manual_seed(0))
    assert sorted(slots) == [0, 1, 2, 3] and {4, 5} <= set(items) and 6 not in items and len(set(items)) == 4
    assert counts(apply([], [0, 0, 0, 0, 1, 1, 1], 4)) == {0: 2, 1: 2}
    # a new class takes from the largest class only: 0 holds 3, 1 holds 1; the 2 evicts a 0
    assert counts(apply([0, 0, 0, 1], [2], 4)) == {0: 2, 1: 1, 2: 1}
    # a sample of a class at its share (4 // 2 = 2) is not stored
    assert apply([0, 0, 1, 1], [1], 4) == [0, 0, 1, 1]
    # room left: stored whatever its class
    assert apply([0, 0], [0, 0], 4) == [0, 0, 0, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_sampler_keeps_classes_balanced_over_a_stream(seed):
    g = torch.Generator().manual_seed(seed)
    memory = []
    for exp in range(5):  # two new classes an experience, 60 samples each, shuffled
        stream = torch.tensor([2 * exp] * 60 + [2 * exp + 1] * 60)[torch.randperm(120, generator=g)].tolist()
        memory = apply(memory, stream, 50, seed)
        n = 2 * (exp + 1)
        assert len(memory) == 50
        assert max(counts(memory).values()) - min(counts(memory).values()) <= 1 and len(counts(memory)) == n


def train(plugin, n_exp=2, plugins_after=(), **kwargs):
    torch.manual_seed(0)
    bench = tiny_benchmark(2 * n_exp, n_exp)
    model = MLP(8, [16], 2 * n_exp)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=[plugin, *plugins_after],
                 batch_size=16, seed=0, **kwargs)
    return s, bench


def test_memory_is_balanced_and_the_model_is_retrained_from_its_initial_weights():
    plugin = GDumb(memory=12, epochs=3, lr=1e-30)  # a step that moves nothing: the weights stay the initial ones
    s, bench = train(plugin)
    initial = {k: v.clone() for k, v in s.model.state_dict().items()}
    for exp in bench.train_stream:
        s.train(exp)
        assert any(not torch.equal(initial[k], v) for k, v in s.model.state_dict().items())  # the engine trained
        s.eval(bench.test_stream)
        assert all(torch.equal(initial[k], v) for k, v in s.model.state_dict().items())
    assert torch.bincount(plugin.memory.labels).tolist() == [3, 3, 3, 3]


def test_retraining_happens_once_per_new_data():
    plugin = GDumb(memory=12, epochs=20)
    s, bench = train(plugin)
    s.train(bench.train_stream[0])
    first = s.eval(bench.test_stream)
    weights = {k: v.clone() for k, v in s.model.state_dict().items()}
    assert s.eval(bench.test_stream) == first  # no new data: no retraining
    assert all(torch.equal(weights[k], v) for k, v in s.model.state_dict().items())
    assert first["accuracy"][0] > 0.9  # learned experience 0 from 12 samples


class Logs:
    """Every scalar logged through strategy.log, by name."""

    def __init__(self):
        self.values = {}

    @hookimpl
    def log_value(self, name, value):
        self.values.setdefault(name, []).append(value)


def test_the_retraining_is_strategy_fit_from_the_initial_weights_step_for_step():
    # what Alg. 2 does, written out: the initial weights, SGD of the strategy's settings (lr 0.1, momentum 0.9),
    # 3 epochs over the memory in batches of 5, each epoch's order drawn from the strategy's generator
    plugin = GDumb(memory=12, epochs=3, batch_size=5)
    s, bench = train(plugin)
    s.train(bench.train_stream[0])
    model = copy.deepcopy(s.model)
    model.load_state_dict(plugin.initial)
    data, generator = plugin.memory.batch(), copy.deepcopy(s.generator)
    assert len(data) == 12  # batches of 5, 5 and 2
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        order = torch.randperm(len(data), generator=generator)
        for i in range(0, len(data), 5):
            part = data.select(order[i:i + 5])
            opt.zero_grad()
            F.cross_entropy(model(part.x), part.y).backward()
            opt.step()
    s.eval(bench.test_stream)
    assert all(torch.equal(v, s.model.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(generator.get_state(), s.generator.get_state())


def test_the_retraining_logs_its_loss_and_takes_the_options_given():
    logs = Logs()
    plugin = GDumb(memory=12, epochs=4, lr=1e-30)
    torch.manual_seed(0)
    bench = tiny_benchmark(4, 2)
    model = MLP(8, [16], 4)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin, logs], batch_size=16, seed=0)
    s.train(bench.train_stream[0])
    s.eval(bench.test_stream)
    losses = logs.values["loss/gdumb"]
    assert len(losses) == 4  # one mean an epoch, through strategy.fit
    assert losses == pytest.approx([losses[0]] * 4, rel=1e-6)  # lr 1e-30 overrides the strategy's 0.1
    # Adam has no momentum: asking for one is refused when the Strategy is built
    with pytest.raises(ConfigError, match="GDumb momentum.*Adam.*no 'momentum'"):
        Strategy(model, torch.optim.Adam(model.parameters()), plugins=[GDumb(momentum=0.9)])
    Strategy(model, torch.optim.Adam(model.parameters()), plugins=[GDumb(lr=0.01, weight_decay=0.1)])


def test_the_retraining_is_training_so_prediction_only_logit_transforms_stand_aside():
    class PredictionOnly:  # as NME: replaces the logits in prediction only (here by NaN, which would break a step)
        @hookimpl
        def adapt_logits(self, strategy, logits):
            return None if strategy.is_training else torch.full_like(logits, float("nan"))

    weights = []
    for extra in ([], [PredictionOnly()]):
        s, bench = train(GDumb(memory=12, epochs=3), plugins_after=extra)
        s.train(bench.train_stream[0])
        s.eval(bench.test_stream)
        assert not s.is_training
        weights.append(s.model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_growing_head_is_reset_too():
    plugin = GDumb(memory=12, epochs=2, lr=1e-30)
    torch.manual_seed(0)
    bench = tiny_benchmark(4, 2)
    model = MLP(8, [16], 0, growing=True)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin], batch_size=16, seed=0)
    s.train(bench.train_stream[0])
    start = {k: v.clone() for k, v in plugin.initial.items()}
    s.train(bench.train_stream[1])
    s.eval(bench.test_stream)
    head = [k for k in start if start[k].shape != plugin.initial[k].shape]
    assert head and all(torch.equal(plugin.initial[k][:len(start[k])], start[k]) for k in head)
    assert all(torch.equal(plugin.initial[k], v) for k, v in s.model.state_dict().items())


@pytest.mark.parametrize("kwargs", [dict(memory=0), dict(memory=-5), dict(memory=None), dict(memory=2.5),
                                    dict(epochs=0), dict(batch_size=0), dict(lr=0), dict(lr=-1.0),
                                    dict(lr=float("nan")), dict(momentum=-0.1), dict(weight_decay=float("inf"))])
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        GDumb(**kwargs)


@pytest.mark.parametrize("stop", ["after_training", "after_eval"])
def test_checkpoint_round_trip_continues_identically(tmp_path, stop):
    full, bench = train(GDumb(memory=12, epochs=2), n_exp=3)
    for exp in bench.train_stream:
        full.train(exp)
        expected = full.eval(bench.test_stream)

    s, _ = train(GDumb(memory=12, epochs=2), n_exp=3)
    for i, exp in enumerate(bench.train_stream[:2]):
        s.train(exp)
        if i == 0 or stop == "after_eval":
            s.eval(bench.test_stream)
    s.save_checkpoint(tmp_path / "c.pt")  # after_training: the retraining for experience 1 is pending
    resumed, _ = train(GDumb(memory=12, epochs=2), n_exp=3)
    resumed.load_checkpoint(tmp_path / "c.pt")
    if stop == "after_training":
        resumed.eval(bench.test_stream)
    resumed.train(bench.train_stream[2])
    assert resumed.eval(bench.test_stream) == expected
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prediction_is_among_the_classes_in_memory_only():
    plugin = GDumb(memory=12, epochs=3)
    s, bench = train(plugin, n_exp=3)
    s.train(bench.train_stream[0])
    s.eval(bench.test_stream)
    data = bench.test_stream[2].dataset  # classes 4, 5: not in the memory yet
    out = s.infer(Batch(data.x, data.y, data.t))
    assert torch.isneginf(out.logits[:, 2:]).all() and torch.isfinite(out.logits[:, :2]).all()
    assert set(out.logits.argmax(1).tolist()) <= {0, 1}
    assert torch.isfinite(out.raw).all()  # the model's own logits are left as they are
    s.train(bench.train_stream[1])
    s.eval(bench.test_stream)
    out = s.infer(Batch(data.x, data.y, data.t))
    assert torch.isneginf(out.logits[:, 4:]).all() and torch.isfinite(out.logits[:, :4]).all()
    assert plugin.adapt_logits(strategy=SimpleNamespace(is_training=True), logits=out.raw) is None  # training: none
