"""CWR and CWR*: the consolidation by hand, the reset, evaluation on cw, sample counts with a memory, the
lower-layer options, roles, any model's head, refusals, checkpoints."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from streamcl import ConfigError, PluginError, Strategy, TensorData, hookimpl
from streamcl.models import MLP
from streamcl.plugins.cumulative import Cumulative
from streamcl.plugins.cwr import CWR, CWRStar, consolidate
from streamcl.plugins.latent_replay import LatentReplay
from streamcl.plugins.replay import Replay
from streamcl.plugins.si import SI
from streamcl.plugins.wa import WA
from tests.conftest import USER_MODELS, image_benchmark
from tests.synthetic import tiny_benchmark


def fake_strategy(head, labels):
    """What CWR* reads of a strategy before an experience: the head, the joined training data, no memory."""
    data = TensorData(torch.zeros(len(labels), head.in_features), torch.tensor(labels))
    return SimpleNamespace(head=head, head_path="head", train_dataset=data, owner=lambda role: None, memory=None,
                           forget_momentum=lambda param, rows=None: None)


def set_rows(head, weight, bias):
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight))
        head.bias.copy_(torch.tensor(bias))


# ----------------------------------------------------------------------------- the maths, by hand
def test_cwr_star_consolidates_a_two_class_experience_as_computed_by_hand():
    """Class 0 was consolidated before (cw = [1, 0, 2], bias 0.5, 18 samples); the experience brings 2 samples of
    class 0 and 6 of the new class 1."""
    plugin = CWRStar()
    plugin.weights, plugin.biases, plugin.past = {0: torch.tensor([1.0, 0.0, 2.0])}, {0: torch.tensor(0.5)}, {0: 18}
    head = nn.Linear(3, 4)
    set_rows(head, [[7.0] * 3] * 4, [7.0] * 4)
    strategy = fake_strategy(head, [1, 0, 1, 1, 0, 1, 1, 1])
    plugin.before_training_exp(strategy=strategy)
    # Alg. 2, line 7: tw[0] = cw[0]; the new class and every class outside the experience start at 0
    assert plugin.cur == {0: 2, 1: 6}
    assert head.weight.tolist() == [[1.0, 0.0, 2.0], [0.0] * 3, [0.0] * 3, [0.0] * 3]
    assert head.bias.tolist() == [0.5, 0.0, 0.0, 0.0]

    # what training left in the rows (rows 2 and 3, outside the experience, are thrown away)
    set_rows(head, [[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [9.0, 9.0, 9.0], [-9.0, 9.0, 9.0]], [1.0, -1.0, 5.0, 5.0])
    plugin.after_training_exp(strategy=strategy)
    # mean-shift: avg(tw) = (3 + 1 + 2 + 1 + 3 + 2) / 6 = 2 -> [1, -1, 0] and [-1, 1, 0]; biases' mean 0
    # class 0: w_past = sqrt(18 / 2) = 3, cw = (3 * [1, 0, 2] + [1, -1, 0]) / 4 = [1, -0.25, 1.5]; b = (1.5 + 1) / 4
    # class 1 (new): cw = [-1, 1, 0], b = -1
    assert plugin.weights[0].tolist() == [1.0, -0.25, 1.5] and plugin.biases[0].item() == 0.625
    assert plugin.weights[1].tolist() == [-1.0, 1.0, 0.0] and plugin.biases[1].item() == -1.0
    assert plugin.past == {0: 20, 1: 6} and plugin.cur == {}
    # evaluation uses cw; a class never consolidated has a zero row
    assert head.weight.tolist() == [[1.0, -0.25, 1.5], [-1.0, 1.0, 0.0], [0.0] * 3, [0.0] * 3]
    assert head.bias.tolist() == [0.625, -1.0, 0.0, 0.0]


def test_the_consolidation_weight_is_the_square_root_of_past_over_current():
    cw, tw = torch.tensor([2.0]), torch.tensor([-1.0])
    assert consolidate(None, tw, 0, 5).item() == -1.0
    w = math.sqrt(10 / 3)
    assert consolidate(cw, tw, 10, 3).item() == pytest.approx((2 * w - 1) / (w + 1), rel=1e-6)


def test_cwr_copies_the_trained_rows_without_mean_shift_or_counts():
    plugin = CWR(init="zero")
    plugin.weights, plugin.past = {0: torch.tensor([5.0, 5.0, 5.0])}, {0: 18}
    head = nn.Linear(3, 4)
    strategy = fake_strategy(head, [0, 0, 1])
    plugin.before_training_exp(strategy=strategy)
    assert head.weight.abs().sum().item() == 0 and head.bias.abs().sum().item() == 0  # every tw re-initialised
    set_rows(head, [[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [9.0] * 3, [9.0] * 3], [1.0, -1.0, 5.0, 5.0])
    plugin.after_training_exp(strategy=strategy)
    assert plugin.weights[0].tolist() == [3.0, 1.0, 2.0] and plugin.weights[1].tolist() == [1.0, 3.0, 2.0]
    assert plugin.biases[0].item() == 1.0 and plugin.past == {0: 20, 1: 1}
    assert head.weight.tolist() == [[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [0.0] * 3, [0.0] * 3]


def test_cwr_re_initialises_at_random_from_the_run_generator():
    head = nn.Linear(16, 4)
    strategy = fake_strategy(head, [0, 1])
    strategy.generator = torch.Generator().manual_seed(3)
    CWR().before_training_exp(strategy=strategy)
    first = head.weight.detach().clone()
    assert first.abs().max().item() <= 1 / 4 and first.std().item() > 0.05  # U(-1/sqrt(16), 1/sqrt(16))
    strategy.generator = torch.Generator().manual_seed(3)
    CWR().before_training_exp(strategy=strategy)
    assert torch.equal(head.weight.detach(), first)


# ----------------------------------------------------------------------------- in a real run
def build(plugins, n_classes=6, n_exp=3, lr=0.1, model=None, **kwargs):
    torch.manual_seed(0)
    bench = tiny_benchmark(n_classes, n_exp)
    model = model or MLP(8, [16, 16], n_classes)
    if kwargs.get("eval_every"):
        kwargs["eval_stream"] = bench.test_stream
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), plugins=plugins, epochs=2,
                 batch_size=16, seed=0, **kwargs)
    return s, bench


def snapshot(params):
    return [p.detach().clone() for p in params]


class HeadSpy:
    """The head's rows at the first training step of each experience and at every evaluation."""

    def __init__(self):
        self.at_start, self.at_eval = [], []

    @hookimpl
    def before_forward(self, strategy):
        if strategy.iteration == 0 and strategy.epoch == 0:
            self.at_start.append(strategy.head.weight.detach().clone())

    @hookimpl
    def before_eval(self, strategy):
        self.at_eval.append(strategy.head.weight.detach().clone())


