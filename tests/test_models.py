import torch

from streamcl.models import MLP, IncrementalLinear, SmallCNN, grow_heads
from streamcl.optim import ParamGroups


def test_incremental_linear_grows_keeping_old_rows():
    head = IncrementalLinear(5, 2)
    w, b = head.weight.detach().clone(), head.bias.detach().clone()
    assert head.grow_to(4) and not head.grow_to(3)
    assert head.weight.shape == (4, 5) and torch.equal(head.weight[:2], w) and torch.equal(head.bias[:2], b)
    x = torch.randn(3, 5)
    assert torch.allclose(head(x), x @ head.weight.T + head.bias)


def test_models_shapes_and_features():
    x = torch.randn(6, 784)
    mlp = MLP()
    logits, feats = mlp(x), mlp.backbone(x)
    assert logits.shape == (6, 10) and feats.shape == (6, 256) and torch.equal(mlp.head(feats), logits)
    assert SmallCNN()(x).shape == (6, 10)
    assert SmallCNN()(x.reshape(6, 1, 28, 28)).shape == (6, 10)
    m = MLP(784, [32], growing=True)
    assert m(x).shape == (6, 0) and grow_heads(m, 3) and m(x).shape == (6, 3)


def test_sync_optimizer_keeps_momentum_of_surviving_parameters():
    m = MLP(4, [3], 2, growing=True)
    grow_heads(m, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    kept = m.backbone[1].weight
    buf = opt.state[kept]["momentum_buffer"].clone()
    groups = ParamGroups(opt, m)
    assert not groups.sync(opt, m)  # nothing changed
    grow_heads(m, 3)
    assert groups.sync(opt, m)
    assert torch.equal(opt.state[kept]["momentum_buffer"], buf)
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in m.parameters()}
    assert opt.param_groups[0]["lr"] == 0.5 and m.head.weight not in opt.state
