"""ExStream: the merge rule by hand, the buffers' invariants, the replay term by hand, checkpoints, refusals."""
import copy

import pytest
import torch

from streamcl import ConfigError, Plugin, PluginError, Strategy, hookimpl
from streamcl.models import MLP
from streamcl.plugins.der import DER
from streamcl.plugins.exstream import ExStream
from streamcl.plugins.replay import Replay
from streamcl.plugins.slow_learner import SlowLearner
from tests.conftest import USER_MODELS, NoHead, image_benchmark
from tests.synthetic import tiny_benchmark


def offer(plugin, points, c=0):
    plugin.add(torch.tensor(points, dtype=torch.float), torch.full((len(points),), c))


def held(plugin, c=0):
    """Class ``c``'s filled slots: prototypes and counts, as lists."""
    keep = plugin.counts[c] > 0
    return plugin.protos[c][keep].tolist(), plugin.counts[c][keep].tolist()


def build(plugins, n_classes=6, n_exp=3, epochs=2, model=None, bench=None):
    torch.manual_seed(0)
    bench = bench or tiny_benchmark(n_classes, n_exp)
    model = model or MLP(8, [16], n_classes)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=plugins, epochs=epochs,
                 batch_size=16, seed=0)
    return s, bench


# ----------------------------------------------------------------------------- the merge rule, by hand
def test_a_full_buffer_merges_its_nearest_stored_pair_and_keeps_the_new_sample():
    """The authors' order (merge="stored"): the nearest pair of the b stored prototypes merges into the first
    one's slot, the new sample takes the second's with count 1."""
    p = ExStream(memory=3)
    p.reserve(1)
    offer(p, [[0, 0], [4, 0], [10, 0]])
    assert held(p) == ([[0, 0], [4, 0], [10, 0]], [1, 1, 1])
    offer(p, [[20, 0]])  # |[0,0]-[4,0]| = 4 < |[4,0]-[10,0]| = 6: merged to [2,0], count 2
    assert held(p) == ([[2, 0], [20, 0], [10, 0]], [2, 1, 1])
    offer(p, [[11, 0]])  # |[2,0]-[10,0]| = 8 < 10, 18: (2 [2,0] + [10,0]) / 3 = [14/3, 0], count 3
    protos, counts = held(p)
    assert counts == [3, 1, 1]
    assert torch.allclose(torch.tensor(protos), torch.tensor([[14 / 3, 0], [20, 0], [11, 0]]))
    p = ExStream(memory=2)  # b = 2: every sample past the second merges the stored pair
    p.reserve(1)
    offer(p, [[0, 0], [10, 0], [1, 0]])
    assert held(p) == ([[5, 0], [1, 0]], [2, 1])


def test_with_new_the_sample_itself_may_merge_into_its_nearest():
    p = ExStream(memory=2, merge="with_new")
    p.reserve(1)
    offer(p, [[0, 0], [10, 0]])
    assert held(p) == ([[0, 0], [10, 0]], [1, 1])
    offer(p, [[1, 0]])  # |[0,0]-[1,0]| = 1 is the nearest of the three pairs
    assert held(p) == ([[0.5, 0], [10, 0]], [2, 1])
    offer(p, [[10, 2]])  # |[10,0]-[10,2]| = 2 < 9.5: (1 [10,0] + 1 [10,2]) / 2
    assert held(p) == ([[0.5, 0], [10, 1]], [2, 2])
    offer(p, [[0.5, 3]])  # 3 to [0.5,0] (count 2) beats 9.55 (stored pair) and 9.7: (2 [0.5,0] + [0.5,3]) / 3
    assert held(p) == ([[0.5, 1], [10, 1]], [3, 2])


def test_a_buffer_of_one_keeps_the_running_mean_of_its_class():
    for merge in ("stored", "with_new"):
        p = ExStream(memory=2, merge=merge)
        p.reserve(2)  # b = 1 per class
        p.add(torch.tensor([[2.0], [7.0], [4.0], [9.0]]), torch.tensor([0, 1, 0, 0]))
        assert held(p, 0) == ([[5.0]], [3]) and held(p, 1) == ([[7.0]], [1])


