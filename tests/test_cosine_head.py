"""CosineHead (LUCIR eq. 4 and imprinting) against hand computations; the head and last ReLU of any model;
refusals."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, PluginError, Strategy, TensorData
from streamcl.models import MLP, Classifier
from streamcl.plugins.cosine_head import CosineHead, CosineLinear, final_relu
from streamcl.plugins.progress_compress import ProgressCompress
from streamcl.plugins.replay import Replay
from tests.conftest import image_benchmark, resnet18, sequential
from tests.synthetic import tiny_benchmark
from tests.test_wa import RowlessHead  # a linear head without weight rows
from tests.conftest import NoHead


def build(plugins, n_classes=6, n_exp=3, seed=0, growing=False):
    torch.manual_seed(seed)
    bench = tiny_benchmark(n_classes, n_exp)
    model = MLP(8, [16], n_classes, growing=growing)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=plugins, epochs=2,
                 batch_size=16, seed=seed)
    return s, bench


# ----------------------------------------------------------------------------- eq. 4
def test_outputs_are_scale_times_the_cosine_by_hand():
    head = CosineLinear(torch.tensor([[3.0, 4.0], [0.0, -2.0]]), scale=2.0)
    x = torch.tensor([[1.0, 0.0], [0.0, 5.0], [-2.0, -2.0]])
    # unit rows (0.6, 0.8), (0, -1); unit inputs (1, 0), (0, 1), (-1, -1)/sqrt(2)
    r = 1 / math.sqrt(2)
    cos = torch.tensor([[0.6, 0.0], [0.8, -1.0], [-1.4 * r, r]])
    assert torch.allclose(head.cosine(x), cos, atol=1e-6)
    assert torch.allclose(head(x), 2.0 * cos, atol=1e-6)
    assert isinstance(head.scale, nn.Parameter) and head.scale.item() == 2.0


def test_outputs_lie_in_minus_scale_to_scale():
    g = torch.Generator().manual_seed(0)
    head = CosineLinear(torch.randn(10, 32, generator=g), scale=7.5)
    x = torch.randn(500, 32, generator=g) * 100
    x[:10] = head.weight[:10] * 3  # inputs along a row: the bound is reached
    out = head(x).detach()
    assert out.abs().max() <= 7.5 * (1 + 1e-6)
    assert out.max() == pytest.approx(7.5, rel=1e-5)
    fixed = CosineLinear(torch.randn(3, 4, generator=g), scale=4.0, learn_scale=False)
    assert "scale" not in dict(fixed.named_parameters()) and fixed.scale.item() == 4.0
    assert fixed(torch.randn(50, 4, generator=g)).abs().max() <= 4.0 * (1 + 1e-6)


def test_adapt_model_replaces_the_head_keeps_every_row_and_learns_the_scale():
    cosine = CosineHead()
    s, bench = build([Replay(memory=12), cosine])
    rows = s.model.head.weight.detach().clone()
    s.train(bench.train_stream[0])
    head = s.model.head
    assert isinstance(head, CosineLinear) and head.out_features == 6 and head.in_features == 16
    assert s.head is head and s.head_path == "head"
    assert isinstance(s.model.backbone[-1], nn.Identity) and cosine.dropped_relu == "backbone.2"  # LUCIR's last ReLU
    trained = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
    assert id(head.scale) in trained and id(head.weight) in trained
    assert head.scale.item() != 1.0  # it learned from 1
    assert not torch.equal(head.weight.detach()[:2], rows[:2])  # trained rows moved
    data = bench.test_stream[0].dataset
    out = s.infer(Batch(data.x, data.y, data.t))
    assert out.raw.abs().max() <= head.scale.abs().item() * (1 + 1e-6)
    assert torch.allclose(out.raw, head.scale * head.cosine(out.features))
    assert (out.features < 0).any()  # no ReLU before the head any more
    kept = build([CosineHead(drop_last_relu=False)])[0]
    kept.train(bench.train_stream[0])
    assert isinstance(kept.model.backbone[-1], nn.ReLU)


# ----------------------------------------------------------------------------- any model: the head and the last ReLU
def test_a_plain_sequential_gets_the_cosine_head_and_loses_the_relu_before_it():
    torch.manual_seed(0)
    model = sequential(4)
    cosine = CosineHead()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=[Replay(memory=8), cosine],
                 batch_size=8, seed=0)
    linear = model[5].weight.detach().clone()
    bench = image_benchmark()
    cosine.adapt_model(strategy=s, model=s.model, experience=bench.train_stream[0])  # as train() calls it
    assert isinstance(model[5], CosineLinear) and torch.equal(model[5].weight.detach(), linear)
    assert isinstance(model[4], nn.Identity) and isinstance(model[2], nn.ReLU) and cosine.dropped_relu == "4"
    assert s.head is model[5] and any(p is model[5].scale for g in s.optimizer.param_groups for p in g["params"])
    for e in bench.train_stream:
        s.train(e)
    assert 0 <= s.eval(bench.test_stream)["accuracy"][0] <= 1


class TwiceReLU(nn.Module):
    """One ReLU module called twice, the second time right before the head: dropping it would drop both."""

    def __init__(self):
        super().__init__()
        self.body, self.act, self.head = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.act(self.body(self.act(x))))


class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


@pytest.mark.parametrize("make,shape,found", [
    (lambda: MLP(8, [16, 16], 4), (1, 8), "backbone.4"), (lambda: sequential(4), (1, 1, 28, 28), "4"),
    (resnet18, (1, 1, 28, 28), None),  # avgpool between its last ReLU and fc
    (TwiceReLU, (1, 8), None), (FunctionalReLU, (1, 8), None)],
    ids=["mlp", "sequential", "resnet18", "relu-twice", "functional"])
def test_the_relu_whose_output_is_the_heads_input_is_found_or_none(make, shape, found):
    torch.manual_seed(0)
    model = make()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), seed=0)
    one = Batch(torch.randn(shape), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert final_relu(s, one) == found


# ----------------------------------------------------------------------------- imprinting
def identity_strategy(weight):
    """A strategy on a model whose features are its inputs, with the cosine head in place and momentum of ones."""
    model = Classifier(nn.Identity(), nn.Linear(weight.shape[1], weight.shape[0], bias=False), weight.shape[1])
    with torch.no_grad():
        model.head.weight.copy_(weight)
    plugin = CosineHead(freeze_old=False)  # imprinting alone: the fixed old rows are tested at the end
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=[plugin], seed=0)
    plugin.adapt_model(strategy=s, model=s.model, experience=SimpleNamespace(
        dataset=TensorData(torch.zeros(1, weight.shape[1]), torch.zeros(1)), classes=[0]))
    s.optimizer.state[s.head.weight]["momentum_buffer"] = torch.ones_like(weight)
    return s, plugin


def imprint(old_rows, x, y, classes, seen):
    w = torch.zeros(4, 2)
    w[: len(old_rows)] = torch.tensor(old_rows)
    w[2:] = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    s, plugin = identity_strategy(w)
    plugin.classes = list(seen)
    s.experience = SimpleNamespace(dataset=TensorData(torch.tensor(x), torch.tensor(y)), classes=classes)
    plugin.before_training_exp(strategy=s)
    return s.head.weight.detach(), s.optimizer.state[s.head.weight]["momentum_buffer"]


def test_new_rows_are_the_normalised_mean_of_normalised_features_times_the_old_norm():
    # old rows of norm 5 and 2: mean 3.5; class 2: unit features (1, 0), (0, 1) -> mean direction (1, 1)/sqrt(2);
    # class 3: (0, 2), (0, 0.5), (3, 0) -> unit (0, 1), (0, 1), (1, 0) -> mean (1/3, 2/3) -> (1, 2)/sqrt(5)
    x = [[1.0, 0.0], [0.0, 4.0], [0.0, 2.0], [0.0, 0.5], [3.0, 0.0]]
    w, momentum = imprint([[3.0, 4.0], [0.0, -2.0]], x, [2, 2, 3, 3, 3], classes=[2, 3], seen=[0, 1])
    assert torch.allclose(w[:2], torch.tensor([[3.0, 4.0], [0.0, -2.0]]))  # old rows untouched
    assert torch.allclose(w[2], 3.5 * torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-6)
    assert torch.allclose(w[3], 3.5 * torch.tensor([1.0, 2.0]) / math.sqrt(5), atol=1e-6)
    assert torch.equal(momentum[:2], torch.ones(2, 2)) and torch.equal(momentum[2:], torch.zeros(2, 2))


def test_only_classes_not_seen_before_are_imprinted_and_never_at_the_first_experience():
    x = [[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]
    w, momentum = imprint([[3.0, 4.0], [0.0, -2.0]], x, [1, 2, 2], classes=[1, 2], seen=[0, 1])
    assert torch.allclose(w[1], torch.tensor([0.0, -2.0]))  # class 1 was seen: kept
    assert torch.allclose(w[3], torch.tensor([1.0, -1.0]))  # class 3 not in the experience: kept
    unit = torch.tensor([0.0, 1.0]) + torch.tensor([1.0, 1.0]) / math.sqrt(2)  # class 2: (0, 1), (5, 5)
    assert torch.allclose(w[2], 3.5 * unit / unit.norm(), atol=1e-6)
    assert torch.equal(momentum[1], torch.ones(2))
    first, _ = imprint([[3.0, 4.0], [0.0, -2.0]], x, [0, 1, 1], classes=[0, 1], seen=[])
    assert torch.allclose(first[:2], torch.tensor([[3.0, 4.0], [0.0, -2.0]]))


def test_imprinting_in_a_run_points_the_new_rows_at_their_class_means():
    seen = {}

    class Watch(CosineHead):
        def imprint_rows(self, head, classes, means, old):
            super().imprint_rows(head, classes, means, old)
            seen[tuple(classes.tolist())] = (head.weight.detach().clone(), means)

    s, bench = build([Watch()])
    for exp in bench.train_stream:
        s.train(exp)
    assert sorted(seen) == [(2, 3), (4, 5)]
    w, means = seen[(4, 5)]
    assert torch.allclose(nn.functional.normalize(w[4:6], dim=1), means, atol=1e-6)
    assert torch.allclose(w[4:6].norm(dim=1), w[:4].norm(dim=1).mean().expand(2), atol=1e-6)


def test_a_growing_head_keeps_growing_from_the_strategy_generator():
    s, bench = build([CosineHead()], growing=True)
    sizes = []
    for exp in bench.train_stream:
        s.train(exp)
        sizes.append(s.model.head.out_features)
    assert sizes == [2, 4, 6] and isinstance(s.model.head, CosineLinear)
    assert 0 <= s.eval(bench.test_stream)["accuracy"][0] <= 1
    again, _ = build([CosineHead()], growing=True)
    for exp in bench.train_stream:
        again.train(exp)
    assert torch.equal(again.model.head.weight, s.model.head.weight)  # the same draws, run to run


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs", [dict(scale=0.0), dict(scale=-1.0), dict(scale=float("inf")), dict(scale="16"),
                                    dict(scale=True), dict(learn_scale="yes"), dict(imprint=1),
                                    dict(drop_last_relu=None)])
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        CosineHead(**kwargs)


def test_plugins_that_rebuild_the_model_and_a_second_head_are_refused_by_role():
    with pytest.raises(PluginError, match="both own the role 'architecture'"):
        build([CosineHead(), ProgressCompress()])
    with pytest.raises(PluginError, match="both own the role 'architecture'"):
        build([CosineHead(), CosineHead()])


def test_a_model_without_a_linear_head_or_without_weight_rows_is_refused_at_construction():
    model = NoHead()
    with pytest.raises(ConfigError, match=r"CosineHead\(\) needs the model's classifier head"):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[CosineHead()], batch_size=16, seed=0)

    model = Classifier(nn.Identity(), RowlessHead(8, 6), 8)
    with pytest.raises(ConfigError, match=r"cosine_head works on the rows of the classifier head's weight.*Rowless"):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[CosineHead()], seed=0)


def test_state_round_trip():
    s, bench = build([CosineHead()])
    plugin = s.plugins[0]
    s.train(bench.train_stream[0])
    copy = CosineHead()
    copy.load_state_dict(plugin.state_dict())
    assert copy.classes == [0, 1] and copy.dropped_relu == "backbone.2" and copy.classes is not plugin.classes


# ----------------------------------------------------------------------------- fixed old-class rows
@pytest.mark.parametrize("freeze_old", [True, False])
def test_old_class_rows_are_fixed_after_the_first_experience_only_the_new_rows_learn(freeze_old):
    s, bench = build([Replay(memory=12), CosineHead(freeze_old=freeze_old)])
    s.train(bench.train_stream[0])
    first = s.model.head.weight.detach().clone()
    s.train(bench.train_stream[1])
    second = s.model.head.weight.detach().clone()
    assert not torch.equal(second[2:4], first[2:4])  # the new classes' rows learn
    assert torch.equal(second[:2], first[:2]) == freeze_old  # the old ones are fixed (LUCIR's authors' code)
    assert s.model.head.frozen.tolist() == [freeze_old] * 2 + [False] * 4
    s.train(bench.train_stream[2])
    third = s.model.head.weight.detach()
    assert torch.equal(third[:4], second[:4]) == freeze_old and not torch.equal(third[4:], second[4:])
    assert s.model.head.scale.requires_grad  # the scale still learns


def test_frozen_rows_get_no_gradient_and_still_score():
    head = CosineLinear(torch.tensor([[3.0, 4.0], [0.0, -2.0], [1.0, 1.0]]), scale=2.0)
    before = head(torch.tensor([[1.0, 0.5]])).detach()
    head.freeze(torch.tensor([0, 2]))
    out = head(torch.tensor([[1.0, 0.5]]))
    assert torch.equal(out.detach(), before)
    out.sum().backward()
    assert head.weight.grad[[0, 2]].abs().sum() == 0 and head.weight.grad[1].abs().sum() > 0
