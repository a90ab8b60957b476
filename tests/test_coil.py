"""COIL: Sinkhorn plan, prospective initialisation, both transport terms by hand; refusals; state."""
import io
import math

import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, Output, Plugin, PluginError, Strategy, hookimpl
from streamcl.models import MLP
from streamcl.models.nets import Classifier
from streamcl.plugins.coil import COIL, sinkhorn_plan, transport_kl, transport_rows, transported_logits
from streamcl.plugins.latent_replay import LatentReplay
from streamcl.plugins.replay import Replay
from tests.conftest import image_benchmark, sequential, warns_once_when_no_class_is_new
from tests.synthetic import tiny_benchmark
from tests.test_distill import Fixed  # a teacher that answers the same logits for any input
from tests.test_wa import RowlessHead  # a linear head without weight rows
from tests.conftest import NoHead


# ----------------------------------------------------------------------------- the plan
def test_sinkhorn_plan_has_the_uniform_marginals_and_the_gibbs_form():
    cost = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.5, 1.0]])
    reg = 0.5
    plan = sinkhorn_plan(cost, reg)
    assert plan.dtype == torch.float64 and plan.shape == (2, 3) and (plan > 0).all()
    assert torch.allclose(plan.sum(1), torch.full((2,), 1 / 2, dtype=torch.float64), atol=1e-10)  # a
    assert torch.allclose(plan.sum(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-10)  # b
    # entropic OT: plan = diag(u) exp(-M / reg) diag(v), so log(plan) + M / reg = f_i + g_j
    A = plan.log() + cost.double() / reg
    assert torch.allclose(A - A[:, :1] - A[:1, :] + A[0, 0], torch.zeros(2, 3, dtype=torch.float64), atol=1e-9)


def test_sinkhorn_plan_in_closed_form_on_two_by_two():
    # uniform 1/2 marginals: plan = [[p, 1/2 - p], [1/2 - p, p]] with p^2 / (1/2 - p)^2 = exp(-(0 + 0 - 1 - 1) / 1)
    plan = sinkhorn_plan(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), 1.0)
    p = math.e / (2 * (1 + math.e))
    assert torch.allclose(plan, torch.tensor([[p, 0.5 - p], [0.5 - p, p]], dtype=torch.float64), atol=1e-10)


def test_a_tiny_regulariser_gives_the_assignment_and_stays_finite():
    cost = torch.tensor([[0.1, 0.9, 0.8], [0.7, 0.2, 0.9], [0.9, 0.8, 0.05]])
    plan = sinkhorn_plan(cost, 1e-4)  # exp(-M / reg) underflows in the plain domain; the log domain copes
    assert torch.isfinite(plan).all()
    assert torch.allclose(plan, torch.eye(3, dtype=torch.float64) / 3, atol=1e-6)


# ----------------------------------------------------------------------------- prospective transport
def test_transport_rows_by_hand():
    weight = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # old rows: norms 3 and 1, mean 2
    bias = torch.tensor([1.0, -1.0])
    plan = torch.tensor([[0.375, 0.125], [0.125, 0.375]], dtype=torch.float64)  # (old, new)
    rows, b = transport_rows(weight, bias, plan, 2.0)
    # columns normalised: (0.75, 0.25) and (0.25, 0.75) over the normalised rows (1, 0), (0, 1)
    s = 2 / math.sqrt(0.75 ** 2 + 0.25 ** 2)  # both carried rows have norm sqrt(0.625): calibrated to 2
    assert torch.allclose(rows, torch.tensor([[0.75 * s, 0.25 * s], [0.25 * s, 0.75 * s]]), atol=1e-6)
    assert torch.allclose(rows.norm(dim=1).mean(), torch.tensor(2.0))
    assert torch.allclose(b, torch.tensor([0.5, -0.5]), atol=1e-7)  # 0.75 - 0.25, 0.25 - 0.75
    # the column sums do not matter (the plan's b), only each column's shares
    rows3, b3 = transport_rows(weight, bias, plan * torch.tensor([1.0, 3.0], dtype=torch.float64), 2.0)
    assert torch.allclose(rows3, rows) and torch.allclose(b3, b)
    assert transport_rows(weight, None, plan, 2.0)[1] is None


def build(plugins, n_classes=6, n_exp=3, seed=0, model=None, **kwargs):
    torch.manual_seed(seed)
    bench = tiny_benchmark(n_classes, n_exp)
    model = model if model is not None else MLP(8, [16], n_classes)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=plugins, epochs=2,
                 batch_size=16, seed=seed, **kwargs)
    return s, bench


