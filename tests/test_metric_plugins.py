"""Metric plugins ([log] metrics): their numbers against hand computations, results.json and scalars.csv, resume, and
that they only observe (a run's accuracy numbers are the same with and without them)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from streamcl import Strategy, hookimpl, runner
from streamcl.loggers.csvlog import CSVLogger, read
from streamcl.models import MLP
from streamcl.registry import build_plugin
from streamcl.report import confusion_figure
from streamcl.scenarios import class_incremental
from streamcl.plugins.confusion_matrix import ConfusionMatrix
from streamcl.plugins.eval_loss import EvalLoss
from streamcl.plugins.forward_transfer import ForwardTransfer, forward_transfer
from streamcl.plugins.learning_rate import LearningRate
from streamcl.plugins.model_size import ModelSize, tensor_bytes
from streamcl.plugins.replay import Replay
from streamcl.plugins.resources import Resources
from streamcl.plugins.train_accuracy import TrainAccuracy
from tests.reliability import (BUILTIN_PLUGINS, METRIC_PLUGINS, Crash, crash_at_step, numbers, tiny_benchmark,
                               tiny_config, tiny_run)

METRICS = ["train_accuracy", "eval_loss", "confusion_matrix", "forward_transfer", "learning_rate", "resources",
           "model_size"]


def identity_model() -> nn.Module:
    """A linear layer whose logits are its input: a one-hot input of class k is predicted as k."""
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(4))
    return model


def predicted_as(pred: list[int]) -> torch.Tensor:
    return F.one_hot(torch.tensor(pred), 4).float()


def frozen_strategy(model, plugins, tmp_path, **kwargs) -> Strategy:
    """lr 0: the model never changes, so its predictions are known by hand."""
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.0), plugins=plugins, seed=0,
                    loggers=[CSVLogger(tmp_path / "scalars.csv")], **kwargs)


def logged(tmp_path, prefix: str) -> dict:
    return {(r["name"], r["step"]): r["value"] for r in read(tmp_path / "scalars.csv") if r["name"].startswith(prefix)}


class Images:
    """A logger that keeps the images sent to it."""

    def __init__(self):
        self.images = {}

    @hookimpl
    def log_image(self, name, image, step, axis):
        self.images[name, step, axis] = image


def test_metric_plugins_are_marked_and_left_out_of_the_generic_tests():
    assert METRIC_PLUGINS == sorted(METRICS)
    for name in METRICS:
        plugin = build_plugin(name)
        assert plugin.metric is True and not getattr(plugin, "owns", ()) and name not in BUILTIN_PLUGINS


def test_train_accuracy_counted_by_hand(tmp_path):
    # experience 0: labels 0 0 0 0 1 1 1 1, predictions 0 0 1 0 1 0 1 1: 6 of 8 right, in every epoch
    x = predicted_as([0, 0, 1, 0, 1, 0, 1, 1, 0, 0, 0, 0])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3])
    bench = class_incremental((x, y), (x, y), 2)
    plugin = TrainAccuracy()
    s = frozen_strategy(identity_model(), [plugin], tmp_path, epochs=2, batch_size=3)  # 3 steps an epoch
    s.train(bench.train_stream)
    s.close()
    assert plugin.results() == {"train_accuracy": [0.75, 0.0]}
    # logged at each epoch's last step: steps 2 and 5 (experience 0), 7 and 9 (experience 1: 4 samples, 2 steps)
    assert logged(tmp_path, "train/") == {("train/accuracy", 2): 0.75, ("train/accuracy", 5): 0.75,
                                          ("train/accuracy", 7): 0.0, ("train/accuracy", 9): 0.0}


def test_train_accuracy_counts_replayed_rows(tmp_path):
    # experience 0 is predicted right, experience 1 wrong: at experience 1 only the replayed rows are right
    x = predicted_as([0, 0, 1, 1, 0, 0, 1, 1])
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    bench = class_incremental((x, y), (x, y), 2)
    plugin = TrainAccuracy()
    s = frozen_strategy(identity_model(), [Replay(memory=4), plugin], tmp_path, batch_size=2)
    s.train(bench.train_stream)
    # 2 steps, each of 2 rows of experience 1 joined by 2 replayed rows: 4 right of 8
    assert plugin.per_experience == [1.0, 0.5]


def test_eval_loss_is_the_cross_entropy_by_hand(tmp_path):
    bench = tiny_benchmark(2)
    torch.manual_seed(0)
    model = MLP(8, [16], 4)
    plugin = EvalLoss()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin], batch_size=16,
                 eval_batch_size=7, seed=0, loggers=[CSVLogger(tmp_path / "scalars.csv")])
    s.train(bench.train_stream[0])
    s.eval(bench.test_stream[:1])  # row 0 measures test experience 0 only
    with s.uncorrected():
        s.eval(bench.test_stream)  # not with corrections on: not recorded
    s.train(bench.train_stream[1])
    s.eval(bench.test_stream)
    s.close()
    with torch.no_grad():
        by_hand = [F.cross_entropy(model(e.dataset.x), e.dataset.y).item() for e in bench.test_stream]
    R = plugin.results()["eval_loss"]
    assert R[0][1] is None and R[1] == pytest.approx(by_hand, rel=1e-5)
    assert logged(tmp_path, "eval_loss/") == pytest.approx(
        {("eval_loss/exp0", 0): R[0][0], ("eval_loss/mean", 0): R[0][0], ("eval_loss/exp0", 1): by_hand[0],
         ("eval_loss/exp1", 1): by_hand[1], ("eval_loss/mean", 1): sum(by_hand) / 2}, rel=1e-5)


def test_eval_loss_is_none_where_the_head_has_no_logit_for_the_classes():
    bench = tiny_benchmark(2)
    model = MLP(8, [16], growing=True)  # two logits after experience 0
    plugin = EvalLoss()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin], batch_size=16, seed=0)
    s.train(bench.train_stream[0])
    s.eval(bench.test_stream)
    assert plugin.matrix[0][0] > 0 and plugin.matrix[0][1] is None


def test_confusion_matrix_by_hand(tmp_path):
    train = (predicted_as([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]))
    # test experience 0 (classes 0 and 1): class 0 predicted 0 0 1 3, class 1 predicted 1 1 0 1
    test = (predicted_as([0, 0, 1, 3, 1, 1, 0, 1, 2, 3]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 3]))
    bench = class_incremental(train, test, 2)
    plugin, images = ConfusionMatrix(), Images()
    model = identity_model()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.0), plugins=[plugin], seed=0, loggers=[images])
    s.train(bench.train_stream[0])
    with s.uncorrected():
        s.eval(bench.test_stream)  # not the one kept
    s.eval(bench.test_stream[:1])
    assert plugin.results() == {"confusion_matrix": [[2, 1, 1], [1, 3, 0], [0, 0, 0]], "confusion_classes": [0, 1, 3]}
    image = images.images["confusion_matrix", 0, "experience"]
    assert image.ndim == 3 and image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1
    s.eval(bench.test_stream)
    assert plugin.counts == [[2, 1, 0, 1], [1, 3, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    fresh = ConfusionMatrix()
    fresh.load_state_dict(plugin.state_dict())
    assert fresh.results() == plugin.results()


def test_confusion_figure_is_an_rgb_array():
    picture = confusion_figure([[2, 1], [0, 3]], [4, 7])
    assert picture.dtype == np.uint8
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.shape[0] > 50


def test_forward_transfer_by_hand():
    R = [[0.9, 0.3, 0.2],
         [0.8, 0.9, 0.4],
         [0.7, 0.8, 0.9]]
    b = {0: 0.1, 1: 0.25, 2: 0.5}
    # GEM: (R[0][1] - b1 + R[1][2] - b2) / 2
    assert forward_transfer(R, b, {0: 0, 1: 1, 2: 2}) == pytest.approx((0.3 - 0.25 + 0.4 - 0.5) / 2)
    assert forward_transfer(R[:1], b, {0: 0}) is None  # nothing learned after the first row
    assert forward_transfer(R, {0: 0.1, 2: 0.5}, {0: 0, 1: 1, 2: 2}) == pytest.approx(0.4 - 0.5)  # b1 unknown
    assert forward_transfer([[0.9, None], [0.8, 0.9]], b, {0: 0, 1: 1}) is None  # R[0][1] not measured
    assert forward_transfer(R, b, {0: 0, 1: 0, 2: 0}) is None  # one joined experience covers all


def test_forward_transfer_b_is_the_engines_evaluation_of_the_initial_model():
    bench = tiny_benchmark(3)
    torch.manual_seed(3)
    model = MLP(8, [16], 6)
    initial = copy.deepcopy(model)
    plugin = ForwardTransfer()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin], batch_size=16, seed=0)
    for exp in bench.train_stream:
        s.train(exp)
        s.eval(bench.test_stream)
    alone = Strategy(initial, torch.optim.SGD(initial.parameters(), lr=0.1), eval_batch_size=7)
    b = alone.eval(bench.test_stream, record=False)["accuracy"]
    res = plugin.results(s)
    assert res["random_init_accuracy"] == b
    R = s.metrics.matrix
    assert res["forward_transfer"] == pytest.approx((R[0][1] - b[1] + R[1][2] - b[2]) / 2)


def test_learning_rate_of_each_group_every_step(tmp_path):
    bench = tiny_benchmark(1)
    model = MLP(8, [16], 2)
    groups = [{"params": model.backbone.parameters(), "lr": 0.1}, {"params": model.head.parameters(), "lr": 0.02}]
    s = Strategy(model, torch.optim.SGD(groups), plugins=[LearningRate()], batch_size=16, seed=0,
                 loggers=[CSVLogger(tmp_path / "scalars.csv")])
    s.train(bench.train_stream)
    s.close()
    assert logged(tmp_path, "lr/") == {**{("lr/group0", k): 0.1 for k in range(3)},
                                       **{("lr/group1", k): 0.02 for k in range(3)}}


def test_model_size_and_plugin_bytes_by_hand(tmp_path):
    shared = torch.zeros(3)
    assert tensor_bytes({"a": [shared, shared], "b": (torch.zeros(2, dtype=torch.float64),), "c": "text"}) == 12 + 16
    bench = tiny_benchmark(2)
    model = MLP(8, [16], 4)
    replay, size, resources = Replay(memory=10), ModelSize(), Resources()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[replay, size, resources],
                 batch_size=16, seed=0, loggers=[CSVLogger(tmp_path / "scalars.csv")])
    s.train(bench.train_stream)
    s.close()
    n = 8 * 16 + 16 + 16 * 4 + 4
    res = size.results()
    assert res["model_parameters"] == res["model_trainable_parameters"] == [n, n]
    assert res["model_bytes"] == [4 * n, 4 * n]
    assert res["plugin_bytes"][-1] == tensor_bytes(replay.state_dict()) > 10 * 8 * 4  # ten samples of 8 floats
    assert logged(tmp_path, "model/parameters") == {("model/parameters", 0): n, ("model/parameters", 1): n}
    used = resources.results()
    assert len(used["train_seconds_per_experience"]) == 2 and all(t > 0 for t in used["train_seconds_per_experience"])
    assert all(m > 0 for m in used["peak_memory_mb"])
    assert {name for name, _ in logged(tmp_path, "resources/")} == {"resources/train_seconds",
                                                                     "resources/peak_memory_mb"}


@pytest.mark.parametrize("method", ["replay", "lwf"])
def test_metrics_together_only_observe_and_reach_results_and_csv(tmp_path, method):
    """All seven beside a method: the run's numbers are those without them; results.json and scalars.csv hold theirs."""
    part = {"method": {"name": method}}
    plain = numbers(tiny_run(part))
    cfg = tiny_config(part)
    cfg["log"]["metrics"] = METRICS
    res = runner.run(cfg, tmp_path, benchmark=tiny_benchmark())
    assert numbers(res) == plain
    written = json.loads((tmp_path / "results.json").read_text())
    assert len(written["train_accuracy"]) == 3 and len(written["eval_loss"]) == 3
    assert written["forward_transfer"] is not None and len(written["random_init_accuracy"]) == 3
    assert sum(map(sum, written["confusion_matrix"])) == 60 and written["confusion_classes"] == list(range(6))
    for key in ("train_seconds_per_experience", "peak_memory_mb", "model_parameters", "model_trainable_parameters",
                "model_bytes", "plugin_bytes"):
        assert len(written[key]) == 3, key
    rows = read(tmp_path / "scalars.csv")
    axes = {r["name"]: r["axis"] for r in rows}
    for name, axis in {"train/accuracy": "step", "lr/group0": "step", "eval_loss/mean": "experience",
                       "eval_loss/exp2": "experience", "forward_transfer": "experience",
                       "resources/train_seconds": "experience", "resources/peak_memory_mb": "experience",
                       "model/parameters": "experience", "model/trainable_parameters": "experience",
                       "model/bytes": "experience", "plugins/bytes": "experience"}.items():
        assert axes.get(name) == axis, name
    fwt = [r["value"] for r in rows if r["name"] == "forward_transfer"]
    assert fwt[-1] == pytest.approx(written["forward_transfer"])


