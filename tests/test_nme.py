"""Nearest-mean-of-exemplars: class means and logits against hand computations, memory checks, resume."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from streamcl import ConfigError, Strategy
from streamcl.models import MLP
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
    features = torch.tensor([[3.0, 0.0], [0.0, 0.5], [2.0, 0.0], [0.0, -4.0], [0.0, -1.0]])
    y = torch.tensor([0, 0, 2, 1, 1])
    classes, means = class_means(features, y)
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


def test_a_task_mask_before_it_keeps_the_prediction_among_the_task_classes():
    """Task-incremental: a logit that reaches NME as -inf (TaskMask, listed first by the runner) stays -inf."""
    plugin = NMEClassifier()
    plugin.load_state_dict({"classes": torch.tensor([0, 1, 2, 3]),
                            "means": torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])})
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # nearest mean: class 0 (distance 0)
    masked = torch.tensor([[0.5, 0.2, -INF, -INF], [-INF, -INF, 0.1, 0.3]])  # task 0: {0, 1}; task 1: {2, 3}
    out = plugin.adapt_logits(SimpleNamespace(is_training=False), masked, features)
    # ||f - m||^2 = 2 - 2 f.m: 0 for class 0, 2 for classes 1 and 3, 4 for class 2
    assert out.tolist() == [[0.0, -2.0, -INF, -INF], [-INF, -INF, -4.0, -2.0]]
    assert out.argmax(1).tolist() == [0, 3]  # the second sample's nearest mean among its task's classes


def build(plugins, n_classes=6, n_exp=3, **kwargs):
    torch.manual_seed(0)
    bench = tiny_benchmark(n_classes, n_exp)
    model = MLP(8, [16], n_classes)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=plugins, epochs=2,
                 batch_size=16, seed=0, **kwargs)
    return s, bench


def test_a_strategy_without_a_replay_memory_or_a_head_is_refused_at_construction():
    from streamcl import Plugin, PluginError

    with pytest.raises(PluginError, match="needs a plugin that owns the role 'memory'"):
        build([NMEClassifier()])  # refused by the engine, at construction

    class Hoard(Plugin):
        owns = frozenset({"memory"})  # owns the role but keeps no streamcl.memory.Memory

    with pytest.raises(ConfigError, match="replay memory"):
        build([Hoard(), NMEClassifier()])

    class Bare(nn.Module):  # no linear layer anywhere: no head, so no features
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(8, 6))

        def forward(self, x):
            return x @ self.w

    model = Bare()
    with pytest.raises(ConfigError, match="NMEClassifier.*needs the model's classifier head"):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[Cumulative(), NMEClassifier()])


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
    # by hand: mean of the normalised features (the MLP's backbone output) of each class's exemplars, then the nearest
    s.model.eval()
    with torch.no_grad():
        phi = nn.functional.normalize(s.model.backbone(replay.memory.inputs()), dim=1)
        means = torch.stack([phi[replay.memory.labels == c].mean(0) for c in range(6)])
        means = nn.functional.normalize(means, dim=1)
        for x, pred in predictions:
            f = nn.functional.normalize(s.model.backbone(x), dim=1)
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


@pytest.mark.parametrize("model_name", ["sequential", "resnet18", "vit"])
def test_icarl_on_a_users_model_classifies_by_the_means_of_its_head_inputs(model_name):
    """Herding, BCE distillation and NME on models that know nothing of streamcl: the features are the input
    of the head the engine found (the last Linear of an nn.Sequential, resnet's fc, timm's head)."""
    from tests.conftest import USER_MODELS, image_benchmark

    torch.manual_seed(0)
    model = USER_MODELS[model_name](4)
    replay, nme = Replay(memory=8, selection="herding"), NMEClassifier()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                 plugins=[replay, Distill(kind="bce"), nme], batch_size=8, eval_batch_size=16, seed=0)
    bench = image_benchmark()
    for exp in bench.train_stream:
        s.train(exp)
    s.eval(bench.test_stream)  # the means are taken at before_eval
    logits = s.predict(bench.test_stream[0].dataset.x)
    assert nme.classes.tolist() == [0, 1, 2, 3] and nme.means.shape == (4, s.feature_dim)
    extractor = s.extractor().eval()  # the model with its head replaced by nn.Identity: inputs -> features
    with torch.no_grad():
        phi = nn.functional.normalize(extractor(replay.memory.inputs()).flatten(1), dim=1)
        means = nn.functional.normalize(torch.stack([phi[replay.memory.labels == c].mean(0) for c in range(4)]), dim=1)
        f = nn.functional.normalize(extractor(bench.test_stream[0].dataset.x).flatten(1), dim=1)
    assert torch.allclose(nme.means, means, atol=1e-5)
    assert torch.allclose(logits, -torch.cdist(f, means).pow(2), atol=1e-4)


def test_icarl_on_a_task_incremental_stream_predicts_within_the_task():
    """With TaskMask (first, as the runner lists it) every prediction is one of the sample's task's classes."""
    from streamcl.plugins import TaskMask
    from streamcl.scenarios import task_incremental
    from tests.synthetic import blobs

    torch.manual_seed(0)
    bench = task_incremental(blobs(n_classes=6), blobs(10, 6, seed=1), 3)
    model = MLP(8, [16], 6)
    predictions = []

    class Spy:
        from streamcl import hookimpl

        @hookimpl
        def after_eval_forward(self, strategy):
            predictions.append((strategy.batch.t, strategy.output.logits.argmax(1)))

    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                 plugins=[TaskMask(), Replay(memory=12, selection="herding"), Distill(kind="bce"), NMEClassifier(),
                          Spy()], batch_size=16, epochs=2, seed=0)
    for exp in bench.train_stream:
        s.train(exp)
    predictions.clear()
    s.eval(bench.test_stream)
    t, pred = torch.cat([p[0] for p in predictions]), torch.cat([p[1] for p in predictions])
    assert torch.equal(pred // 2, t)  # task k holds classes 2k and 2k + 1