class Rows(Plugin):
    """Copies the head's rows (and momentum) at before_training_exp."""

    def __init__(self, coil=None):
        self.seen, self.coil, self.plans = [], coil, []

    @hookimpl
    def before_training_exp(self, strategy):
        head = strategy.head
        buf = strategy.optimizer.state.get(head.weight, {}).get("momentum_buffer")
        self.seen.append((head.weight.detach().clone(), head.bias.detach().clone(),
                          None if buf is None else buf.clone()))
        self.model = {k: v.clone() for k, v in strategy.model.state_dict().items()}
        memory = strategy.owner("memory").memory
        self.memory = None if memory is None else Batch(*(t.clone() for t in memory.batch()))
        if self.coil is not None:
            self.plans.append(None if self.coil.plan is None else self.coil.plan.clone())


def prototypes(features, x, y, classes):
    """By hand: per class, the normalised mean of the normalised features of its samples."""
    with torch.no_grad():
        phi = nn.functional.normalize(features(x), dim=1)
    return torch.stack([nn.functional.normalize(phi[y == c].mean(0), dim=0) for c in classes])


def test_prospective_initialisation_of_the_new_rows_in_a_run():
    replay, coil, before = Replay(memory=12), COIL(), Rows()
    after = Rows(coil)
    s, bench = build([replay, before, coil, after])
    s.train(bench.train_stream[0])
    assert after.plans == [None]  # nothing old to transport from
    assert torch.equal(before.seen[0][0], after.seen[0][0])
    s.train(bench.train_stream[1])
    assert coil.old.tolist() == [0, 1] and coil.new.tolist() == [2, 3]
    # the plan by hand: prototypes of the memory's old exemplars and of the experience's data, before training
    w0, b0, _ = before.seen[1]
    model = MLP(8, [16], 6)
    model.load_state_dict(before.model)
    data = bench.train_stream[1].dataset
    assert sorted(before.memory.y.unique().tolist()) == [0, 1]
    old_p = prototypes(model.backbone, before.memory.x, before.memory.y, [0, 1])
    new_p = prototypes(model.backbone, data.x, data.y, [2, 3])
    plan = sinkhorn_plan(torch.cdist(old_p.double(), new_p.double(), p=3.0), 0.464)
    assert torch.allclose(after.plans[1], plan, atol=1e-12)
    w1, b1, buf1 = after.seen[1]
    rows, bias = transport_rows(w0[:2], b0[:2], plan, w0[:2].norm(dim=1).mean())
    assert torch.allclose(w1[2:4], rows, atol=1e-6) and torch.allclose(b1[2:4], bias, atol=1e-6)
    assert torch.equal(w1[:2], w0[:2]) and torch.equal(w1[4:], w0[4:])  # old and future rows untouched
    assert torch.equal(b1[:2], b0[:2]) and torch.equal(b1[4:], b0[4:])
    assert (buf1[2:4] == 0).all() and torch.equal(buf1[:2], before.seen[1][2][:2])  # the replaced rows' momentum
    assert torch.allclose(w1[2:4].norm(dim=1).mean(), w0[:2].norm(dim=1).mean())


def test_no_initialisation_with_init_false():
    before, after = Rows(), Rows()
    s, bench = build([Replay(memory=12), before, COIL(init=False), after])
    for exp in bench.train_stream[:2]:
        s.train(exp)
    assert all(torch.equal(a, b) for a, b in zip(before.seen[1][:2], after.seen[1][:2]))


# ----------------------------------------------------------------------------- the terms by hand
def test_transported_logits_use_the_head_with_the_rows_replaced():
    head = nn.Linear(2, 5)
    f = torch.tensor([[1.0, 2.0]])
    out = transported_logits(head, torch.tensor([[1.0, 0.0], [0.0, -1.0]]), torch.tensor([0.5, 0.0]), f)
    assert out.tolist() == [[1.5, -2.0]]
    assert head.weight.shape == (5, 2)  # the head itself is unchanged


def test_transport_kl_by_hand():
    # T = 2: student (1, 0.5) -> softmax(0.5, 0.25); target (0, 0.5) -> softmax(0, 0.25)
    a = 1 / (1 + math.exp(-0.25))  # softmax of two logits 0.25 apart
    b = 1 - a
    value = transport_kl(torch.tensor([[0.0, 0.5]]), torch.tensor([[1.0, 0.5]]), 2.0)
    assert value.item() == pytest.approx(b * math.log(b / a) + a * math.log(a / b), rel=1e-6)
    assert value.item() == pytest.approx((a - b) * math.log(a / b), rel=1e-6)