def test_a_run_trains_tw_and_evaluates_cw_also_inside_an_experience():
    plugin, spy = CWRStar(), HeadSpy()
    s, bench = build([plugin, spy], eval_every=1)
    s.train(bench.train_stream[0])
    cw0 = torch.stack([plugin.weights[c] for c in range(2)])
    s.train(bench.train_stream[1])
    cw1 = torch.stack([plugin.weights[c] for c in range(4)])
    # the second experience (classes 2, 3) started from zero rows, the first's classes included
    assert spy.at_start[1].abs().sum().item() == 0
    # after it the head is cw, rows of unseen classes 0
    assert torch.equal(s.head.weight.detach()[:4], cw1) and s.head.weight.detach()[4:].abs().sum().item() == 0
    # two evaluations inside each experience (eval_every=1, 2 epochs): the rows a consolidation would give then;
    # the one after the last epoch is the consolidation itself
    assert len(spy.at_eval) == 4
    assert torch.equal(spy.at_eval[1][:2], cw0) and torch.equal(spy.at_eval[3][:4], cw1)
    assert spy.at_eval[2][4:].abs().sum().item() == 0 and not torch.equal(spy.at_eval[2][:4], cw1)
    # training went on from tw: the third experience starts with the consolidated rows of nothing it trains
    s.train(bench.train_stream[2])
    assert spy.at_start[2][:4].abs().sum().item() == 0 and plugin.past == {c: 20 for c in range(6)}


def test_replayed_classes_count_and_start_from_cw():
    """With a replay memory beside it, the memory's classes are trained too (AR1*'s code counts its latents)."""
    plugin, spy = CWRStar(lower_lr=None), HeadSpy()
    s, bench = build([Replay(memory=8), plugin, spy])
    s.train(bench.train_stream[0])
    cw = {c: w.clone() for c, w in plugin.weights.items()}
    s.train(bench.train_stream[1])
    assert spy.at_start[1][0].tolist() == cw[0].tolist() and spy.at_start[1][1].tolist() == cw[1].tolist()
    assert plugin.past == {0: 24, 1: 24, 2: 20, 3: 20}  # 20 samples each, 4 per class in memory


