"""HAT (hard attention to the task): the compensated gradient (eq. 6) and the annealing (eq. 3), the conditioned
gradients (eq. 2) and the regulariser (eq. 5) by hand, task 0's units bit-identical after task 1, per-row masks in
a mixed-task minibatch, refusals."""
import math

import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, Plugin, Strategy, hookimpl
from streamcl.masks import (MaskedSequential, annealed_scale, attention_regulariser, condition_gradients_,
                            cumulative_masks, gradient_factors, hat_mask)
from streamcl.models import MLP, SmallCNN
from streamcl.plugins import TaskMask
from streamcl.plugins.hat import HAT, HATNet
from streamcl.scenarios import class_incremental
from tests.conftest import resnet18
from tests.synthetic import blobs, task_benchmark


def strategy(plugins, hidden=(16, 16), n_classes: int = 4, seed: int = 0, lr: float = 0.1, epochs: int = 2):
    torch.manual_seed(seed)
    model = MLP(8, list(hidden), n_classes)
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), plugins=plugins,
                    epochs=epochs, batch_size=16, seed=seed)


# ------------------------------------------------------------------------------ eq. 6 and eq. 3
@pytest.mark.parametrize("s", [1 / 400, 0.5, 7.0, 400.0])
def test_the_compensated_gradient_is_eq_6_times_the_plain_one(s):
    e = torch.tensor([-1.5, -0.2, 0.0, 0.01, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.7, -1.0, 2.0, 0.5, -0.3, 1.1], dtype=torch.float64)
    m = hat_mask(e, s, 400.0)
    assert torch.equal(m.detach(), torch.sigmoid(s * e.detach()))
    (m * c).sum().backward()
    x = e.detach()
    plain = c * s * torch.sigmoid(s * x) * (1 - torch.sigmoid(s * x))  # d(c . sigmoid(s e))/de
    compensated = 400.0 * (torch.cosh(s * x) + 1) / (s * (torch.cosh(x) + 1)) * plain
    fine = (s * x).abs() < 30  # beyond, sigmoid'(s e) underflows in the formula (0 * inf)
    assert fine.sum() >= 2
    assert torch.allclose(e.grad[fine], compensated[fine], rtol=1e-9, atol=1e-12)
    # its closed form, everywhere: s_max sigmoid'(e) times the gradient with respect to the mask (never vanishes)
    assert torch.allclose(e.grad, 400.0 * torch.sigmoid(x) * (1 - torch.sigmoid(x)) * c, rtol=1e-12)


def test_s_anneals_from_1_over_s_max_to_s_max_within_each_epoch():
    assert annealed_scale(0, 5, 400.0) == 1 / 400                       # first batch
    assert annealed_scale(2, 5, 400.0) == pytest.approx(1 / 400 + (400 - 1 / 400) / 2)  # middle: 200.00125
    assert annealed_scale(4, 5, 400.0) == 400.0                         # last batch
    seen, at_eval = [], []

    class Spy(Plugin):
        @hookimpl
        def before_forward(self, strategy):
            seen.append(strategy.model.masked().s)

        @hookimpl
        def after_eval_forward(self, strategy):
            masked = strategy.model.masked()
            at_eval.append(torch.equal(masked.masks(0)[0].detach(), torch.sigmoid(400.0 * masked.mask_logits[0])))

    s = strategy([HAT(), Spy()])
    s.train(task_benchmark(2).train_stream[0])  # 40 samples, batch 16: B = 3 batches an epoch, 2 epochs
    assert seen == pytest.approx([1 / 400, 1 / 400 + (400 - 1 / 400) / 2, 400.0] * 2)
    s.eval(task_benchmark(2).test_stream[0])
    assert at_eval and all(at_eval)  # s_max in evaluation


# ------------------------------------------------------------------------------ eq. 4, eq. 2 and eq. 5 by hand
A1 = torch.tensor([1.0, 0.0, 0.5, 1.0])  # a^{<t} of a 3-4-2 net's first layer
A2 = torch.tensor([0.0, 1.0])            # and of its second
ROWS = torch.tensor([1.0, 0.0, 0.0])     # the head's classes earlier tasks used


def test_the_cumulative_mask_is_the_elementwise_max_over_earlier_tasks():
    t0 = [torch.tensor([1.0, 0.0, 0.5, 0.0]), torch.tensor([0.0, 0.0])]
    t1 = [torch.tensor([0.0, 0.0, 0.25, 1.0]), torch.tensor([0.0, 1.0])]
    out = cumulative_masks([t0, t1], t0)
    assert out[0].tolist() == A1.tolist() and out[1].tolist() == A2.tolist()
    assert [a.tolist() for a in cumulative_masks([], t0)] == [[0.0] * 4, [0.0] * 2]