def strategy_at(epoch, iteration=1, epochs=2):
    """A strategy at this point of training, on a model whose features are its inputs."""
    model = Classifier(nn.Identity(), nn.Linear(2, 4), 2)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=epochs, seed=0)
    s.epoch, s.iteration, s.n_current = epoch, iteration, 1
    return s


def coil_with(**kwargs):
    coil = COIL(**kwargs)
    coil.load_state_dict({"old_classes": [0, 1], "teacher": Fixed([[0.0, 0.5, 9.0, 9.0]]),
                          "teacher_state": {"logits": torch.tensor([[0.0, 0.5, 9.0, 9.0]])},
                          "plan": torch.full((2, 2), 0.25, dtype=torch.float64),
                          "old": torch.tensor([0, 1]), "new": torch.tensor([2, 3]),
                          "forward_rows": (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0.0, 0.0])),
                          "backward_rows": (torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0.0, 0.5]))})
    return coil


def test_retrospective_term_by_hand():
    coil = coil_with(rt_weight=2.0)
    f = torch.tensor([[0.5, 0.0]], requires_grad=True)  # transported old logits: (2 * 0.5, 0 + 0.5) = (1, 0.5)
    z = torch.tensor([[7.0, 7.0, 7.0, 7.0]], requires_grad=True)
    batch = Batch(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    terms = coil.loss_terms(strategy=strategy_at(1), batch=batch, output=Output(z, f, z))
    a = 1 / (1 + math.exp(-0.25))
    kl = (a - 1 + a) * math.log(a / (1 - a))  # teacher (0, 0.5) on the old classes against (1, 0.5), T = 2
    assert set(terms) == {"coil"}
    assert terms["coil"].item() == pytest.approx(2.0 * (1 / 2) ** 2 * kl, rel=1e-6)  # weight (e / E)^2
    terms["coil"].backward()
    assert z.grad is None and f.grad is not None and f.grad.abs().sum() > 0  # through the features only


def test_prospective_term_by_hand_in_the_first_epoch():
    coil = coil_with(pt_weight=3.0)
    f = torch.tensor([[1.0, 0.5]], requires_grad=True)  # transported new logits (1, 0.5): the target
    z = torch.tensor([[9.0, 9.0, 0.0, 0.5]], requires_grad=True)  # the model's new-class logits (0, 0.5)
    batch = Batch(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    terms = coil.loss_terms(strategy=strategy_at(0), batch=batch, output=Output(z, f, z))
    a = 1 / (1 + math.exp(-0.25))
    assert terms["coil"].item() == pytest.approx(3.0 * (2 * a - 1) * math.log(a / (1 - a)), rel=1e-6)
    terms["coil"].backward()
    assert f.grad is None and z.grad[0, :2].abs().sum() == 0 and z.grad[0, 2:].abs().sum() > 0


def test_no_terms_without_a_plan_or_with_zero_weights():
    f, z = torch.zeros(1, 2), torch.zeros(1, 4)
    assert COIL().loss_terms(strategy=strategy_at(0), batch=None, output=Output(z, f, z)) is None
    assert coil_with(pt_weight=0.0).loss_terms(strategy=strategy_at(0), batch=None, output=Output(z, f, z)) is None
    assert coil_with(rt_weight=0.0).loss_terms(strategy=strategy_at(1), batch=None, output=Output(z, f, z)) is None


def test_terms_in_a_run_first_epoch_prospective_then_retrospective():
    logged = []

    class Terms(Plugin):
        @hookimpl
        def after_training_iteration(self, strategy):
            value = strategy.loss_terms.get("coil")
            logged.append((strategy.experience.index, strategy.epoch, -1.0 if value is None else value.item()))

    coil = COIL(pt_weight=1.0, rt_weight=1.0, refresh=2)
    s, bench = build([Replay(memory=12), coil, Terms()])
    for exp in bench.train_stream:
        s.train(exp)
    assert all(v == -1 for e, _, v in logged if e == 0)
    later = [v for e, _, v in logged if e > 0]
    assert len(later) == 12 and min(later) >= -1e-6 and max(later) > 0
    assert coil.teacher is None and coil.old_classes == [0, 1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs", [dict(sinkhorn_reg=0.0), dict(sinkhorn_reg=-1.0), dict(sinkhorn_reg=float("inf")),
                                    dict(cost_norm=0.5), dict(cost_norm="2"), dict(pt_weight=-1.0),
                                    dict(rt_weight=10.5), dict(rt_weight=float("nan")), dict(temperature=0.0),
                                    dict(temperature=0.5),
                                    dict(refresh=0), dict(refresh=2.5), dict(refresh=True), dict(init="yes"),
                                    dict(pt_weight=True)])
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError, match="COIL"):
        COIL(**kwargs)


