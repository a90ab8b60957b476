"""Weight aligning: the factor and the rescaled rows on a hand-built head, clipping, set_correction, any model's
head, refusals, state."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from streamcl import ConfigError, PluginError, Strategy, hookimpl
from streamcl.methods import RECIPES
from streamcl.models import MLP
from streamcl.models.heads import IncrementalLinear
from streamcl.models.nets import Classifier
from streamcl.plugins.distill import LwFDistill
from streamcl.plugins.replay import Replay
from streamcl.plugins.wa import WA, aligning_factor
from tests.conftest import image_benchmark, sequential, warns_once_when_no_class_is_new
from tests.synthetic import tiny_benchmark


def exp(index, classes):
    return SimpleNamespace(index=index, classes=tuple(classes))


def hand_head():
    """Rows: old classes 0, 1 (norms 5 and 1), new classes 2, 3 (norms 10 and 2), class 4 not seen yet."""
    head = nn.Linear(2, 5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [2.0, 0.0], [-7.0, 1.0]]))
        head.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))
    return head


def fake_strategy(head, trained=(), experience=None):
    """What WA reads of a strategy: the head (and its path), the experiences, a log."""
    logged = []
    return SimpleNamespace(head=head, head_path="head", trained=list(trained), experience=experience, logged=logged,
                           log=lambda name, value: logged.append((name, value)))


def after_second_experience(plugin, head):
    e0, e1 = exp(0, [0, 1]), exp(1, [2, 3])
    strategy = fake_strategy(head, [e0, e1], e1)
    plugin.after_training_exp(strategy=strategy)
    return strategy


# ----------------------------------------------------------------------------- the maths
def test_the_wa_factor_on_a_hand_built_head():
    head = hand_head()
    before = head.weight.detach().clone()
    # eq. 4: mean old norm (5 + 1) / 2 = 3, mean new norm (10 + 2) / 2 = 6, gamma = 3 / 6
    assert aligning_factor(head.weight, [0, 1], [2, 3]) == 0.5
    plugin = WA(clip=False)
    strategy = after_second_experience(plugin, head)
    w = head.weight.detach()
    assert w[2].tolist() == [3.0, 4.0] and w[3].tolist() == [1.0, 0.0]  # eq. 5: gamma * W_new
    assert torch.equal(w[[0, 1, 4]], before[[0, 1, 4]])  # old rows and the unseen class's row untouched
    assert head.bias.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])  # the bias is not rescaled
    assert plugin.gammas == [(1, 0.5)] and plugin.last == {"rows": [2, 3], "gamma": 0.5}
    assert strategy.logged == [("wa/factor", 0.5)]
    # the aligned new rows have the old rows' mean norm
    assert w[[2, 3]].norm(dim=1).mean().item() == pytest.approx(w[[0, 1]].norm(dim=1).mean().item())


def test_an_irrational_factor_by_hand():
    head = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 3.0]]))
    plugin = WA()
    plugin.after_training_exp(strategy=fake_strategy(head, [exp(0, [0, 1]), exp(1, [2])], exp(1, [2])))
    gamma = (math.sqrt(2) + 1) / 2 / 3
    assert plugin.gammas[0][1] == pytest.approx(gamma, rel=1e-12)
    assert head.weight[2].tolist() == pytest.approx([0.0, 3 * gamma], rel=1e-6)


def test_nothing_is_aligned_without_old_or_without_new_classes():
    head = hand_head()
    before = head.weight.detach().clone()
    plugin = WA()
    e0 = exp(0, [0, 1])
    plugin.after_training_exp(strategy=fake_strategy(head, [e0], e0))
    e1 = exp(1, [0, 1])  # the same classes again (domain-incremental): nothing new
    plugin.after_training_exp(strategy=fake_strategy(head, [e0, e1], e1))
    assert torch.equal(head.weight.detach(), before) and plugin.gammas == [] and plugin.last is None


def test_clipping_makes_the_head_weights_non_negative_after_each_update():
    head = hand_head()
    strategy = fake_strategy(head)
    WA(clip=False).after_update(strategy=strategy)
    assert head.weight[4, 0].item() == -7.0
    WA().after_update(strategy=strategy)  # clip=True is the default, as in the paper
    assert head.weight.tolist() == [[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [2.0, 0.0], [0.0, 1.0]]
    assert head.bias.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])  # only the weights


def test_a_growing_head_is_aligned_too():
    head = IncrementalLinear(2, 0)
    head.grow_to(4)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [2.0, 0.0]]))
    plugin = WA()
    after_second_experience(plugin, head)
    assert head.weight[2:].tolist() == [[3.0, 4.0], [1.0, 0.0]]


# ----------------------------------------------------------------------------- set_correction
def test_correction_off_divides_the_new_rows_back_and_on_restores_them_exactly():
    head = hand_head()
    plugin = WA(clip=False)
    strategy = after_second_experience(plugin, head)
    aligned = head.weight.detach().clone()
    plugin.set_correction(strategy=strategy, active=False)
    assert head.weight[2:4].tolist() == [[6.0, 8.0], [2.0, 0.0]]  # W_new / gamma
    assert torch.equal(head.weight[[0, 1, 4]], aligned[[0, 1, 4]])
    plugin.set_correction(strategy=strategy, active=False)  # switched off twice: divided once
    assert head.weight[2:4].tolist() == [[6.0, 8.0], [2.0, 0.0]]
    plugin.set_correction(strategy=strategy, active=True)
    assert torch.equal(head.weight.detach(), aligned)
    plugin.set_correction(strategy=strategy, active=True)  # on twice: nothing more
    assert torch.equal(head.weight.detach(), aligned)


def test_correction_off_after_a_resume_and_with_nothing_aligned():
    head = hand_head()
    done = WA(clip=False)
    strategy = after_second_experience(done, head)
    aligned = head.weight.detach().clone()
    fresh = WA(clip=False)
    fresh.load_state_dict(done.state_dict())  # a resumed run has seen no hook yet
    fresh.set_correction(strategy=strategy, active=False)
    assert head.weight[2:4].tolist() == [[6.0, 8.0], [2.0, 0.0]]
    fresh.set_correction(strategy=strategy, active=True)
    assert torch.equal(head.weight.detach(), aligned)
    WA().set_correction(strategy=strategy, active=False)  # no alignment yet: nothing to undo
    assert torch.equal(head.weight.detach(), aligned)


def build(plugins, n_classes=4, n_exp=2):
    torch.manual_seed(0)
    bench = tiny_benchmark(n_classes, n_exp)
    model = MLP(8, [16], n_classes)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=plugins, epochs=2,
                 batch_size=16, seed=0)
    return s, bench


class Spy:
    def __init__(self):
        self.logits = []

    @hookimpl
    def after_eval_forward(self, strategy):
        self.logits.append(strategy.output.logits.clone())


def test_a_real_run_aligns_clips_and_uncorrected_changes_the_logits():
    wa, spy = WA(), Spy()
    s, bench = build([Replay(memory=20), LwFDistill(), wa, spy])
    s.train(bench.train_stream[0])
    assert wa.gammas == [] and bool((s.model.head.weight >= 0).all())
    s.train(bench.train_stream[1])
    (index, gamma), = wa.gammas
    assert index == 1 and gamma > 0 and gamma != 1
    norms = s.model.head.weight.detach().norm(dim=1)
    assert norms[[2, 3]].mean().item() == pytest.approx(norms[[0, 1]].mean().item(), rel=1e-5)
    weights = s.model.head.weight.detach().clone()
    s.eval(bench.test_stream)
    n = len(spy.logits)
    assert s.corrects
    with s.uncorrected():
        s.eval(bench.test_stream)
    corrected, raw = torch.cat(spy.logits[:n]), torch.cat(spy.logits[n:])
    assert torch.equal(corrected[:, :2], raw[:, :2]) and not torch.equal(corrected[:, 2:], raw[:, 2:])
    assert torch.equal(s.model.head.weight.detach(), weights)


def test_the_one_liner_on_a_plain_sequential_aligns_its_last_linear():
    torch.manual_seed(0)
    model = sequential()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    wa = WA()
    s = Strategy(model, opt, plugins=[Replay(memory=500), LwFDistill(), wa], batch_size=8, seed=0)
    assert s.head is model[5]
    bench = image_benchmark()
    for e in bench.train_stream:
        s.train(e)
    (index, gamma), = wa.gammas
    w = model[5].weight.detach()
    assert index == 1 and bool((w >= 0).all()) and bool((model[3].weight < 0).any())  # only the head is clipped
    assert w[[2, 3]].norm(dim=1).mean().item() == pytest.approx(w[[0, 1]].norm(dim=1).mean().item(), rel=1e-5)
    assert 0 <= s.eval(bench.test_stream)["accuracy"][0] <= 1


# ----------------------------------------------------------------------------- refusals and state
class RowlessHead(nn.Module):
    """A linear head (in_features, out_features) whose weight is not one parameter of one row per class."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocks = nn.ParameterList([nn.Parameter(torch.zeros(out_features, 4)) for _ in range(in_features // 4)])

    def forward(self, x):
        return x @ torch.cat(list(self.blocks), 1).T


