"""Synaptic intelligence against hand computations: the path integral over an exact SGD trajectory on a quadratic."""
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from streamcl import ConfigError, Plugin, PluginError, Strategy, TensorData, hookimpl
from streamcl.plugins.si import SI
from streamcl.scenarios import class_incremental
from tests.reliability import tiny_run

A = (0.5, 2.0)  # curvatures a_k of L(theta) = sum_k a_k (theta_k - b_k)^2
B = ((1.0, -2.0), (-1.0, 0.5))  # b of experience 0 and of experience 1
THETA0 = (0.25, 0.75)
LR, STEPS, XI, C = 0.1, 4, 0.5, 0.3


class Point(nn.Module):
    """Two parameters; every sample's logits are (theta_1, theta_2, 0, 0), whatever the input."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(THETA0, dtype=torch.float64))

    def forward(self, x):
        return torch.cat([self.theta, self.theta.new_zeros(2)]).expand(len(x), 4)


def quadratic(logits, y):
    """L(theta) of the experience the labels come from (labels 0, 1: experience 0; 2, 3: experience 1)."""
    b = torch.tensor(B[int(y[0]) // 2], dtype=torch.float64)
    return (torch.tensor(A, dtype=torch.float64) * (logits[0, :2] - b).square()).sum()


def quadratic_stream():
    data = TensorData(torch.zeros(8, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    return class_incremental(data, data, 2)


def train_point(plugin):
    model = Point()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=LR), criterion=quadratic, plugins=[plugin],
                 epochs=STEPS, batch_size=4, seed=0)  # one batch an epoch: one step an epoch
    return s, quadratic_stream()


def by_hand():
    """omega, Omega and theta after each experience, stepping plain SGD by hand (float64)."""
    a, theta = torch.tensor(A, dtype=torch.float64), torch.tensor(THETA0, dtype=torch.float64)
    Omega, anchor, out = torch.zeros(2, dtype=torch.float64), None, []
    for b in B:
        b, start, omega = torch.tensor(b, dtype=torch.float64), theta.clone(), torch.zeros(2, dtype=torch.float64)
        for _ in range(STEPS):
            g_task = 2 * a * (theta - b)  # the unregularised gradient (eq. 3)
            g = g_task + (2 * C * Omega * (theta - anchor) if anchor is not None else 0)
            update = -LR * g
            omega += -g_task * update
            theta = theta + update
        Omega = Omega + (omega / ((theta - start).square() + XI)).clamp(min=0)  # eq. 5
        anchor = theta.clone()
        out.append((omega, Omega.clone(), theta.clone()))
    return out


class Spy(Plugin):
    """Listed before SI: sees its running path integral at the end of the experience, before SI folds it."""

    def __init__(self, si):
        self.si, self.omega = si, None

    @hookimpl
    def after_training_exp(self, strategy):
        self.omega = self.si.omega["theta"].clone()


def test_first_experience_path_integral_closed_form():
    plugin = SI(c=C, xi=XI)
    spy = Spy(plugin)
    model = Point()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=LR), criterion=quadratic, plugins=[spy, plugin],
                 epochs=STEPS, batch_size=4, seed=0)
    s.train(quadratic_stream().train_stream[0])
    # plain SGD on a_k (theta_k - b_k)^2: theta_t - b = r^t (theta_0 - b), r = 1 - 2 lr a; each step adds
    # -g_t * (-lr g_t) = lr g_t^2 with g_t = 2 a r^t (theta_0 - b)
    for k in range(2):
        a, b, t0 = A[k], B[0][k], THETA0[k]
        r = 1 - 2 * LR * a
        omega = LR * 4 * a * a * (t0 - b) ** 2 * (1 - r ** (2 * STEPS)) / (1 - r * r)
        change = (r ** STEPS - 1) * (t0 - b)
        assert spy.omega[k].item() == pytest.approx(omega, rel=1e-12)
        assert plugin.importance["theta"][k].item() == pytest.approx(omega / (change ** 2 + XI), rel=1e-12)
        assert s.model.theta[k].item() == pytest.approx(b + r ** STEPS * (t0 - b), rel=1e-12)
    assert plugin.omega is None and plugin.start is None


def test_two_experiences_match_the_hand_trajectory_and_the_penalty():
    s, bench = train_point(SI(c=C, xi=XI))
    expected = by_hand()
    plugin = s.plugins[0]
    s.train(bench.train_stream[0])
    assert torch.allclose(plugin.importance["theta"], expected[0][1], rtol=1e-12, atol=0)
    (coefficients, anchors), = plugin.anchors.points
    assert torch.allclose(coefficients["theta"], C * expected[0][1], rtol=1e-12, atol=0)
    assert torch.equal(anchors["theta"], s.model.theta.detach())
    # the penalty c * sum Omega (theta - theta~)^2 (eq. 4), at a moved point
    with torch.no_grad():
        s.model.theta += torch.tensor([0.5, -1.5], dtype=torch.float64)
    terms = plugin.loss_terms(strategy=s)
    assert set(terms) == {"si"}
    hand = C * (expected[0][1] * torch.tensor([0.25, 2.25], dtype=torch.float64)).sum()
    assert terms["si"].item() == pytest.approx(hand.item(), rel=1e-12)
    with torch.no_grad():
        s.model.theta.copy_(expected[0][2])
    # experience 1 trains under the penalty; its path integral uses the task's gradient only
    s.train(bench.train_stream[1])
    assert torch.allclose(s.model.theta.detach(), expected[1][2], rtol=1e-12, atol=0)
    assert torch.allclose(plugin.importance["theta"], expected[1][1], rtol=1e-12, atol=0)
    assert (expected[1][1] > expected[0][1]).all()  # both experiences counted


def test_a_negative_path_integral_adds_no_importance():
    plugin = SI(c=1.0, xi=0.1)
    model = nn.Linear(2, 1)
    omega = {"weight": torch.tensor([[-1.0, 2.0]]), "bias": torch.tensor([-3.0])}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    plugin.load_state_dict({"importance": {}, "omega": omega, "start": start, "anchors": []})
    plugin.after_training_exp(strategy=SimpleNamespace(model=model, optimizer=None))
    assert plugin.importance["weight"].tolist() == [[0.0, pytest.approx(2.0 / 0.1)]]  # no change: Delta = 0
    assert plugin.importance["bias"].tolist() == [0.0]


def test_no_penalty_before_the_first_experience_ends_and_c_zero_adds_none():
    assert SI().loss_terms(strategy=None) is None
    s, bench = train_point(SI(c=0.0, xi=XI))
    s.train(bench.train_stream[0])
    assert s.plugins[0].loss_terms(strategy=s) is None
    assert s.plugins[0].importance["theta"].gt(0).all()


def test_defaults():
    plugin = SI()
    assert (plugin.c, plugin.xi) == (2.0, 1e-3)


@pytest.mark.parametrize("kwargs", [dict(c=-1.0), dict(c=float("nan")), dict(c=math.inf), dict(c="1"), dict(c=True),
                                    dict(xi=0.0), dict(xi=-1e-3), dict(xi=float("inf")), dict(xi=None)])
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError, match="SI (c|xi)="):
        SI(**kwargs)


def test_two_si_plugins_are_refused():
    with pytest.raises(PluginError, match="both own the role 'si_penalty'"):
        tiny_run({"plugins": [{"name": "si"}, {"name": "si", "c": 2.0}]})


def test_a_huge_weight_is_capped_and_stays_finite():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = tiny_run({"plugins": [{"name": "si", "c": 1e30}]})
    assert any("SI: the penalty" in str(w.message) for w in caught)
    assert all(math.isfinite(v) for row in res["accuracy_matrix"] for v in row if v is not None)
    assert 0.0 <= res["final_accuracy"] <= 1.0


def test_state_round_trip_in_the_middle_of_an_experience():
    s, bench = train_point(SI(c=C, xi=XI))
    s.train(bench.train_stream[0])
    plugin = s.plugins[0]
    plugin.before_training_exp(strategy=s)
    plugin.omega["theta"] += torch.tensor([0.125, 0.5], dtype=torch.float64)
    state = plugin.state_dict()
    other = SI(c=C, xi=XI)
    other.load_state_dict(state)
    for key in ("importance", "omega", "start"):
        assert all(torch.equal(other.__dict__[key][n], t) for n, t in plugin.__dict__[key].items())
    state["omega"]["theta"] += 1  # the loaded copy shares nothing with the state
    assert torch.equal(other.omega["theta"], plugin.omega["theta"])
    assert other.loss_terms(strategy=s)["si"].item() == plugin.loss_terms(strategy=s)["si"].item()
