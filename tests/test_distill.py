"""Distillation (LwF's KL, iCaRL's BCE) against hand computations; the teacher stays frozen."""
import io
import math

import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, Output, Plugin, PluginError, Strategy, hookimpl
from streamcl.models import MLP
from streamcl.plugins.distill import Distill, LwFDistill
from streamcl.plugins.replay import Replay
from tests.reliability import Crash, crash_at_step
from tests.synthetic import task_benchmark, tiny_benchmark


class Fixed(nn.Module):
    """A 'teacher' that answers the same logits for any input."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x):
        return self.logits[: len(x)]


def with_teacher(plugin, teacher_logits, old_classes):
    teacher = Fixed(teacher_logits)
    plugin.load_state_dict({"old_classes": old_classes, "teacher": teacher, "teacher_state": teacher.state_dict()})
    return plugin


def term(plugin, student_logits):
    """The plugin's terms for a minibatch whose student logits are given; the teacher runs through the
    engine's forward (``strategy.forward(batch, model=teacher)``)."""
    z = torch.tensor(student_logits, requires_grad=True)
    batch = Batch(torch.zeros(len(z), 3), torch.zeros(len(z), dtype=torch.long), torch.zeros(len(z), dtype=torch.long))
    model = MLP(3, [4], 3)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1))
    strategy.n_current = len(z)
    terms = plugin.loss_terms(strategy=strategy, batch=batch, output=Output(z, None, z))
    return terms, z


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


# ----------------------------------------------------------------------------- the maths
def test_kl_term_by_hand_on_old_classes_only():
    # old classes 0, 1; column 2 (the new class) must not count, whatever its value
    plugin = with_teacher(LwFDistill(), [[0.0, 1.0, 50.0]], [0, 1])
    terms, z = term(plugin, [[1.0, 0.0, -50.0]])
    # T = 2: p = softmax((0.5, 0)) = (a, b), q = softmax((0, 0.5)) = (b, a), a = e^.5 / (1 + e^.5)
    a = math.exp(0.5) / (1 + math.exp(0.5))
    b = 1 - a
    kl = b * math.log(b / a) + a * math.log(a / b)  # KL(q || p)
    assert set(terms) == {"lwf"}
    assert terms["lwf"].item() == pytest.approx(0.25 * 4 * kl, rel=1e-6)  # weight 1 / T^2 times T^2: the paper's term
    assert kl == pytest.approx(math.tanh(0.25) * 0.5, rel=1e-9)  # (a - b) * log(a / b)
    terms["lwf"].backward()
    assert z.grad[0, 2] == 0  # no gradient to the new class


def test_under_task_labels_one_softmax_per_old_task():
    # old tasks 0 (classes 0, 1) and 1 (classes 2, 3); column 4 is the current task's
    teacher, student = [[0.0, 1.0, 2.0, -1.0, 9.0]], [[1.0, 0.0, 0.0, 0.5, -9.0]]
    plugin = with_teacher(LwFDistill(), teacher, [0, 1, 2, 3])
    plugin.task_classes = {0: [0, 1], 1: [2, 3]}
    terms, _ = term(plugin, student)

    def kl(q_logits, p_logits, T=2.0):
        q = torch.softmax(torch.tensor(q_logits) / T, 0)
        p = torch.softmax(torch.tensor(p_logits) / T, 0)
        return float((q * (q / p).log()).sum()) * T * T

    per_task = kl([0.0, 1.0], [1.0, 0.0]) + kl([2.0, -1.0], [0.0, 0.5])
    assert terms["lwf"].item() == pytest.approx(0.25 * per_task, rel=1e-6)
    joint = kl([0.0, 1.0, 2.0, -1.0], [1.0, 0.0, 0.0, 0.5])
    assert terms["lwf"].item() != pytest.approx(0.25 * joint, rel=1e-3)  # not one softmax over all old classes
    plugin.task_classes = {}  # no task labels: the one softmax over every old class
    assert term(plugin, student)[0]["lwf"].item() == pytest.approx(0.25 * joint, rel=1e-6)


