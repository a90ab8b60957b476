"""Progress & Compress: lateral wiring, frozen knowledge base while progressing, compression by distillation,
online-EWC decay by hand, refusals."""
import math
import warnings

import pytest
import torch
from torch.nn import functional as F

from torch import nn

from streamcl import Batch, Plugin, Strategy, hookimpl
from streamcl.errors import ConfigError
from streamcl.models import MLP, SmallCNN
from streamcl.parts import capture_input
from streamcl.plugins.progress_compress import ProgressCompress, ProgressCompressNet, check_model, kl_on_finite
from tests.conftest import USER_MODELS
from tests.synthetic import tiny_benchmark


def wrapped(seed: int = 0, hidden=(16, 16), growing: bool = False) -> ProgressCompressNet:
    torch.manual_seed(seed)
    model = MLP(8, hidden, 4, growing=growing)
    return ProgressCompressNet(model, check_model(model, "head"), torch.Generator().manual_seed(seed), 0.1, None)


def strategy(plugins, seed: int = 0, hidden=(16,), n_classes: int = 4):
    torch.manual_seed(seed)
    model = MLP(8, list(hidden), n_classes)
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=plugins,
                    epochs=2, batch_size=16, seed=seed)


# ------------------------------------------------------------------------------ wiring (eq. 1)
def test_the_active_column_is_eq_1_by_hand():
    net = wrapped()
    x = torch.randn(5, 8)
    kb, ac, (l2, lh) = net.kb, net.ac, net.laterals
    h1 = F.relu(kb.backbone[1](x))
    h2 = F.relu(kb.backbone[3](h1))
    a1 = F.relu(x @ ac.backbone[1].weight.T + ac.backbone[1].bias)
    lat2 = l2.alpha * (F.relu(h1 @ l2.V.weight.T + l2.V.bias) @ l2.U.T)
    a2 = F.relu(a1 @ ac.backbone[3].weight.T + ac.backbone[3].bias + lat2)
    lath = lh.alpha * (F.relu(h2 @ lh.V.weight.T + lh.V.bias) @ lh.U.T)
    expected = a2 @ ac.head.weight.T + ac.head.bias + lath
    with capture_input(net.head) as box:  # while progressing the engine's head is the column's, with its lateral
        logits = net(x)
    assert torch.allclose(logits, expected, atol=1e-6) and torch.allclose(box[0], a2, atol=1e-6)
    assert l2.V.in_features == 16 and l2.U.shape == (16, 16) and lh.U.shape == (4, 16)


def test_the_active_column_reads_the_knowledge_base_only_through_the_adaptors():
    net, x = wrapped(), torch.randn(6, 8)
    before = net(x)
    with torch.no_grad():
        net.kb.backbone[1].weight.add_(1.0)  # the KB's hidden activations change
    assert not torch.allclose(net(x), before)
    with torch.no_grad():
        for lateral in net.laterals:
            lateral.alpha.zero_()
        without = net(x)
        net.kb.backbone[1].weight.sub_(3.0)
    assert torch.equal(net(x), without)  # alpha = 0 cuts the KB off


def test_the_knowledge_base_never_reads_the_active_column():
    net, x = wrapped(), torch.randn(6, 8)
    net.progress = False
    before = net(x)
    assert torch.equal(before, net.kb(x))
    with torch.no_grad():
        for p in net.column_parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(net(x), before)


def test_the_column_is_reinitialised_from_the_generator():
    a, b = wrapped(0), wrapped(0)
    assert all(torch.equal(p, q) for p, q in zip(a.column_parameters(), b.column_parameters()))
    # the AC is a fresh initialisation, not a copy of the KB
    assert not torch.equal(a.ac.backbone[1].weight, a.kb.backbone[1].weight)
    bound = 1 / math.sqrt(8)
    assert a.ac.backbone[1].weight.abs().max() <= bound


def test_a_growing_head_grows_its_lateral_too():
    from streamcl.models import grow_heads
    net = wrapped(growing=True)
    assert net.laterals[-1].U.shape[0] == 0
    grow_heads(net, 3)
    assert net.kb.head.out_features == net.ac.head.out_features == 3
    assert net.laterals[-1].U.shape == (3, 16) and net.laterals[-1].alpha.shape == (3,)
    assert net(torch.randn(2, 8)).shape == (2, 3)