def test_refusals_at_construction():
    with pytest.raises(ConfigError, match="clip"):
        WA(clip=1)
    model = Classifier(nn.Flatten(), RowlessHead(8, 4), 8)
    with pytest.raises(ConfigError, match=r"rows of the classifier head's weight.*'head' \(RowlessHead, 4 outputs\) "
                                          r"has no \.weight"):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[WA()], batch_size=16, seed=0)
    no_head = nn.Sequential(nn.Flatten(), nn.Tanh(), nn.Bilinear(8, 8, 4))
    with pytest.raises(ConfigError, match=r"WA\(\) needs the model's classifier head"):
        Strategy(no_head, torch.optim.SGD(no_head.parameters(), lr=0.1), plugins=[WA()], seed=0)
    from streamcl.plugins.cosine_head import CosineHead  # replaces the head: refused by role
    with pytest.raises(PluginError, match="architecture"):
        build([CosineHead(), WA()])


def test_state_round_trip():
    plugin = WA()
    after_second_experience(plugin, hand_head())
    copy = WA()
    copy.load_state_dict(plugin.state_dict())
    assert copy.gammas == plugin.gammas and copy.last == plugin.last
    copy.last["rows"].append(9)
    assert plugin.last["rows"] == [2, 3]  # not shared


# ----------------------------------------------------------------------------- the recipe's distillation
def test_the_wa_recipe_distils_every_row_of_a_minibatch_with_exemplars():
    """The paper's L_KD covers new samples and exemplars: the term equals, by hand, T^2 KL over every row of the
    minibatch (not over the experience's own rows only, the form before issue 18, kept as distill_on="new")."""
    checked = []

    class Check:
        @hookimpl
        def after_forward(self, strategy):
            batch, out = strategy.batch, strategy.output
            if lwf.teacher is None or len(batch) == strategy.n_current:
                return
            T = 2.0
            with torch.no_grad():
                z_t = lwf.teacher(batch.x)[:, [0, 1]]
            p = torch.softmax(z_t / T, 1)
            kl_rows = (p * (p.log() - torch.log_softmax(out.raw.detach()[:, [0, 1]] / T, 1))).sum(1) * T * T
            term = float(lwf.loss_terms(strategy=strategy, batch=batch, output=out)["lwf"].detach())
            assert term == pytest.approx(float(kl_rows.mean()), rel=1e-5, abs=1e-7)
            assert term != pytest.approx(float(kl_rows[:strategy.n_current].mean()), rel=1e-3)
            checked.append(len(batch) - strategy.n_current)

    replay, lwf, wa = RECIPES["wa"].plugins(memory=20)
    assert isinstance(lwf, LwFDistill) and lwf.replayed and lwf.weight == 1.0 and wa.clip
    s, bench = build([replay, lwf, wa, Check()])
    for e in bench.train_stream:
        s.train(e)
    assert checked and all(n > 0 for n in checked)
    assert not RECIPES["wa"].plugins(distill_on="new")[1].replayed
    with pytest.raises(ConfigError, match="distill_on"):
        RECIPES["wa"].plugins(distill_on="old")


def test_an_experience_with_no_new_class_is_warned_about_once():
    s, bench = build([Replay(memory=12), LwFDistill(), WA()])
    warns_once_when_no_class_is_new(s, bench, "wa: experience 1 brings no class not seen before")