def test_a_task_incremental_run_groups_the_old_classes_by_task_and_keeps_them_in_its_state():
    torch.manual_seed(0)
    bench = task_benchmark(3)
    model = MLP(8, [16], 6)
    plugin = LwFDistill()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin], batch_size=16, seed=0)
    for exp in bench.train_stream:
        s.train(exp)
    assert plugin.task_classes == {0: [0, 1], 1: [2, 3], 2: [4, 5]} and plugin.kl_groups() == [[0, 1], [2, 3], [4, 5]]
    copy = LwFDistill()
    copy.load_state_dict(plugin.state_dict())
    assert copy.task_classes == plugin.task_classes
    assert Distill(kind="bce").kl_groups() == []  # sigmoid outputs: nothing to group


def test_kl_term_batch_mean_weight_and_temperature():
    teacher = [[2.0, 0.0], [0.0, 0.0]]
    student = [[0.0, 0.0], [1.0, -1.0]]
    plugin = with_teacher(Distill(kind="kl", weight=3.0, temperature=1.0), teacher, [0, 1])
    terms, _ = term(plugin, student)

    def kl(t, s):
        q = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
        p = [math.exp(v) / sum(math.exp(u) for u in s) for v in s]
        return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))

    expected = 3.0 * (kl(teacher[0], student[0]) + kl(teacher[1], student[1])) / 2  # T^2 = 1
    assert set(terms) == {"distill"}
    assert terms["distill"].item() == pytest.approx(expected, rel=1e-6)


def test_kl_term_is_zero_when_the_student_matches():
    plugin = with_teacher(LwFDistill(), [[0.3, -1.2, 4.0]], [0, 1, 2])
    terms, _ = term(plugin, [[0.3, -1.2, 4.0]])
    assert abs(terms["lwf"].item()) < 1e-6


def test_bce_term_by_hand():
    # old classes 0, 2 of 3; iCaRL: targets sigmoid(teacher), sum over old classes, mean over the batch
    teacher = [[0.0, 9.0, -1.0], [2.0, 9.0, 0.5]]
    student = [[0.0, -9.0, 2.0], [-1.0, 9.0, 0.5]]
    plugin = with_teacher(Distill(kind="bce"), teacher, [0, 2])
    terms, _ = term(plugin, student)

    def bce(q, s):
        g = sigmoid(s)
        return -(q * math.log(g) + (1 - q) * math.log(1 - g))

    rows = [sum(bce(sigmoid(teacher[i][c]), student[i][c]) for c in (0, 2)) for i in range(2)]
    assert terms["distill"].item() == pytest.approx(sum(rows) / 2, rel=1e-6)
    # the first row's class 0 alone: q = g = 0.5 -> log 2
    assert bce(0.5, 0.0) == pytest.approx(math.log(2))


def test_bce_with_a_temperature_softens_both_sides():
    plugin = with_teacher(Distill(kind="bce", temperature=2.0), [[2.0]], [0])
    terms, _ = term(plugin, [[-4.0]])
    q, g = sigmoid(1.0), sigmoid(-2.0)
    assert terms["distill"].item() == pytest.approx(-(q * math.log(g) + (1 - q) * math.log(1 - g)), rel=1e-6)


def test_no_teacher_no_term_and_defaults():
    assert Distill().loss_terms(strategy=None, batch=None, output=None) is None
    assert (Distill().kind, Distill().temperature, Distill().weight) == ("kl", 2.0, 1.0)
    assert (Distill(kind="bce").temperature, LwFDistill().kind, LwFDistill().temperature) == (1.0, "kl", 2.0)
    assert Distill().replayed and not LwFDistill().replayed and LwFDistill().weight == 0.25


@pytest.mark.parametrize("kwargs", [dict(kind="l2"), dict(weight=-1.0), dict(weight=float("nan")),
                                    dict(temperature=0.0), dict(temperature=-2.0), dict(weight="1"),
                                    dict(replayed="no")])
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        Distill(**kwargs)


