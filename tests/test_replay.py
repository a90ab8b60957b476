import pytest
import torch

from streamcl import ConfigError, Strategy
from streamcl.models import MLP
from streamcl.plugins import Replay
from tests.accuracy import finals, mean_final
from tests.synthetic import tiny_benchmark


def train(plugin, n_classes=6, n_exp=3, **kwargs):
    torch.manual_seed(0)
    bench = tiny_benchmark(n_classes, n_exp)
    model = MLP(8, [16], n_classes)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin], batch_size=16, seed=0,
                 **kwargs)
    for exp in bench.train_stream:
        s.train(exp)
    return s, bench


def test_class_balanced_memory_splits_the_total_over_classes_seen():
    plugin = Replay(memory=12)
    s, bench = train(plugin, n_exp=3)
    labels = plugin.memory.labels
    assert len(plugin.memory) == 12 and torch.bincount(labels, minlength=6).tolist() == [2] * 6
    assert plugin.capacity == 12


def test_old_classes_keep_their_first_picks_when_quotas_shrink():
    plugin = Replay(memory=12)
    s, bench = train(plugin, n_exp=2)
    first = plugin.memory.inputs()[plugin.memory.labels == 0][:3].clone()  # 6 per class after 2 experiences
    s.train(tiny_benchmark(6, 3).train_stream[2])
    assert torch.equal(plugin.memory.inputs()[plugin.memory.labels == 0], first[:2])


def test_a_recurring_class_splits_its_quota_over_its_experiences():
    """Domain-incremental: every experience has the same classes; each keeps an even share of each class."""
    from streamcl.scenarios import domain_incremental
    from tests.synthetic import blobs
    torch.manual_seed(0)
    bench = domain_incremental(blobs(20, 2), blobs(5, 2, seed=1), 3, transform=lambda k, x: x + k, split=False)
    plugin = Replay(memory=12)
    model = MLP(8, [16], 2)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin], batch_size=16, seed=0)
    s.train(bench.train_stream[0])
    s.train(bench.train_stream[1])
    kept = plugin.memory.inputs()[:, 0].clone()
    s.train(bench.train_stream[2])
    origin, labels = plugin.memory.extras["experience"][:12], plugin.memory.labels
    for c in (0, 1):  # 6 per class, 2 from each experience
        assert torch.bincount(origin[labels == c], minlength=3).tolist() == [2, 2, 2]
    assert set(plugin.memory.inputs()[origin < 2][:, 0].tolist()) <= set(kept.tolist())  # stored ones kept


def test_on_a_long_domain_stream_the_memory_keeps_samples_from_every_tenth_of_it():
    """100 experiences of the same 2 classes, 40 slots (20 per class): past 20 experiences a class keeps one sample
    from each of 20 experiences spread over the stream, not from its first 20 (which the even split gave)."""
    from streamcl.scenarios import domain_incremental
    from tests.synthetic import blobs
    torch.manual_seed(0)
    bench = domain_incremental(blobs(4, 2), blobs(2, 2, seed=1), 100, transform=lambda k, x: x + k, split=False)
    plugin = Replay(memory=40)
    model = MLP(8, [16], 2)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.01), plugins=[plugin], batch_size=8, seed=0)
    for exp in bench.train_stream:
        s.train(exp)
    origin, labels = plugin.memory.extras["experience"][:40], plugin.memory.labels
    assert len(plugin.memory) == 40 and torch.bincount(labels).tolist() == [20, 20]
    for c in (0, 1):
        mine = origin[labels == c]
        assert len(set(mine.tolist())) == 20  # one sample from each of 20 experiences
        assert set((mine // 10).tolist()) == set(range(10)) and 99 in mine  # every tenth of the stream
        assert (mine.sort().values.diff() <= 10).all()  # no gap wider than a tenth


def test_the_thinning_keeps_the_first_and_the_newest_and_closes_the_smallest_gap():
    assert Replay._shares([0, 1, 2], 6) == {0: 2, 1: 2, 2: 2}  # room for all: an even split
    assert Replay._shares([0, 1, 2, 3], 3) == {0: 1, 1: 0, 2: 1, 3: 1}  # gaps 2, 2: the first such goes
    assert Replay._shares([0, 2, 4, 5, 9], 3) == {0: 1, 2: 0, 4: 0, 5: 1, 9: 1}  # 4 (gap 3), then 2 (gap 5)


def test_herding_selection_matches_herding_on_the_features():
    from streamcl.memory import herding

    plugin = Replay(memory=4, selection="herding")
    s, bench = train(plugin, n_classes=4, n_exp=2)
    # the two class-2 exemplars are the first two herding picks over class 2's features
    data = bench.train_stream[1].dataset
    x2 = data.x[data.y == 2]
    s.model.eval()
    with torch.no_grad():
        feats = s.model.backbone(x2)  # the MLP's features: the input of its head
    assert torch.equal(plugin.memory.inputs()[plugin.memory.labels == 2], x2[herding(feats, 1)])


def test_herding_on_a_users_sequential_uses_the_input_of_its_last_linear_layer():
    from streamcl.memory import herding
    from tests.conftest import image_benchmark, sequential

    torch.manual_seed(0)
    model, plugin = sequential(4), Replay(memory=4, selection="herding")
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.01), plugins=[plugin], batch_size=8, seed=0)
    bench = image_benchmark()
    for exp in bench.train_stream:
        s.train(exp)
    data = bench.train_stream[1].dataset
    x3 = data.x[data.y == 3]
    model.eval()
    with torch.no_grad():
        feats = model[:-1](x3)  # everything before the last nn.Linear
    assert torch.equal(plugin.memory.inputs()[plugin.memory.labels == 3], x3[herding(feats, 1)])


