"""Ensemble: one independent copy of the initial model per experience; the combination checked by hand."""
import copy
import math

import torch
from torch import nn

from streamcl import Batch, Plugin, Strategy, hookimpl
from streamcl.models import MLP
from streamcl.plugins.ensemble import Ensemble, EnsembleNet, MemberHeads
from streamcl.scenarios import class_incremental, task_incremental
from tests.conftest import NoHead
from tests.synthetic import blobs

INF = float("-inf")


def lse(*v: float) -> float:
    return math.log(sum(math.exp(a) for a in v))


def hand_heads(classes=((0, 1), (2, 3)), tasks=(0, 1)) -> MemberHeads:
    """Two members on 2 features each; member k's head gives ``z_k = (f_k1, f_k2, f_k1 + f_k2, -f_k1)`` of its slice."""
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    heads = MemberHeads(nn.Linear(2, 4), 2, 4)
    heads.heads.append(nn.Linear(2, 4))
    heads.widths.append(2)
    for k, head in enumerate(heads.heads):
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.zero_()
        heads.set_classes(k, tasks[k], classes[k], "cpu")
    return heads.eval()


def test_class_incremental_rows_concatenate_each_members_log_softmax_over_its_own_classes():
    heads = hand_heads(tasks=(None, None))
    f = torch.tensor([[1.0, 2.0, 0.0, 3.0]])  # member 0 sees (1, 2), member 1 sees (0, 3)
    out = heads(f)[0].tolist()
    # member 0: z = (1, 2, 3, -1) on classes 0, 1 -> (1, 2); member 1: z = (0, 3, 3, 0) on classes 2, 3 -> (3, 0)
    expected = [1 - lse(1, 2), 2 - lse(1, 2), 3 - lse(3, 0), 0 - lse(3, 0)]
    assert all(abs(a - b) < 1e-6 for a, b in zip(out, expected))
    assert heads.allowed(torch.tensor([0])).tolist() == [[True, True, True, True]]


def test_a_row_of_a_members_task_is_that_members_alone():
    heads = hand_heads()
    f = torch.tensor([[1.0, 2.0, 0.0, 3.0]] * 3)
    out = heads(f, torch.tensor([0, 1, 4])).tolist()  # task 4 has no member: every member, pooled
    a, b = [1 - lse(1, 2), 2 - lse(1, 2)], [3 - lse(3, 0), 0 - lse(3, 0)]
    for row, expected in zip(out, ([*a, 0.0, 0.0], [0.0, 0.0, *b], [*a, *b])):
        assert all(abs(x - y) < 1e-6 for x, y in zip(row, expected))
    assert heads.allowed(torch.tensor([0, 1, 4])).tolist() == [[True, True, False, False], [False, False, True, True],
                                                               [True, True, True, True]]


def test_a_class_two_members_hold_pools_their_probabilities_and_training_takes_the_latest():
    heads = hand_heads(classes=((0, 1), (1, 2)), tasks=(None, None))
    f = torch.tensor([[1.0, 2.0, 0.0, 3.0]])
    # member 0 on classes 0, 1: z (1, 2); member 1 on classes 1, 2: z (3, 3)
    s0, s1 = [1 - lse(1, 2), 2 - lse(1, 2)], [3 - lse(3, 3), 3 - lse(3, 3)]
    out = heads(f)[0].tolist()
    expected = [s0[0], math.log(math.exp(s0[1]) + math.exp(s1[0])), s1[1], 0.0]
    assert all(abs(a - b) < 1e-6 for a, b in zip(out, expected))
    out = heads.train()(f)[0].tolist()  # in training the member in training scores its classes alone
    assert all(abs(a - b) < 1e-6 for a, b in zip(out, [s0[0], s1[0], s1[1], 0.0]))


def test_the_training_loss_is_the_newest_members_own_cross_entropy():
    """Pooled over disjoint members, -log_softmax(out)[y] = -s_k(y) + log(members): the same gradient."""
    heads = hand_heads(tasks=(None, None)).train()
    f = torch.tensor([[1.0, 2.0, 0.5, 3.0]], requires_grad=True)
    loss = nn.functional.cross_entropy(heads(f), torch.tensor([3]))
    own = -heads.scores(f)[1][0, 1]
    assert abs(float(loss.detach()) - float(own.detach()) - math.log(2)) < 1e-6
    g1 = torch.autograd.grad(loss, f)[0]
    g2 = torch.autograd.grad(own, f)[0]
    assert torch.allclose(g1, g2, atol=1e-6) and g1[0, :2].abs().max() < 1e-6  # member 0's features: no gradient


