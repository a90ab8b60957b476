"""The model contract (streamcl/parts.py) and the engine's services to plugins, checked by hand."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, DataError, Plugin, Strategy, hookimpl
from streamcl.parts import find_head
from streamcl.scenarios import TensorData
from tests.conftest import USER_MODELS, image_benchmark
from tests.synthetic import tiny_benchmark


def _strategy(model, plugins=(), **kwargs):
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=plugins, batch_size=8, seed=0,
                    **kwargs)


class Classic(nn.Module):
    """A VGG-style model: the head is the last Linear inside ``classifier``."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(8, 6))
        self.classifier = nn.Sequential(nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))

    def forward(self, x):
        return self.classifier(self.features(x))


class TorchvisionViTStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(8, 6)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(6, 4)))

    def forward(self, x):
        return self.heads(self.encoder(x))


class Doubled(nn.Module):
    """``fc`` is not the last step: its output is doubled, so it is not the classifier head."""

    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(8, 6), nn.Linear(6, 4)

    def forward(self, x):
        return 2 * self.fc(self.body(x))


class NeedsHead(Plugin):
    requires = frozenset({"head"})


@pytest.mark.parametrize("name,path", [("mlp", "head"), ("sequential", "5"), ("resnet18", "fc"), ("vit", "head")])
def test_the_head_of_each_user_model(name, path):
    assert find_head(USER_MODELS[name]()) == path


def test_heads_inside_containers_and_the_override():
    assert find_head(Classic()) == "classifier.3"
    assert find_head(TorchvisionViTStyle()) == "heads.head"
    assert find_head(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())) is None
    assert find_head(Classic(), "features.1") == "features.1"
    with pytest.raises(ConfigError, match="no sub-module there"):
        find_head(Classic(), "classifier.9")


def test_features_are_the_heads_input():
    model = USER_MODELS["sequential"]()
    s = _strategy(model)
    x = torch.randn(5, 1, 28, 28)
    out = s.forward(Batch(x, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)))
    assert torch.equal(out.features, model[:-1](x))
    assert torch.equal(out.logits, model(x)) and torch.equal(out.raw, out.logits)
    assert s.feature_dim == 32 and s.head is model[5]
    assert torch.equal(s.embed(TensorData(x, torch.zeros(5, dtype=torch.long))), model[:-1](x))
    assert not model[5]._forward_pre_hooks  # the capture leaves no hook behind (copies carry none)


def test_a_plugin_that_requires_a_head_is_refused_at_construction():
    model = nn.Sequential(nn.Flatten(), nn.Conv1d(1, 1, 1))
    with pytest.raises(ConfigError, match="NeedsHead.*needs the model's classifier head.*head='path"):
        _strategy(model, [NeedsHead()])


def test_a_layer_that_is_not_the_last_is_refused_as_head_when_a_plugin_needs_it():
    bench = tiny_benchmark()
    _strategy(Doubled()).train(bench.train_stream[0])  # no plugin needs the head: runs
    with pytest.raises(DataError, match="its output is not the model's"):
        _strategy(Doubled(), [NeedsHead()]).train(bench.train_stream[0])
    _strategy(Doubled(), [NeedsHead()], head="fc")  # the user's word is taken at construction


def test_a_users_fixed_linear_head_grows_and_keeps_its_rows():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.0), batch_size=8, seed=0)  # lr 0: rows stay
    bench = tiny_benchmark(n_classes=4, n_experiences=2)
    s.train(bench.train_stream[0])
    before = [p.detach().clone() for p in (s.head.weight, s.head.bias)]
    s.train(bench.train_stream[1])
    assert s.head.out_features == 4 and type(s.head) is nn.Linear and s.model[2] is s.head
    assert torch.equal(s.head.weight[:2], before[0]) and torch.equal(s.head.bias[:2], before[1])
    assert any(p is s.head.weight for g in s.optimizer.param_groups for p in g["params"])


