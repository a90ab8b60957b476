"""HyperNetwork: generated weights, the output regulariser by hand, frozen embeddings, its cap, resume."""
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from streamcl import ConfigError, Plugin, Strategy, hookimpl
from streamcl.models import MLP
from streamcl.parts import capture_input
from streamcl.plugins.hypernetwork import HyperNetModel, HyperNetwork, regulariser_curvature
from streamcl.scenarios import class_incremental
from tests.reliability import Crash, crash_at_step, numbers, tiny_config
from tests.synthetic import blobs


def tiny_hnet(target=None, seed=0, n_tasks=2, **kwargs) -> HyperNetModel:
    kwargs = {"task_dim": 3, "chunk_dim": 2, "chunk_size": 20, "hidden": (5,), **kwargs}
    target = target if target is not None else MLP(4, [3], 2)
    model = HyperNetModel(target, generator=torch.Generator().manual_seed(seed), **kwargs)
    model.grow(n_tasks, torch.Generator().manual_seed(seed + 1))
    return model


def til_stream(n_experiences=3):
    n = 2 * n_experiences
    return class_incremental(blobs(n_classes=n), blobs(10, n, seed=1), n_experiences, task_labels=True)


def fake_strategy(model, task, index=0, optimizer=None):
    exp = SimpleNamespace(task=task, index=index, dataset=None)
    return SimpleNamespace(model=model, experience=exp, optimizer=optimizer)


# ----------------------------------------------------------------------------- the generated network
def test_generated_weights_have_the_target_shapes_for_the_protocol_mlp():
    target = MLP(784, [256, 256], 10)
    model = HyperNetModel(target, 96, 96, 42000, (10, 10), torch.Generator().manual_seed(0))
    model.grow(2, torch.Generator().manual_seed(1))
    assert model.n_weights == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10 == 269322
    assert model.n_chunks == 7 and tuple(model.chunk_embeddings.shape) == (7, 96)
    weights = model.task_weights(1)
    assert {n: tuple(w.shape) for n, w in weights.items()} == {n: tuple(p.shape) for n, p in target.named_parameters()}
    assert list(model.target.parameters()) == []  # the target holds no weights of its own
    hnet = sum(p.numel() for p in model.parameters())
    assert hnet == (192 * 10 + 10) + (10 * 10 + 10) + (10 * 42000 + 42000) + 7 * 96 + 2 * 96
    # the generated weights start at the size of the target's own initial weights (root mean square)
    rms = math.sqrt(sum(float(p.detach().square().sum()) for p in target.parameters()) / model.n_weights)
    flat = torch.cat([w.flatten() for w in weights.values()])
    assert 0.5 * rms < float(flat.detach().square().mean().sqrt()) < 2 * rms
    x = torch.randn(5, 784)
    logits = model(x, task_labels=torch.ones(5, dtype=torch.long))
    assert torch.allclose(logits, torch.func.functional_call(model.target, weights, (x,)))
    assert model.head is None  # no head_path given: no features to show


def test_chunks_are_one_mlp_on_task_and_chunk_embeddings_by_hand():
    model = tiny_hnet(hidden=())  # f_h([e, c]) = W [e, c] + b, chunk by chunk
    e = model.task_embeddings[0]
    w, b = model.weights[0], model.biases[0]
    chunks = [w @ torch.cat([e, c]) + b for c in model.chunk_embeddings]
    flat = torch.cat(chunks)[: model.n_weights]
    assert model.n_weights == 4 * 3 + 3 + 3 * 2 + 2 == 23 and model.n_chunks == 2
    assert torch.allclose(model.generate(e[None])[0], flat)
    assert torch.allclose(model.task_weights(0)["head.bias"], flat[21:23])


def test_each_sample_runs_with_its_own_tasks_weights_and_the_head_sees_every_row_s_features():
    model = tiny_hnet(n_tasks=3, head_path="head")
    assert isinstance(model.head, nn.Linear) and list(model.head.parameters()) == []
    x, t = torch.randn(6, 4), torch.tensor([2, 0, 1, 0, 2, 7])  # 7 was never seen: the highest embedding (2)
    with capture_input(model.head) as box:  # as the engine reads the features
        logits = model(x, task_labels=t)
    features = box[0]
    for i in range(6):
        w = model.task_weights(min(int(t[i]), 2))
        z = torch.func.functional_call(model.target, w, (x[i:i + 1],))
        f = torch.relu(x[i:i + 1] @ w["backbone.1.weight"].T + w["backbone.1.bias"])  # MLP(4, [3]): the hidden layer
        assert torch.allclose(logits[i], z[0], atol=1e-6) and torch.allclose(features[i], f[0], atol=1e-6)
    assert torch.allclose(model(x), model(x, task_labels=torch.full((6,), 2)))  # no task labels: the last task
    # a batch of one takes a branch-free path, so per-sample gradients (torch.func.vmap) go through it
    per_sample = torch.func.vmap(lambda xi, ti: model(xi[None], task_labels=ti[None])[0])(x, t)
    assert torch.allclose(per_sample, logits, atol=1e-6)


