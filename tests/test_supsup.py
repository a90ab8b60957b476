"""SupSup: top-k masks by hand, fixed signed-constant weights, one-shot task inference against autograd, GG, GN."""
import math

import pytest
import torch
from torch import nn

from streamcl import ConfigError, Strategy
from streamcl.models import MLP
from streamcl.plugins.supsup import SupSup, SupSupNet, top_fraction
from streamcl.scenarios import task_incremental
from tests.synthetic import blobs, tiny_benchmark


def supsup_strategy(model=None, **kwargs):
    model = model or MLP(8, [16], 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Strategy(model, opt, plugins=[SupSup(**kwargs)], epochs=2, batch_size=16, seed=0)


def test_a_mask_keeps_the_top_fraction_by_magnitude_by_hand():
    s = torch.tensor([[0.1, -3.0, 2.0], [0.5, -0.5, 0.0]])
    assert top_fraction(s, 0.5).int().tolist() == [[0, 1, 1], [1, 0, 0]]  # 3 kept; of the tied 0.5s the first
    assert top_fraction(s, 1 / 3).int().tolist() == [[0, 1, 1], [0, 0, 0]]
    assert top_fraction(s, 1.0).all() and not top_fraction(s, 0.05).any()  # round(0.3) = 0 kept
    x = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    m = top_fraction(x, 0.3)
    assert int(m.sum()) == 960 and x.abs()[m].min() >= x.abs()[~m].max()


def test_a_mask_passes_the_gradient_straight_through_to_the_scores():
    layer = nn.Linear(2, 1, bias=False)
    net = SupSupNet(nn.Sequential(layer), "0", ["0.weight"], density=0.5, infer="sample")
    net.add_slot([0], [0], torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 3.0]]))
        net.scores[0][0].copy_(torch.tensor([[-1.0, 0.5]]))  # keeps w0 (|-1| > |0.5|)
    out = net(torch.tensor([[1.0, 1.0]]), torch.tensor([0]))
    assert out.item() == 2.0
    out.sum().backward()
    assert net.scores[0][0].grad.tolist() == [[-2.0, 3.0]]  # dL/dm = W x = (2, 3), times d|s|/ds = sign(s)


def test_weights_are_fixed_signed_kaiming_constants_and_biases_zero():
    strategy = supsup_strategy()
    stream = task_incremental(blobs(n_classes=4), blobs(10, 4, seed=1), 2).train_stream
    strategy.train(stream[0])
    net = strategy.model
    for name, p in net.model.named_parameters():
        if name in net.names:
            assert torch.allclose(p.abs(), torch.full_like(p, math.sqrt(2.0 / p.shape[1])))
        else:
            assert not p.any()
    before = {n: p.detach().clone() for n, p in net.model.named_parameters()}
    strategy.train(stream[1])
    assert all(torch.equal(p, before[n]) and not p.requires_grad for n, p in net.model.named_parameters())
    assert not any(s.requires_grad for s in net.scores[0]) and all(s.requires_grad for s in net.scores[1])


def test_one_shot_inference_is_the_gradient_of_each_samples_entropy_by_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    net = SupSupNet(model, "2", ["0.weight", "2.weight"], density=0.5, infer="sample")
    g = torch.Generator().manual_seed(1)
    for task, classes in ((0, [0, 1]), (1, [2]), (2, [1, 2])):
        net.add_slot([task], classes, g)
    net.eval()
    x = torch.randn(6, 4, generator=g)
    found = net.infer_slots(x, {})
    masks = [[m.detach() for m in net.masks(k)] for k in range(3)]
    expected = []
    for row in x:  # reverse mode, one sample at a time, as the paper's eq. 4 reads
        alpha = torch.full((3,), 1 / 3, requires_grad=True)
        w = {n: p.detach() * sum(a * m[i] for a, m in zip(alpha, masks))
             for i, (n, p) in enumerate(zip(net.names, net.params()))}
        logp = torch.func.functional_call(model, w, (row[None],)).log_softmax(1)
        (-(logp.exp() * logp).sum()).backward()
        expected.append(int(alpha.grad.argmin()))
    assert found.tolist() == expected
    net.infer = "batch"
    assert len(set(net.infer_slots(x, {}).tolist())) == 1


def test_gg_routes_by_task_label_and_keeps_task_zero():
    strategy = supsup_strategy()
    bench = task_incremental(blobs(n_classes=6), blobs(10, 6, seed=1), 3)
    strategy.train(bench.train_stream[0])
    x, t = bench.test_stream[0].dataset.x, torch.zeros(20, dtype=torch.long)
    before = strategy.predict(x, t)
    assert torch.isinf(before[:, 2:]).all() and torch.isfinite(before[:, :2]).all()  # among task 0's classes
    strategy.train(bench.train_stream[1:])
    assert torch.equal(strategy.predict(x, t), before)
    res = strategy.eval(bench.test_stream)
    assert min(res["accuracy"]) > 0.5 and strategy.plugins[0].inference_accuracy == []  # above chance; nothing inferred


@pytest.mark.parametrize("infer", ["sample", "batch"])
def test_gn_infers_the_task_and_reports_how_often_right(infer):
    strategy = supsup_strategy(infer=infer)
    bench = tiny_benchmark(6, 3)
    strategy.train(bench.train_stream)
    res = strategy.eval(bench.test_stream)
    share = strategy.plugins[0].inference_accuracy[-1]
    assert 0 <= share <= 1 and strategy.model.infer_tasks
    assert res["accuracy"][0] >= 0 and SupSup.bits_per_task(strategy) == sum(p.numel() for p in strategy.model.params())


@pytest.mark.parametrize("kwargs,match", [({"density": 0}, "density"), ({"scores_lr": -1}, "scores_lr"),
                                          ({"infer": "all"}, "infer")])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SupSup(**kwargs)
