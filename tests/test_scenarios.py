import pytest
import torch
from torch.utils.data import Dataset

from streamcl import Batch, DataError, Strategy
from streamcl.models import MLP
from streamcl.scenarios import (TensorData, class_incremental, domain_incremental, join, split_classes,
                                task_incremental)
from tests.synthetic import blobs


def test_split_classes_equal_and_b50_inc10():
    assert split_classes(range(10), 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert split_classes(range(10), classes_per_exp=5) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    # "B50-Inc10" in miniature: half the classes first, then steps of one
    assert split_classes(range(10), 6, first=5) == [[0, 1, 2, 3, 4], [5], [6], [7], [8], [9]]
    assert split_classes(range(10), first=4, classes_per_exp=3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


@pytest.mark.parametrize("kwargs", [dict(n_experiences=3), dict(classes_per_exp=4), dict(n_experiences=4, first=5),
                                    dict(n_experiences=2, classes_per_exp=2), dict(first=11, classes_per_exp=1)])
def test_split_classes_refuses_uneven(kwargs):
    with pytest.raises(DataError):
        split_classes(range(10), **kwargs)


def test_class_incremental_on_tensors():
    bench = class_incremental(blobs(), blobs(10, seed=1), 2, class_order=[3, 1, 0, 2])
    assert [e.classes for e in bench.train_stream] == [(3, 1), (0, 2)]
    first = bench.train_stream[0].dataset
    assert isinstance(first, TensorData) and len(first) == 40
    assert set(first.y.tolist()) == {1, 3} and first.t.eq(0).all()
    assert bench.n_classes == 4 and bench.train_stream[0].task is None
    assert [len(e) for e in bench.test_stream] == [20, 20]


def test_class_order_from_seed_is_reproducible_and_validated():
    a = class_incremental(blobs(), blobs(), 2, seed=7).info["class_order"]
    assert a == class_incremental(blobs(), blobs(), 2, seed=7).info["class_order"]
    assert sorted(a) == [0, 1, 2, 3]
    with pytest.raises(DataError, match="permutation"):
        class_incremental(blobs(), blobs(), 2, class_order=[0, 1, 2, 2])


def test_task_incremental_exposes_task_labels():
    bench = task_incremental(blobs(), blobs(10), 2)
    for i, (tr, te) in enumerate(zip(bench.train_stream, bench.test_stream)):
        assert tr.task == te.task == i
        assert tr.dataset.t.eq(i).all() and te.dataset.t.eq(i).all()


def test_domain_incremental_permutes_disjoint_chunks():
    data = TensorData(torch.arange(60 * 6, dtype=torch.float32).reshape(60, 6), torch.arange(60) % 3)
    bench = domain_incremental(data, data, 3)
    e0, e1 = bench.train_stream[0].dataset, bench.train_stream[1].dataset
    assert torch.equal(e0.x, data.x[:20])  # experience 0 keeps the original inputs
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(e1.x, data.x[20:40][:, perm]) and torch.equal(e1.y, data.y[20:40])
    assert bench.train_stream[2].classes == (0, 1, 2) and bench.scenario == "domain"
    assert all(e.task is None for e in bench.train_stream) and int(e1.t.abs().sum()) == 0


def test_domain_incremental_with_task_labels_gives_experience_k_task_k():
    data = TensorData(torch.arange(60 * 6, dtype=torch.float32).reshape(60, 6), torch.arange(60) % 3)
    bench = domain_incremental(data, data, 3, task_labels=True)
    for stream in (bench.train_stream, bench.test_stream):
        assert [e.task for e in stream] == [0, 1, 2]
        assert [sorted(set(e.dataset.t.tolist())) for e in stream] == [[0], [1], [2]]
    assert torch.equal(data.t, torch.zeros(60, dtype=torch.long))  # the source keeps its labels


class ListDataset(Dataset):
    """A plain Dataset with ``targets`` (like a torchvision dataset): no tensor fast path."""

    def __init__(self, data: TensorData):
        self.items = [(data.x[i], int(data.y[i])) for i in range(len(data))]
        self.targets = [y for _, y in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_general_dataset_goes_through_a_dataloader():
    bench = class_incremental(ListDataset(blobs()), ListDataset(blobs(10)), 2)
    exp = bench.train_stream[1]
    assert not isinstance(exp.dataset, TensorData) and exp.classes == (2, 3)
    torch.manual_seed(0)
    model = MLP(8, [16], 4)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8, epochs=5, seed=0)
    batches = list(strategy.batches(exp.dataset, 8, torch.randperm(40)))
    assert sum(len(b) for b in batches) == 40 and all(isinstance(b, Batch) for b in batches)
    assert set(torch.cat([b.y for b in batches]).tolist()) == {2, 3}
    strategy.train(exp)
    assert strategy.eval(bench.test_stream)["accuracy"][1] > 0.8


def test_tensor_fast_path_is_index_slices_of_an_order():
    data = blobs()
    model = MLP(8, [4], 4)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), seed=3)
    perm = torch.randperm(80, generator=torch.Generator().manual_seed(3))
    batches = list(strategy.batches(data, 32, perm))
    assert [len(b) for b in batches] == [32, 32, 16]
    assert torch.equal(torch.cat([b.x for b in batches]), data.x[perm])


def test_join_keeps_tensors_and_batch_cat():
    a, b = blobs(2), blobs(3)
    joined = join([a, b])
    assert isinstance(joined, TensorData) and len(joined) == len(a) + len(b)
    ba, bb = Batch(a.x, a.y, a.t), Batch(b.x, b.y, b.t)
    assert torch.equal(ba.cat(bb).y, torch.cat([a.y, b.y]))