def test_a_memory_given_as_training_data_is_counted_once():
    plugin = CWRStar(lower_lr=None)
    s, bench = build([Cumulative(), plugin])
    for exp in bench.train_stream[:2]:
        s.train(exp)
    assert plugin.past == {0: 40, 1: 40, 2: 20, 3: 20}


# ----------------------------------------------------------------------------- the layers below the head
def lower_and_head(s):
    head = {id(p) for p in s.head.parameters()}
    return [p for p in s.model.parameters() if id(p) not in head], list(s.head.parameters())


def test_frozen_after_the_first_experience_by_default():
    s, bench = build([CWRStar()])
    s.train(bench.train_stream[0])
    lower, head = lower_and_head(s)
    before, head_before = snapshot(lower), snapshot(head)
    for exp in bench.train_stream[1:]:
        s.train(exp)
    assert all(torch.equal(a, b) for a, b in zip(before, lower))
    assert not any(torch.equal(a, b) for a, b in zip(head_before, head))
    assert not any(p.requires_grad for p in lower) and all(p.requires_grad for p in head)
    group = [g for g in s.optimizer.param_groups if any(p is lower[0] for p in g["params"])][0]
    assert group["lr"] == 0.0


def test_frozen_lower_layers_train_in_evaluation_mode():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 6))
    modes = []

    class Modes:
        @hookimpl
        def after_forward(self, strategy):
            modes.append((model[1].training, model[3].training))

    s, bench = build([CWRStar(), Modes()], model=model)
    s.train(bench.train_stream[0])
    stats = model[1].running_mean.clone()
    s.train(bench.train_stream[1])
    assert modes[0] == (True, True) and set(modes[6:]) == {(False, True)}
    assert torch.equal(model[1].running_mean, stats)


def test_slowed_lower_layers_learn_at_the_factor():
    s, bench = build([CWRStar(lower_lr=0.1)])
    s.train(bench.train_stream[0])
    lower, _ = lower_and_head(s)
    before = snapshot(lower)
    s.train(bench.train_stream[1])
    assert all(p.requires_grad for p in lower) and not torch.equal(before[0], lower[0])
    group = [g for g in s.optimizer.param_groups if any(p is lower[0] for p in g["params"])][0]
    assert group["lr"] == pytest.approx(0.01)


def test_lower_lr_none_leaves_the_layers_to_the_optimizer_and_lower_from_0_freezes_from_the_start():
    s, bench = build([CWRStar(lower_lr=None)])
    for exp in bench.train_stream[:2]:
        s.train(exp)
    assert len(s.optimizer.param_groups) == 1 and all(p.requires_grad for p in s.model.parameters())

    s, bench = build([CWRStar(lower_from=0)])
    lower, head = lower_and_head(s)
    before = snapshot(lower)
    s.train(bench.train_stream[0])
    assert all(torch.equal(a, b) for a, b in zip(before, lower))
    assert s.eval(bench.test_stream)["accuracy"][0] > 0.5  # the head alone learns on the initial features


def test_resume_inside_an_experience_keeps_the_lower_layers_fixed_and_the_counts(tmp_path, monkeypatch):
    from tests.reliability import Crash, crash_at_step

    s, bench = build([CWRStar()])
    for exp in bench.train_stream:
        s.train(exp)
    expected, cw = snapshot(s.model.parameters()), s.plugins[0].state_dict()

    crashing, _ = build([CWRStar()], checkpoint_dir=tmp_path, checkpoint_every=4)
    crash_at_step(monkeypatch, 17)  # in the third experience (6 steps each), after the checkpoint at step 16
    with pytest.raises(Crash):
        for exp in bench.train_stream:
            crashing.train(exp)
    monkeypatch.undo()
    resumed, _ = build([CWRStar()], checkpoint_dir=tmp_path, checkpoint_every=4)
    resumed.load_checkpoint()
    assert resumed.plugins[0].in_experience and resumed.plugins[0].cur == {4: 20, 5: 20}
    resumed.train(bench.train_stream[2])
    assert all(torch.equal(a, b) for a, b in zip(expected, snapshot(resumed.model.parameters())))
    again = resumed.plugins[0].state_dict()
    assert again["past"] == cw["past"] and all(torch.equal(again["weights"][c], cw["weights"][c]) for c in cw["weights"])


