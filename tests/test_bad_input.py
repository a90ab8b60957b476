"""Bad input gets a clear error (the library's own type, saying what to do), and nothing is lost."""
import pytest
import torch

from streamcl import ConfigError, DataError, Strategy, TrainingError, hookimpl
from streamcl.memory import Budget
from streamcl.models import MLP
from streamcl.scenarios import Experience, TensorData
from tests.synthetic import blobs, tiny_benchmark


def make(model=None, **kwargs):
    torch.manual_seed(0)
    model = model or MLP(8, [16], 4)
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=16, seed=0, **kwargs)


def experience(x, y, n_classes=4):
    return Experience(0, TensorData(x, y), tuple(sorted(set(y.tolist()))), n_classes)


@pytest.mark.parametrize("bad", [4, 17, -1])
def test_labels_outside_the_class_range(bad):
    data = blobs()
    y = data.y.clone()
    y[5] = bad
    with pytest.raises(DataError, match=rf"label {bad}, outside the stream's classes 0..3"):
        make().train(experience(data.x, y))
    with pytest.raises(DataError, match=rf"label {bad}"):
        make().eval(experience(data.x, y))


class Functional(torch.nn.Module):
    """Two outputs from a weight used functionally: no linear head the engine could widen."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(2, 8))

    def forward(self, x):
        return x @ self.weight.T


def test_model_smaller_than_the_stream_points_to_the_growing_head():
    bench = tiny_benchmark()
    s = make(Functional())  # two outputs, four classes
    s.train(bench.train_stream[0])  # labels 0, 1 fit
    with pytest.raises(DataError, match=r"gives 2 outputs .* holds label 3 .*growing=True"):
        s.train(bench.train_stream[1])


def test_a_fixed_linear_head_too_small_for_the_stream_grows():
    bench = tiny_benchmark()
    s = make(MLP(8, [16], 2))  # an nn.Linear head of two outputs, four classes: widened, not refused
    s.train(bench.train_stream[0])
    s.train(bench.train_stream[1])
    assert s.head.out_features == 4


def test_inputs_of_the_wrong_shape():
    data = blobs()
    with pytest.raises(DataError, match=r"inputs of shape \(5,\) do not fit MLP"):
        make().train(experience(data.x[:, :5], data.y))
    with pytest.raises(DataError, match=r"inputs of shape \(5,\)"):
        make().eval(experience(data.x[:, :5], data.y))


def test_empty_experience():
    with pytest.raises(DataError, match="is empty"):
        make().train(experience(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)))


@pytest.mark.parametrize("kwargs", [dict(total=0), dict(total=-5), dict(per_class=0), dict(per_class=-1),
                                    dict(total=2.5), dict(), dict(total=10, per_class=2)])
def test_memory_budget_of_zero_or_negative_or_unclear(kwargs):
    with pytest.raises(ConfigError, match="memory budget"):
        Budget(**kwargs)


def test_budget_split_by_hand():
    assert Budget(total=10).quotas([3, 1, 2]) == {3: 4, 1: 3, 2: 3}
    assert sum(Budget(total=500).quotas(list(range(6))).values()) == 500
    assert Budget(per_class=20).quotas([0, 1]) == {0: 20, 1: 20}


class Explode:
    """A loss term that becomes infinite at a given step."""

    def __init__(self, at: int):
        self.at = at

    @hookimpl
    def loss_terms(self, strategy):
        factor = float("inf") if strategy.global_step == self.at else 0.0
        return {"boom": factor * sum(p.sum() for p in strategy.model.parameters())}


def test_non_finite_loss_names_term_and_place_and_keeps_the_checkpoint(tmp_path):
    bench = tiny_benchmark()
    s = make(plugins=[Explode(at=7)], epochs=2, checkpoint_dir=tmp_path, checkpoint_every=2)
    s.train(bench.train_stream[0])  # steps 0-5
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    with pytest.raises(TrainingError, match=r"'boom' at experience 1, epoch 0, iteration 1 \(step 7\).*intact"):
        s.train(bench.train_stream[1])
    # step 6 trained, step 7 (the bad loss) changed nothing; the last checkpoint (end of experience 0) loads
    assert any(not torch.equal(before[k], v) for k, v in s.model.state_dict().items())
    after_six = {k: v.clone() for k, v in s.model.state_dict().items()}
    fresh = make(plugins=[Explode(at=-1)], epochs=2, checkpoint_dir=tmp_path)
    fresh.load_checkpoint()
    assert fresh.global_step == 6 and len(fresh.trained) == 1 and fresh._resume_at is None
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in after_six.values())
    fresh.train(bench.train_stream[1])
    assert fresh.global_step == 12


def test_non_finite_check_can_be_turned_off():
    s = make(plugins=[Explode(at=0)], check_finite=False)
    s.train(tiny_benchmark().train_stream[0])  # runs; the model is now NaN, as asked
    assert not torch.isfinite(next(s.model.parameters())).all()


def test_a_device_the_machine_lacks():
    from streamcl import config

    with pytest.raises(ConfigError, match=r"train.device = 'cuda:7'.*CUDA device"):
        config.parse({"train": {"device": "cuda:7"}})
    with pytest.raises(ConfigError, match="not a torch device"):
        config.parse({"train": {"device": "toaster"}})


# ------------------------------------------------------------------ the optimizer the user built is the contract
def test_a_head_only_optimizer_trains_only_the_head(tmp_path):
    torch.manual_seed(0)
    m = MLP(8, [16], 4)
    s = Strategy(m, torch.optim.SGD(m.head.parameters(), lr=0.1), batch_size=16, seed=0, checkpoint_dir=tmp_path)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    bench = tiny_benchmark()
    s.train(bench.train_stream[0])
    same = {n: torch.equal(before[n], p) for n, p in s.model.named_parameters()}
    assert same == {"backbone.1.weight": True, "backbone.1.bias": True, "head.weight": False, "head.bias": False}
    resumed = make(MLP(8, [16], 4), checkpoint_dir=tmp_path)  # its optimizer holds everything: refused below
    with pytest.raises(Exception, match="optimizer"):
        resumed.load_checkpoint()
    m2 = MLP(8, [16], 4)
    again = Strategy(m2, torch.optim.SGD(m2.head.parameters(), lr=0.1), batch_size=16, seed=0, checkpoint_dir=tmp_path)
    again.load_checkpoint()
    frozen = again.model.backbone[1].weight.detach().clone()
    again.train(bench.train_stream[1])
    assert torch.equal(frozen, again.model.backbone[1].weight)


def test_a_growing_head_keeps_its_groups_learning_rate():
    torch.manual_seed(0)
    m = MLP(8, [16], growing=True)
    opt = torch.optim.SGD([{"params": m.backbone.parameters(), "lr": 0.01},
                           {"params": m.head.parameters(), "lr": 0.1}], momentum=0.9)
    s = Strategy(m, opt, batch_size=16, seed=0)
    for exp in tiny_benchmark().train_stream:
        s.train(exp)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1]
    assert [[tuple(p.shape) for p in g["params"]] for g in opt.param_groups] == [[(16, 8), (16,)], [(4, 16), (4,)]]
    assert opt.param_groups[1]["params"][0] is s.model.head.weight


def test_a_model_without_parameters_or_an_optimizer_of_another_model():
    with pytest.raises(ConfigError, match="has no parameters"):
        Strategy(torch.nn.Flatten(), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    with pytest.raises(ConfigError, match="holds none of the parameters"):
        Strategy(MLP(8, [4], 2), torch.optim.SGD(MLP(8, [4], 2).parameters(), lr=0.1))


def test_load_checkpoint_refuses_a_strategy_built_differently_and_mixes_nothing(tmp_path):
    from plugins.replay import Replay
    from streamcl.checkpoint import CheckpointError

    def build(memory=20, lr=0.1, hidden=16):
        torch.manual_seed(0)
        m = MLP(8, [hidden], 4)
        return Strategy(m, torch.optim.SGD(m.parameters(), lr=lr), plugins=[Replay(memory)], batch_size=16,
                        seed=0, checkpoint_dir=tmp_path)

    build().train(tiny_benchmark().train_stream[0])
    for kwargs, named in ((dict(memory=40), r"plugins \(Replay\(memory=20\)"), (dict(lr=0.5), "optimizer"),
                          (dict(hidden=32), r"model \(backbone.1.weight \(16, 8\)")):
        other = build(**kwargs)
        with pytest.raises(CheckpointError, match=named):
            other.load_checkpoint()
        assert other.global_step == 0 and other.plugins[0].memory is None  # nothing was restored
    same = build()
    same.load_checkpoint()
    assert same.global_step > 0 and len(same.plugins[0].memory) == 20


# ------------------------------------------------------------------ datasets of the user's: augmented, NaN, labels
def _item_stream(transform=None, target_transform=None, n_classes=4):
    from streamcl.scenarios import class_incremental
    from tests.conftest import ItemDataset

    return class_incremental(ItemDataset(blobs(n_classes=n_classes), transform, target_transform),
                             ItemDataset(blobs(10, n_classes, seed=1)), 2)


class CrashAt:
    def __init__(self, step):
        self.step = step

    @hookimpl
    def after_training_iteration(self, strategy):
        if strategy.global_step + 1 == self.step:
            raise KeyboardInterrupt


def test_an_augmented_dataloader_run_resumes_exactly_and_needs_only_the_strategy_seed(tmp_path):
    from tests.conftest import jitter

    bench = _item_stream(jitter)

    def run(plugins=(), global_seed=0, resume=False):
        torch.manual_seed(0)
        m = MLP(8, [16], 4)
        s = Strategy(m, torch.optim.SGD(m.parameters(), lr=0.1), plugins=list(plugins), batch_size=16, seed=3,
                     checkpoint_dir=tmp_path, checkpoint_every=2)
        if resume:
            s.load_checkpoint()
        torch.manual_seed(global_seed)  # the global generator must not matter
        for exp in bench.train_stream[len(s.trained):]:
            s.train(exp)
        return s.eval(bench.test_stream)["accuracy"], [p.detach().clone() for p in s.model.parameters()]

    acc, params = run()
    acc2, params2 = run(global_seed=123)
    assert acc == acc2 and all(torch.equal(a, b) for a, b in zip(params, params2))
    with pytest.raises(KeyboardInterrupt):
        run([CrashAt(step=5)])  # inside experience 1 (steps 3-5), after the checkpoint of step 4
    acc3, params3 = run([CrashAt(step=-1)], global_seed=7, resume=True)
    assert acc3 == acc and all(torch.equal(a, b) for a, b in zip(params, params3))


def test_a_memory_refuses_a_dataset_with_random_transforms_and_stores_clean_samples_with_augment():
    from plugins.replay import Replay
    from tests.conftest import jitter

    with pytest.raises(DataError, match=r"different input each time.*Replay.*augment="):
        make(plugins=[Replay(20)]).train(_item_stream(jitter).train_stream[0])
    seen = []

    def augment(x):
        seen.append(x)
        return jitter(x)

    bench = _item_stream()
    s = make(plugins=[Replay(20, batch_size=8)], augment=augment)
    s.train(bench.train_stream[0])
    clean = blobs().x
    stored = s.plugins[0].memory.inputs()
    assert all(any(torch.equal(v, c) for c in clean) for v in stored)  # every stored input is a clean one
    seen.clear()
    s.train(bench.train_stream[1])
    assert len(seen) == 40 + 3 * 8  # 40 new samples and 8 replayed in each of 3 steps, all augmented
    assert s.unaugmented is not None and not torch.equal(s.unaugmented.x, s.batch.x)


def test_nan_inputs_are_refused_at_training_and_evaluation():
    data = blobs()
    x = data.x.clone()
    x[3, 2] = float("nan")
    with pytest.raises(DataError, match="NaN or infinite"):
        make().eval(experience(x, data.y))
    with pytest.raises(DataError, match="NaN or infinite"):
        make().train(experience(x, data.y))
    from streamcl.scenarios import class_incremental
    from tests.conftest import ItemDataset
    bench = class_incremental(ItemDataset(TensorData(x, data.y)), ItemDataset(TensorData(x, data.y)), 1)
    with pytest.raises(DataError, match="NaN or infinite"):
        make().eval(bench.test_stream)


def test_fractional_labels_are_refused_not_truncated():
    data = blobs()
    y = data.y.float()
    y[4] = 2.7
    with pytest.raises(DataError, match="whole numbers.*2.7"):
        TensorData(data.x, y)
    assert TensorData(data.x, data.y.float()).y.dtype == torch.long  # 2.0 is class 2
    from streamcl.batch import Batch
    with pytest.raises(DataError, match="whole numbers"):
        Batch.collate([(data.x[0], 6.7), (data.x[1], 1)])


def test_a_target_transform_is_honoured_when_splitting_classes():
    bench = _item_stream(target_transform=lambda y: (y + 1) % 4)
    first = bench.train_stream[0]
    yielded = {int(first.dataset[i][1]) for i in range(len(first))}
    assert yielded == set(first.classes)
    make().train(first)


def test_labels_outside_the_experience_classes_are_refused():
    data = blobs()
    exp = Experience(0, data, (0, 1), 4)  # holds 0..3
    with pytest.raises(DataError, match=r"label\(s\) \[2, 3\], which are not among its classes \[0, 1\]"):
        make().train(exp)


def test_cumulative_on_a_users_dataset():
    from plugins.cumulative import Cumulative

    bench = _item_stream()
    s = make(plugins=[Cumulative()])
    for exp in bench.train_stream:
        s.train(exp)
    assert s.global_step == 3 + 5  # 40 samples, then 40 + the first 40, in batches of 16


def test_batchnorm_and_a_last_minibatch_of_one_sample():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4))
    data = blobs(n_per_class=11, n_classes=3)  # 33 samples: batches of 16, 16 and 1
    s = make(model)
    s.train(experience(data.x, data.y))
    assert s.global_step == 2  # the lone last sample is left out (documented), no ValueError