RESUMED = ("forward_transfer", "random_init_accuracy", "train_accuracy")


# checkpoints every 2 steps (3 an epoch): the crash before update 4 resumes from step 2, inside the first epoch and
# before the first evaluation (the random model's copy comes from the checkpoint); before update 9 from step 8, inside
# experience 1's first epoch
@pytest.mark.parametrize("step", [4, 9])
def test_kill_and_resume_gives_the_same_forward_transfer_and_train_accuracy(tmp_path, monkeypatch, step):
    part = {"plugins": [{"name": "forward_transfer"}, {"name": "train_accuracy"}]}
    whole = tiny_run(part, tmp_path / "whole", checkpoint_every=2)
    with monkeypatch.context() as m:
        crash_at_step(m, step)
        with pytest.raises(Crash):
            tiny_run(part, tmp_path / "run", checkpoint_every=2)
    resumed = tiny_run(part, tmp_path / "run", resume=True, checkpoint_every=2)
    assert {k: resumed[k] for k in RESUMED} == {k: whole[k] for k in RESUMED}
    assert numbers(resumed) == numbers(whole)
    curve = [[(r["step"], r["value"]) for r in read(tmp_path / run / "scalars.csv") if r["name"] == "train/accuracy"]
             for run in ("whole", "run")]
    assert curve[0] == curve[1] and len(curve[0]) == 6  # every epoch's value, the interrupted one's too


def test_states_round_trip():
    bench = tiny_benchmark(2)
    model = MLP(8, [16], 4)
    plugins = [build_plugin(name) for name in METRICS]
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=plugins, batch_size=16, seed=0)
    for exp in bench.train_stream:
        s.train(exp)
        s.eval(bench.test_stream)
    for plugin in plugins:
        fresh = type(plugin)()
        fresh.load_state_dict(plugin.state_dict())
        if hasattr(plugin, "results"):
            args = (s,) if isinstance(plugin, ForwardTransfer) else ()
            assert json.dumps(fresh.results(*args)) == json.dumps(plugin.results(*args)), type(plugin).__name__
