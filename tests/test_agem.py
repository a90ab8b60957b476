import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, Strategy
from streamcl.models import MLP
from streamcl.plugins.agem import AGEM, agem_project
from streamcl.plugins.gem import current_gradient, trainable_params
from tests.synthetic import tiny_benchmark


# ------------------------------------------------------------------------------ projection maths
def test_hand_example():
    g, ref = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.0, 1.0, 1.0])
    # g.ref = -2, |ref|^2 = 2: g - (-2 / 2) ref = (1, -1, 1)
    out = agem_project(g, ref)
    assert torch.equal(out, torch.tensor([1.0, -1.0, 1.0]))
    assert out @ ref == 0


def test_projected_gradients_are_orthogonal_to_the_reference():
    gen = torch.Generator().manual_seed(0)
    n = 0
    for _ in range(50):
        g, ref = torch.randn(7, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
        out = agem_project(g, ref)
        if g @ ref < 0:
            n += 1
            assert abs(float(out @ ref)) < 1e-12
            assert torch.allclose(out, g - (g @ ref) / (ref @ ref) * ref)
        else:
            assert out is g
    assert n > 10


def test_no_projection_without_conflict():
    g = torch.tensor([1.0, 2.0])
    assert agem_project(g, torch.tensor([1.0, 0.0])) is g      # positive dot product
    assert agem_project(g, torch.tensor([2.0, -1.0])) is g     # zero dot product
    assert agem_project(g, torch.zeros(2)) is g                # a zero reference never divides by zero


def test_a_tiny_reference_still_projects_finitely():
    g, ref = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1e-30])  # |ref|^2 underflows in float32
    out = agem_project(g, ref)
    assert torch.isfinite(out).all() and torch.allclose(out, torch.tensor([1.0, 0.0]))


def test_bad_projection_arguments():
    with pytest.raises(ValueError):
        agem_project(torch.ones(3), torch.ones(4))


@pytest.mark.parametrize("kwargs", [dict(per_experience=0), dict(per_experience=-5), dict(per_experience=1.5),
                                    dict(per_experience=True), dict(sample_size=0), dict(sample_size=2.0),
                                    dict(sample_size=None), dict(sample_size=False)])
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        AGEM(**kwargs)


# ------------------------------------------------------------------------------ the plugin
def linear_strategy(plugins):
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=list(plugins), batch_size=4, seed=0)


def hand_gradient(W, b, batch: Batch):
    """Mean cross-entropy of softmax regression, by hand: dL/dz = (p - onehot) / n."""
    dz = (torch.softmax(batch.x @ W.T + b, 1) - torch.eye(3)[batch.y]) / len(batch.y)
    return torch.cat([(dz.T @ batch.x).reshape(-1), dz.sum(0)])


def memories():
    g = torch.Generator().manual_seed(5)
    return [Batch(torch.randn(5, 3, generator=g), torch.tensor([0, 1, 1, 0, 1]), torch.zeros(5, dtype=torch.long)),
            Batch(torch.randn(4, 3, generator=g), torch.tensor([2, 2, 1, 0]), torch.zeros(4, dtype=torch.long))]


def test_after_backward_projects_against_the_whole_memory_mean_gradient():
    plugin = AGEM(per_experience=5, sample_size=100)  # the sample is the whole memory (9 samples)
    s = linear_strategy([plugin])
    plugin.memories = memories()
    ref = hand_gradient(s.model.weight.detach(), s.model.bias.detach(), memories()[0].cat(memories()[1]))
    g = -ref + 0.3 * torch.arange(12.0) / 12
    assert g @ ref < 0
    s.model.weight.grad, s.model.bias.grad = g[:9].view(3, 3).clone(), None  # a missing grad counts as zeros
    g[9:] = 0
    plugin.after_backward(s)
    out = current_gradient(trainable_params(s.model))
    assert torch.allclose(out, agem_project(g, ref), atol=1e-6)
    assert abs(float(out @ ref)) < 1e-5


def test_no_conflict_leaves_grad_untouched():
    plugin = AGEM(per_experience=5, sample_size=100)
    s = linear_strategy([plugin])
    plugin.memories = memories()
    ref = hand_gradient(s.model.weight.detach(), s.model.bias.detach(), memories()[0].cat(memories()[1]))
    s.model.weight.grad, s.model.bias.grad = ref[:9].view(3, 3).clone(), ref[9:].clone()
    before = s.model.weight.grad.clone()
    plugin.after_backward(s)
    assert torch.equal(s.model.weight.grad, before)


def test_the_reference_sample_is_drawn_from_the_generator_without_replacement():
    plugin = AGEM(per_experience=5, sample_size=4)
    s = linear_strategy([plugin])
    plugin.memories = memories()
    pool = memories()[0].cat(memories()[1])
    state = s.generator.get_state()
    sample = plugin._sample(s)
    expected = torch.Generator().set_state(state)
    idx = torch.randperm(9, generator=expected)[:4]
    assert torch.equal(sample.x, pool.x[idx]) and torch.equal(sample.y, pool.y[idx])


def train(plugins, n_exp=3):
    torch.manual_seed(0)
    bench = tiny_benchmark(2 * n_exp, n_exp)
    model = MLP(8, [16], 2 * n_exp)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=plugins, batch_size=16, seed=0)
    return s, bench


def test_one_memory_per_experience():
    plugin = AGEM(per_experience=6, sample_size=8)
    s, bench = train([plugin])
    for i, exp in enumerate(bench.train_stream):
        s.train(exp)
        assert [len(m) for m in plugin.memories] == [6] * (i + 1)
        assert set(plugin.memories[-1].y.tolist()) <= set(exp.classes)


def test_checkpoint_round_trip_continues_identically(tmp_path):
    full, bench = train([AGEM(per_experience=10, sample_size=8)])
    for exp in bench.train_stream:
        full.train(exp)
    expected = full.eval(bench.test_stream)

    s, _ = train([AGEM(per_experience=10, sample_size=8)])
    for exp in bench.train_stream[:2]:
        s.train(exp)
    s.save_checkpoint(tmp_path / "c.pt")
    resumed, _ = train([AGEM(per_experience=10, sample_size=8)])
    resumed.load_checkpoint(tmp_path / "c.pt")
    resumed.train(bench.train_stream[2])
    assert resumed.eval(bench.test_stream) == expected
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
