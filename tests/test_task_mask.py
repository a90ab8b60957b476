import torch

from streamcl import Batch, Strategy
from streamcl.models import MLP
from streamcl.plugins import TaskMask
from streamcl.scenarios import task_incremental
from tests.synthetic import blobs


def test_logits_outside_the_task_are_masked_by_hand():
    mask = TaskMask()

    class S:
        pass

    for task, classes in ((0, (0, 1)), (1, (2, 3))):
        s = S()
        s.experience = type("E", (), {"task": task, "classes": classes, "n_classes": 4})()
        mask.before_training_exp(s)
    logits = torch.arange(12.0).reshape(3, 4)
    batch = Batch(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 5]))
    out = mask.adapt_logits(logits, batch)
    inf = float("-inf")
    assert out.tolist() == [[0.0, 1.0, inf, inf], [inf, inf, 6.0, 7.0], [8.0, 9.0, 10.0, 11.0]]  # task 5 unknown


def test_task_incremental_stream_keeps_old_tasks():
    torch.manual_seed(0)
    bench = task_incremental(blobs(n_classes=4), blobs(10, 4, seed=1), 2)
    model = MLP(8, [16], 4)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[TaskMask()], batch_size=16,
                 epochs=5, seed=0)
    for exp in bench.train_stream:
        s.train(exp)
    accuracy = s.eval(bench.test_stream)["accuracy"]
    assert accuracy[0] > 0.8 and accuracy[1] > 0.8  # task 0 still predicted within its own classes
    other = TaskMask()
    other.load_state_dict(s.plugins[0].state_dict())
    assert torch.equal(other.table, torch.tensor([[True, True, False, False], [False, False, True, True]]))
