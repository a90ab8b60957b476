"""Memory aware synapses against hand computations on a linear model: |d ||Wx + b||^2 / d theta| averaged."""
import math
import warnings

import pytest
import torch
from torch import nn

from streamcl import ConfigError, PluginError, Strategy, TensorData
from streamcl.plugins.mas import MAS
from streamcl.plugins.task_mask import TaskMask
from streamcl.scenarios import class_incremental
from tests.reliability import tiny_run


def stream(task_labels=False):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3] * 3)
    return class_incremental(TensorData(x, y), TensorData(x, y), 2, task_labels=task_labels)


def linear_strategy(plugins, lr=0.0):
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=lr), plugins=plugins, batch_size=5, seed=0)


def by_hand(model, x, rows=None):
    """mean_n |2 z_n x_n^T| and mean_n |2 z_n|, z = W x + b (only ``rows`` of z count)."""
    z = x @ model.weight.detach().T + model.bias.detach()
    if rows is not None:
        z = z * torch.isin(torch.arange(z.shape[1]), torch.tensor(rows)).to(z.dtype)
    return (2 * z[:, :, None] * x[:, None, :]).abs().mean(0), (2 * z).abs().mean(0)


def test_importance_is_the_mean_absolute_gradient_of_the_squared_norm():
    s, bench = linear_strategy([MAS(lambda_=0.5)]), stream()
    plugin = s.plugins[0]
    s.train(bench.train_stream[0])  # lr = 0: the weights stay where they started
    w, b = by_hand(s.model, bench.train_stream[0].dataset.x)
    assert torch.allclose(plugin.importance["weight"], w, rtol=1e-12, atol=0)
    assert torch.allclose(plugin.importance["bias"], b, rtol=1e-12, atol=0)
    s.train(bench.train_stream[1])  # summed over experiences
    w1, b1 = by_hand(s.model, bench.train_stream[1].dataset.x)
    assert torch.allclose(plugin.importance["weight"], w + w1, rtol=1e-12, atol=0)
    assert torch.allclose(plugin.importance["bias"], b + b1, rtol=1e-12, atol=0)
    (coefficients, anchors), = plugin.anchors.points
    assert torch.allclose(coefficients["weight"], 0.5 * (w + w1), rtol=1e-12, atol=0)
    assert torch.equal(anchors["bias"], s.model.bias.detach())


def test_penalty_value():
    s, bench = linear_strategy([MAS(lambda_=0.5)]), stream()
    plugin = s.plugins[0]
    assert plugin.loss_terms(strategy=s) is None  # nothing before the first experience ends
    s.train(bench.train_stream[0])
    w, b = by_hand(s.model, bench.train_stream[0].dataset.x)
    dw = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)
    db = torch.tensor([0.5, 0.0, -2.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        s.model.weight += dw
        s.model.bias += db
    terms = plugin.loss_terms(strategy=s)
    assert set(terms) == {"mas"}
    hand = 0.5 * ((w * dw.square()).sum() + (b * db.square()).sum())  # lambda * sum Omega (theta - theta*)^2
    assert terms["mas"].item() == pytest.approx(hand.item(), rel=1e-12)
    s.model.zero_grad(set_to_none=True)  # what training left there
    terms["mas"].backward()
    assert torch.allclose(s.model.bias.grad, 2 * 0.5 * b * db, rtol=1e-12, atol=0)


def test_under_a_task_mask_only_the_task_head_counts():
    s, bench = linear_strategy([TaskMask(), MAS()]), stream(task_labels=True)
    plugin = s.plugins[1]
    s.train(bench.train_stream[0])  # task 0: classes 0 and 1
    w, b = by_hand(s.model, bench.train_stream[0].dataset.x, rows=[0, 1])
    assert torch.allclose(plugin.importance["weight"], w, rtol=1e-12, atol=0)
    assert torch.allclose(plugin.importance["bias"], b, rtol=1e-12, atol=0)
    assert plugin.importance["weight"][2:].abs().sum() == 0 and plugin.importance["bias"][:2].gt(0).all()


def test_lambda_zero_adds_no_penalty_and_defaults():
    s, bench = linear_strategy([MAS(lambda_=0.0)]), stream()
    s.train(bench.train_stream[0])
    assert s.plugins[0].loss_terms(strategy=s) is None and s.plugins[0].importance["bias"].gt(0).any()
    assert MAS().lambda_ == 0.03


@pytest.mark.parametrize("value", [-1.0, float("nan"), math.inf, "1", True, None])
def test_bad_settings(value):
    with pytest.raises(ConfigError, match="MAS lambda_="):
        MAS(lambda_=value)


def test_two_mas_plugins_are_refused():
    with pytest.raises(PluginError, match="both own the role 'mas_penalty'"):
        tiny_run({"plugins": [{"name": "mas"}, {"name": "mas", "lambda_": 2.0}]})


def test_a_huge_weight_is_capped_and_stays_finite():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = tiny_run({"plugins": [{"name": "mas", "lambda_": 1e30}]})
    assert any("MAS: the penalty" in str(w.message) for w in caught)
    assert all(math.isfinite(v) for row in res["accuracy_matrix"] for v in row if v is not None)
    assert 0.0 <= res["final_accuracy"] <= 1.0


def test_state_round_trip():
    s, bench = linear_strategy([MAS(lambda_=0.5)], lr=0.1), stream()
    s.train(bench.train_stream[0])
    plugin, other = s.plugins[0], MAS(lambda_=0.5)
    state = plugin.state_dict()
    other.load_state_dict(state)
    state["importance"]["weight"] += 1  # the loaded copy shares nothing with the state
    assert all(torch.equal(other.importance[n], t) for n, t in plugin.importance.items())
    assert other.loss_terms(strategy=s)["mas"].item() == plugin.loss_terms(strategy=s)["mas"].item()
