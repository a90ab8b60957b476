"""SLCA's slow learner: its parameter groups reach the engine's optimizer with the right rates, on any model's head;
a zero backbone rate freezes the representation; refusals."""
import pytest
import torch

from streamcl import ConfigError, Strategy, hookimpl
from streamcl.models import MLP
from streamcl.plugins.slow_learner import SlowLearner
from tests.conftest import USER_MODELS, image_benchmark
from tests.synthetic import tiny_benchmark


def rates(strategy):
    """The learning rate each named parameter of the model trains at in the strategy's optimizer."""
    lr = {id(p): g["lr"] for g in strategy.optimizer.param_groups for p in g["params"]}
    return {n: lr.get(id(p)) for n, p in strategy.model.named_parameters()}


def test_the_head_trains_at_head_lr_and_every_other_parameter_at_backbone_lr():
    model = MLP(8, [16, 16], 4)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), epochs=1, batch_size=8,
                        plugins=[SlowLearner(backbone_lr=1e-4, head_lr=1e-2)])
    bench = tiny_benchmark()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy.train(bench.train_stream[0])
    got = rates(strategy)
    assert got == {n: (1e-2 if n.startswith("head.") else 1e-4) for n in got}
    assert all(g["momentum"] == 0.9 for g in strategy.optimizer.param_groups)  # the user's other settings kept
    moved = {n: (p - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert 0 < moved["backbone.1.weight"] < moved["head.weight"]  # both learn, the representation slowly


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_the_groups_follow_the_head_the_engine_finds(name):
    model = USER_MODELS[name](4)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.5), epochs=1, batch_size=8,
                        plugins=[SlowLearner(backbone_lr=0.001, head_lr=0.1)])
    strategy.train(image_benchmark().train_stream[0])
    head = {n for n, _ in strategy.head.named_parameters(prefix=strategy.head_path)}
    assert head and all(lr == (0.1 if n in head else 0.001) for n, lr in rates(strategy).items())


def test_a_zero_backbone_rate_freezes_the_representation():
    model = MLP(8, [16], 4)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.5), epochs=1, batch_size=8,
                        plugins=[SlowLearner(backbone_lr=0.0, head_lr=0.1)])
    before = model.backbone[1].weight.detach().clone()
    strategy.train(tiny_benchmark().train_stream[0])
    assert torch.equal(model.backbone[1].weight, before) and model.backbone[1].weight.grad is None
    assert not model.backbone[1].weight.requires_grad and model.head.weight.requires_grad


@pytest.mark.parametrize("kwargs", [{"backbone_lr": -1e-4}, {"head_lr": 0}, {"head_lr": float("nan")},
                                    {"backbone_lr": "fast"}, {"head_lr": True}])
def test_bad_rates_are_refused(kwargs):
    with pytest.raises(ConfigError, match="SlowLearner"):
        SlowLearner(**kwargs)


class HeadAtHalf:
    """A plugin listed after the slow learner that gives the head a group of its own."""

    @hookimpl
    def param_groups(self, strategy, model):
        return [{"params": list(strategy.head.parameters()), "lr": 0.5}]


def test_a_later_plugins_group_takes_the_parameters_it_names():
    model = MLP(8, [16], 4)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, batch_size=8,
                        plugins=[SlowLearner(backbone_lr=1e-4, head_lr=1e-2), HeadAtHalf()])
    strategy.train(tiny_benchmark().train_stream[0])
    assert rates(strategy) == {"backbone.1.weight": 1e-4, "backbone.1.bias": 1e-4, "head.weight": 0.5, "head.bias": 0.5}
