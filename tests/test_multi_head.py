"""MultiHead: one head per task label, each sample scored by its task's head (routing checked by hand)."""
import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, PluginError, Strategy
from streamcl.models import MLP
from streamcl.plugins import TaskMask
from streamcl.plugins.ewc import EWC
from streamcl.plugins.multi_head import MultiHead, MultiHeadNet, TaskHeads
from streamcl.scenarios import task_incremental
from tests.conftest import NoHead
from tests.synthetic import blobs

INF = float("-inf")


def hand_heads() -> TaskHeads:
    """Task 0 scores classes 0, 1; task 3 scores classes 2, 3, 4; every weight and bias set by hand."""
    heads = TaskHeads(in_features=2, out_features=5)
    g, like = torch.Generator().manual_seed(0), torch.zeros(())
    heads.add(0, [0, 1], g, like)
    heads.add(3, [2, 3, 4], g, like)
    with torch.no_grad():
        heads.heads[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        heads.heads[0].bias.copy_(torch.tensor([0.5, -0.5]))
        heads.heads[1].weight.copy_(torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0]]))
        heads.heads[1].bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    return heads


def test_each_row_is_scored_by_its_tasks_head_by_hand():
    heads = hand_heads()
    f = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, -1.0], [0.0, 0.0]])
    heads.route = torch.tensor([0, 3, 3, 7])  # task 7 has no head: the most recent one (task 3's) scores it
    out = heads(f)
    assert out.tolist() == [[1.5, 1.5, 0.0, 0.0, 0.0],        # W0 f + b0 on classes 0, 1
                            [0.0, 0.0, 3.0, 3.0, 0.0],        # W3 f + b3 on classes 2, 3, 4: (3, 3, 0)
                            [0.0, 0.0, 2.0, 7.0, 3.0],
                            [0.0, 0.0, 0.0, 1.0, 2.0]]
    heads.route = None  # no task labels: task 0, the engine's default
    assert heads(f[:1]).tolist() == [[1.5, 1.5, 0.0, 0.0, 0.0]]
    assert heads.allowed(torch.tensor([0, 3, 7])).tolist() == [[True, True, False, False, False],
                                                               [False, False, True, True, True],
                                                               [False, False, True, True, True]]


