"""The TensorBoard run, read back with TensorBoard's own EventAccumulator, after short runs on real SFM-5."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from streamcl import Plugin, Strategy, config, hookimpl, runner
from streamcl.loggers import TensorBoardLogger

pytestmark = pytest.mark.slow

ITERS_PER_EXP = 94  # ceil(12000 / 128): two Fashion-MNIST classes per experience, batch 128


def read_events(log_dir: Path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    files = list(Path(log_dir).glob("events.out.tfevents.*"))
    assert files, f"no event file under {log_dir}"
    acc = ea.EventAccumulator(str(log_dir), size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    return acc.Reload()


def text(acc, tag: str) -> list[str]:
    return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")]


def hparams(acc) -> tuple[dict, dict]:
    """The hparams plugin's session-start hyper-parameters, and the experiment's declared metric tags."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    values = {}
    for key, v in start.session_start_info.hparams.items():
        kind = v.WhichOneof("kind")
        values[key] = getattr(v, kind)
    return values, {m.name.tag for m in exp.experiment.metric_infos}


# ----------------------------------------------------------------------------- a run from a config
@pytest.fixture(scope="module")
def naive_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb_naive")
    cfg = config.parse({"method": {"name": "naive"}}, ["train.epochs=1"])
    res = runner.run(cfg, out, console=False)
    return res, read_events(out / "tensorboard")


def test_loss_scalars_once_per_iteration(naive_run):
    res, acc = naive_run
    n = 5 * ITERS_PER_EXP
    task, total = acc.Scalars("loss/task"), acc.Scalars("loss/total")
    assert len(task) == len(total) == n
    assert [s.step for s in task] == list(range(n))
    assert [s.step for s in total] == list(range(n))
    # No plugin contributes a term: the total is the task loss.
    assert [s.value for s in total] == pytest.approx([s.value for s in task], rel=1e-6)
    assert {t for t in acc.Tags()["scalars"] if t.startswith("loss/")} == {"loss/task", "loss/total"}
    # Fine-tuning a fresh MLP starts near log(10) and goes down within the first experience.
    assert task[0].value == pytest.approx(2.30, abs=0.2)
    assert sum(s.value for s in task[80:94]) / 14 < 0.5 * task[0].value


def test_accuracy_scalars_once_per_experience(naive_run):
    res, acc = naive_run
    R = res["accuracy_matrix"]
    assert len(R) == 5
    for j in range(5):
        events = acc.Scalars(f"accuracy/exp{j}")
        assert [e.step for e in events] == [0, 1, 2, 3, 4]
        assert [e.value for e in events] == pytest.approx([R[i][j] for i in range(5)], abs=1e-6)
    mean = acc.Scalars("accuracy/mean")
    assert [e.step for e in mean] == [0, 1, 2, 3, 4]
    assert [e.value for e in mean] == pytest.approx([sum(r) / 5 for r in R], abs=1e-6)
    assert mean[-1].value == pytest.approx(res["final_accuracy"], abs=1e-6)


def test_accuracy_matrix_image(naive_run):
    from PIL import Image

    res, acc = naive_run
    images = acc.Images("accuracy_matrix")
    assert [im.step for im in images] == [0, 1, 2, 3, 4]
    import numpy as np

    from streamcl.report import matrix_figure
    png = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    assert np.array_equal(png, matrix_figure(res["accuracy_matrix"]))  # the labelled heat map of the last row
    old_new = acc.Images("old_new_accuracy")
    assert [im.step for im in old_new] == [0, 1, 2, 3, 4]
    # The matrix as markdown text, too.
    assert "exp 4" in text(acc, "accuracy_matrix")[-1]


def test_run_description_text(naive_run):
    res, acc = naive_run
    assert text(acc, "run/plugins") == ["(none)"]
    described = text(acc, "run/hparams")
    assert len(described) == 1
    body = json.loads(described[0].strip().strip("`"))
    assert body["train"]["epochs"] == 1 and body["method"] == {"name": "naive"}


def test_hparams_summary(naive_run):
    res, acc = naive_run
    hp, metric_tags = hparams(acc)
    assert "plugins" in hp
    assert hp["plugins"] == "(none)"  # the plugins that ran, not the config's raw [[plugins]] list
    assert hp["method.name"] == "naive"
    assert hp["train.epochs"] == 1 and hp["seed"] == 0 and hp["benchmark.name"] == "split-fmnist"
    assert "train.lr" not in hp and "log.console" not in hp  # left at their defaults: nothing to compare runs by
    assert {"hparam/final_accuracy", "hparam/avg_incremental_accuracy", "hparam/forgetting"} <= metric_tags
    final = acc.Scalars("hparam/final_accuracy")
    assert final[-1].value == pytest.approx(res["final_accuracy"], abs=1e-6)


# ----------------------------------------------------------------------------- a plugin's loss term
class L2(Plugin):
    """A weight penalty contributed as the loss term ``l2``."""

    def __init__(self, weight: float = 1e-3):
        self.weight = weight

    @hookimpl
    def loss_terms(self, strategy, batch, output):
        return {"l2": self.weight * sum(p.pow(2).sum() for p in strategy.model.parameters())}


def test_plugin_loss_term_is_logged(tmp_path):
    cfg = config.parse({})
    torch.manual_seed(0)
    bench = runner.build_benchmark(cfg)
    model = runner.build_model(cfg, bench.n_classes, (784,))
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), plugins=[L2(weight=1e-3)],
                        epochs=1, batch_size=128, eval_batch_size=512, seed=0,
                        loggers=[TensorBoardLogger(tmp_path / "tb")])
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
        strategy.eval(bench.test_stream)
    strategy.close()

    acc = read_events(tmp_path / "tb")
    n = 2 * ITERS_PER_EXP
    l2, task, total = (acc.Scalars(f"loss/{t}") for t in ("l2", "task", "total"))
    assert len(l2) == len(task) == len(total) == n
    assert [s.step for s in l2] == list(range(n))
    assert all(s.value > 0 for s in l2)
    for a, b, c in zip(l2, task, total):
        assert c.value == pytest.approx(a.value + b.value, rel=1e-5)
    # The logged term is what the plugin computes: 1e-3 * ||theta||^2 of the final model, at the last step.
    final_norm = sum(float(p.detach().pow(2).sum()) for p in model.parameters())
    assert l2[-1].value == pytest.approx(1e-3 * final_norm, rel=0.05)

    assert [e.step for e in acc.Scalars("accuracy/mean")] == [0, 1]
    assert text(acc, "run/plugins") == ["L2(weight=0.001)"]
    hp, _ = hparams(acc)
    assert hp["plugins"] == "L2(weight=0.001)"
    assert hp["epochs"] == 1 and hp["optimizer"] == "SGD"