def test_checkpoint_round_trip_continues_identically(tmp_path):
    s, bench = build([CWRStar()])
    for exp in bench.train_stream[:2]:
        s.train(exp)
    s.save_checkpoint(tmp_path / "a.pt")
    s.train(bench.train_stream[2])
    expected = s.eval(bench.test_stream)

    again, _ = build([CWRStar()])
    again.load_checkpoint(tmp_path / "a.pt")
    plugin = again.plugins[0]
    assert plugin.past == {0: 20, 1: 20, 2: 20, 3: 20} and not plugin.in_experience
    again.train(bench.train_stream[2])
    assert again.eval(bench.test_stream)["accuracy"] == expected["accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(snapshot(s.model.parameters()), snapshot(again.model.parameters())))


def test_state_round_trip_is_a_copy():
    plugin = CWRStar()
    plugin.weights, plugin.biases = {0: torch.tensor([1.0, 2.0])}, {0: torch.tensor(0.5)}
    plugin.past, plugin.cur, plugin.in_experience = {0: 3}, {1: 4}, True
    copy = CWRStar()
    copy.load_state_dict(plugin.state_dict())
    assert copy.weights[0].tolist() == [1.0, 2.0] and copy.biases[0].item() == 0.5
    assert (copy.past, copy.cur, copy.in_experience) == ({0: 3}, {1: 4}, True)
    copy.weights[0][0] = 9.0
    assert plugin.weights[0][0].item() == 1.0


# ----------------------------------------------------------------------------- roles, models, refusals
def test_roles_latent_replay_only_beside_a_cwr_star_that_leaves_the_lower_layers():
    assert CWRStar().owns == {"head_rows", "architecture"} and CWRStar(lower_lr=None).owns == {"head_rows"}
    with pytest.raises(PluginError, match="both own the role 'architecture'"):
        build([LatentReplay(memory=12), CWRStar()])
    with pytest.raises(PluginError, match="both own the role 'head_rows'"):
        build([WA(), CWRStar(lower_lr=None)])
    s, bench = build([SI(head=False), LatentReplay(memory=12), CWRStar(lower_lr=None)])  # the ar1 recipe
    for exp in bench.train_stream:
        s.train(exp)
    # 20 samples a class; the memory of 12 latents holds 6 a class after the first experience, 3 after the second
    assert s.plugins[2].past == {0: 20 + 6 + 3, 1: 29, 2: 20 + 3, 3: 23, 4: 20, 5: 20}


def test_si_without_the_head_leaves_its_rows_out():
    for head in (False, True):
        si = SI(head=head)
        s, bench = build([si, CWRStar(lower_lr=None)])
        for exp in bench.train_stream[:2]:
            s.train(exp)
        assert si.importance and any(n.startswith("head.") for n in si.importance) == head
        assert all(any(n.startswith("head.") for n in c) == head for c, _ in si.anchors.points)
    with pytest.raises(ConfigError, match="SI head=0"):
        SI(head=0)
    no_head = nn.Sequential(nn.Flatten(), nn.Tanh(), nn.Bilinear(8, 8, 4))
    with pytest.raises(ConfigError, match=r"head=False"):
        Strategy(no_head, torch.optim.SGD(no_head.parameters(), lr=0.1), plugins=[SI(head=False)], seed=0)


@pytest.mark.parametrize("name", sorted(USER_MODELS))
def test_any_model_with_a_linear_head(name):
    torch.manual_seed(0)
    model = USER_MODELS[name](4)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), plugins=[CWRStar()], batch_size=8,
                 seed=0)
    bench = image_benchmark()
    for exp in bench.train_stream:
        s.train(exp)
    plugin = s.plugins[0]
    assert sorted(plugin.weights) == [0, 1, 2, 3]
    assert torch.equal(s.head.weight.detach(), torch.stack([plugin.weights[c] for c in range(4)]).to(s.head.weight))


def test_refusals():
    for bad in (-0.1, float("inf"), True, "0"):
        with pytest.raises(ConfigError, match="lower_lr"):
            CWRStar(lower_lr=bad)
    for bad in (-1, 1.0, True):
        with pytest.raises(ConfigError, match="lower_from"):
            CWRStar(lower_from=bad)
    with pytest.raises(ConfigError, match="init"):
        CWR(init="gaussian")
    no_head = nn.Sequential(nn.Flatten(), nn.Tanh(), nn.Bilinear(8, 8, 4))
    with pytest.raises(ConfigError, match=r"CWRStar\(\) needs the model's classifier head"):
        Strategy(no_head, torch.optim.SGD(no_head.parameters(), lr=0.1), plugins=[CWRStar()], seed=0)
