"""PackNet: pruning by hand, owners, task t never sees later tasks' weights, packed weights fixed, composition."""
import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, Strategy
from streamcl.models import MLP
from streamcl.plugins.packnet import PackNet, PackNetNet, prune_free
from streamcl.plugins.replay import Replay
from tests.conftest import USER_MODELS, image_benchmark
from tests.synthetic import keeps_first_task, task_benchmark, tiny_benchmark


def packnet_strategy(model=None, plugins=None, **kwargs):
    model = model or MLP(8, [16], 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Strategy(model, opt, plugins=plugins or [PackNet(**kwargs)], epochs=2, batch_size=16, seed=0)


def test_pruning_keeps_exactly_the_largest_free_weights_by_hand():
    w = torch.tensor([[0.5, -0.1, 3.0], [-2.0, 0.2, 0.05]])
    owner = torch.tensor([[0, 0, 1], [0, 0, 0]], dtype=torch.int32)  # 3.0 is packed: not a candidate
    keep = prune_free(w, owner, 0.6)  # 5 free: round(3.0) = 3 smallest pruned (0.05, -0.1, 0.2)
    assert keep.tolist() == [[True, False, False], [True, False, False]]
    assert prune_free(w, owner, 0.0).tolist() == (owner == 0).tolist()
    tie = prune_free(torch.tensor([1.0, -1.0, 1.0, 2.0]), torch.zeros(4, dtype=torch.int32), 0.5)
    assert tie.tolist() == [False, False, True, True]  # ties: the earlier pruned first


def test_task_t_runs_with_the_weights_of_tasks_up_to_t_only():
    layer = nn.Linear(3, 1, bias=False)
    net = PackNetNet(nn.Sequential(layer), head_path="0", names=["0.weight"])
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 10.0, 100.0]]))
    net.owner_0.copy_(torch.tensor([[1, 2, 0]], dtype=torch.int32))  # task 0 owns w0, task 1 owns w1, w2 free
    net.new_slot([0]), net.new_slot([1])
    x = torch.ones(2, 3)
    assert net(x, torch.tensor([0, 1])).flatten().tolist() == [1.0, 11.0]  # no row sees the free weight
    net.open.fill_(1)  # while task 1 trains it also runs with the free weights
    assert net(x, torch.tensor([0, 1])).flatten().tolist() == [1.0, 111.0]
    assert net(x, torch.tensor([7, 7])).flatten().tolist() == [111.0, 111.0]  # an untrained task: the newest slot


def test_packed_weights_are_bit_identical_after_later_tasks_and_each_task_gets_its_share():
    strategy = packnet_strategy(prune=0.5, retrain_epochs=1)
    stream = task_benchmark().train_stream
    strategy.train(stream[0])
    net = strategy.model
    packed = [(p.detach().clone(), net.owner(i) == 1) for i, p in enumerate(net.params())]
    free0 = sum(int(m.numel()) for _, m in packed)
    assert strategy.plugins[0].kept[0] == pytest.approx(free0 / 2, abs=len(packed))  # half of every layer kept
    strategy.train(stream[1])
    strategy.train(stream[2])
    for i, (p, (before, mine)) in enumerate(zip(net.params(), packed)):
        assert torch.equal(p.detach()[mine], before[mine])
    kept = PackNet.weights_per_task(strategy)
    assert kept == strategy.plugins[0].kept and kept[0] > kept[1] > kept[2] > 0
    # biases were trained with the first task only
    assert not any(p.requires_grad for n, p in net.model.named_parameters() if n.endswith("bias") and "head" not in n)


def test_task_zero_predicts_the_same_after_later_tasks():
    assert keeps_first_task(packnet_strategy(), task_benchmark())  # its classes' scores (later classes' biases train)


def test_packnet_composes_with_replay_on_mixed_task_batches():
    strategy = packnet_strategy(plugins=[PackNet(), Replay(memory=20)])
    bench = task_benchmark()
    strategy.train(bench.train_stream)
    res = strategy.eval(bench.test_stream)
    assert len(res["accuracy"]) == 3 and all(0 <= a <= 1 for a in res["accuracy"])


def test_a_model_without_linear_or_conv_weights_and_bad_arguments_are_refused():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.w

    with pytest.raises(ConfigError, match="packnet masks the weights of Linear and Conv layers"):
        packnet_strategy(model=Scale())
    with pytest.raises(ConfigError, match="prune"):
        PackNet(prune=1.0)
    with pytest.raises(ConfigError, match="retrain_epochs"):
        PackNet(retrain_epochs=-1)


def test_packnet_runs_on_a_convolutional_model():
    model = USER_MODELS["resnet18"](4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    strategy = Strategy(model, opt, plugins=[PackNet(retrain_epochs=1)], epochs=1, batch_size=8, seed=0)
    bench = image_benchmark()
    strategy.train(bench.train_stream)
    assert len(PackNet.weights_per_task(strategy)) == 2
    out = strategy.predict(bench.test_stream[0].dataset.x[:3])
    assert out.shape == (3, 4) and torch.isfinite(out).all()


def test_a_class_incremental_stream_makes_each_experience_a_slot():
    strategy = packnet_strategy()
    strategy.train(tiny_benchmark(4, 2).train_stream)
    assert strategy.model.n_slots == 2 and strategy.model.slot_of.tolist() == [1]
    assert isinstance(strategy.forward(Batch(torch.randn(4, 8), torch.zeros(4, dtype=torch.long),
                                             torch.zeros(4, dtype=torch.long))).logits, torch.Tensor)
