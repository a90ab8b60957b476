"""SLCA's classifier alignment: the Gaussian statistics of a tiny feature set by hand (full, diagonal, low rank),
sampling, logit normalisation, the head alone re-trained from the second experience, state, refusals."""
import math

import pytest
import torch

from streamcl import ConfigError, PluginError, Strategy
from streamcl.models import MLP
from streamcl.plugins.classifier_alignment import ClassifierAlignment, class_statistics, logit_norm, sample_features
from tests.synthetic import tiny_benchmark

# class 0: rows (1, 2), (3, 4), (5, 0); class 1: one row (7, 7)
FEATURES = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0], [7.0, 7.0]])
LABELS = torch.tensor([0, 0, 0, 1])


def test_mean_and_unbiased_covariance_by_hand():
    stats = class_statistics(FEATURES, LABELS)
    mu, cov = stats[0]
    # mean (3, 2); centred rows (-2, 0), (0, 2), (2, -2); sum of outer products / (3 - 1)
    assert mu.tolist() == [3.0, 2.0]
    assert cov.tolist() == [[4.0, -2.0], [-2.0, 4.0]]
    assert stats[1][0].tolist() == [7.0, 7.0] and stats[1][1].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert class_statistics(FEATURES, LABELS, "diagonal")[0][1].tolist() == [4.0, 4.0]


def test_low_rank_keeps_the_top_eigenpair_and_the_mean_of_the_rest():
    # [[4, -2], [-2, 4]] has eigenvalues 6 (along (1, -1)/sqrt 2) and 2 (along (1, 1)/sqrt 2): sigma^2 = 2,
    # W = sqrt(6 - 2) (1, -1)/sqrt 2 = (sqrt 2, -sqrt 2)
    _, factor = class_statistics(FEATURES, LABELS, 1)[0]
    assert factor.shape == (2, 3)
    top = factor[0, :2].abs()
    assert torch.allclose(top, torch.tensor([math.sqrt(2), math.sqrt(2)], dtype=torch.float64))
    assert factor[0, 0] * factor[0, 1] < 0 and factor[0, 2] == 0
    assert factor[1, :2].tolist() == [0.0, 0.0] and factor[1, 2].item() == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize("kind", ["full", "diagonal", 1])
def test_samples_have_the_stored_mean_and_covariance(kind):
    mu, cov = class_statistics(FEATURES, LABELS, kind)[0]
    x = sample_features(mu, cov, 200_000, torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), mu, atol=0.02)
    want = {"full": [[4.0, -2.0], [-2.0, 4.0]], "diagonal": [[4.0, 0.0], [0.0, 4.0]],
            1: [[4.0, -2.0], [-2.0, 4.0]]}[kind]  # W W^T + sigma^2 I: exact for rank 1 of 2
    assert torch.allclose(torch.cov(x.T), torch.tensor(want, dtype=torch.float64), atol=0.06)


def test_logit_normalisation():
    out = logit_norm(torch.tensor([[3.0, 4.0], [0.0, -2.0]]), 0.1)
    assert torch.allclose(out, torch.tensor([[6.0, 8.0], [0.0, -10.0]]), atol=1e-5)  # / (0.1 * ||z||)


def aligned_run(plugin, n_experiences=2):
    torch.manual_seed(0)
    model = MLP(8, [16], 4)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), epochs=1, batch_size=8,
                        plugins=[plugin], seed=0)
    bench = tiny_benchmark(n_experiences=n_experiences)
    return strategy, bench, model


def test_statistics_after_each_experience_and_alignment_from_the_second():
    plugin = ClassifierAlignment(epochs=2, samples=16)
    strategy, bench, model = aligned_run(plugin)
    calls, align = [], plugin.align
    plugin.align = lambda s: (calls.append(len(s.trained)), align(s))
    strategy.train(bench.train_stream[0])
    assert sorted(plugin.stats) == [0, 1] and plugin.nbytes == 2 * (16 + 16 * 16) * 8 and calls == []
    head = model.head.weight.detach().clone()
    strategy.train(bench.train_stream[1])
    assert calls == [2] and sorted(plugin.stats) == [0, 1, 2, 3]
    data = bench.train_stream[1].dataset
    feats = strategy.embed(data)  # the new classes' statistics: the features after their experience
    assert torch.allclose(plugin.stats[2][0].float(), feats[data.y == 2].mean(0), atol=1e-5)
    assert not torch.equal(model.head.weight, head)


def test_alignment_trains_no_parameter_but_the_head():
    plugin = ClassifierAlignment(epochs=3, samples=8)
    strategy, bench, model = aligned_run(plugin)
    strategy.train(bench.train_stream[0])
    strategy.train(bench.train_stream[1])
    backbone = [p.detach().clone() for p in model.backbone.parameters()]
    head = model.head.weight.detach().clone()
    plugin.align(strategy)
    assert all(torch.equal(p, q) for p, q in zip(model.backbone.parameters(), backbone))
    assert not torch.equal(model.head.weight, head)


def test_state_round_trip():
    plugin = ClassifierAlignment(covariance="diagonal")
    plugin.stats = class_statistics(FEATURES, LABELS, "diagonal")
    other = ClassifierAlignment(covariance="diagonal")
    other.load_state_dict(plugin.state_dict())
    assert other.stats.keys() == plugin.stats.keys()
    assert all(torch.equal(a, b) for c in plugin.stats for a, b in zip(plugin.stats[c], other.stats[c]))


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"samples": 1}, {"lr": 0}, {"temperature": -1.0},
                                    {"covariance": "low"}, {"covariance": 0}, {"weight_decay": float("inf")}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ConfigError, match="ClassifierAlignment"):
        ClassifierAlignment(**kwargs)


def test_features_of_another_width_are_refused_by_name():
    plugin = ClassifierAlignment(epochs=1, samples=4)
    strategy, bench, model = aligned_run(plugin)
    strategy.train(bench.train_stream[0])
    plugin.stats = {c: (torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)) for c in (0, 1)}
    with pytest.raises(PluginError, match="statistics of \\[3\\]-wide features, and the model's features are now 16"):
        plugin.align(strategy)


def test_refresh_centres_each_class_on_its_stored_samples_features_now():
    from streamcl.plugins.replay import Replay
    torch.manual_seed(0)
    model = MLP(8, [16], 4)
    plugin = ClassifierAlignment(epochs=1, samples=8, refresh=True)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, batch_size=8,
                        plugins=[Replay(memory=12), plugin], seed=0)
    bench = tiny_benchmark()
    strategy.train(bench.train_stream[0])
    strategy.train(bench.train_stream[1])
    stored = strategy.memory.batch()
    feats = strategy.embed(stored).double()
    means = plugin.refreshed_means(strategy)
    assert sorted(means) == sorted(set(stored.y.tolist()))
    assert all(torch.allclose(means[c], feats[stored.y == c].mean(0)) for c in means)
    assert not torch.allclose(means[0], plugin.stats[0][0])  # the representation moved since experience 0
    assert ClassifierAlignment(refresh=True).refreshed_means(strategy=aligned_run(ClassifierAlignment())[0]) == {}
