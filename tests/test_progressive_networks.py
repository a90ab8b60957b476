"""Progressive Neural Networks: frozen columns stay bit-identical, routing and a lateral term by hand, no column for
a task not trained, parameters per task, refusals, resume, composition with replay."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from streamcl import Batch, ConfigError, DataError, Plugin, PluginError, Strategy, hookimpl
from streamcl.models import MLP, SmallCNN
from streamcl.parts import capture_input
from streamcl.plugins.progressive_networks import ColumnHeads, ProgressiveNet, ProgressiveNetworks
from streamcl.plugins.replay import Replay
from streamcl.plugins.task_mask import TaskMask
from streamcl.scenarios import Experience, TensorData, class_incremental, task_incremental
from tests.conftest import USER_MODELS
from tests.synthetic import blobs

INF = float("-inf")


def _stream(n_tasks: int = 3, task: bool = True):
    make = task_incremental if task else class_incremental
    return make(blobs(n_classes=2 * n_tasks), blobs(10, 2 * n_tasks, seed=1), n_tasks)


def _strategy(plugins=None, model=None, n_classes: int = 6, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = MLP(8, [16, 16], n_classes) if model is None else model
    plugins = [ProgressiveNetworks()] if plugins is None else plugins
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=plugins, epochs=3,
                    batch_size=16, seed=0, **kwargs)


def _column(net: ProgressiveNet, k: int) -> dict[str, torch.Tensor]:
    """Every tensor of column ``k``: its layers, head and adaptors."""
    out = {}
    for name, m in zip(("body", "lat", "head", "head_lat"), net.frozen_parts(k)):
        out.update({f"{name}.{n}": v.detach().clone() for n, v in m.state_dict().items()})
    return out


class Modes(Plugin):
    """The training mode of each column's layers and whether they take gradients, at every training forward."""

    def __init__(self):
        self.seen = []

    @hookimpl
    def after_forward(self, strategy):
        net = strategy.model
        self.seen.append([(net.columns[k].training, any(p.requires_grad for m in net.frozen_parts(k)
                                                        for p in m.parameters())) for k in range(len(net.columns))])


# ------------------------------------------------------------------------------ frozen columns
def test_frozen_columns_are_bit_identical_after_later_tasks():
    s, bench = _strategy([ProgressiveNetworks(), Modes()]), _stream(3)
    s.plugins[1].seen.clear()
    snapshots = []
    for exp in bench.train_stream:
        s.train(exp)
        snapshots.append(_column(s.model, len(s.model.columns) - 1))
    net = s.model
    assert len(net.columns) == 3 and net.tasks == [0, 1, 2]
    for k in range(2):  # columns 0 and 1 (layers, head and adaptors) as they were after their task
        now = _column(net, k)
        assert sorted(now) == sorted(snapshots[k]) and all(torch.equal(now[n], snapshots[k][n]) for n in now)
        assert all(not p.requires_grad for m in net.frozen_parts(k) for p in m.parameters())
    assert any(lat.alpha.requires_grad for lat in net.laterals[2])  # the newest column's adaptors train
    # in the last experience the frozen columns ran in evaluation mode, without gradients; the newest trained
    assert s.plugins[1].seen[-1] == [(False, False), (False, False), (True, True)]
    assert min(s.eval(bench.test_stream)["accuracy"]) > 0.8


def test_the_first_column_is_the_users_model_and_later_ones_are_drawn_afresh():
    s, bench = _strategy(), _stream(2)
    first = s.model.backbone[1].weight
    s.train(bench.train_stream[0])
    assert s.model.columns[0].backbone[1].weight is first  # the user's own parameters, trained
    s.train(bench.train_stream[1])
    a = s.model.columns[1].backbone[1].weight
    assert not torch.equal(a, s.model.columns[0].backbone[1].weight)
    again = _strategy()
    again.train(bench.train_stream[0])
    again.train(bench.train_stream[1])
    assert torch.equal(again.model.columns[1].backbone[1].weight, a)  # drawn from the run's generator


