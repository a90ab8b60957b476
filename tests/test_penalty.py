"""streamcl.penalty: per-sample gradient means and capped importance-weighted anchors, against hand computations."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from streamcl import Strategy, TensorData
from streamcl.penalty import Anchors, sample_gradients, stability_limit


def linear_strategy(lr=0.1, momentum=0.0):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum))


def test_squared_and_absolute_per_sample_gradients_of_a_linear_model():
    s = linear_strategy()
    x, y = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 1, 0, 1])
    fisher = sample_gradients(s, TensorData(x, y), lambda z, b: F.cross_entropy(z, b.y), "square", chunk=2)
    # d CE / d logits = softmax - onehot; d / dW = that outer x, per sample
    d = torch.softmax(s.model(x), 1).detach() - F.one_hot(y, 2).float()
    assert torch.allclose(fisher["weight"], (d[:, :, None] * x[:, None, :]).square().mean(0), atol=1e-6)
    assert torch.allclose(fisher["bias"], d.square().mean(0), atol=1e-6)
    # d ||Wx + b||^2 / dW = 2 (Wx + b) x^T
    mas = sample_gradients(s, TensorData(x, y), lambda z, b: z.square().sum(), "abs", chunk=3)
    z = s.model(x).detach()
    assert torch.allclose(mas["weight"], (2 * z[:, :, None] * x[:, None, :]).abs().mean(0), atol=1e-5)
    assert s.model.training  # the mode is put back


def test_per_sample_gradients_are_taken_as_many_samples_at_a_time_as_the_budget_allows(monkeypatch):
    from streamcl import penalty
    assert penalty.rows_within([torch.zeros(1000), torch.zeros(24)], budget=8192) == 2  # 4096 bytes a sample
    assert penalty.rows_within([torch.zeros(10 ** 6)], budget=10) == 1
    assert penalty.rows_within([torch.zeros(10, dtype=torch.float64)]) == (1 << 30) // 80
    torch.manual_seed(0)
    model = nn.Sequential(nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(12, 2))
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 1, 0, 1])
    score = lambda z, b: F.cross_entropy(z, b.y)  # noqa: E731
    whole = sample_gradients(s, TensorData(x, y), score)
    calls, original = [], penalty._per_sample
    monkeypatch.setattr(penalty, "_per_sample",
                        lambda st, b, sc, names: calls.append(len(b)) or original(st, b, sc, names))
    monkeypatch.setattr(penalty, "BUDGET", 2 * 8 * 4)  # the convolution's 8 floats, two samples at a time
    cut = sample_gradients(s, TensorData(x, y), score)
    assert calls == [2, 2, 2, 1]  # the outer-product check on 2 samples, then the convolution 2 + 2 + 1
    assert whole.keys() == cut.keys() and all(torch.allclose(whole[n], cut[n], atol=1e-7) for n in whole)
    by_hand = torch.zeros(2, 1, 3)
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        by_hand += model[1].weight.grad.square() / 5
    assert torch.allclose(cut["1.weight"], by_hand, atol=1e-7)


def test_penalty_is_the_weighted_squared_distance_to_every_anchor():
    s = linear_strategy()
    model, anchors = s.model, Anchors("test")
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    anchors.add({"weight": torch.full((2, 3), 0.5)}, {"weight": w0 - 1})
    anchors.add({"weight": torch.full((2, 3), 2.0), "bias": torch.ones(2)}, {"weight": w0, "bias": b0 + 2})
    value = anchors.penalty(model)
    assert value.item() == pytest.approx(0.5 * 6 * 1 + 2.0 * 0 + 1.0 * 2 * 4)
    value.backward()
    assert torch.allclose(model.weight.grad, torch.full((2, 3), 2 * 0.5 * 1.0))
    assert torch.allclose(model.bias.grad, torch.full((2,), 2 * 1.0 * -2.0))


def test_a_grown_parameter_is_compared_on_its_leading_rows_and_a_reshaped_one_is_skipped():
    anchors = Anchors("test")
    anchors.add({"w": torch.full((2, 3), 2.0), "v": torch.ones(4, 2)}, {"w": torch.zeros(2, 3), "v": torch.zeros(4, 2)})
    model = nn.Module()
    model.w = nn.Parameter(torch.ones(5, 3))  # grew from 2 rows to 5: the first 2 are compared
    model.v = nn.Parameter(torch.ones(4, 7))  # pruned or rebuilt to another width: a new parameter
    assert anchors.penalty(model).item() == pytest.approx(2.0 * 2 * 3)
    model.v = nn.Parameter(torch.ones(3, 2))  # fewer rows than anchored: skipped too
    assert anchors.penalty(model).item() == pytest.approx(2.0 * 2 * 3)


def test_decay_folds_the_points_into_one_at_the_newest_anchor():
    anchors = Anchors("test")
    anchors.add({"w": torch.tensor([1.0, 2.0])}, {"w": torch.zeros(2)})
    anchors.add({"w": torch.tensor([3.0, 1.0])}, {"w": torch.ones(2)}, decay=0.5)
    (coef, centre), = anchors.points
    assert torch.equal(coef["w"], torch.tensor([3.5, 2.0])) and torch.equal(centre["w"], torch.ones(2))


def test_coefficients_are_capped_at_half_the_sgd_stability_limit():
    s = linear_strategy(lr=0.1, momentum=0.9)
    assert stability_limit(s.optimizer)[id(s.model.weight)] == pytest.approx(19.0)  # (1 + 0.9) / 0.1
    anchors = Anchors("test")
    with pytest.warns(RuntimeWarning, match="capped"):
        anchors.add({"weight": torch.tensor([[1e9, 1.0, 1.0], [1.0, 1.0, 1.0]])},
                    {"weight": torch.zeros(2, 3)}, model=s.model, optimizer=s.optimizer)
    coef = anchors.points[0][0]["weight"]
    assert coef[0, 0].item() == pytest.approx(0.5 * 19.0 / 2)  # curvature 2c <= half the limit
    assert torch.equal(coef.flatten()[1:], torch.ones(5))


def test_a_huge_weight_cannot_make_sgd_diverge():
    s = linear_strategy(lr=0.5, momentum=0.9)
    anchors = Anchors("test")
    with pytest.warns(RuntimeWarning):
        anchors.add({n: torch.full_like(p, 1e12) for n, p in s.model.named_parameters()},
                    {n: torch.zeros_like(p) for n, p in s.model.named_parameters()}, model=s.model, optimizer=s.optimizer)
    for _ in range(200):
        s.optimizer.zero_grad()
        anchors.penalty(s.model).backward()
        s.optimizer.step()
    assert torch.isfinite(s.model.weight).all() and s.model.weight.abs().max() < 1e-3


def test_a_grown_parameter_is_compared_on_its_leading_rows_and_state_round_trips():
    model, anchors = nn.Linear(2, 3), Anchors("test")
    with torch.no_grad():
        model.weight.zero_()
    anchors.add({"weight": torch.ones(2, 2)}, {"weight": torch.ones(2, 2)})
    assert anchors.penalty(model).item() == 4.0  # rows 0-1 of the 3-row weight
    copy = Anchors("test")
    copy.load_state_dict(anchors.state_dict())
    assert copy.penalty(model).item() == 4.0


class MixesSamples(nn.Module):
    """A linear layer fed the batch mean as well: its per-sample gradients are not outer products."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.inner(x)
        return self.head(h + h.mean(0, keepdim=True))