def test_fit_trains_with_each_parameters_group_settings():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": 0.5}], lr=0.1)
    s = Strategy(model, opt, seed=0)
    x, y = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([0, 0])
    means = s.fit(Batch(x, y, y), lambda b: model(b.x).pow(2).mean(), model.parameters(), epochs=1, name="t",
                  batch_size=2)
    # loss = mean((w.x)^2) = ((-1)^2 + 3^2)/2 = 5; grad = mean(2 (w.x) x) = ((-2)(1, 2) + 6 (3, 0))/2 = (8, -2)
    assert means == [5.0]
    assert torch.allclose(model.weight, torch.tensor([[1.0 - 0.5 * 8, -1.0 + 0.5 * 2]]))


class DropOdd(Plugin):
    """Holds out every odd label; records the batch the loss saw."""

    def __init__(self):
        self.sizes = []

    @hookimpl
    def held_out(self, batch):
        return batch.y % 2 == 1

    @hookimpl
    def after_forward(self, strategy):
        self.sizes.append((len(strategy.batch), int((strategy.batch.y % 2).sum()), strategy.n_current))


def test_held_out_rows_never_reach_the_loss():
    plugin = DropOdd()
    s = _strategy(nn.Linear(8, 4), [plugin])
    s.train(tiny_benchmark(n_classes=4, n_experiences=1).train_stream[0])
    assert plugin.sizes and all(odd == 0 and n == size for size, odd, n in plugin.sizes)


class HalfLoss(Plugin):
    @hookimpl
    def task_loss(self, strategy, output, batch):
        return 0.5 * strategy.criterion(output.logits, batch.y)


def test_task_loss_transform_replaces_the_loss_not_the_criterion():
    s = _strategy(nn.Linear(8, 4), [HalfLoss()])
    s.train(tiny_benchmark().train_stream[0])
    plain = s.criterion(s.output.logits, s.batch.y)
    assert torch.allclose(s.loss_terms["task"], 0.5 * plain)


class Corrector(Plugin):
    def __init__(self):
        self.calls, self.logged = [], []

    @hookimpl
    def set_correction(self, active):
        self.calls.append(active)

    @hookimpl
    def log_value(self, name, value, step):
        self.logged.append((name, value, step))

    @hookimpl
    def adapt_logits(self, logits):
        return logits + 100 * torch.arange(logits.shape[1], device=logits.device)


def test_predict_uncorrected_and_log_reach_the_plugins():
    plugin = Corrector()
    s = _strategy(nn.Linear(8, 4), [plugin])
    assert s.corrects
    with s.uncorrected():
        assert plugin.calls == [False]
    assert plugin.calls == [False, True]
    s.log("x/y", 3)
    assert plugin.logged == [("x/y", 3.0, 0)]
    assert (s.predict(torch.randn(7, 8)).argmax(1) == 3).all()
    chunked = s.infer(Batch(torch.randn(9, 8), torch.zeros(9, dtype=torch.long), torch.zeros(9, dtype=torch.long)),
                      batch_size=2, adapt=False)
    assert chunked.logits.shape == (9, 4) and chunked.features.shape == (9, 8)


def test_forget_momentum_zeroes_chosen_rows():
    model = nn.Linear(3, 2)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), seed=0)
    model(torch.ones(1, 3)).sum().backward()
    s.optimizer.step()
    s.forget_momentum(model.weight, rows=[1])
    buf = s.optimizer.state[model.weight]["momentum_buffer"]
    assert torch.equal(buf[1], torch.zeros(3)) and torch.equal(buf[0], torch.ones(3))


def test_the_four_user_models_train_and_give_features():
    bench = image_benchmark()
    for name, make in USER_MODELS.items():
        s = _strategy(make())
        s.train(bench.train_stream[0])
        assert s.embed(bench.test_stream[0].dataset).shape == (8, s.feature_dim), name
