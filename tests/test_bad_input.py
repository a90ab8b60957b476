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