def test_two_distillers_of_the_old_logits_are_refused():
    with pytest.raises(PluginError, match="both own the role 'logit_distillation'"):
        build([Distill(kind="bce"), LwFDistill()])


# ----------------------------------------------------------------------------- teacher and runs
def build(plugins, n_classes=6, n_exp=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    bench = tiny_benchmark(n_classes, n_exp)
    model = MLP(8, [16], n_classes)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=plugins, epochs=2,
                 batch_size=16, seed=seed, **kwargs)
    return s, bench


class TeacherWatch(Plugin):
    """Records the teacher's weights when it is taken and checks them after every update."""

    def __init__(self, distill):
        self.distill, self.checks, self.student_moved = distill, 0, False

    @hookimpl
    def before_training_exp(self, strategy):
        self.start = None
        if self.distill.teacher is not None:
            teacher = self.distill.teacher
            assert teacher is not strategy.model and not teacher.training
            assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
            student = strategy.model.state_dict()
            self.start = {k: v.clone() for k, v in teacher.state_dict().items()}
            assert all(torch.equal(self.start[k], student[k]) for k in student)  # a copy of the grown model
            self.student_start = {k: v.clone() for k, v in student.items()}

    @hookimpl
    def after_update(self, strategy):
        if self.start is not None:
            now = self.distill.teacher.state_dict()
            assert all(torch.equal(self.start[k], now[k]) for k in self.start)
            self.checks += 1

    @hookimpl
    def after_training_exp(self, strategy):
        if self.start is not None:
            now = strategy.model.state_dict()
            self.student_moved |= any(not torch.equal(self.student_start[k], now[k]) for k in now)


@pytest.mark.parametrize("kind", ["kl", "bce"])
def test_teacher_is_frozen_while_the_student_trains(kind):
    distill = Distill(kind=kind)
    watch = TeacherWatch(distill)
    losses = []

    class Terms(Plugin):
        @hookimpl
        def after_training_iteration(self, strategy):
            losses.append(dict(strategy.loss_terms))

    s, bench = build([Replay(memory=12), distill, watch, Terms()])
    s.train(bench.train_stream[0])
    assert distill.teacher is None and all("distill" not in t for t in losses)  # nothing to distil yet
    for exp in bench.train_stream[1:]:
        s.train(exp)
    assert watch.checks == 2 * 2 * 3 and watch.student_moved  # 2 experiences x 2 epochs x 3 steps
    assert distill.old_classes == [0, 1, 2, 3, 4, 5]
    distilled = [t["distill"].item() for t in losses[6:]]
    assert len(distilled) == 12 and min(distilled) >= -1e-6 and max(distilled) > 0
    if kind == "kl":  # the first step of an experience: the student is the teacher
        assert abs(distilled[0]) < 1e-6 and abs(distilled[6]) < 1e-6


@pytest.mark.parametrize("plugin,sizes", [(Distill, [21, 21, 21, 17]), (LwFDistill, [16, 16, 16, 12])],
                         ids=["replayed", "current only"])
def test_which_samples_are_distilled(plugin, sizes):
    seen = []

    class Spy(plugin):
        def distillation(self, student, teacher):
            seen.append((len(student), student.shape[1]))
            return super().distillation(student, teacher)

    s, bench = build([Replay(memory=12, batch_size=5), Spy()], n_exp=2)
    for exp in bench.train_stream:
        s.train(exp)
    # 60 samples of classes 3-5 in batches of 16, 16, 16, 12, each joined by 5 replayed; old classes 0-2
    assert seen == [(n, 3) for n in sizes] * 2


