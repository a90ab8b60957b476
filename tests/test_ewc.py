"""EWC and online EWC: the Fisher and the penalty against hand computations; no weight makes a NaN model."""
import math
import warnings

import pytest
import torch
from torch import nn

from streamcl import ConfigError, Strategy, TensorData
from streamcl.models import MLP
from streamcl.plugins.ewc import EWC
from streamcl.plugins.task_mask import TaskMask
from streamcl.scenarios import task_incremental
from tests.reliability import tiny_run
from tests.synthetic import blobs

W = torch.tensor([[0.5, -1.0, 0.2], [0.3, 0.8, -0.4]])
B = torch.tensor([0.1, -0.2])
X = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.3, 2.0], [-1.5, 0.4, 0.7]])
Y = torch.tensor([0, 1, 1])


def linear(weight=W, bias=B) -> nn.Linear:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.copy_(bias)
    return model


def strategy(model, plugins, lr=1e-3, momentum=0.0) -> Strategy:
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), plugins=plugins,
                    batch_size=2, seed=0)


def hand_fisher(weight, bias, x, y):
    """Per sample, d CE / d z = softmax(z) - onehot(y); d/dW = that outer x, d/db = that: squared, averaged."""
    fw, fb = torch.zeros_like(weight), torch.zeros_like(bias)
    for xn, yn in zip(x, y):
        z = [sum(weight[k, j].item() * xn[j].item() for j in range(3)) + bias[k].item() for k in range(2)]
        p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
        delta = torch.tensor([p[k] - (1.0 if k == yn else 0.0) for k in range(2)], dtype=torch.float64)
        fw += (torch.outer(delta, xn.double()) ** 2).float() / len(x)
        fb += (delta ** 2).float() / len(x)
    return {"weight": fw, "bias": fb}


# ----------------------------------------------------------------------------- the Fisher
def test_fisher_of_a_linear_model_by_hand():
    ewc = EWC(lambda_=1.0)
    s = strategy(linear(), [ewc])
    fisher = ewc.fisher(s, TensorData(X, Y))
    expected = hand_fisher(W, B, X, Y)
    assert set(fisher) == {"weight", "bias"}
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-5, atol=1e-7)


def test_fisher_samples_take_a_subset_drawn_from_the_strategy_generator():
    data = TensorData(X, Y)
    whole = EWC(fisher_samples=3)  # as many as the data holds: every sample
    s = strategy(linear(), [whole])
    torch.testing.assert_close(whole.fisher(s, data)["weight"], hand_fisher(W, B, X, Y)["weight"])
    one = EWC(fisher_samples=1)
    s = strategy(linear(), [one])
    s.generator.manual_seed(5)
    index = torch.randperm(3, generator=torch.Generator().manual_seed(5))[0]
    torch.testing.assert_close(one.fisher(s, data)["bias"], hand_fisher(W, B, X[index:index + 1],
                                                                        Y[index:index + 1])["bias"])


def test_fisher_under_a_task_mask_is_zero_on_the_other_tasks_head_rows():
    torch.manual_seed(0)
    bench = task_incremental(blobs(n_classes=4), blobs(10, 4, seed=1), 2)
    ewc = EWC(lambda_=2.0)
    model = MLP(8, [16], 4)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[TaskMask(), ewc], batch_size=16,
                 seed=0)
    s.train(bench.train_stream[0])  # task 0: classes 0 and 1
    (coefficients, _), = ewc.anchors.points
    for name in ("head.weight", "head.bias"):
        assert torch.all(coefficients[name][2:] == 0)  # rows of classes 2, 3: masked out of every logit
        assert torch.all(coefficients[name][:2].abs().sum(-1) > 0)
    assert coefficients["backbone.1.weight"].sum() > 0


# ----------------------------------------------------------------------------- the penalty
def after(ewc, s, weight, bias, x, y):
    """Set the model's parameters, then consolidate on (x, y) as after an experience."""
    with torch.no_grad():
        s.model.weight.copy_(weight)
        s.model.bias.copy_(bias)
    ewc.consolidate(s, data=TensorData(x, y))


W2, B2 = torch.tensor([[0.1, 0.4, -0.6], [-0.2, 0.3, 0.9]]), torch.tensor([0.0, 0.5])
X2, Y2 = torch.tensor([[0.2, -1.0, 0.3], [1.2, 0.1, -0.5]]), torch.tensor([1, 0])
W3, B3 = torch.tensor([[0.7, 0.0, 0.1], [0.2, -0.5, 0.3]]), torch.tensor([-0.3, 0.2])


