"""Dark experience replay (DER / DER++): the two loss terms by hand, the memory's logits, resume."""
import math

import pytest
import torch
from torch import nn

from streamcl import ConfigError, Strategy, hookimpl
from streamcl.models import MLP
from streamcl.plugins.dark_replay import DarkReplay
from tests.synthetic import tiny_benchmark


def hand_model():
    """logits = (x0, x1, x0 + x1)."""
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model.bias.zero_()
    return model


def hand_strategy(plugins=(), batch_size=128):
    """A strategy around :func:`hand_model`: the memory's minibatches go through the engine's forward."""
    model = hand_model()
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=list(plugins),
                    batch_size=batch_size, seed=0)


def filled(plugin, x, y, z, width=None):
    from streamcl.memory import Memory

    plugin.memory = Memory(plugin.capacity)
    width = torch.full((len(y),), z.shape[1]) if width is None else width
    plugin.memory.write(torch.arange(len(y)), x, y, torch.zeros_like(y), logits=z, width=width)
    return plugin


def test_der_mse_and_derpp_ce_terms_by_hand():
    x = torch.tensor([[1.0, 2.0], [0.0, 1.0]])  # logits [[1, 2, 3], [0, 1, 1]]
    z = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # squared errors [[0, 1, 4], [0, 1, 1]]: mean 7/6
    y = torch.tensor([2, 0])
    # a memory minibatch of the whole memory: both terms are means, whatever order the draw takes
    plugin = filled(DarkReplay(memory=2, alpha=0.3, beta=0.7, batch_size=2), x, y, z)
    strategy = hand_strategy()
    terms = plugin.loss_terms(strategy)
    ce = ((math.log(math.e + math.e ** 2 + math.e ** 3) - 3) + (math.log(1 + 2 * math.e) - 0)) / 2
    assert terms["der_mse"].item() == pytest.approx(0.3 * 7 / 6, rel=1e-6)
    assert terms["der_ce"].item() == pytest.approx(0.7 * ce, rel=1e-6)
    assert set(DarkReplay(plus=False).loss_terms(strategy) or {}) == set()  # empty memory: nothing
    der = filled(DarkReplay(memory=2, alpha=0.3, plus=False, batch_size=2), x, y, z)
    assert set(der.loss_terms(strategy)) == {"der_mse"}
    assert der.loss_terms(strategy)["der_mse"].item() == pytest.approx(0.35, rel=1e-6)


def test_mse_gradient_flows_into_the_model():
    plugin = filled(DarkReplay(memory=2, batch_size=2), torch.ones(2, 2), torch.tensor([0, 1]), torch.zeros(2, 3))
    strategy = hand_strategy(batch_size=2)
    sum(plugin.loss_terms(strategy).values()).backward()
    assert strategy.model.weight.grad is not None and strategy.model.weight.grad.abs().sum() > 0


def test_logits_stored_before_the_head_grew_are_compared_on_their_own_columns():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0]])
    stored = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 5.0]])  # row 0 stored with 2 columns, row 1 with 3
    width = torch.tensor([2, 3])
    # row 0: (1, 4) ; row 1: (1, 0, 9): 15 over 5 entries
    assert DarkReplay.mse(logits, stored, width).item() == pytest.approx(3.0)
    same = torch.tensor([3, 3])
    assert torch.allclose(DarkReplay.mse(logits[:, :3], stored, same), nn.functional.mse_loss(logits[:, :3], stored))


class Record:
    """Records the current samples of each training step and the model's own logits for them (``output.raw``)."""

    def __init__(self):
        self.x, self.logits = [], []

    @hookimpl
    def after_forward(self, strategy):
        n = strategy.n_current
        self.x.append(strategy.batch.x[:n].clone())
        self.logits.append(strategy.output.raw[:n].detach().clone())


def run(plugins, n_classes=4, n_exp=2, seed=0, init_seed=None, **kwargs):
    torch.manual_seed(seed if init_seed is None else init_seed)
    bench = tiny_benchmark(n_classes, n_exp)
    model = MLP(8, [16], n_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    s = Strategy(model, opt, plugins=plugins, batch_size=16, epochs=2, seed=seed, **kwargs)
    return s, bench


def test_reservoir_stores_the_logits_the_model_produced():
    plugin, record = DarkReplay(memory=1000), Record()
    s, bench = run([plugin, record])
    s.train(bench.train_stream[0])
    # until the memory is full, reservoir sampling keeps every sample, in arrival order
    assert len(plugin.memory) == plugin.seen == 40 * 2  # 40 samples, 2 epochs
    assert torch.equal(plugin.memory.inputs(), torch.cat(record.x))
    assert torch.equal(plugin.memory.extras["logits"][:80], torch.cat(record.logits))

    small, record = DarkReplay(memory=10), Record()
    s, bench = run([small, record])
    s.train(bench.train_stream)
    assert len(small.memory) == 10 and small.seen == 160
    x, logits = torch.cat(record.x), torch.cat(record.logits)
    for i in range(10):  # every stored row is a (sample, logits) pair of some step
        match = (x == small.memory.inputs()[i]).all(1) & (logits == small.memory.extras["logits"][i]).all(1)
        assert match.any()
    assert set(small.memory.labels.tolist()) <= {0, 1, 2, 3}


def test_growing_head_widens_the_stored_logits():
    plugin = DarkReplay(memory=1000)
    torch.manual_seed(0)
    bench = tiny_benchmark(4, 2)
    model = MLP(8, [16], 0, growing=True)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin], batch_size=16, epochs=2, seed=0)
    s.train(bench.train_stream[0])
    assert plugin.memory.extras["logits"].shape[1] == 2
    s.train(bench.train_stream[1])
    stored, width = plugin.memory.extras["logits"][:160], plugin.memory.extras["width"][:160]
    assert stored.shape[1] == 4 and width[:80].eq(2).all() and width[80:].eq(4).all()
    assert stored[:80, 2:].eq(0).all()