def test_a_model_with_a_growing_head_or_no_parameters_is_refused():
    plugin = HyperNetwork()
    strategy = SimpleNamespace(generator=torch.Generator().manual_seed(0), head_path="head")
    exp = SimpleNamespace(task=0, dataset=None)
    with pytest.raises(ConfigError, match="grows with the classes"):
        plugin.adapt_model(strategy, MLP(4, [3], 2, growing=True), exp)
    with pytest.raises(ConfigError, match="no parameters"):
        plugin.adapt_model(strategy, nn.ReLU(), exp)


def test_adapt_model_grows_embeddings_and_trains_only_the_current_tasks():
    plugin, strategy = HyperNetwork(task_dim=3, chunk_dim=2, chunk_size=20, hidden=[5]), \
        SimpleNamespace(generator=torch.Generator().manual_seed(0), head_path="head")
    model = plugin.adapt_model(strategy, MLP(4, [3], 2), SimpleNamespace(task=0, dataset=None))
    assert isinstance(model, HyperNetModel) and model.n_tasks == 1
    e0 = model.task_embeddings[0].detach().clone()
    again = plugin.adapt_model(strategy, model, SimpleNamespace(task=2, dataset=None))
    assert again is model and model.n_tasks == 3 and torch.equal(model.task_embeddings[0], e0)
    assert [e.requires_grad for e in model.task_embeddings] == [False, False, True]
    data = SimpleNamespace(t=torch.tensor([1, 0, 1]))  # no experience task: the labels in its data
    plugin.adapt_model(strategy, model, SimpleNamespace(task=None, dataset=data))
    assert [e.requires_grad for e in model.task_embeddings] == [True, True, False]


# ----------------------------------------------------------------------------- the regulariser
def test_output_regulariser_by_hand_and_zero_right_after_storing():
    model = tiny_hnet(hidden=(), n_tasks=3)
    plugin = HyperNetwork(beta=0.5)
    plugin.trained = [0, 1]  # tasks 0 and 1 were trained; task 2 is the current one
    plugin.before_training_exp(fake_strategy(model, task=2, index=2))
    assert sorted(plugin.targets) == [0, 1] and plugin.beta_used == 0.5  # no SGD optimizer: nothing to cap
    assert float(plugin.regulariser(model).detach()) == 0.0  # the targets are the hypernetwork's outputs right now
    stored = {t: model.generate(model.task_embeddings[t][None])[0].detach() for t in (0, 1)}
    with torch.no_grad():
        model.weights[0][3, 1] += 0.25  # row 3 = output 3 of each chunk; input 1 = task embedding coordinate 1
        model.biases[0][5] -= 0.5
    # f_h changes by 0.25 * e_t[1] at outputs 3 and 23 (cut off: n_weights = 23) and by -0.5 at 5 and 25 (cut)
    by_hand = sum((0.25 * model.task_embeddings[t][1].item()) ** 2 + 0.5 ** 2 for t in (0, 1)) / 2
    assert math.isclose(float(plugin.regulariser(model).detach()), by_hand, rel_tol=1e-5)
    term = plugin.loss_terms(fake_strategy(model, 2), None, None)["hnet"]
    assert math.isclose(float(term.detach()), 0.5 * by_hand, rel_tol=1e-5)
    direct = sum((model.generate(model.task_embeddings[t][None])[0] - stored[t]).square().sum() for t in (0, 1)) / 2
    assert math.isclose(float(plugin.regulariser(model).detach()), float(direct.detach()), rel_tol=1e-6)


def test_no_regulariser_on_the_first_task_or_with_beta_zero():
    model = tiny_hnet()
    plugin = HyperNetwork()
    plugin.before_training_exp(fake_strategy(model, task=0))
    assert plugin.targets == {} and plugin.loss_terms(fake_strategy(model, 0), None, None) is None
    plugin = HyperNetwork(beta=0)
    plugin.trained = [0]
    plugin.before_training_exp(fake_strategy(model, task=1, index=1))
    assert plugin.loss_terms(fake_strategy(model, 1), None, None) is None


def test_a_task_label_trained_again_warns_and_is_not_regularised():
    model = tiny_hnet()
    plugin = HyperNetwork()
    plugin.trained = [0]
    with pytest.warns(RuntimeWarning, match="task label 0 was trained in an earlier experience"):
        plugin.before_training_exp(fake_strategy(model, task=0, index=1))
    assert plugin.targets == {}