def penalty_and_gradient(ewc, s):
    s.model.zero_grad()
    value = ewc.loss_terms(strategy=s)["ewc"]
    value.backward()
    return value.item(), s.model.weight.grad.clone(), s.model.bias.grad.clone()


def test_penalty_is_one_term_per_experience_by_hand():
    lam = 3.0
    ewc = EWC(lambda_=lam)
    s = strategy(linear(), [ewc])
    assert ewc.loss_terms(strategy=s) is None  # nothing consolidated yet
    after(ewc, s, W, B, X, Y)
    after(ewc, s, W2, B2, X2, Y2)
    f1, f2 = hand_fisher(W, B, X, Y), hand_fisher(W2, B2, X2, Y2)
    with torch.no_grad():
        s.model.weight.copy_(W3)
        s.model.bias.copy_(B3)
    value, gw, gb = penalty_and_gradient(ewc, s)
    now, a1, a2 = {"weight": W3, "bias": B3}, {"weight": W, "bias": B}, {"weight": W2, "bias": B2}
    expected = sum(lam / 2 * (f[n] * (now[n] - a[n]) ** 2).sum() for f, a in ((f1, a1), (f2, a2)) for n in now)
    assert value == pytest.approx(expected.item(), rel=1e-5)
    grad = {n: sum(lam * f[n] * (now[n] - a[n]) for f, a in ((f1, a1), (f2, a2))) for n in now}
    torch.testing.assert_close(gw, grad["weight"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gb, grad["bias"], rtol=1e-5, atol=1e-7)


def test_online_penalty_is_one_decayed_term_at_the_latest_anchor_by_hand():
    lam, gamma = 3.0, 0.8
    ewc = EWC(lambda_=lam, online=True, gamma=gamma)
    s = strategy(linear(), [ewc])
    after(ewc, s, W, B, X, Y)
    after(ewc, s, W2, B2, X2, Y2)
    assert len(ewc.anchors.points) == 1
    f1, f2 = hand_fisher(W, B, X, Y), hand_fisher(W2, B2, X2, Y2)
    running = {n: gamma * f1[n] + f2[n] for n in f1}  # F* = gamma F*_old + F_new (eq. 8)
    with torch.no_grad():
        s.model.weight.copy_(W3)
        s.model.bias.copy_(B3)
    value, gw, gb = penalty_and_gradient(ewc, s)
    now, anchor = {"weight": W3, "bias": B3}, {"weight": W2, "bias": B2}
    # eq. 7: 1/2 ||theta - theta*||^2 weighted by gamma F*, times lambda
    expected = sum(lam / 2 * (gamma * running[n] * (now[n] - anchor[n]) ** 2).sum() for n in now)
    assert value == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(gw, lam * gamma * running["weight"] * (W3 - W2), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gb, lam * gamma * running["bias"] * (B3 - B2), rtol=1e-5, atol=1e-7)


def test_online_with_gamma_one_and_one_experience_equals_ewc():
    plain, online = EWC(lambda_=5.0), EWC(lambda_=5.0, online=True)
    for ewc in (plain, online):
        s = strategy(linear(), [ewc])
        after(ewc, s, W, B, X, Y)
        with torch.no_grad():
            s.model.weight.copy_(W3)
        ewc.value = ewc.loss_terms(strategy=s)["ewc"].item()
    assert plain.value == pytest.approx(online.value, rel=1e-6) and plain.value > 0


def test_consolidate_on_a_sub_module_and_refuse_a_foreign_one():
    model = MLP(3, [4], 2)
    ewc, whole = EWC(lambda_=2.0), EWC(lambda_=2.0)
    s = strategy(model, [])
    data = TensorData(X, Y)
    ewc.consolidate(s, model.head, data)
    whole.consolidate(s, None, data)
    (part, anchors), = ewc.anchors.points
    (full, _), = whole.anchors.points
    assert set(part) == {"weight", "bias"}
    torch.testing.assert_close(part["weight"], full["head.weight"])
    torch.testing.assert_close(anchors["bias"], model.head.bias.detach())
    assert ewc.penalty(model.head).item() == 0.0
    with torch.no_grad():
        model.head.bias += 1.0
    assert ewc.penalty(model.head).item() == pytest.approx(part["bias"].sum().item(), rel=1e-6)
    with pytest.raises(ValueError, match="not a parameter of strategy.model"):
        ewc.consolidate(s, nn.Linear(3, 2), data)


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs", [
    {"lambda_": -1.0}, {"lambda_": float("inf")}, {"lambda_": float("nan")}, {"lambda_": True}, {"lambda_": "1"},
    {"online": 1}, {"online": "yes"}, {"online": True, "gamma": 1.5}, {"online": True, "gamma": -0.1},
    {"online": True, "gamma": True}, {"gamma": 0.9}, {"fisher_samples": 0}, {"fisher_samples": -3},
    {"fisher_samples": 2.5}, {"fisher_samples": True},
])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ConfigError, match=list(kwargs)[-1]):
        EWC(**kwargs)