# ------------------------------------------------------------------------------ eq. 2 and routing by hand
def hand_net() -> ProgressiveNet:
    """Two columns of a 3-2-2-2 MLP (Flatten, Linear, ReLU, Linear, ReLU, head), every weight set by hand."""
    plugin = ProgressiveNetworks(alpha=0.5)
    torch.manual_seed(0)
    model = MLP(3, [2, 2], 2)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin], seed=0)
    data = TensorData(torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]))
    net = plugin.adapt_model(s, s.model, Experience(0, data, (0, 1), 2, task=0))
    net = plugin.adapt_model(s, net, Experience(1, data, (0, 1), 2, task=1))  # two tasks of classes 0 and 1
    with torch.no_grad():
        for k, c in enumerate((1.0, -1.0)):
            col = net.columns[k].backbone
            col[1].weight.copy_(torch.tensor([[1.0, 0.0, c], [0.0, 1.0, 1.0]]))
            col[1].bias.copy_(torch.tensor([0.0, -0.5]))
            col[3].weight.copy_(torch.tensor([[1.0, c], [c, 1.0]]))
            col[3].bias.zero_()
            net.head.heads[k].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, c]]))
            net.head.heads[k].bias.copy_(torch.tensor([0.0, 0.25 * k]))
        lat, hlat = net.laterals[1][0], net.head.laterals[0]
        lat.V.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        lat.U.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
        hlat.V.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
        hlat.U.copy_(torch.tensor([[1.0, 1.0], [-1.0, 0.0]]))
    return net.eval()


def test_each_row_uses_its_tasks_column_and_the_lateral_term_by_hand():
    net = hand_net()
    assert net.tasks == [0, 1] and net.laterals[1][0].alpha.item() == 0.5
    x = torch.tensor([[1.0, 2.0, 1.0], [1.0, 2.0, 1.0], [0.5, -1.0, 2.0]])
    t = torch.tensor([0, 1, 1])
    # column 0: h1 = relu(W1 x + b1), h2 = relu(W2 h1), out = H h2
    h1 = F.relu(torch.stack([x[:, 0] + x[:, 2], x[:, 1] + x[:, 2] - 0.5], 1))
    h2 = F.relu(torch.stack([h1[:, 0] + h1[:, 1], h1[:, 0] + h1[:, 1]], 1))
    out0 = torch.stack([h2[:, 0], h2[:, 1]], 1)
    # column 1: its own layers, plus U relu(V (alpha h)) from column 0's input to the same layer (eq. 2)
    a1 = F.relu(torch.stack([x[:, 0] - x[:, 2], x[:, 1] + x[:, 2] - 0.5], 1))
    v = F.relu(torch.stack([0.5 * (h1[:, 0] + h1[:, 1]), 0.5 * (h1[:, 0] - h1[:, 1])], 1))
    lateral = torch.stack([2 * v[:, 0], 3 * v[:, 1]], 1)
    a2 = F.relu(torch.stack([a1[:, 0] - a1[:, 1], -a1[:, 0] + a1[:, 1]], 1) + lateral)
    w = F.relu(0.5 * 0.5 * h2)  # the head's adaptor: V = 0.5 I on alpha h2
    out1 = torch.stack([a2[:, 0] + w[:, 0] + w[:, 1], -a2[:, 1] + 0.25 - w[:, 0]], 1)
    with torch.no_grad():
        got = net(x, task_labels=t)
    assert torch.allclose(got[0], out0[0], atol=1e-6)
    assert torch.allclose(got[1:], out1[1:], atol=1e-6)
    assert not torch.allclose(out0[1], out1[1])  # the same input, scored by another column
    # a task label never trained goes to the newest column; none given: task 0 (the engine's default) is column 0
    assert torch.allclose(net(x, task_labels=torch.tensor([7, 7, 7])), out1, atol=1e-6)
    assert torch.allclose(net(x), out1, atol=1e-6)


