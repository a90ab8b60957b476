"""Nearest-mean-of-exemplars: class means and logits against hand computations, memory checks, resume."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, Strategy
from streamcl.models import MLP
from streamcl.models.nets import Classifier
from streamcl.plugins.cumulative import Cumulative
from streamcl.plugins.distill import Distill
from streamcl.plugins.nme import NMEClassifier, class_means, nme_logits
from streamcl.plugins.replay import Replay
from tests.synthetic import tiny_benchmark

INF = float("inf")


def test_nme_logits_by_hand_and_argmax_is_the_nearest_mean():
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # for classes 0 and 2; class 1 has no exemplars
    classes = torch.tensor([0, 2])
    features = torch.tensor([[5.0, 0.0], [0.0, 0.5], [-3.0, 4.0], [4.0, 3.0]])
    out = nme_logits(features, means, classes, 3)
    # normalised features: (1, 0), (0, 1), (-0.6, 0.8), (0.8, 0.6); ||f - m||^2 = 2 - 2 f.m
    expected = torch.tensor([[0.0, -INF, -2.0],
                             [-2.0, -INF, 0.0],
                             [-(2 + 1.2), -INF, -(2 - 1.6)],
                             [-(2 - 1.6), -INF, -(2 - 1.2)]])
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.argmax(1).tolist() == [0, 2, 2, 0]
    # the same as the distance computed directly
    phi = features / features.norm(dim=1, keepdim=True)
    direct = ((phi[:, None, :] - means[None]) ** 2).sum(-1)
    assert torch.allclose(out[:, [0, 2]], -direct, atol=1e-6)


def test_class_means_are_normalised_means_of_normalised_features():
    model = Classifier(nn.Identity(), nn.Linear(2, 3), 2)  # features = inputs
    x = torch.tensor([[3.0, 0.0], [0.0, 0.5], [2.0, 0.0], [0.0, -4.0], [0.0, -1.0]])
    y = torch.tensor([0, 0, 2, 1, 1])
    classes, means = class_means(model, Batch(x, y, torch.zeros_like(y)))
    assert classes.tolist() == [0, 1, 2]
    s = 1 / math.sqrt(2)  # class 0: mean of (1, 0) and (0, 1) = (0.5, 0.5), normalised
    assert torch.allclose(means, torch.tensor([[s, s], [0.0, -1.0], [1.0, 0.0]]), atol=1e-6)


def test_adapt_logits_only_in_evaluation():
    plugin = NMEClassifier()
    plugin.load_state_dict({"classes": torch.tensor([1]), "means": torch.tensor([[0.0, 1.0]])})
    logits, features = torch.tensor([[7.0, 1.0]]), torch.tensor([[0.0, 3.0]])
    assert plugin.adapt_logits(SimpleNamespace(is_training=True), logits, features) is None
    out = plugin.adapt_logits(SimpleNamespace(is_training=False, model=None), logits, features)
    assert out.tolist() == [[-INF, 0.0]]
    assert NMEClassifier().adapt_logits(SimpleNamespace(is_training=False), logits, features) is None  # no means yet


def build(plugins, n_classes=6, n_exp=3, **kwargs):
    torch.manual_seed(0)
    bench = tiny_benchmark(n_classes, n_exp)
    model = MLP(8, [16], n_classes)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=plugins, epochs=2,
                 batch_size=16, seed=0, **kwargs)
    return s, bench


def test_a_strategy_without_a_replay_memory_is_refused():
    from streamcl import Plugin, PluginError

    with pytest.raises(PluginError, match="needs a plugin that owns the role 'memory'"):
        build([NMEClassifier()])  # refused by the engine, at construction

    class Hoard(Plugin):
        owns = frozenset({"memory"})  # owns the role but keeps no streamcl.memory.Memory

    s, bench = build([Hoard(), NMEClassifier()])
    with pytest.raises(ConfigError, match="replay memory"):
        s.train(bench.train_stream[0])


def test_cumulative_memory_serves_as_exemplars():
    s, bench = build([Cumulative(), NMEClassifier()])
    s.train(bench.train_stream[0])
    assert s.eval(bench.test_stream)["accuracy"][0] > 0.5


def test_evaluation_predicts_the_nearest_exemplar_mean():
    replay, nme = Replay(memory=12, selection="herding"), NMEClassifier()
    predictions = []

    class Spy:
        from streamcl import hookimpl

        @hookimpl
        def after_eval_forward(self, strategy):
            predictions.append((strategy.batch.x, strategy.output.logits.argmax(1)))

    s, bench = build([nme, replay, Distill(kind="bce"), Spy()])  # NME first: the means still see the new memory
    for exp in bench.train_stream:
        s.train(exp)
    acc = s.eval(bench.test_stream)["accuracy"]
    assert nme.classes.tolist() == [0, 1, 2, 3, 4, 5]
    # by hand: mean of the normalised features of each class's exemplars, then the nearest one
    s.model.eval()
    with torch.no_grad():
        phi = nn.functional.normalize(s.model(replay.memory.inputs(), return_features=True)[1], dim=1)
        means = torch.stack([phi[replay.memory.labels == c].mean(0) for c in range(6)])
        means = nn.functional.normalize(means, dim=1)
        for x, pred in predictions:
            f = nn.functional.normalize(s.model(x, return_features=True)[1], dim=1)
            assert torch.equal(torch.cdist(f, means).argmin(1), pred)
    assert min(acc) > 0.5  # the blobs are easy


def test_state_dict_round_trip_and_resume_continue_identically(tmp_path):
    def plugins():
        return [Replay(memory=12, selection="herding"), Distill(kind="bce"), NMEClassifier()]

    s, bench = build(plugins())
    rows = []
    for exp in bench.train_stream:
        s.train(exp)
        rows.append(s.eval(bench.test_stream)["accuracy"])

    s, bench = build(plugins())
    for exp in bench.train_stream[:2]:
        s.train(exp)
        s.eval(bench.test_stream)
    s.save_checkpoint(tmp_path / "two.pt")
    copy = NMEClassifier()
    copy.load_state_dict(s.plugins[2].state_dict())
    assert torch.equal(copy.means, s.plugins[2].means) and copy.classes.tolist() == [0, 1, 2, 3]

    r, _ = build(plugins())
    r.load_checkpoint(tmp_path / "two.pt")
    assert r.eval(bench.test_stream)["accuracy"] == rows[1]
    r.train(bench.train_stream[2])
    assert r.eval(bench.test_stream)["accuracy"] == rows[2]