def test_the_conditioned_gradient_of_a_2_layer_net_by_hand():
    layers = [nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 3)]  # two masked layers, then the head
    for layer in layers:
        layer.weight.grad, layer.bias.grad = torch.ones_like(layer.weight), torch.full_like(layer.bias, 2.0)
    condition_gradients_(layers, gradient_factors([A1, A2], ROWS))
    # W1[i, j] * (1 - a1[i]) (the inputs are not masked); b1 * (1 - a1)
    assert layers[0].weight.grad.tolist() == [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [0, 0, 0]]
    assert layers[0].bias.grad.tolist() == [0, 2, 1, 0]
    # W2[i, j] * (1 - min(a2[i], a1[j])); b2 * (1 - a2)
    assert layers[1].weight.grad.tolist() == [[1, 1, 1, 1], [0, 1, 0.5, 0]]
    assert layers[1].bias.grad.tolist() == [2, 0]
    # the head: W[i, j] * (1 - min(rows[i], a2[j])); bias * (1 - rows)
    assert layers[2].weight.grad.tolist() == [[1, 0], [1, 1], [1, 1]]
    assert layers[2].bias.grad.tolist() == [0, 2, 2]


def test_the_regulariser_is_eq_5_by_hand():
    masks = [torch.tensor([0.2, 0.8]), torch.tensor([0.5])]
    cumulative = [torch.tensor([1.0, 0.0]), torch.tensor([0.25])]
    # (0.2 * 0 + 0.8 * 1 + 0.5 * 0.75) / (0 + 1 + 0.75)
    assert attention_regulariser(masks, cumulative).item() == pytest.approx(1.175 / 1.75)
    zeros = [torch.zeros(2), torch.zeros(1)]
    assert attention_regulariser(masks, zeros).item() == pytest.approx(1.5 / 3)  # the first task: the mean mask
    assert attention_regulariser(masks, [torch.ones(2), torch.ones(1)]).item() == 0.0  # every unit taken


def test_the_plugin_conditions_the_gradients_and_adds_c_times_eq_5():
    """Task 1 trains after task 0's masks were set by hand: every gradient reaching the step is the raw one times
    eq. 2's factor, and the loss term ``hat`` is c R at the current s."""
    raw, conditioned, terms = [], [], []

    class Before(Plugin):
        @hookimpl
        def after_backward(self, strategy):
            raw.append([p.grad.clone() for p in strategy.model.layers()[0].parameters()]
                       + [p.grad.clone() for p in strategy.model.layers()[1].parameters()]
                       + [p.grad.clone() for p in strategy.model.head.parameters()])

        @hookimpl
        def before_backward(self, strategy):
            masked = strategy.model.masked()
            if strategy.experience.task != 1:
                return
            m = [torch.sigmoid(masked.s * e.detach()) for e in masked.embeddings[1]]
            terms.append((strategy.loss_terms["hat"].item(), 0.75 * attention_regulariser(m, hand).item()))

    class After(Plugin):
        @hookimpl
        def before_update(self, strategy):
            conditioned.append([p.grad.clone() for p in strategy.model.layers()[0].parameters()]
                               + [p.grad.clone() for p in strategy.model.layers()[1].parameters()]
                               + [p.grad.clone() for p in strategy.model.head.parameters()])

    hat = HAT()
    s = strategy([TaskMask(), Before(), hat, After()], hidden=(4, 2), epochs=1)
    stream = task_benchmark(2)
    s.train(stream.train_stream[0])
    hand = [A1, A2]
    hat.task_masks[0] = [A1.clone(), A2.clone()]
    s.train(stream.train_stream[1])
    rows = torch.tensor([1.0, 1.0, 0.0, 0.0])  # task 0's classes 0, 1
    f = gradient_factors(hand, rows)
    assert len(raw) == len(conditioned) == 3 + 3
    for before, after in zip(raw[3:], conditioned[3:]):
        expected = [before[0] * f[0][0], before[1] * f[0][1], before[2] * f[1][0], before[3] * f[1][1],
                    before[4] * f[2][0], before[5] * f[2][1]]
        for a, b in zip(after, expected):
            assert torch.equal(a, b)
    assert any(bool((g != 0).any()) for g in raw[-1])
    assert len(terms) == 3 and all(t == pytest.approx(e, rel=1e-5) for t, e in terms)