def test_the_features_are_each_rows_own_columns():
    net, x = hand_net(), torch.randn(6, 3)
    t = torch.tensor([0, 1, 0, 1, 1, 0])
    feats = []
    head = net.head
    handle = head.register_forward_pre_hook(lambda m, args: feats.append(args[0]))
    net(x, task_labels=t)
    handle.remove()
    c0 = F.relu(net.columns[0].backbone[3](F.relu(net.columns[0].backbone[1](x))))
    assert torch.allclose(feats[0][t == 0], c0[t == 0]) and not torch.allclose(feats[0][t == 1], c0[t == 1])


# ------------------------------------------------------------------------------ columns for trained tasks only
def test_no_column_for_a_task_evaluated_before_it_is_trained():
    s, bench = _strategy(), _stream(3)
    s.eval(bench.test_stream)  # before any training: the user's model, not wrapped
    assert not isinstance(s.model, ProgressiveNet)
    for i, exp in enumerate(bench.train_stream):
        s.train(exp)
        s.eval(bench.test_stream)  # tasks ahead of training are evaluated (on the newest column)
        assert len(s.model.columns) == i + 1 and s.model.tasks == list(range(i + 1))
        assert sorted(s.plugins[0].parameters_per_task) == list(range(i + 1))


def test_adapt_logits_masks_to_the_rows_task_and_the_raw_output_stays_finite():
    s, bench = _strategy(), _stream(2)
    for exp in bench.train_stream:
        s.train(exp)
    x = bench.test_stream[0].dataset.x[:3]
    out = s.infer(Batch(x, torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 5])))
    assert torch.isfinite(out.raw).all()
    assert out.logits[0, 2:].eq(INF).all() and torch.isfinite(out.logits[0, :2]).all()
    for row in (1, 2):  # task 1, and a task never trained (the newest column's classes)
        assert out.logits[row, [0, 1, 4, 5]].eq(INF).all() and torch.isfinite(out.logits[row, 2:4]).all()


def test_parameters_per_task_are_each_new_column_and_its_adaptors():
    s, bench = _strategy(), _stream(3)
    for exp in bench.train_stream:
        s.train(exp)
    column = 8 * 16 + 16 + 16 * 16 + 16 + 16 * 6 + 6  # a column of the 8-16-16-6 MLP
    # column k: V (k*16 -> 16, no bias), U (16 x 16), alpha into layer 2; V (k*16 -> 16), U (6 x 16), alpha into the head
    lateral = {k: (k * 16 * 16 + 16 * 16 + 1) + (k * 16 * 16 + 6 * 16 + 1) for k in (1, 2)}
    assert s.plugins[0].parameters_per_task == {0: column, 1: column + lateral[1], 2: column + lateral[2]}
    assert sum(s.plugins[0].parameters_per_task.values()) == sum(p.numel() for p in s.model.parameters())


def test_a_class_incremental_stream_keeps_one_column():
    s, bench = _strategy(), _stream(3, task=False)
    for exp in bench.train_stream:
        s.train(exp)
    assert len(s.model.columns) == 1 and s.model.tasks == [0]
    assert s.model.head.classes(0).tolist() == list(range(6))


def test_a_task_that_comes_back_gets_a_new_column_and_the_old_stays_frozen():
    s, bench = _strategy(), _stream(2)
    s.train(bench.train_stream[0])
    s.train(bench.train_stream[1])
    before = _column(s.model, 0)
    s.train(bench.train_stream[0])
    net = s.model
    assert net.tasks == [0, 1, 0] and len(net.columns) == 3
    assert all(torch.equal(v, before[n]) for n, v in _column(net, 0).items())
    assert net.route(torch.tensor([0, 1]), 2, "cpu").tolist() == [2, 1]