def test_state_dict_round_trip_and_checkpoint_resume_continue_identically(tmp_path):
    def plugins():
        return [Replay(memory=12), LwFDistill()]

    s, bench = build(plugins())
    for exp in bench.train_stream:
        s.train(exp)
    straight = s.eval(bench.test_stream)

    s, bench = build(plugins(), seed=0)
    s.train(bench.train_stream[0])
    s.train(bench.train_stream[1])
    s.save_checkpoint(tmp_path / "mid.pt")
    state = s.plugins[1].state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    copy = LwFDistill()
    copy.load_state_dict(torch.load(buf, weights_only=False))
    assert copy.old_classes == [0, 1, 2, 3] and copy.teacher is not s.plugins[1].teacher
    x = bench.test_stream[0].dataset.x[:5]
    assert torch.equal(copy.teacher(x), s.plugins[1].teacher(x))

    r, _ = build(plugins(), seed=0)
    r.load_checkpoint(tmp_path / "mid.pt")
    r.train(bench.train_stream[2])
    assert r.eval(bench.test_stream)["accuracy"] == straight["accuracy"]


def test_checkpoint_inside_an_experience_keeps_the_teacher(tmp_path, monkeypatch):
    def plugins():
        return [Replay(memory=12), Distill(kind="bce")]

    s, bench = build(plugins(), n_exp=2)
    for exp in bench.train_stream:
        s.train(exp)
    straight = s.eval(bench.test_stream)["accuracy"]

    s, bench = build(plugins(), n_exp=2, checkpoint_dir=tmp_path, checkpoint_every=1)
    with monkeypatch.context() as m:
        crash_at_step(m, 11)  # steps 1-8 train experience 0; the checkpoint of step 10 is inside experience 1
        with pytest.raises(Crash):
            for exp in bench.train_stream:
                s.train(exp)
    r, _ = build(plugins(), n_exp=2, checkpoint_dir=tmp_path)
    r.load_checkpoint()
    assert r.plugins[1].teacher is not None and r.global_step == 10
    r.train(bench.train_stream[1])
    assert r.eval(bench.test_stream)["accuracy"] == straight


def test_distillation_under_a_task_mask_uses_the_models_own_logits():
    """Task-incremental: the mask hides the old heads from the adapted logits; the term reads the raw ones."""
    from streamcl.plugins import TaskMask
    from streamcl.scenarios import class_incremental
    from tests.synthetic import blobs
    torch.manual_seed(0)
    bench = class_incremental(blobs(n_classes=4), blobs(10, 4, seed=1), 2, task_labels=True)
    model = MLP(8, [16], 4)
    terms = []

    class Spy(Plugin):
        @hookimpl
        def after_training_iteration(self, strategy):
            terms.append(strategy.loss_terms.get("lwf"))

    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[TaskMask(), LwFDistill(), Spy()],
                 batch_size=16, seed=0)
    s.train(bench.train_stream)
    later = [t for t in terms if t is not None]
    assert later and all(torch.isfinite(t) for t in later) and later[0] == 0 and later[-1] > 0  # 0 at the start


def test_the_teacher_gets_the_task_labels_when_the_model_takes_them():
    """A multi-head model (forward(x, task_labels)): the engine's forward passes the minibatch's task labels to
    the teacher too, so the distilled logits are those of each sample's own head."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(3, 2), nn.Linear(3, 2)])

        def forward(self, x, task_labels):
            return torch.stack([self.heads[int(t)](r) for r, t in zip(x, task_labels)])

    torch.manual_seed(0)
    model = TwoHeads()
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1))
    plugin = Distill(kind="bce")
    plugin.load_state_dict({"old_classes": [0, 1], "teacher": model, "teacher_state": model.state_dict()})
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    batch = Batch(x, torch.zeros(4, dtype=torch.long), t)
    strategy.n_current = 4
    z = torch.tensor([[1.0, -2.0]] * 4)  # the student's logits
    terms = plugin.loss_terms(strategy=strategy, batch=batch, output=Output(z, None, z))
    with torch.no_grad():  # each sample's own head, by hand
        q = torch.sigmoid(torch.stack([model.heads[int(k)](r) for r, k in zip(x, t)]))
    g = torch.sigmoid(z)
    by_hand = -(q * g.log() + (1 - q) * (1 - g).log()).sum(1).mean()
    assert terms["distill"].item() == pytest.approx(by_hand.item(), rel=1e-6)