def test_curvature_is_the_largest_eigenvalue_and_caps_beta():
    model = tiny_hnet(n_tasks=3)
    tasks = [0, 1]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    params = [p for n, p in model.named_parameters() if not n.startswith("task_embeddings.")]
    out = model.generate(torch.stack([model.task_embeddings[t] for t in tasks]).detach()).flatten()
    J = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(o, params, retain_graph=True)])
                     for o in out]).double()  # the Jacobian, one row per generated weight
    G = 2 / len(tasks) * J.T @ J
    d = 0.05 / 1.9  # lr / (1 + momentum), the same for every parameter
    exact = float(np.linalg.eigvalsh((d * G).numpy()).max())
    estimate = regulariser_curvature(model, tasks, {id(p): 1.9 / 0.05 for p in params}, iterations=200)
    assert math.isclose(estimate, exact, rel_tol=1e-3)
    assert regulariser_curvature(model, tasks, {}) == 0.0  # no SGD limit (Adam): nothing to cap
    # beta above 1 / curvature is capped there, with a warning; the value used is kept for resuming
    plugin = HyperNetwork(beta=10 / exact)
    plugin.trained = tasks
    with pytest.warns(RuntimeWarning, match="was capped"):
        plugin.before_training_exp(fake_strategy(model, task=2, index=2, optimizer=optimizer))
    assert math.isclose(plugin.beta_used, 1 / exact, rel_tol=0.05)
    resumed = HyperNetwork(beta=10 / exact)
    resumed.load_state_dict(plugin.state_dict())
    assert resumed.beta_used == plugin.beta_used and torch.equal(resumed.targets[1], plugin.targets[1])
    small = HyperNetwork(beta=0.5 / exact)
    small.trained = tasks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small.before_training_exp(fake_strategy(model, task=2, index=2, optimizer=optimizer))
    assert small.beta_used == 0.5 / exact


# ----------------------------------------------------------------------------- training
class Probe(Plugin):
    """Records the gradients of the first two task embeddings at every step of the second experience."""

    def __init__(self):
        self.grads = []

    @hookimpl
    def after_backward(self, strategy):
        if strategy.experience.index == 1:
            embeddings = strategy.model.task_embeddings
            self.grads.append((embeddings[0].grad, embeddings[1].grad))


def train_two_tasks(beta, seed=0):
    torch.manual_seed(seed)
    model = MLP(8, [16], 4)
    plugin, probe = HyperNetwork(beta=beta, task_dim=4, chunk_dim=4, chunk_size=64, hidden=[8]), Probe()
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), plugins=[plugin, probe],
                        epochs=4, batch_size=8, seed=seed)
    first, second = list(til_stream(2).train_stream)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a large beta is capped, with a warning
        strategy.train(first)
        hnet = strategy.model
        before = hnet.generate(hnet.task_embeddings[0][None])[0].detach().clone()
        e0 = hnet.task_embeddings[0].detach().clone()
        strategy.train(second)
    after = hnet.generate(hnet.task_embeddings[0][None])[0].detach()
    return float((after - before).norm() / before.norm()), probe.grads, e0, hnet, plugin


def test_a_large_beta_keeps_the_first_tasks_weights_and_beta_zero_lets_them_drift():
    kept, _, _, _, plugin = train_two_tasks(beta=1e6)
    drifted, *_ = train_two_tasks(beta=0.0)
    assert plugin.beta_used < 1e6  # capped at half the stability limit
    assert drifted > 0.5 and kept < 0.15 and kept < 0.1 * drifted, (kept, drifted)


def test_earlier_embeddings_receive_no_gradient():
    _, grads, e0, hnet, _ = train_two_tasks(beta=1.0)
    assert grads and all(g0 is None and g1 is not None for g0, g1 in grads)
    assert torch.equal(hnet.task_embeddings[0].detach(), e0)  # frozen: never moved by the second task


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs,match", [
    ({"beta": -1}, "beta"), ({"beta": float("nan")}, "beta"), ({"beta": "1"}, "beta"), ({"beta": True}, "beta"),
    ({"task_dim": 0}, "task_dim"), ({"chunk_dim": 2.5}, "chunk_dim"), ({"chunk_size": -3}, "chunk_size"),
    ({"hidden": 10}, "hidden"), ({"hidden": "10"}, "hidden"), ({"hidden": [10, 0]}, "hidden"),
    ({"hidden_lr": 0}, "hidden_lr"), ({"hidden_lr": 2}, "hidden_lr"), ({"hidden_lr": float("inf")}, "hidden_lr"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HyperNetwork(**kwargs)


def test_a_negative_task_label_is_refused():
    with pytest.raises(ConfigError, match="task label -1"):
        HyperNetwork().adapt_model(SimpleNamespace(generator=torch.Generator(), head_path="head"), MLP(4, [3], 2),
                                   SimpleNamespace(task=-1, dataset=None))


# ----------------------------------------------------------------------------- resume on a task-incremental stream
def test_kill_and_resume_is_bit_identical_with_the_regulariser_active(tmp_path, monkeypatch):
    from streamcl import runner

    part = {"benchmark": {"scenario": "task"},
            "plugins": [{"name": "hypernetwork", "task_dim": 4, "chunk_dim": 4, "chunk_size": 64, "hidden": [8]}]}

    def run(out=None, resume=False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return runner.run(tiny_config(part), out, resume=resume, benchmark=til_stream())

    whole = numbers(run())
    for step in (8, 16):  # inside the second and the third experience, after checkpoints at steps 6 and 15
        out = tmp_path / f"crash{step}"
        with monkeypatch.context() as m:
            crash_at_step(m, step)
            with pytest.raises(Crash):
                run(out)
        assert numbers(run(out, resume=True)) == whole