@pytest.mark.parametrize("merge", ["stored", "with_new"])
def test_buffers_never_pass_capacity_and_counts_sum_to_the_samples_seen(merge):
    g = torch.Generator().manual_seed(0)
    p = ExStream(memory=12, merge=merge)
    p.reserve(3)  # b = 4
    x, y = torch.randn(200, 5, generator=g), torch.randint(3, (200,), generator=g)
    for start in range(0, 200, 16):
        p.add(x[start:start + 16], y[start:start + 16])
        seen = torch.bincount(y[:start + 16], minlength=3)
        assert p.counts.sum(1).tolist() == seen.tolist()
        assert (p.counts > 0).sum(1).tolist() == seen.clamp(max=4).tolist()
    for c in range(3):  # a merge keeps the count-weighted sum: the sum of every sample of the class
        assert torch.allclose((p.counts[c, :, None] * p.protos[c]).sum(0), x[y == c].sum(0), atol=1e-4)


# ----------------------------------------------------------------------------- in a strategy
def test_it_stores_the_head_input_of_the_steps_own_rows_in_order():
    """On a plain nn.Sequential (features: the input of its last Linear), beside a replay memory whose rows are
    left out; 100 prototypes a class, so nothing merges and every stored row is one sample's features."""
    seen = {c: [] for c in range(4)}

    class Spy(Plugin):
        @hookimpl
        def after_forward(self, strategy):
            n = strategy.n_current
            with torch.no_grad():
                features = strategy.model[:5](strategy.batch.x[:n])
            for f, c in zip(features, strategy.batch.y[:n].tolist()):
                seen[c].append(f)

    plugin = ExStream(memory=400)
    s, bench = build([Replay(memory=8), plugin, Spy()], epochs=1, model=USER_MODELS["sequential"](4),
                     bench=image_benchmark())
    for exp in bench.train_stream:
        s.train(exp)
    assert plugin.capacity == 100
    for c in range(4):
        assert plugin.counts[c].tolist() == [1] * 8 + [0] * 92  # 8 samples a class, replayed rows not offered
        assert torch.allclose(plugin.protos[c, :8], torch.stack(seen[c]), atol=1e-5)


def test_the_replay_term_is_the_cross_entropy_of_the_head_on_drawn_prototypes():
    plugin = ExStream(memory=12, replay_batch=5, weight=0.5)
    s, bench = build([plugin], n_exp=2)
    for exp in bench.train_stream:
        s.train(exp)
    head = s.model.head
    twin = torch.Generator()
    twin.set_state(s.generator.get_state())
    filled = torch.nonzero(plugin.counts.flatten() > 0).flatten()  # slot k of class c is row c * b + k
    assert len(filled) == 12
    slots = filled[torch.randperm(12, generator=twin)[:5]]  # the draw the plugin makes next
    z, y = plugin.protos.flatten(0, 1)[slots], slots // plugin.capacity
    logits = z @ head.weight.T + head.bias
    hand = 0.5 * (torch.logsumexp(logits, 1) - logits[torch.arange(5), y]).mean()
    terms = plugin.loss_terms(strategy=s)
    assert set(terms) == {"exstream"}
    assert torch.allclose(terms["exstream"], hand, atol=1e-6)
    assert torch.equal(s.generator.get_state(), twin.get_state())  # it drew from strategy.generator
    s.optimizer.zero_grad(set_to_none=True)
    terms["exstream"].backward()  # through the head only
    assert all(p.grad is None for p in s.model.backbone.parameters()) and head.weight.grad is not None

    plugin.replay_batch = None  # every prototype, no draw
    z, y = plugin.protos.flatten(0, 1)[filled], filled // plugin.capacity
    logits = z @ head.weight.T + head.bias
    hand = 0.5 * (torch.logsumexp(logits, 1) - logits[torch.arange(12), y]).mean()
    assert torch.allclose(plugin.loss_terms(strategy=s)["exstream"], hand, atol=1e-6)
    assert torch.equal(s.generator.get_state(), twin.get_state())