# ------------------------------------------------------------------------------ phases
class Probe(Plugin):
    """Records the knowledge base at the start of the progress phase and checks it at every epoch's end."""

    def __init__(self):
        self.kb, self.ac, self.epochs_checked, self.frozen = None, None, 0, []

    @hookimpl
    def before_training_exp(self, strategy):
        net = strategy.model
        self.kb = {k: v.clone() for k, v in net.kb.state_dict().items()}
        self.ac = {k: v.clone() for k, v in net.ac.state_dict().items()}
        self.frozen.append(all(not p.requires_grad for p in net.kb.parameters()))
        assert all(id(p) in {id(q) for g in strategy.optimizer.param_groups for q in g["params"]}
                   for p in net.column_parameters())

    @hookimpl
    def after_training_epoch(self, strategy):
        net = strategy.model
        assert all(torch.equal(v, self.kb[k]) for k, v in net.kb.state_dict().items())
        assert not all(torch.equal(v, self.ac[k]) for k, v in net.ac.state_dict().items())
        self.epochs_checked += 1


def test_the_knowledge_base_is_unchanged_while_progressing_and_evaluation_uses_it():
    bench = tiny_benchmark(6, 3)
    probe, pc = Probe(), ProgressCompress(lambda_=1.0)
    s = strategy([pc, probe], n_classes=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.train(bench.train_stream)
    assert probe.epochs_checked == 6 and probe.frozen == [True, True, True]
    net = s.model
    assert isinstance(net, ProgressCompressNet) and not net.progress  # evaluation runs the KB
    assert any(not torch.equal(v, probe.kb[k]) for k, v in net.kb.state_dict().items())  # compress moved it
    x = bench.test_stream[0].dataset.x
    assert torch.equal(net(x), net.kb(x))
    assert set(pc.last) == {"kl", "ewc", "total"} and pc.experiences == 3


class KLProbe(Plugin):
    """KL(AC || KB) on the experience's data, measured where it is listed (before or after the compress)."""

    def __init__(self):
        self.kl = []

    @hookimpl
    def after_training_exp(self, strategy):
        net, data = strategy.model, strategy.experience.dataset
        with torch.no_grad():
            progress = net.progress
            net.progress = True
            teacher = net(data.x)
            net.progress = False
            student = net(data.x)
            net.progress = progress
        self.kl.append(kl_on_finite(teacher, student).item())


def test_compress_reduces_the_kl_between_the_active_column_and_the_knowledge_base():
    bench = tiny_benchmark(4, 2)
    before, after = KLProbe(), KLProbe()
    pc = ProgressCompress(lambda_=0.0)
    s = strategy([before, pc, after])
    s.epochs = 5
    s.train(bench.train_stream)
    for b, a in zip(before.kl, after.kl):
        assert a < 0.5 * b
    assert after.kl[-1] == pytest.approx(pc.last["kl"], rel=0.5, abs=0.05)


def test_kl_on_finite_entries_by_hand():
    inf = float("-inf")
    teacher = torch.tensor([[1.0, inf, 0.0, inf], [inf, 2.0, inf, 0.0]])
    student = torch.tensor([[0.0, inf, 0.0, inf], [inf, 0.0, inf, 2.0]], requires_grad=True)
    p1, p2 = torch.softmax(torch.tensor([1.0, 0.0]), 0), torch.softmax(torch.tensor([2.0, 0.0]), 0)
    q1, q2 = torch.tensor([0.5, 0.5]), torch.softmax(torch.tensor([0.0, 2.0]), 0)
    expected = ((p1 * (p1 / q1).log()).sum() + (p2 * (p2 / q2).log()).sum()) / 2
    value = kl_on_finite(teacher, student)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert torch.isfinite(student.grad).all()
    assert kl_on_finite(teacher, teacher.clone()).item() == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------------ online EWC (eq. 7-8)
class KBSnapshot(Plugin):
    def __init__(self):
        self.states = []

    @hookimpl
    def after_training_exp(self, strategy):
        self.states.append({k: v.detach().clone() for k, v in strategy.model.kb.named_parameters()})


def fisher_by_hand(kb, params: dict, data) -> dict:
    """mean_n (d CE(kb(x_n), y_n) / d theta)^2 at ``params``, one sample at a time."""
    saved = {k: v.detach().clone() for k, v in kb.named_parameters()}
    with torch.no_grad():
        for k, p in kb.named_parameters():
            p.copy_(params[k])
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for x, y in zip(data.x, data.y):
        kb.zero_grad()
        F.cross_entropy(kb(x[None]), y[None]).backward()
        for k, p in kb.named_parameters():
            total[k] += p.grad.square()
    with torch.no_grad():
        for k, p in kb.named_parameters():
            p.copy_(saved[k])
    return {k: v / len(data.y) for k, v in total.items()}


def test_online_ewc_decays_the_knowledge_base_importance_by_hand():
    bench = tiny_benchmark(4, 2)
    lam, gamma = 0.5, 0.7
    pc, snap = ProgressCompress(lambda_=lam, gamma=gamma), KBSnapshot()
    s = strategy([pc, snap])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coefficient may be capped here, or the sums below would not hold
        s.train(bench.train_stream)
    kb = s.model.kb
    f1 = fisher_by_hand(kb, snap.states[0], bench.train_stream[0].dataset)
    f2 = fisher_by_hand(kb, snap.states[1], bench.train_stream[1].dataset)
    (coefficients, anchors), = pc.ewc.anchors.points
    for k in f1:
        # eq. 8: F* = gamma F*_1 + F_2; the penalty is lambda/2 ||.||^2 over gamma F* (eq. 7)
        expected = lam / 2 * gamma * (gamma * f1[k] + f2[k])
        assert torch.allclose(coefficients[k], expected, rtol=1e-4, atol=1e-9), k
        assert torch.equal(anchors[k], snap.states[1][k])
    theta = {k: v + 0.1 for k, v in snap.states[1].items()}
    with torch.no_grad():
        for k, p in kb.named_parameters():
            p.copy_(theta[k])
    by_hand = sum((coefficients[k] * 0.01).sum() for k in coefficients)
    assert pc.ewc.penalty(kb).item() == pytest.approx(by_hand.item(), rel=1e-5)


# ------------------------------------------------------------------------------ refusals
class NotAChain(nn.Module):
    """Linear layers whose forward is not their order: a skip connection."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.a(x)) + x)


def refused(model, match):
    with pytest.raises(ConfigError, match=match):  # when the Strategy is built
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[ProgressCompress()], batch_size=16)


def test_an_unsupported_model_is_refused_at_construction_naming_what_is_missing():
    refused(SmallCNN(1, 4, image_size=8), r"progress_compress.*Linear, ReLU, Flatten.*holds ToImage at 'backbone.0'")
    refused(USER_MODELS["resnet18"](), r"fully connected layers only.*ResNet holds Conv2d at 'conv1'")
    refused(USER_MODELS["vit"](), r"fully connected layers only.*VisionTransformer holds PatchEmbed at 'patch_embed'")
    refused(nn.Sequential(nn.Linear(8, 4)), "at least one hidden Linear")
    refused(MLP(8, [], 4), "at least one hidden Linear")
    refused(NotAChain(), r"NotAChain's forward is not its modules \(a, head\) applied in turn")
    refused(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4), nn.Softmax(1)),
            r"modules after its classifier head '2' \(3\)")


def test_a_plain_sequential_runs_and_the_features_are_the_column_s_then_the_knowledge_base_s():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 6))
    logged = Logged()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                 plugins=[ProgressCompress(), logged], epochs=2, batch_size=16, seed=0)
    bench = tiny_benchmark(6, 3)
    x = bench.test_stream[0].dataset.x[:5]
    batch = Batch(x, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.train(bench.train_stream[0])
    net = s.model
    assert isinstance(net, ProgressCompressNet) and not net.progress and s.head is net.kb[5]
    assert torch.equal(s.forward(batch).features, torch.relu(net.kb[3](torch.relu(net.kb[1](x)))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.train(bench.train_stream[1])
    net.progress = True
    s.model_changed()
    column = torch.relu(net.ac[1](x))
    lateral = net.laterals[0](torch.relu(net.kb[1](x)))
    assert torch.allclose(s.forward(batch).features, torch.relu(net.ac[3](column) + lateral), atol=1e-6)
    assert s.loss_terms.keys() == {"task"}
    assert logged.names.count("loss/compress") == 4  # the engine's private loop: one mean per epoch, 2 x 2


class Logged(Plugin):
    def __init__(self):
        self.names = []

    @hookimpl
    def log_value(self, name):
        self.names.append(name)


@pytest.mark.parametrize("kwargs,name", [({"lambda_": -1}, "lambda_"), ({"gamma": 1.5}, "gamma"),
                                         ({"alpha": float("nan")}, "alpha"), ({"adaptor_width": 0}, "adaptor_width"),
                                         ({"reset": "yes"}, "reset"), ({"fisher_samples": 0}, "fisher_samples")])
def test_bad_arguments_are_refused(kwargs, name):
    with pytest.raises(ConfigError, match=rf"progress_compress {name}="):
        ProgressCompress(**kwargs)