def test_tiny_stream_checkpoint_resume_continues_identically(tmp_path):
    s, bench = run([DarkReplay(memory=30)], n_classes=6, n_exp=3)
    s.train(bench.train_stream[0])
    s.save_checkpoint(tmp_path / "a.pt")
    s.train(bench.train_stream[1:])
    first = s.eval(bench.test_stream)

    b, bench = run([DarkReplay(memory=30)], n_classes=6, n_exp=3, init_seed=1)  # other weights: the checkpoint's win
    b.load_checkpoint(tmp_path / "a.pt")
    b.train(bench.train_stream[1:])
    second = b.eval(bench.test_stream)
    assert first["accuracy"] == second["accuracy"]
    for p, q in zip(s.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(s.plugins[0].memory.extras["logits"], b.plugins[0].memory.extras["logits"])
    assert min(first["accuracy"]) >= 0  # and the run is a real one
    assert s.plugins[0].memory.extras["logits"].isfinite().all()


def test_state_dict_round_trip():
    a = DarkReplay(memory=12)
    s, bench = run([a])
    s.train(bench.train_stream)
    b = DarkReplay(memory=12)
    b.load_state_dict(a.state_dict())
    assert b.seen == a.seen and len(b.memory) == 12
    s.batch_size = 5
    s.generator.manual_seed(3)
    ta = a.loss_terms(s)
    s.generator.manual_seed(3)
    tb = b.loss_terms(s)
    assert all(torch.equal(ta[k], tb[k]) for k in ("der_mse", "der_ce"))


def masked_strategy(plugins):
    """Task 0 holds classes 0 and 1, task 1 classes 2 and 3 (a TaskMask listed first, as the runner lists it)."""
    from streamcl.plugins import TaskMask
    mask = TaskMask()
    mask.table = torch.tensor([[True, True, False, False], [False, False, True, True]])
    torch.manual_seed(0)
    model = nn.Linear(2, 4)
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[mask, *plugins], seed=0)


def test_under_a_task_mask_the_terms_compare_raw_outputs_and_score_labels_within_the_task():
    """Task-incremental (SFM-5-TIL): the memory holds the network's own output h(x) (eq. 4-6), never the task
    mask's -inf; der_mse compares raw outputs, der_ce is the cross-entropy among the sample's task's classes."""
    x = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    y, t = torch.tensor([1, 2]), torch.tensor([0, 1])
    plugin = DarkReplay(memory=2, alpha=0.3, beta=0.7, batch_size=2)
    s = masked_strategy([plugin])
    filled(plugin, x, y, torch.zeros(2, 4))
    plugin.memory.t[:2] = t
    terms = plugin.loss_terms(s)
    with torch.no_grad():
        raw = s.model(x)
    assert terms["der_mse"].item() == pytest.approx(0.3 * raw.pow(2).mean().item(), rel=1e-6)
    ce = [torch.logsumexp(raw[0, :2], 0) - raw[0, 1], torch.logsumexp(raw[1, 2:], 0) - raw[1, 2]]  # within the task
    assert terms["der_ce"].item() == pytest.approx(0.7 * (ce[0] + ce[1]).item() / 2, rel=1e-6)


def test_a_task_incremental_run_stores_raw_outputs_and_stays_finite():
    """Before the fix the memory stored the masked logits and der_mse was -inf - (-inf): 'non-finite loss'."""
    from streamcl.plugins import TaskMask
    from streamcl.scenarios import task_incremental
    from tests.synthetic import blobs

    torch.manual_seed(0)
    bench = task_incremental(blobs(n_classes=4), blobs(10, 4, seed=1), 2)
    plugin, record = DarkReplay(memory=1000), Record()
    model = MLP(8, [16], 4)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                 plugins=[TaskMask(), plugin, record], batch_size=16, epochs=2, seed=0)
    s.train(bench.train_stream)
    assert len(plugin.memory) == 160 and plugin.memory.extras["logits"][:160].isfinite().all()
    assert torch.equal(plugin.memory.extras["logits"][:160], torch.cat(record.logits))
    assert min(s.eval(bench.test_stream)["accuracy"]) > 0.8


@pytest.mark.parametrize("kwargs", [dict(memory=0), dict(memory=-5), dict(memory=2.5), dict(alpha=-1),
                                    dict(beta=float("nan")), dict(alpha="1"), dict(plus="yes"), dict(batch_size=0)])
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        DarkReplay(**kwargs)