def test_an_experience_of_two_task_labels_is_refused():
    data = blobs(n_classes=4)
    data = TensorData(data.x, data.y, (data.y >= 2).long())
    bench = class_incremental(data, data, 1)
    with pytest.raises(DataError, match=r"progressive_networks: .*task labels \[0, 1\]"):
        _strategy(n_classes=4).train(bench.train_stream[0])


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("model,match", [
    (SmallCNN(1, 4, image_size=8), r"progressive_networks wires lateral adaptors .* holds ToImage at 'backbone.0'"),
    (USER_MODELS["resnet18"](4), r"progressive_networks wires lateral adaptors .* holds Conv2d at 'conv1'"),
    (nn.Sequential(nn.Linear(8, 4)), "progressive_networks needs at least one hidden Linear"),
])
def test_a_model_that_is_not_a_chain_of_linear_layers_is_refused(model, match):
    with pytest.raises(ConfigError, match=match):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[ProgressiveNetworks()])


def test_roles_and_arguments():
    with pytest.raises(PluginError, match="task_head"):
        _strategy([TaskMask(), ProgressiveNetworks()])
    for bad in ({"alpha": -1.0}, {"alpha": float("nan")}, {"adaptor_width": 0}, {"adaptor_width": True}):
        with pytest.raises(ConfigError, match=rf"progressive_networks {next(iter(bad))}="):
            ProgressiveNetworks(**bad)


def test_a_plain_sequential_and_a_narrower_adaptor():
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6))
    s, bench = _strategy([ProgressiveNetworks(adaptor_width=4)], model=model), _stream(3)
    for exp in bench.train_stream:
        s.train(exp)
    assert s.head_path == "head" and len(s.model.columns) == 3
    assert s.model.head.laterals[1].V.weight.shape == (4, 32) and not len(s.model.laterals[1])
    assert min(s.eval(bench.test_stream)["accuracy"]) > 0.8


# ------------------------------------------------------------------------------ resume, replay
def test_a_checkpoint_resumes_mid_stream_with_the_same_numbers(tmp_path):
    a, bench = _strategy(), _stream(3)
    a.train(bench.train_stream[0])
    a.train(bench.train_stream[1])
    path = a.save_checkpoint(tmp_path / "two.pt")
    a.train(bench.train_stream[2])
    b = _strategy(seed=5)  # another initial model: the checkpoint's columns replace it
    b.load_checkpoint(path)
    assert b.model.tasks == [0, 1] and b.plugins[0].columns == a.plugins[0].columns[:2]
    b.train(bench.train_stream[2])
    assert list(a.model.state_dict()) == list(b.model.state_dict())
    assert all(torch.equal(u, v) for u, v in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert a.eval(bench.test_stream)["accuracy"] == b.eval(bench.test_stream)["accuracy"]


class Rows(Plugin):
    """At every training forward: the task labels of the minibatch, and whether each task's rows have the features
    that column's forward alone gives them."""

    def __init__(self):
        self.seen = []

    @hookimpl
    def after_forward(self, strategy):
        t, x, f = strategy.batch.t, strategy.batch.x, strategy.output.features
        same = []
        with torch.no_grad():
            for k in torch.unique(t).tolist():
                own = t == k
                with capture_input(strategy.model.head) as box:
                    strategy.model(x[own], task_labels=t[own])
                same.append(torch.allclose(f[own], box[0], atol=1e-6))
        self.seen.append((sorted(set(t.tolist())), all(same)))


def test_with_replay_each_row_of_a_mixed_batch_goes_to_its_own_column():
    rows = Rows()
    s, bench = _strategy([Replay(memory=40), ProgressiveNetworks(), rows]), _stream(3)
    for exp in bench.train_stream:
        s.train(exp)
    assert rows.seen[-1][0] == [0, 1, 2]  # the last minibatch mixes the experience's task with two replayed ones
    assert all(same for _, same in rows.seen)
    assert min(s.eval(bench.test_stream)["accuracy"]) > 0.8


def test_column_heads_outside_the_net_score_with_the_newest_column():
    heads = ColumnHeads(nn.Linear(2, 3), 2, 3)
    f = torch.randn(4, 2)
    assert torch.equal(heads(f), heads.heads[0](f))
