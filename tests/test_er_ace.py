"""ER-ACE: the asymmetric cross-entropy by hand, inside a strategy with Replay, resume."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from streamcl import Batch, ConfigError, Output, PluginError, Strategy, hookimpl
from streamcl.models import MLP
from streamcl.plugins.er_ace import ERACE, ace
from streamcl.plugins.replay import Replay
from tests.synthetic import tiny_benchmark

LOGITS = torch.tensor([[1.0, 2.0, 0.5, -1.0, 3.0],    # incoming, label 2
                       [0.0, 1.0, 2.0, 1.0, 0.0],     # incoming, label 3
                       [2.0, -1.0, 0.0, 1.0, 4.0],    # replayed, label 0
                       [0.5, 0.5, 1.0, 2.0, 1.0]])    # replayed, label 1
Y = torch.tensor([2, 3, 0, 1])


def lse(*values):
    return math.log(sum(math.exp(v) for v in values))


def hand_loss():
    """Incoming classes {2, 3}; seen so far {0, 1, 2, 3}; class 4 is not seen yet."""
    ce_in = ((lse(0.5, -1.0) - 0.5) + (lse(2.0, 1.0) - 1.0)) / 2
    ce_re = ((lse(2.0, -1.0, 0.0, 1.0) - 2.0) + (lse(0.5, 0.5, 1.0, 2.0) - 0.5)) / 2
    return ce_in + ce_re


def mask(classes, width=5):
    keep = torch.zeros(width, dtype=torch.bool)
    keep[list(classes)] = True
    return keep


def test_asymmetric_loss_by_hand():
    loss = ace(LOGITS, Y, 2, mask([2, 3]), mask([0, 1, 2, 3]))
    assert loss.item() == pytest.approx(hand_loss(), rel=1e-6)
    # no replayed rows: the masked cross-entropy of the incoming ones alone
    only_in = ace(LOGITS[:2], Y[:2], 2, mask([2, 3]), mask([0, 1, 2, 3]))
    assert only_in.item() == pytest.approx(((lse(0.5, -1.0) - 0.5) + (lse(2.0, 1.0) - 1.0)) / 2, rel=1e-6)


def test_masked_logits_get_no_gradient_from_incoming_samples():
    logits = LOGITS[:2].clone().requires_grad_()
    ace(logits, Y[:2], 2, mask([2, 3]), mask(range(5))).backward()
    assert logits.grad[:, [0, 1, 4]].eq(0).all() and logits.grad[:, [2, 3]].ne(0).all()
    assert torch.isfinite(logits.grad).all()


def fake_strategy(n_current=2, classes=(2, 3), trained=((0, 1),)):
    exp = SimpleNamespace(index=len(trained), classes=classes)
    return SimpleNamespace(n_current=n_current, experience=exp,
                           trained=[SimpleNamespace(index=i, classes=c) for i, c in enumerate(trained)])


def task_loss(plugin, strategy, logits, y):
    """The plugin's ``task_loss`` transform on a minibatch with these logits and labels."""
    batch = Batch(torch.zeros(len(y), 1), y, torch.zeros_like(y))
    return plugin.task_loss(strategy=strategy, output=Output(logits, None, logits), batch=batch)


def test_task_loss_takes_the_classes_of_the_experience_and_of_the_past():
    plugin, strategy = ERACE(), fake_strategy()
    assert task_loss(plugin, strategy, LOGITS, Y).item() == pytest.approx(hand_loss(), rel=1e-6)
    ce_re = ((lse(2.0, -1.0, 0.0, 1.0) - 2.0) + (lse(0.5, 0.5, 1.0, 2.0) - 0.5)) / 2
    y = torch.tensor([2, 2, 0, 1])  # class 3 of the experience is absent from this minibatch
    # "experience" (default): class 3 stays in the incoming softmax
    by_experience = ((lse(0.5, -1.0) - 0.5) + (lse(2.0, 1.0) - 2.0)) / 2 + ce_re
    assert task_loss(plugin, strategy, LOGITS, y).item() == pytest.approx(by_experience, rel=1e-6)
    # "batch": only the classes present in the incoming minibatch (the paper's online rule)
    by_batch = ((lse(0.5) - 0.5) + (lse(2.0) - 2.0)) / 2 + ce_re
    assert task_loss(ERACE(incoming="batch"), strategy, LOGITS, y).item() == pytest.approx(by_batch, rel=1e-6)


