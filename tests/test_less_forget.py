"""LessForget (LUCIR eq. 6-7) against hand computations; the teacher stays frozen; refusals."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, Output, Plugin, PluginError, Strategy, hookimpl
from streamcl.models import MLP
from streamcl.plugins.distill import LwFDistill
from streamcl.plugins.less_forget import LessForget, less_forget
from streamcl.plugins.replay import Replay
from tests.conftest import image_benchmark, sequential
from tests.synthetic import tiny_benchmark
from tests.conftest import NoHead


class FixedFeatures(nn.Module):
    """A model (a 'teacher') whose head reads the same features for any input."""

    def __init__(self, features):
        super().__init__()
        self.register_buffer("features", torch.tensor(features))
        self.head = nn.Linear(self.features.shape[1], 1)

    def forward(self, x):
        return self.head(self.features[: len(x)])


def with_teacher(plugin, teacher_features, old_classes):
    teacher = FixedFeatures(teacher_features)
    plugin.load_state_dict({"old_classes": old_classes, "teacher": teacher, "teacher_state": teacher.state_dict()})
    return plugin


def term(plugin, student_features, classes):
    """The term for a student with these features (and the engine's forward of the teacher), its features."""
    f = torch.tensor(student_features, requires_grad=True)
    batch = Batch(torch.zeros(len(f), 3), torch.zeros(len(f), dtype=torch.long), torch.zeros(len(f), dtype=torch.long))
    model = FixedFeatures(student_features)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin], seed=0)
    strategy.experience = SimpleNamespace(classes=classes)
    terms = plugin.loss_terms(strategy=strategy, batch=batch, output=Output(f.sum(1, keepdim=True), f))
    return terms, f


# ----------------------------------------------------------------------------- the maths
def test_term_and_its_adaptive_weight_by_hand():
    # cosines: (1, 0) vs (0, 1): 0; (1, 1) vs (2, 2): 1; (3, 0) vs (-1, 0): -1 -> 1 - cos = 1, 0, 2 -> mean 1
    teacher = [[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]]
    student = [[1.0, 0.0], [1.0, 1.0], [3.0, 0.0]]
    plugin = with_teacher(LessForget(), teacher, [0, 1, 2, 3])  # 4 old classes
    terms, _ = term(plugin, student, classes=[4, 5])  # 2 new: lambda = 5 * sqrt(4 / 2)
    assert set(terms) == {"less_forget"}
    assert terms["less_forget"].item() == pytest.approx(5 * math.sqrt(2) * 1.0, rel=1e-6)
    fixed = with_teacher(LessForget(lambda_base=3.0, adaptive=False), teacher, [0, 1, 2, 3])
    assert term(fixed, student, classes=[4, 5])[0]["less_forget"].item() == pytest.approx(3.0, rel=1e-6)


def test_adaptive_weight_on_the_protocol_and_zero_when_features_agree():
    plugin = LessForget()
    for n_old, expected in ((2, 5.0), (4, 5 * math.sqrt(2)), (6, 5 * math.sqrt(3)), (8, 10.0)):
        plugin.old_classes = list(range(n_old))
        assert plugin.weight_for(2) == pytest.approx(expected)
    plugin = with_teacher(LessForget(), [[0.3, -1.2, 4.0]], [0, 1])
    terms, _ = term(plugin, [[0.6, -2.4, 8.0]], classes=[2, 3])  # same direction, twice the length
    assert abs(terms["less_forget"].item()) < 1e-6


def test_gradient_is_orthogonal_to_the_features_and_matches_the_hand_derivative():
    # d(1 - cos(f, t))/df = -(t_bar - cos * f_bar) / |f|; lambda = 5 (2 old, 2 new), batch of 1
    plugin = with_teacher(LessForget(), [[0.0, 2.0]], [0, 1])
    terms, f = term(plugin, [[3.0, 4.0]], classes=[2, 3])
    terms["less_forget"].backward()
    f_bar, t_bar, cos = torch.tensor([0.6, 0.8]), torch.tensor([0.0, 1.0]), 0.8
    assert torch.allclose(f.grad[0], -5 * (t_bar - cos * f_bar) / 5.0, atol=1e-6)
    assert abs(float(f.grad[0] @ f.detach()[0])) < 1e-6