def test_ten_experiences_train_as_with_one_term_per_experience():
    """The folded penalty against the form before it (one quadratic per experience, summed every step): the same
    losses and the same model after a 10-experience stream, and the plugin's state does not grow with it."""
    from streamcl.scenarios import class_incremental
    from tests.test_penalty import explicit

    class PerExperience(EWC):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.kept, add = [], self.anchors.add
            self.anchors.add = lambda c, a, **kw: (self.kept.append(({n: t.clone() for n, t in c.items()},
                                                                     {n: t.clone() for n, t in a.items()})),
                                                   add(c, a, **kw))

        def penalty(self, model):
            return explicit(self.kept, model)

    runs = []
    for plugin in (EWC(lambda_=5.0), PerExperience(lambda_=5.0)):
        torch.manual_seed(0)
        model = MLP(20, [16], 20)
        s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), plugins=[plugin],
                     batch_size=16, epochs=1, seed=0)
        losses = []  # the EWC term of each experience's last step
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no coefficient capped: both forms are the plain sum
            for exp in class_incremental(blobs(n_classes=20, dim=20), blobs(5, 20, dim=20, seed=1), 10).train_stream:
                s.train(exp)
                losses.append(float(s.loss_terms.get("ewc", torch.zeros(())).detach()))
        runs.append((losses, [p.detach().clone() for p in model.parameters()], plugin))
    (folded, w_folded, plugin), (reference, w_reference, _) = runs
    assert len(runs[1][2].kept) == 10 and len(plugin.anchors.points) == 1
    assert folded == pytest.approx(reference, rel=1e-5) and max(folded) > 0
    for a, b in zip(w_folded, w_reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_defaults_and_state_round_trip():
    ewc = EWC()
    assert (ewc.lambda_, ewc.online, ewc.gamma, ewc.fisher_samples) == (20.0, False, 1.0, None)
    s = strategy(linear(), [ewc])
    after(ewc, s, W, B, X, Y)
    state = ewc.state_dict()
    other = EWC()
    other.load_state_dict(state)
    state["anchors"]["sums"]["weight"][0].zero_()  # the copy is its own
    s.model.weight.data += 0.5
    assert other.penalty(s.model).item() == pytest.approx(ewc.penalty(s.model).item()) and other.penalty(s.model) > 0


# ----------------------------------------------------------------------------- no weight makes a NaN
@pytest.mark.parametrize("online", [False, True])
def test_huge_lambda_stays_finite_and_warns_on_the_tiny_stream(online):
    with pytest.warns(RuntimeWarning, match="capped") as caught:
        results = tiny_run({"plugins": [{"name": "ewc", "lambda_": 1e6, "online": online}]})
    assert caught[0].filename.endswith("plugins/ewc.py")  # EWC's line, not the shared penalty's or pluggy's
    matrix = torch.tensor(results["accuracy_matrix"])
    assert torch.isfinite(matrix).all() and math.isfinite(results["final_accuracy"])
    assert matrix[0, 0] > 0.9 and matrix[-1, 0] > 0.9  # the first experience is learned, then held


@pytest.mark.slow
@pytest.mark.parametrize("online", [False, True])
def test_huge_lambda_stays_finite_on_a_pair_of_pfm5_experiences(online):
    from streamcl import config, runner

    cfg = config.parse({"benchmark": {"name": "permuted-fmnist", "scenario": "domain"}, "seed": 0})
    bench = runner.build_benchmark(cfg)
    torch.manual_seed(0)
    model = MLP()
    ewc = EWC(lambda_=1e6, online=online)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), plugins=[ewc], seed=0,
                 eval_batch_size=512)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s.train(bench.train_stream[0])
        s.train(bench.train_stream[1])
    assert any("capped" in str(w.message) for w in caught)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    accuracy = s.eval([bench.test_stream[0], bench.test_stream[1]])["accuracy"]
    assert accuracy[0] > 0.7  # the first experience is held, and nothing diverged


def test_the_docstring_calls_the_fisher_what_it_is():
    doc = EWC.__doc__
    assert "as the paper defines it" not in doc  # the paper's Fisher is over the model's predictive distribution
    assert "empirical Fisher" in doc and "true labels" in doc