def test_a_strategy_without_a_memory_is_refused():
    with pytest.raises(PluginError, match="needs a plugin that owns the role 'memory'"):
        build([COIL()])


def test_plugins_that_rebuild_the_model_are_refused_by_role():
    with pytest.raises(PluginError, match="both own the role 'architecture'"):
        build([LatentReplay(), COIL()])


@pytest.mark.parametrize("model,match", [
    (NoHead(), r"COIL\(\) needs the model's classifier head"),  # no head found
    (Classifier(nn.Identity(), RowlessHead(8, 6), 8), r"COIL works on the rows of the classifier head's weight"),
])
def test_a_model_without_a_linear_head_with_weight_rows_is_refused_at_construction(model, match):
    with pytest.raises(ConfigError, match=match):
        build([Replay(memory=12), COIL()], model=model)


def test_a_plain_sequential_transports_the_rows_of_its_last_linear():
    torch.manual_seed(0)
    model = sequential(4)
    coil, before = COIL(pt_weight=1.0, rt_weight=1.0, refresh=1), Rows()
    after = Rows(coil)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                 plugins=[Replay(memory=8), before, coil, after], epochs=2, batch_size=8, seed=0)
    bench = image_benchmark()
    s.train(bench.train_stream[0])
    s.train(bench.train_stream[1])
    assert coil.old.tolist() == [0, 1] and coil.new.tolist() == [2, 3]
    frozen_model = sequential(4)  # the model before the experience; features: the input of its last Linear
    frozen_model.load_state_dict(before.model)
    old_p = prototypes(frozen_model[:5], before.memory.x, before.memory.y, [0, 1])
    data = bench.train_stream[1].dataset
    new_p = prototypes(frozen_model[:5], data.x[data.y >= 2], data.y[data.y >= 2], [2, 3])
    plan = sinkhorn_plan(torch.cdist(old_p.double(), new_p.double(), p=3.0), 0.464)
    assert torch.allclose(after.plans[1], plan, atol=1e-9)
    w0, b0, _ = before.seen[1]
    rows, bias = transport_rows(w0[:2], b0[:2], plan, w0[:2].norm(dim=1).mean())
    w1, b1, _ = after.seen[1]
    assert torch.allclose(w1[2:4], rows, atol=1e-6) and torch.allclose(b1[2:4], bias, atol=1e-6)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_largest_weights_in_range_stay_finite():
    coil = COIL(pt_weight=10.0, rt_weight=10.0, sinkhorn_reg=1e-3, temperature=1.0)
    s, bench = build([Replay(memory=12), coil])
    for exp in bench.train_stream:
        s.train(exp)
    assert all(torch.isfinite(p).all() for p in s.model.parameters())


# ----------------------------------------------------------------------------- state
class StopAfter(Exception):
    pass


def test_state_dict_round_trip_mid_experience():
    coil = COIL(refresh=2)
    states = []

    class Grab(Plugin):
        @hookimpl
        def after_training_iteration(self, strategy):
            if strategy.experience.index == 1 and strategy.epoch == 1 and strategy.iteration == 1:
                buf = io.BytesIO()
                torch.save(coil.state_dict(), buf)  # a checkpoint pickles it
                buf.seek(0)
                states.append(torch.load(buf, weights_only=False))
                raise StopAfter

    s, bench = build([Replay(memory=12), coil, Grab()])
    s.train(bench.train_stream[0])
    with pytest.raises(StopAfter):
        s.train(bench.train_stream[1])
    state = states[0]
    assert state["teacher"] is not None and state["backward_rows"] is not None and state["forward_rows"] is not None
    other = COIL(refresh=2)
    other.load_state_dict(state)
    again = other.state_dict()
    assert again["old_classes"] == [0, 1] and torch.equal(again["plan"], coil.plan)
    for key in ("old", "new"):
        assert torch.equal(again[key], getattr(coil, key))
    for key in ("forward_rows", "backward_rows"):
        assert all(torch.equal(a, b) for a, b in zip(again[key], getattr(coil, key)))
    assert all(torch.equal(v, coil.teacher.state_dict()[k]) for k, v in other.teacher.state_dict().items())
    assert other.teacher is not state["teacher"] and not any(p.requires_grad for p in other.teacher.parameters())
    # the copies are the plugin's own: changing the loaded state leaves the original alone
    other.backward_rows[0].add_(1.0)
    assert not torch.equal(other.backward_rows[0], coil.backward_rows[0])


def test_an_experience_with_no_new_class_is_warned_about_once():
    s, bench = build([Replay(memory=12), COIL()])
    warns_once_when_no_class_is_new(s, bench, "COIL: experience 1 brings no class not seen before")