def test_a_sample_of_a_class_outside_the_masks_is_still_scored_against_its_class():
    strategy = fake_strategy(classes=(2, 3))
    y = torch.tensor([0, 3, 0, 1])  # an old class among the incoming samples (data joined to the experience)
    loss = task_loss(ERACE(), strategy, LOGITS, y)
    assert torch.isfinite(loss)
    # the incoming softmax covers the experience's classes and those present: {0, 2, 3}
    ce_re = ((lse(2.0, -1.0, 0.0, 1.0) - 2.0) + (lse(0.5, 0.5, 1.0, 2.0) - 0.5)) / 2
    expected = ((lse(1.0, 0.5, -1.0) - 1.0) + (lse(0.0, 2.0, 1.0) - 1.0)) / 2 + ce_re
    assert loss.item() == pytest.approx(expected, rel=1e-6)


class Spy:
    def __init__(self):
        self.steps = []

    @hookimpl
    def after_forward(self, strategy):
        logits = strategy.output.logits.detach().clone()
        self.steps.append((strategy.n_current, logits, strategy.batch.y.clone(), strategy.experience.classes))

    @hookimpl
    def before_backward(self, strategy):
        self.steps[-1] += (strategy.loss.detach().clone(),)


def run(plugins, seed=0, n_classes=6, n_exp=3):
    torch.manual_seed(seed)
    bench = tiny_benchmark(n_classes, n_exp)
    model = MLP(8, [16], n_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Strategy(model, opt, plugins=plugins, batch_size=16, epochs=2, seed=seed), bench


def test_with_replay_the_task_loss_is_the_asymmetric_one():
    spy = Spy()
    s, bench = run([Replay(memory=12), ERACE(), spy])
    s.train(bench.train_stream)
    replayed = 0
    for n, logits, y, classes, loss in spy.steps:
        seen = list(range(max(classes) + 1))  # class-incremental in class order, 2 classes each
        by_hand = F.cross_entropy(logits[:n].masked_fill(~mask(classes, 6), float("-inf")), y[:n])
        if len(y) > n:
            replayed += 1
            by_hand = by_hand + F.cross_entropy(logits[n:].masked_fill(~mask(seen, 6), float("-inf")), y[n:])
        assert torch.allclose(by_hand, loss)
    assert replayed == 2 * 2 * 3  # experiences 1 and 2: 2 epochs of 3 minibatches each
    assert s.criterion is F.cross_entropy  # the loss comes through task_loss; the criterion stays the plain one


def test_resume_inside_an_experience_keeps_the_asymmetric_loss(tmp_path, monkeypatch):
    from tests.reliability import Crash, crash_at_step

    def build(seed=0):
        torch.manual_seed(seed)
        model = MLP(8, [16], 6)
        return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                        plugins=[Replay(memory=12), ERACE()], batch_size=16, epochs=2, seed=0,
                        checkpoint_dir=tmp_path, checkpoint_every=2)

    bench = tiny_benchmark(6, 3)
    whole = build()
    whole.train(bench.train_stream)
    crashed = build()
    crash_at_step(monkeypatch, 9)  # inside experience 1 (6 steps per experience), after the step-8 checkpoint
    with pytest.raises(Crash):
        crashed.train(bench.train_stream)
    monkeypatch.undo()
    resumed = build(seed=1)
    resumed.load_checkpoint()
    resumed.train(bench.train_stream[len(resumed.trained):])
    for p, q in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_owns_the_criterion_and_refuses_bad_settings():
    class OtherCriterion(ERACE):
        pass

    with pytest.raises(PluginError, match="criterion"):
        run([ERACE(), OtherCriterion()])
    with pytest.raises(ConfigError):
        ERACE(incoming="minibatch")