def test_a_short_run_replays_every_step_and_counts_every_sample():
    terms = []

    class Terms(Plugin):
        @hookimpl
        def after_training_iteration(self, strategy):
            terms.append(set(strategy.loss_terms))

    plugin = ExStream(memory=60)
    s, bench = build([plugin, Terms()])
    for exp in bench.train_stream:
        s.train(exp)
    assert terms[0] == {"task"} and all(t == {"task", "exstream"} for t in terms[1:])  # from the second step on
    assert plugin.counts.sum(1).tolist() == [40] * 6  # 20 samples a class, offered once per epoch (2 epochs)
    assert (plugin.counts > 0).sum(1).tolist() == [10] * 6


def test_on_fixed_features_as_in_the_paper_replay_keeps_old_classes_the_head_alone_forgets():
    """The paper's extractor is fixed: here SlowLearner(backbone_lr=0) fixes the MLP's (random) hidden layer, so the
    prototypes stay valid; the replayed head keeps the first two experiences' classes better than the head alone.
    (With the backbone learning and weight 1, the stale prototypes do not help on this stream: docs/methods.md.)"""
    rows = {}
    for name, plugins in (("head alone", []), ("exstream", [ExStream(memory=60, weight=10.0)])):
        s, bench = build([SlowLearner(backbone_lr=0.0, head_lr=0.1), *plugins], epochs=5)
        for exp in bench.train_stream:
            s.train(exp)
        rows[name] = s.eval(bench.test_stream)["accuracy"]
    assert sum(rows["exstream"][:2]) > sum(rows["head alone"][:2]) + 0.5, rows


def test_state_dict_round_trip_and_resume_continue_identically(tmp_path):
    def plugins():
        return [ExStream(memory=12, replay_batch=5)]

    s, bench = build(plugins())
    for exp in bench.train_stream[:2]:
        s.train(exp)
    s.save_checkpoint(tmp_path / "two.pt")
    plugin = s.plugins[0]
    fresh = ExStream(memory=12, replay_batch=5)
    fresh.load_state_dict(plugin.state_dict())
    for name in ("protos", "counts", "tasks"):
        assert torch.equal(getattr(fresh, name), getattr(plugin, name))
    assert fresh.capacity == plugin.capacity == 2
    going_on = copy.deepcopy(plugin)  # keeps its distances; the loaded one rebuilds them: the same merges
    x, y = torch.randn(40, 16, generator=torch.Generator().manual_seed(1)), torch.arange(40) % 4
    going_on.add(x, y)
    fresh.add(x, y)
    assert torch.equal(going_on.protos, fresh.protos) and torch.equal(going_on.counts, fresh.counts)

    r, _ = build(plugins())
    r.load_checkpoint(tmp_path / "two.pt")
    s.train(bench.train_stream[2])
    r.train(bench.train_stream[2])
    assert torch.equal(r.plugins[0].protos, plugin.protos) and torch.equal(r.plugins[0].counts, plugin.counts)
    assert r.eval(bench.test_stream)["accuracy"] == s.eval(bench.test_stream)["accuracy"]


# ----------------------------------------------------------------------------- refusals
def test_a_model_without_a_head_is_refused_at_construction():
    model = NoHead()
    with pytest.raises(ConfigError, match=r"ExStream\(\) needs the model's classifier head"):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[ExStream()], seed=0)


def test_a_memory_under_one_prototype_per_class_is_refused_before_training():
    s, bench = build([ExStream(memory=5)])
    with pytest.raises(ConfigError, match="memory=5 split over the stream's 6 classes leaves no prototype"):
        s.train(bench.train_stream[0])
    assert s.global_step == 0


@pytest.mark.parametrize("kwargs", [{"memory": 0}, {"memory": 2.5}, {"replay_batch": 0}, {"weight": -1.0},
                                    {"weight": float("nan")}, {"merge": "oldest"}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ConfigError, match="ExStream"):
        ExStream(**kwargs)


def test_a_plugin_that_widens_the_head_is_refused_by_role():
    with pytest.raises(PluginError, match="both own the role 'head_rows'"):
        build([ExStream(), DER()])
