import itertools

import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, PluginError, Strategy
from streamcl.models import MLP
from streamcl.plugins.agem import AGEM
from streamcl.plugins.gem import GEM, conflicts, current_gradient, gem_project, memory_gradient, trainable_params
from streamcl.plugins.task_mask import TaskMask
from tests.synthetic import tiny_benchmark


# ------------------------------------------------------------------------------ brute force
def brute_force_projection(h: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The closest point to ``h`` with ``G z >= 0``, by enumerating active sets.

    For every subset S of the constraints, the closest point with ``G_S z = 0`` is
    ``h - G_S^T (G_S G_S^T)^-1 G_S h``; the projection is the feasible one nearest ``h``.
    """
    best, best_dist = None, float("inf")
    k = G.shape[0]
    for r in range(k + 1):
        for S in itertools.combinations(range(k), r):
            if S:
                A = G[list(S)]
                z = h - A.T @ torch.linalg.solve(A @ A.T, A @ h)
            else:
                z = h.clone()
            if (G @ z >= -1e-10).all() and (z - h).norm() < best_dist:
                best, best_dist = z, (z - h).norm()
    return best


def conflicting_cases(n_cases=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n_cases:
        d, k = int(torch.randint(3, 5, (1,), generator=g)), int(torch.randint(2, 4, (1,), generator=g))
        G = torch.randn(k, d, generator=g, dtype=torch.float64)
        grad = torch.randn(d, generator=g, dtype=torch.float64)
        if conflicts(grad, G):
            out.append((grad, G))
    return out


# ------------------------------------------------------------------------------ projection maths
@pytest.mark.parametrize("margin", [0.0, 0.5, 2.0])
def test_projection_is_the_closest_feasible_gradient(margin):
    for grad, G in conflicting_cases():
        z = gem_project(grad, G, margin=margin, eps=0.0)
        assert (G @ z >= -1e-9).all()  # every constraint <z, g_k> >= 0 holds
        expected = brute_force_projection(grad + margin * G.sum(0), G)
        assert torch.allclose(z, expected, atol=1e-9), (grad, G, z, expected)
        if margin == 0:  # eq. 10: nothing closer to g satisfies the constraints
            assert (z - grad).norm() <= (brute_force_projection(grad, G) - grad).norm() + 1e-9


def test_hand_example_with_and_without_margin():
    g, G = torch.tensor([1.0, -1.0]), torch.tensor([[0.0, 1.0]])
    # dual: min 1/2 v^2 - v subject to v >= margin; v = max(1, margin); z = g + v * (0, 1)
    assert torch.allclose(gem_project(g, G, margin=0.0, eps=0.0), torch.tensor([1.0, 0.0]))
    assert torch.allclose(gem_project(g, G, margin=0.5, eps=0.0), torch.tensor([1.0, 0.0]))
    assert torch.allclose(gem_project(g, G, margin=2.0, eps=0.0), torch.tensor([1.0, 1.0]))
    # two constraints, both active: z is g minus its part in their span (here the whole plane but x3)
    g3, G3 = torch.tensor([-1.0, -1.0, 5.0]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert torch.allclose(gem_project(g3, G3, margin=0.0, eps=0.0), torch.tensor([0.0, 0.0, 5.0]))


def test_no_conflict_no_projection():
    g, G = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # dots 1 and 0
    assert gem_project(g, G, margin=0.5) is g
    assert gem_project(g, torch.zeros(0, 3), margin=0.5) is g


def test_the_ridge_moves_the_projection_by_little_and_keeps_dependent_constraints_solvable():
    for grad, G in conflicting_cases(10, seed=1):
        exact, ridged = gem_project(grad, G, 0.5, eps=0.0), gem_project(grad, G, 0.5)  # default eps 1e-3
        assert (ridged - exact).norm() <= 1e-2 * (1 + exact.norm())
    g, G = torch.tensor([1.0, -1.0, 0.0]), torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    z = gem_project(g, G, margin=0.0)  # G G^T is singular: only the ridge makes the QP strictly convex
    assert torch.isfinite(z).all() and (G @ z >= -1e-2).all()
    assert torch.allclose(z, torch.tensor([1.0, 0.0, 0.0]), atol=1e-2)


def test_float32_in_float32_out():
    grad, G = conflicting_cases(1)[0]
    z = gem_project(grad.float(), G.float(), 0.5)
    assert z.dtype == torch.float32
    assert torch.allclose(z.double(), gem_project(grad, G, 0.5), atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(per_experience=0), dict(per_experience=-1), dict(per_experience=2.5),
                                    dict(per_experience=True), dict(per_experience=5, memory=10), dict(memory=0),
                                    dict(margin=-0.1),
                                    dict(margin=float("nan")), dict(margin=float("inf")), dict(margin="0.5"),
                                    dict(margin=True)])
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        GEM(**kwargs)


def test_bad_projection_arguments():
    with pytest.raises(ValueError):
        gem_project(torch.ones(3), torch.ones(2, 4))
    with pytest.raises(ValueError):
        gem_project(torch.ones(3), torch.ones(2, 3), margin=-1.0)


def test_gem_and_agem_are_refused_together():
    model = nn.Linear(3, 3)
    with pytest.raises(PluginError, match="gradient_projection"):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[GEM(), AGEM()])


# ------------------------------------------------------------------------------ the plugin
def linear_strategy(plugins, lr=0.1):
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=lr), plugins=list(plugins), batch_size=4, seed=0)


def hand_gradient(W, b, batch: Batch, allowed=None):
    """Mean cross-entropy of softmax regression, by hand: dL/dz = (p - onehot) / n (over ``allowed`` classes)."""
    z = batch.x @ W.T + b
    if allowed is not None:
        z = z.masked_fill(~allowed, float("-inf"))
    dz = (torch.softmax(z, 1) - torch.eye(3)[batch.y]) / len(batch.y)
    return torch.cat([(dz.T @ batch.x).reshape(-1), dz.sum(0)])


def memories():
    g = torch.Generator().manual_seed(5)
    return [Batch(torch.randn(5, 3, generator=g), torch.tensor([0, 1, 1, 0, 1]), torch.zeros(5, dtype=torch.long)),
            Batch(torch.randn(4, 3, generator=g), torch.tensor([2, 2, 1, 0]), torch.zeros(4, dtype=torch.long))]


def test_memory_gradient_is_the_mean_loss_gradient_and_leaves_grad_alone():
    s = linear_strategy([])
    W, b = s.model.weight.detach().clone(), s.model.bias.detach().clone()
    params = trainable_params(s.model)
    for m in memories():
        assert torch.allclose(memory_gradient(s, m, params), hand_gradient(W, b, m), atol=1e-6)
    assert s.model.weight.grad is None and s.model.bias.grad is None


def test_memory_gradient_goes_through_adapt_logits():
    mask = TaskMask()
    mask.table = torch.tensor([[True, True, False]])  # task 0: classes 0 and 1
    s = linear_strategy([mask])
    m = memories()[0]
    got = memory_gradient(s, m, trainable_params(s.model))
    expected = hand_gradient(s.model.weight.detach(), s.model.bias.detach(), m, torch.tensor([True, True, False]))
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(got.view(-1)[6:9], torch.zeros(3))  # class 2's row gets no gradient


def test_after_backward_writes_the_projection_into_grad():
    plugin = GEM(per_experience=5, margin=0.5)
    s = linear_strategy([plugin])
    plugin.memories = memories()
    W, b = s.model.weight.detach().clone(), s.model.bias.detach().clone()
    G = torch.stack([hand_gradient(W, b, m) for m in plugin.memories])
    g = -G[0] + 0.1 * G[1]  # conflicts with the first memory
    s.model.weight.grad, s.model.bias.grad = g[:9].view(3, 3).clone(), g[9:].clone()
    plugin.after_backward(s)
    expected = gem_project(g, G, margin=0.5)
    assert torch.allclose(current_gradient(trainable_params(s.model)), expected, atol=1e-5)
    assert (G @ current_gradient(trainable_params(s.model)) >= -1e-2).all()  # the ridge loosens by 1e-3 * v_k


def test_a_missing_grad_counts_as_zeros():
    plugin = GEM(per_experience=5, margin=0.0)
    s = linear_strategy([plugin])
    plugin.memories = memories()[:1]
    G = hand_gradient(s.model.weight.detach(), s.model.bias.detach(), plugin.memories[0])[None]
    s.model.weight.grad, s.model.bias.grad = -G[0, :9].view(3, 3).clone(), None
    plugin.after_backward(s)
    g = torch.cat([-G[0, :9], torch.zeros(3)])
    expected = gem_project(g, G, margin=0.0)
    assert s.model.bias.grad is not None
    assert torch.allclose(current_gradient(trainable_params(s.model)), expected, atol=1e-5)


def test_no_conflict_leaves_grad_untouched():
    plugin = GEM(per_experience=5)
    s = linear_strategy([plugin])
    plugin.memories = memories()
    G = torch.stack([hand_gradient(s.model.weight.detach(), s.model.bias.detach(), m) for m in plugin.memories])
    g = G.sum(0)
    assert not conflicts(g, G)
    s.model.weight.grad, s.model.bias.grad = g[:9].view(3, 3).clone(), g[9:].clone()
    before = s.model.weight.grad
    plugin.after_backward(s)
    assert s.model.weight.grad is before and torch.equal(s.model.weight.grad, g[:9].view(3, 3))


def train(plugins, n_exp=3):
    torch.manual_seed(0)
    bench = tiny_benchmark(2 * n_exp, n_exp)
    model = MLP(8, [16], 2 * n_exp)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=plugins, batch_size=16, seed=0)
    return s, bench


def test_one_memory_per_experience_of_its_samples():
    plugin = GEM(per_experience=7)
    s, bench = train([plugin])
    for i, exp in enumerate(bench.train_stream):
        s.train(exp)
        assert len(plugin.memories) == i + 1
        m, data = plugin.memories[-1], exp.dataset
        assert len(m) == 7 and set(m.y.tolist()) <= set(exp.classes)
        rows = {tuple(r.tolist()) for r in data.x}
        assert all(tuple(r.tolist()) in rows for r in m.x) and len({tuple(r.tolist()) for r in m.x}) == 7


@pytest.mark.parametrize("cls", [GEM, AGEM])
def test_a_total_memory_is_split_over_the_experiences_seen_and_older_ones_shrink_to_their_first_samples(cls):
    plugin = cls(memory=10)
    assert plugin.per_experience is None and cls().per_experience in (100, 250)
    s, bench = train([plugin])
    sizes, first = [], None
    for exp in bench.train_stream:
        s.train(exp)
        sizes.append([len(m) for m in plugin.memories])
        if first is None:
            first = plugin.memories[0].x.clone()
        assert torch.equal(plugin.memories[0].x, first[: len(plugin.memories[0])])  # a prefix of its first draw
    assert sizes == [[10], [5, 5], [4, 3, 3]]
    assert plugin.memories[0].x.untyped_storage().nbytes() == plugin.memories[0].x.nbytes  # a copy: the rest is freed
    restored = cls(memory=10)
    restored.load_state_dict(plugin.state_dict())
    assert [len(m) for m in restored.memories] == [4, 3, 3]


def test_constraints_hold_during_training():
    class Check:
        from streamcl import hookimpl

        def __init__(self, plugin):
            self.plugin, self.worst, self.steps = plugin, float("inf"), 0

        @hookimpl
        def after_backward(self, strategy):  # listed after GEM: sees the projected gradient
            if not self.plugin.memories:
                return
            params = trainable_params(strategy.model)
            G = torch.stack([memory_gradient(strategy, m, params) for m in self.plugin.memories])
            self.worst = min(self.worst, float((G @ current_gradient(params)).min()))
            self.steps += 1

    plugin = GEM(per_experience=10, margin=0.0)
    check = Check(plugin)
    s, bench = train([plugin, check])
    for exp in bench.train_stream:
        s.train(exp)
    assert check.steps > 0 and check.worst >= -2e-3  # up to 1e-3 * v_k below 0, from the QP's ridge


@pytest.mark.parametrize("projection", [GEM, AGEM])
def test_beside_er_ace_the_memory_gradients_are_of_the_plain_cross_entropy(projection):
    """ER-ACE gives its masked loss through task_loss; GEM's and A-GEM's memory gradients keep the plain one
    (before, ER-ACE replaced strategy.criterion and the memory gradients masked the memory's classes)."""
    from torch.nn import functional as F

    from streamcl import hookimpl
    from streamcl.plugins.er_ace import ERACE

    plugin = projection(per_experience=10)
    checked = []

    class Check:
        @hookimpl
        def after_backward(self, strategy):  # during the training of experience 1: ER-ACE's masks are active
            if not plugin.memories:
                return
            params = trainable_params(strategy.model)
            memory = plugin.memories[0]  # classes 0 and 1, none of them incoming now
            got = memory_gradient(strategy, memory, params)
            plain = torch.autograd.grad(F.cross_entropy(strategy.model(memory.x), memory.y), params)
            assert torch.allclose(got, torch.cat([g.reshape(-1) for g in plain]), atol=1e-6)
            checked.append(True)

    s, bench = train([ERACE(), plugin, Check()], n_exp=2)
    for exp in bench.train_stream:
        s.train(exp)
    assert len(checked) == 3 and s.criterion is F.cross_entropy


def test_checkpoint_round_trip_continues_identically(tmp_path):
    full, bench = train([GEM(per_experience=10)])
    for exp in bench.train_stream:
        full.train(exp)
    expected = full.eval(bench.test_stream)

    s, _ = train([GEM(per_experience=10)])
    for exp in bench.train_stream[:2]:
        s.train(exp)
    s.save_checkpoint(tmp_path / "c.pt")
    resumed, _ = train([GEM(per_experience=10)])
    resumed.load_checkpoint(tmp_path / "c.pt")
    resumed.train(bench.train_stream[2])
    assert resumed.eval(bench.test_stream) == expected
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