def slow_means(s, data, score, reduce):
    from streamcl.penalty import _per_sample, trainable
    total, n = {}, 0
    for batch in s.batches(data, 4):
        for name, g in _per_sample(s, batch, score, list(trainable(s.model))).items():
            total[name] = total.get(name, 0) + (g.square() if reduce == "square" else g.abs()).sum(0)
        n += len(batch)
    return {k: v / n for k, v in total.items()}


@pytest.mark.parametrize("reduce", ["square", "abs"])
def test_batched_outer_products_equal_per_sample_gradients_under_a_task_mask(reduce):
    from streamcl.models import MLP
    from streamcl.plugins import TaskMask
    from streamcl.scenarios import class_incremental
    from tests.synthetic import blobs
    torch.manual_seed(0)
    bench = class_incremental(blobs(n_classes=4), blobs(10, 4, seed=1), 2, task_labels=True)
    model = MLP(8, [16, 16], 4)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[TaskMask()], batch_size=16)
    s.train(bench.train_stream[0])
    data, score = bench.train_stream[1].dataset, lambda z, b: F.cross_entropy(z, b.y)
    fast = sample_gradients(s, data, score, reduce, chunk=7)
    slow = slow_means(s, data, score, reduce)
    assert set(fast) == set(slow)
    for name in fast:
        assert torch.allclose(fast[name], slow[name], rtol=1e-4, atol=1e-8), name


def test_a_layer_that_mixes_samples_takes_the_per_sample_way():
    torch.manual_seed(0)
    model = MixesSamples()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(6, 3, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 1, 0, 1, 0])
    score = lambda z, b: F.cross_entropy(z, b.y)  # noqa: E731
    fast = sample_gradients(s, TensorData(x, y), score, chunk=3)
    slow = slow_means(s, TensorData(x, y), score, "square")
    for name in fast:
        assert torch.allclose(fast[name], slow[name], rtol=1e-5, atol=1e-8), name


# ----------------------------------------------------------------------------- the points folded: constant cost
def explicit(points, model) -> torch.Tensor:
    """``sum_k sum_i c_ki (theta_i - a_ki)^2`` point by point, each on the leading rows it covers."""
    params = dict(model.named_parameters())
    return sum((c * ((params[n][: c.shape[0]] if c.dim() else params[n]) - an[n]).square()).sum()
               for cs, an in points for n, c in cs.items())


def test_ten_folded_points_give_the_explicit_sum_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(6, 3, generator=g))
    model.s = nn.Parameter(torch.randn((), generator=g))
    anchors, points = Anchors("test"), []
    for k in range(10):  # the head grows: rows 0-1 anchored first, up to 6 rows later
        rows = min(6, 2 + k // 2)
        point = ({"w": torch.rand(rows, 3, generator=g) * 10, "s": torch.rand((), generator=g)},
                 {"w": torch.randn(rows, 3, generator=g), "s": torch.randn((), generator=g)})
        points.append(point)
        anchors.add(*point)
    assert len(anchors.points) == 1 and len(anchors.sums) == 2  # one quadratic per parameter, whatever k
    folded, by_hand = anchors.penalty(model), explicit(points, model)
    assert folded.item() == pytest.approx(by_hand.item(), rel=1e-5)
    grad_folded = torch.autograd.grad(folded, [model.w, model.s])
    grad_hand = torch.autograd.grad(by_hand, [model.w, model.s])
    for a, b in zip(grad_folded, grad_hand):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_holding_the_points_one_by_one_is_folded_on_load():
    model = nn.Linear(2, 3)
    points = [({"weight": torch.full((3, 2), 1.0 + k)}, {"weight": torch.full((3, 2), float(k))}) for k in range(3)]
    anchors = Anchors("test")
    anchors.load_state_dict(points)  # the state before the points were folded
    assert anchors.penalty(model).item() == pytest.approx(explicit(points, model).item(), rel=1e-6)