# ------------------------------------------------------------------------------ protection
def test_units_task_0_uses_are_bit_identical_after_task_1_with_momentum():
    hat = HAT(c=0.01)  # on 40 samples the paper's c = 0.75 closes every unit
    s = strategy([TaskMask(), hat], hidden=(16, 16), epochs=3)
    stream = task_benchmark(2)
    s.train(stream.train_stream[0])
    net: HATNet = s.model
    l1, l2 = net.masked().linear
    used1, used2 = (m == 1.0 for m in hat.task_masks[0])
    assert used1.any() and used2.any() and not used1.all()
    before = [t.detach().clone() for t in (l1.weight, l1.bias, l2.weight, l2.bias, net.head.weight, net.head.bias)]
    logits0 = s.predict(stream.test_stream[0].dataset.x, torch.zeros(20, dtype=torch.long))
    s.train(stream.train_stream[1])
    after = [t.detach() for t in (l1.weight, l1.bias, l2.weight, l2.bias, net.head.weight, net.head.bias)]
    assert torch.equal(after[0][used1], before[0][used1])                       # into task 0's first-layer units
    assert torch.equal(after[1][used1], before[1][used1])
    assert torch.equal(after[2][used2][:, used1], before[2][used2][:, used1])   # between task 0's units
    assert torch.equal(after[3][used2], before[3][used2])
    assert torch.equal(after[4][:2][:, used2], before[4][:2][:, used2])         # out of them, to task 0's classes
    assert torch.equal(after[5][:2], before[5][:2])
    assert not torch.equal(after[0], before[0])                                 # task 1 did train
    assert torch.equal(net.masked().final_masks(0)[0], hat.task_masks[0][0])    # task 0's embeddings kept
    logits1 = s.predict(stream.test_stream[0].dataset.x, torch.zeros(20, dtype=torch.long))
    assert torch.allclose(logits1, logits0, atol=1e-5)  # units with masks strictly between 0 and 1: tiny changes


# ------------------------------------------------------------------------------ per-row masks
def two_task_masks() -> MaskedSequential:
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    m = MaskedSequential(seq, [torch.tensor([9.0, -9.0, 9.0, -9.0]), torch.tensor([9.0, 9.0])], 400.0, task=0)
    m.add_task(2, [torch.tensor([-9.0, 9.0, 9.0, 9.0]), torch.tensor([-9.0, 9.0])])
    return m


def test_each_row_of_a_mixed_task_minibatch_takes_its_tasks_masks():
    m = two_task_masks().eval()
    x = torch.randn(4, 3)
    m.route = torch.tensor([0, 2, 5, 0])  # task 5 has no embeddings: the most recent task's (2)
    out = m(x)
    seq = m.seq
    h0 = torch.relu(seq[0](x) * torch.tensor([1.0, 0.0, 1.0, 0.0]))
    h2 = torch.relu(seq[0](x) * torch.tensor([0.0, 1.0, 1.0, 1.0]))
    by0, by2 = seq[2](h0) * torch.tensor([1.0, 1.0]), seq[2](h2) * torch.tensor([0.0, 1.0])
    assert torch.allclose(out, torch.stack([by0[0], by2[1], by2[2], by0[3]]), atol=1e-6)
    m.route = None  # task 0
    assert torch.allclose(m(x), by0, atol=1e-6)


def test_only_the_tasks_in_the_minibatch_get_mask_gradients():
    m = two_task_masks().train()
    m.s = 1.0
    m.route = torch.tensor([0, 0, 0])
    m(torch.randn(3, 3)).sum().backward()
    assert all(e.grad is not None for e in m.embeddings[0]) and all(e.grad is None for e in m.embeddings[1])
    m.zero_grad(set_to_none=True)
    m.route = torch.tensor([2, 0, 2])
    m(torch.randn(3, 3)).sum().backward()
    assert all(e.grad is not None for es in m.embeddings for e in es)


def test_replayed_rows_of_an_old_task_leave_its_embeddings_alone():
    """A mixed minibatch (task 0 rows replayed while task 1 trains): task 0's embeddings get no update."""
    data = task_benchmark(2).train_stream[0].dataset
    replayed = Batch(data.x[:8], data.y[:8], torch.zeros(8, dtype=torch.long))

    class Mix(Plugin):
        @hookimpl
        def replay_batch(self, strategy, batch):
            return replayed if strategy.experience.task == 1 else None

    hat = HAT()
    s = strategy([TaskMask(), hat, Mix()], epochs=1)
    stream = task_benchmark(2)
    s.train(stream.train_stream[0])
    e0 = [e.detach().clone() for e in s.model.masked().embeddings[0]]
    s.train(stream.train_stream[1])
    assert all(torch.equal(a, b) for a, b in zip(e0, s.model.masked().embeddings[0]))


def test_a_class_incremental_stream_is_one_task_with_nothing_protected():
    hat = HAT()
    s = strategy([hat], n_classes=4)
    s.train(class_incremental(blobs(n_classes=4), blobs(10, 4, seed=1), 2).train_stream)
    assert s.model.masked().tasks == [0] and hat.cumulative is None and list(hat.task_masks) == [0]


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("model", [lambda: SmallCNN(1, 4), lambda: resnet18(4)])
def test_a_model_whose_units_cannot_be_masked_is_refused_at_setup(model):
    net = model()
    with pytest.raises(ConfigError, match=r"hat masks the units of fully connected layers.*Conv2d"):
        Strategy(net, torch.optim.SGD(net.parameters(), lr=0.1), plugins=[HAT()])


@pytest.mark.parametrize("kwargs", [{"s_max": 0.5}, {"c": -1.0}, {"c": math.inf}, {"clipgrad": 0}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ConfigError, match="hat"):
        HAT(**kwargs)