def test_herding_on_a_model_without_a_head_is_refused_at_construction():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(8, 6))

        def forward(self, x):
            return x @ self.w

    model = Bare()
    with pytest.raises(ConfigError, match="features that herding selection picks exemplars by.*no linear classifier"):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[Replay(selection="herding")])
    Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[Replay()])  # random picks need no head


def test_experience_balanced_and_random_and_reservoir_fill_the_memory():
    for selection in ("experience_balanced", "random", "reservoir"):
        plugin = Replay(memory=10, selection=selection)
        train(plugin, n_exp=3)
        assert len(plugin.memory) == 10, selection
    plugin = Replay(memory=9, selection="experience_balanced")
    train(plugin, n_exp=3)
    assert torch.bincount(plugin.memory.extras["experience"][:9]).tolist() == [3, 3, 3]


def test_replay_batch_is_drawn_from_memory_and_joined():
    sizes = []
    plugin = Replay(memory=8, batch_size=5)

    class Spy:
        from streamcl import hookimpl

        @hookimpl
        def before_forward(self, strategy):
            sizes.append((strategy.n_current, len(strategy.batch)))

    torch.manual_seed(0)
    bench = tiny_benchmark(4, 2)
    model = MLP(8, [16], 4)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin, Spy()], batch_size=16, seed=0)
    s.train(bench.train_stream[0])
    assert all(n == total for n, total in sizes)  # empty memory: nothing replayed
    sizes.clear()
    s.train(bench.train_stream[1])
    assert sizes == [(16, 21), (16, 21), (8, 13)]


def test_a_joined_memory_is_trained_as_part_of_the_experience_each_exemplar_once_an_epoch():
    """join=True: iCaRL's training set (Alg. 3), the new data and the exemplars, drawn in one shuffled order."""
    rows = []
    plugin = Replay(memory=8, join=True)

    class Spy:
        from streamcl import hookimpl

        @hookimpl
        def before_forward(self, strategy):
            rows.append((strategy.n_current, strategy.batch.x.clone()))

    torch.manual_seed(0)
    bench = tiny_benchmark(4, 2)
    model = MLP(8, [16], 4)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin, Spy()], batch_size=16,
                 epochs=2, seed=0)
    s.train(bench.train_stream[0])
    rows.clear()
    stored = plugin.memory.inputs().clone()
    s.train(bench.train_stream[1])
    assert len(s.train_dataset) == len(bench.train_stream[1]) + 8
    assert all(n == len(x) for n, x in rows)  # nothing replayed beside the minibatch
    seen = torch.cat([x for _, x in rows])
    per_epoch = len(seen) // 2
    for epoch in (seen[:per_epoch], seen[per_epoch:]):  # every exemplar once an epoch
        assert all(int((epoch == e).all(1).sum()) == 1 for e in stored)
    with pytest.raises(ConfigError, match="reservoir"):
        Replay(join=True, selection="reservoir")


def test_memory_bytes_report_how_many_samples_fit():
    plugin = Replay(memory_bytes=10 * (8 * 4 + 16), compress="uint8")
    train(plugin, n_exp=2)
    assert plugin.capacity == (10 * 48) // (8 + 8 + 16) == 15


@pytest.mark.parametrize("kwargs", [dict(memory=0), dict(memory=-1), dict(memory_bytes=0), dict(selection="best"),
                                    dict(batch_size=0), dict(memory=None)])
def test_bad_replay_settings(kwargs):
    with pytest.raises(ConfigError):
        Replay(**kwargs)


def test_state_dict_round_trip_continues_identically():
    a = Replay(memory=12)
    s, bench = train(a, n_exp=2)
    b = Replay(memory=12)
    b.load_state_dict(a.state_dict())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(a.memory.sample(7, g1)[1].x, b.memory.sample(7, g2)[1].x)


# ----------------------------------------------------------------------------- SFM-5 accuracy (seeds 0-2)
REPLAY = {"plugins": [{"name": "replay", "memory": 500}]}


@pytest.mark.slow
def test_replay_500_on_sfm5():
    assert mean_final(REPLAY) >= 0.78


@pytest.mark.slow
def test_replay_2000_on_sfm5():
    assert mean_final({"plugins": [{"name": "replay", "memory": 2000}]}) >= 0.81


@pytest.mark.slow
def test_compressed_replay_in_the_bytes_of_500_samples_beats_replay_500():
    part = {"plugins": [{"name": "replay", "memory_bytes": 500 * (784 * 4 + 16), "compress": "uint8"}]}
    assert mean_final(part) > mean_final(REPLAY)
    assert all(f > 0.79 for f in finals(part))