def _stream(task: bool = True, n_classes: int = 4):
    make = task_incremental if task else class_incremental
    return make(blobs(n_classes=n_classes), blobs(10, n_classes, seed=1), n_classes // 2)


class Spy(Plugin):
    """Keeps the newest member's weights at the start of each experience and the members' modes in training."""

    def __init__(self):
        self.starts, self.modes = [], []

    @hookimpl
    def before_training_exp(self, strategy):
        net = strategy.model
        body, head = net.member(len(net.bodies) - 1)
        self.starts.append({**{k: v.clone() for k, v in body.state_dict().items()},
                            **{f"head.{k}": v.clone() for k, v in head.state_dict().items()}})

    @hookimpl
    def after_forward(self, strategy):
        self.modes.append([b.training for b in strategy.model.bodies])


def _strategy(model=None, plugins=(), task: bool = True, lr_head: float | None = None):
    model = MLP(8, [16], 4) if model is None else model
    if lr_head is None:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.SGD([{"params": model.backbone.parameters()},
                               {"params": model.head.parameters(), "lr": lr_head}], lr=0.1, momentum=0.9)
    return Strategy(model, opt, plugins=[Ensemble(), *plugins], batch_size=16, epochs=3, seed=0)


def test_each_member_starts_from_the_initial_weights_and_learns_only_its_experience():
    torch.manual_seed(0)
    model = MLP(8, [16], 4)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    spy = Spy()
    s, bench = _strategy(model, [spy], lr_head=0.05), _stream()
    s.train(bench.train_stream[0])
    member0 = [p.detach().clone() for m in s.model.member(0) for p in m.parameters()]
    s.train(bench.train_stream[1])
    net = s.model
    assert isinstance(net, EnsembleNet) and len(net.bodies) == 2 and s.head is net.head and s.head_path == "head"
    for start in spy.starts:  # member k at the start of experience k: the model's initial weights
        assert sorted(start) == sorted(initial) and all(torch.equal(start[k], initial[k]) for k in initial)
    assert all(torch.equal(p, q) for p, q in zip((p for m in net.member(0) for p in m.parameters()), member0))
    assert all(not p.requires_grad for m in net.member(0) for p in m.parameters())
    assert spy.modes[-1] == [False, True]  # the frozen member trains in evaluation mode
    groups = [{id(p) for p in g["params"]} for g in s.optimizer.param_groups]
    assert all(id(p) in groups[0] for p in net.bodies[1].parameters())
    assert all(id(p) in groups[1] for p in net.head.heads[1].parameters())  # the head's group (lr 0.05)
    n = sum(p.numel() for p in MLP(8, [16], 4).parameters())
    assert s.plugins[0].parameters_per_experience == [n, 2 * n] and s.feature_dim == 32
    assert min(s.eval(bench.test_stream)["accuracy"]) > 0.9


def test_prediction_masks_what_the_row_cannot_be_and_the_raw_output_stays_finite():
    torch.manual_seed(0)
    s, bench = _strategy(), _stream()
    for exp in bench.train_stream:
        s.train(exp)
    x = bench.test_stream[0].dataset.x[:2]
    out = s.infer(Batch(x, torch.zeros(2, dtype=torch.long), torch.tensor([0, 1])))
    assert torch.isfinite(out.raw).all() and out.raw[0, 2:].eq(0).all() and out.raw[1, :2].eq(0).all()
    assert out.logits[0, 2:].eq(INF).all() and out.logits[1, :2].eq(INF).all()
    assert torch.equal(out.logits[0, :2], out.raw[0, :2])
    with torch.no_grad():  # member 0 alone, its log-softmax over classes 0 and 1
        z = s.model.head.heads[0](s.model.bodies[0](x))[:, :2].log_softmax(1)
    assert torch.allclose(out.raw[0, :2], z[0])


def test_class_incremental_prediction_pools_the_members():
    torch.manual_seed(0)
    s, bench = _strategy(task=False), _stream(task=False)
    for exp in bench.train_stream:
        s.train(exp)
    acc = s.eval(bench.test_stream)["accuracy"]
    assert all(a > 0.5 for a in acc)
    x = bench.test_stream[0].dataset.x[:3]
    with torch.no_grad():
        s0 = s.model.head.heads[0](s.model.bodies[0](x))[:, [0, 1]].log_softmax(1)
        s1 = s.model.head.heads[1](s.model.bodies[1](x))[:, [2, 3]].log_softmax(1)
    assert torch.allclose(s.predict(x), torch.cat([s0, s1], 1), atol=1e-6)


def test_a_model_without_a_head_is_a_member_whole():
    torch.manual_seed(0)
    model = NoHead()  # Linear(8, 6) the engine does not take for a head
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[Ensemble()], batch_size=16, epochs=3,
                 seed=0)
    bench = task_incremental(blobs(n_classes=6), blobs(10, 6, seed=1), 3)
    for exp in bench.train_stream:
        s.train(exp)
    net = s.model
    assert all(isinstance(h, nn.Identity) for h in net.head.heads) and len(net.bodies) == 3
    assert s.plugins[0].parameters_per_experience == [54, 108, 162]
    assert min(s.eval(bench.test_stream)["accuracy"]) > 0.9


class Doubled(nn.Module):
    """A head whose output is not the model's: the model doubles it."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 4)

    def forward(self, x):
        return 2 * self.head(self.body(x))


def test_a_head_whose_output_is_not_the_models_keeps_the_member_whole():
    torch.manual_seed(0)
    model = Doubled()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[Ensemble()], batch_size=16, seed=0)
    bench = _stream()
    s.train(bench.train_stream[0])
    assert isinstance(s.model.head.heads[0], nn.Identity) and s.model.bodies[0] is model
    x = bench.test_stream[0].dataset.x[:2]
    with torch.no_grad():
        expected = model(x)[:, :2].log_softmax(1)
    assert torch.allclose(s.predict(x)[:, :2], expected)


def test_a_checkpoint_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    a, bench = _strategy(), _stream()
    a.train(bench.train_stream[0])
    path = a.save_checkpoint(tmp_path / "one.pt")
    a.train(bench.train_stream[1])
    torch.manual_seed(5)  # another initial model: member 1 still copies the first run's initial weights
    b = _strategy()
    b.load_checkpoint(path)
    b.train(bench.train_stream[1])
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.eval(bench.test_stream)["accuracy"] == b.eval(bench.test_stream)["accuracy"]
    assert copy.deepcopy(a.plugins[0].state_dict())["parameters_per_experience"] == \
        b.plugins[0].state_dict()["parameters_per_experience"]