def test_no_teacher_no_term_and_defaults():
    plugin = LessForget()
    assert plugin.loss_terms(strategy=None, batch=None, output=None) is None
    assert (plugin.lambda_base, plugin.adaptive) == (5.0, True)
    assert repr(LessForget(lambda_base=2)) == "LessForget(lambda_base=2)"


# ----------------------------------------------------------------------------- in a run
def build(plugins, n_classes=6, n_exp=3, seed=0):
    torch.manual_seed(seed)
    bench = tiny_benchmark(n_classes, n_exp)
    model = MLP(8, [16], n_classes)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=plugins, epochs=2,
                 batch_size=16, seed=seed)
    return s, bench


class Terms(Plugin):
    def __init__(self):
        self.seen = []

    @hookimpl
    def after_training_iteration(self, strategy):
        self.seen.append({k: v.item() for k, v in strategy.loss_terms.items()})


def test_teacher_is_frozen_and_the_term_starts_at_zero_each_experience():
    plugin, terms = LessForget(), Terms()
    s, bench = build([Replay(memory=12), plugin, terms])
    s.train(bench.train_stream[0])
    assert plugin.teacher is None and all("less_forget" not in t for t in terms.seen)
    for exp in bench.train_stream[1:]:
        s.train(exp)
        teacher = plugin.teacher
        assert teacher is not s.model and not teacher.training
        assert all(not p.requires_grad for p in teacher.parameters())
    assert plugin.old_classes == [0, 1, 2, 3, 4, 5]
    values = [t["less_forget"] for t in terms.seen[6:]]
    assert len(values) == 12 and abs(values[0]) < 1e-6 and abs(values[6]) < 1e-6 and max(values) > 0
    assert min(values) >= -1e-6


def test_huge_lambda_stays_finite():
    plugin = LessForget(lambda_base=1e6)
    s, bench = build([Replay(memory=12), plugin])
    for exp in bench.train_stream:
        s.train(exp)
    assert all(torch.isfinite(p).all() for p in s.model.parameters())
    assert 0 <= s.eval(bench.test_stream)["accuracy"][0] <= 1


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs", [dict(lambda_base=-1.0), dict(lambda_base=float("nan")), dict(lambda_base="5"),
                                    dict(lambda_base=float("inf")), dict(adaptive="yes")])
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        LessForget(**kwargs)


def test_two_feature_distillers_are_refused_and_a_logit_distiller_runs_beside():
    with pytest.raises(PluginError, match="both own the role 'feature_distillation'"):
        build([LessForget(), LessForget(lambda_base=1.0)])
    terms = Terms()
    s, bench = build([Replay(memory=12), LwFDistill(), LessForget(), terms])
    for exp in bench.train_stream[:2]:
        s.train(exp)
    assert {"lwf", "less_forget"} <= set(terms.seen[-1])


def test_a_model_without_a_head_is_refused_at_construction():
    model = NoHead()
    with pytest.raises(ConfigError, match=r"LessForget\(\) needs the model's classifier head"):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[LessForget()], seed=0)


def test_a_plain_sequential_distils_the_input_of_its_last_linear():
    torch.manual_seed(0)
    model = sequential(4)
    plugin, hand, checked = LessForget(), [], []

    class Check(Plugin):
        @hookimpl
        def after_forward(self, strategy):
            if plugin.teacher is not None:  # the term by hand: both models' inputs of their last Linear
                with torch.no_grad():
                    own, target = model[:5](strategy.batch.x), plugin.teacher[:5](strategy.batch.x)
                assert torch.allclose(own, strategy.output.features)
                hand.append(plugin.weight_for(len(strategy.experience.classes)) * less_forget(own, target))

        @hookimpl
        def after_training_iteration(self, strategy):
            if plugin.teacher is not None:
                checked.append(strategy.loss_terms["less_forget"].item() == pytest.approx(hand[-1].item(), abs=1e-6))

    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                 plugins=[Replay(memory=8), plugin, Check()], epochs=2, batch_size=8, seed=0)
    for exp in image_benchmark().train_stream:
        s.train(exp)
    assert len(checked) == 4 and all(checked)  # 2 epochs of 2 minibatches in the second experience
    assert abs(hand[0].item()) < 1e-6 and max(h.item() for h in hand) > 0