def test_tasks_that_share_class_labels_keep_their_own_heads():
    """Both tasks label their classes 0 and 1: one column per class, filled by the row's own task's head."""
    heads = TaskHeads(in_features=1, out_features=2)
    g, like = torch.Generator().manual_seed(0), torch.zeros(())
    heads.add(0, [0, 1], g, like)
    heads.add(1, [0, 1], g, like)
    with torch.no_grad():
        heads.heads[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        heads.heads[1].weight.copy_(torch.tensor([[-1.0], [1.0]]))
        for h in heads.heads:
            h.bias.zero_()
    heads.route = torch.tensor([0, 1])
    assert heads(torch.tensor([[2.0], [2.0]])).tolist() == [[2.0, -2.0], [-2.0, 2.0]]
    assert heads.classes_of(1) == [0, 1] and heads.tasks == [0, 1]


def test_one_sample_runs_every_head_and_gives_the_same_scores():
    """The path taken under torch.func.vmap (per-sample gradients): every head, other tasks' rows times 0."""
    heads = hand_heads()
    f = torch.tensor([[3.0, -1.0]])
    heads.route = torch.tensor([3])
    assert heads(f).tolist() == [[0.0, 0.0, 2.0, 7.0, 3.0]]


def test_a_task_that_comes_back_with_new_classes_keeps_its_rows():
    heads = hand_heads()
    w, b = heads.heads[0].weight.detach().clone(), heads.heads[0].bias.detach().clone()
    assert heads.add(0, [1, 5], torch.Generator().manual_seed(1), torch.zeros(()))
    assert not heads.add(0, [0, 5], torch.Generator().manual_seed(1), torch.zeros(()))  # nothing new
    head = heads.heads[0]
    assert head.classes.tolist() == [0, 1, 5] and heads.out_features == 6 and heads.tasks == [0, 3]
    assert torch.equal(head.weight[:2], w) and torch.equal(head.bias[:2], b)
    bound = 1 / 2 ** 0.5  # nn.Linear's U(-1/sqrt(in), 1/sqrt(in))
    assert head.weight[2].abs().max() <= bound and head.bias[2].abs() <= bound


def test_adapt_logits_masks_other_classes_and_the_raw_output_stays_finite():
    torch.manual_seed(0)
    s, bench = _strategy()
    s.train(bench.train_stream[0])
    s.train(bench.train_stream[1])
    x = bench.test_stream[0].dataset.x[:2]
    batch = Batch(x, torch.zeros(2, dtype=torch.long), torch.tensor([0, 1]))
    out = s.infer(batch)
    assert torch.isfinite(out.raw).all()
    assert out.raw[0, 2:].eq(0).all() and out.raw[1, :2].eq(0).all()  # the other task's columns: 0 in the raw output
    assert out.logits[0, 2:].eq(INF).all() and out.logits[1, :2].eq(INF).all()
    assert torch.equal(out.logits[0, :2], out.raw[0, :2]) and torch.equal(out.logits[1, 2:], out.raw[1, 2:])
    assert torch.equal(s.predict(x, [0, 1]), out.logits)


def _strategy(plugins=None, lr_head: float | None = None, epochs: int = 2):
    bench = task_incremental(blobs(n_classes=4), blobs(10, 4, seed=1), 2)
    model = MLP(8, [16], 4)
    if lr_head is None:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.SGD([{"params": model.backbone.parameters()},
                               {"params": model.head.parameters(), "lr": lr_head}], lr=0.1, momentum=0.9)
    return Strategy(model, opt, plugins=plugins or [MultiHead()], batch_size=16, epochs=epochs, seed=0), bench


def test_heads_are_made_for_trained_tasks_only_and_join_the_heads_optimizer_group():
    torch.manual_seed(0)
    s, bench = _strategy(lr_head=0.05)
    s.train(bench.train_stream[0])
    s.eval(bench.test_stream)  # task 1 is evaluated before it is trained: no head is made for it
    heads = MultiHead.heads(s)
    assert isinstance(s.model, MultiHeadNet) and s.head is heads and s.head_path == "model.head"
    assert heads.tasks == [0] and s.feature_dim == 16
    s.train(bench.train_stream[1])
    assert heads.tasks == [0, 1] and [h.classes.tolist() for h in heads.heads] == [[0, 1], [2, 3]]
    ids = [{id(p) for p in g["params"]} for g in s.optimizer.param_groups]
    assert all(id(p) in ids[1] for p in heads.parameters()) and all(id(p) in ids[0] for p in s.model.model.backbone.parameters())
    assert MultiHead.parameters_per_task(s) == {0: 2 * 16 + 2, 1: 2 * 16 + 2}
    assert s.eval(bench.test_stream)["accuracy"][0] > 0.8  # task 0 still predicted within its own classes


def test_the_features_are_the_heads_input():
    torch.manual_seed(0)
    s, bench = _strategy()
    s.train(bench.train_stream[0])
    data = bench.test_stream[0].dataset
    with torch.no_grad():
        expected = s.model.model.backbone(data.x)
    assert torch.allclose(s.embed(data), expected)


def test_heads_of_absent_tasks_take_no_step():
    """A minibatch of task 1 leaves task 0's head out of the graph: no gradient, so momentum does not move it."""
    torch.manual_seed(0)
    s, bench = _strategy()
    s.train(bench.train_stream[0])
    before = [p.detach().clone() for p in MultiHead.heads(s).heads[0].parameters()]
    s.train(bench.train_stream[1])
    after = list(MultiHead.heads(s).heads[0].parameters())
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert all(p.grad is None for p in after)


def test_a_one_sample_minibatch_gives_absent_heads_no_gradient():
    """One sample runs every head (other tasks' rows times 0); after_backward gives their all-zero gradient None."""
    torch.manual_seed(0)
    s, bench = _strategy()
    s.train(bench.train_stream[0])
    s.train(bench.train_stream[1])
    heads = MultiHead.heads(s)
    s.model.zero_grad(set_to_none=True)
    s.batch = Batch(bench.train_stream[1].dataset.x[:1], torch.tensor([2]), torch.tensor([1]))
    out = s.forward(s.batch)
    s.criterion(out.logits, s.batch.y).backward()
    assert heads.heads[0].weight.grad is not None and not heads.heads[0].weight.grad.any()
    s.plugins[0].after_backward(s)
    assert heads.heads[0].weight.grad is None and heads.heads[1].weight.grad.abs().sum() > 0


def test_per_sample_gradients_reach_only_the_samples_head():
    """EWC's Fisher (per-sample gradients; torch.func.vmap checks the batched path) on task 1's data: zero on task 0's
    head, not on task 1's."""
    torch.manual_seed(0)
    ewc = EWC(lambda_=1.0)
    s, bench = _strategy([MultiHead(), ewc])
    s.train(bench.train_stream[0])
    s.train(bench.train_stream[1])
    fisher = ewc.fisher(s, bench.train_stream[1].dataset)
    assert not fisher["model.head.heads.0.weight"].any() and fisher["model.head.heads.1.weight"].any()
    fisher = ewc.fisher(s, bench.train_stream[0].dataset)
    assert fisher["model.head.heads.0.weight"].any() and not fisher["model.head.heads.1.weight"].any()


def test_a_checkpoint_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    a, bench = _strategy()
    a.train(bench.train_stream[0])
    path = a.save_checkpoint(tmp_path / "one.pt")
    a.train(bench.train_stream[1])
    torch.manual_seed(5)  # another initial model: the checkpoint's weights and heads replace it
    b, _ = _strategy()
    b.load_checkpoint(path)
    assert MultiHead.heads(b).tasks == [0]
    b.train(bench.train_stream[1])
    assert list(a.model.state_dict()) == list(b.model.state_dict())
    assert all(torch.equal(u, v) for u, v in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert a.eval(bench.test_stream)["accuracy"] == b.eval(bench.test_stream)["accuracy"]


def test_a_model_that_is_its_own_head():
    torch.manual_seed(0)
    bench = task_incremental(blobs(n_classes=4), blobs(10, 4, seed=1), 2)
    model = nn.Linear(8, 4)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[MultiHead()], batch_size=16, seed=0)
    for exp in bench.train_stream:
        s.train(exp)
    assert s.head_path == "model" and MultiHead.heads(s).tasks == [0, 1]
    assert min(s.eval(bench.test_stream)["accuracy"]) > 0.8


def test_refusals():
    model = NoHead()
    with pytest.raises(ConfigError, match="MultiHead.*classifier head"):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[MultiHead()])
    model = MLP(8, [16], 4)
    with pytest.raises(PluginError, match="task_head"):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[TaskMask(), MultiHead()])
