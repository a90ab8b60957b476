"""The online stream builder (streamcl.scenarios.online): single pass, blurry boundaries, no boundaries."""
from __future__ import annotations

import pytest
import torch

from conftest import image_benchmark
from streamcl import Plugin, Strategy, config, hookimpl
from streamcl.errors import ConfigError, DataError
from streamcl.scenarios import TensorData, class_incremental, online


def numbered(n_per_class: int = 10, n_classes: int = 6, n_experiences: int = 3):
    """A class-incremental stream whose sample i has input value i (so each sample can be traced)."""
    n = n_per_class * n_classes
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1)
    y = torch.arange(n) % n_classes
    return class_incremental(TensorData(x, y), TensorData(x, y), n_experiences)


def ids(exp) -> list[int]:
    return exp.dataset.x.flatten().long().tolist()


def test_with_boundaries_each_experience_keeps_its_samples_shuffled():
    bench = numbered()
    out = online(bench, seed=3)
    for a, b in zip(bench.train_stream, out.train_stream):
        assert sorted(ids(a)) == sorted(ids(b)) and ids(a) != ids(b)  # same samples, drawn order
        assert b.covers == a.covers and b.classes == a.classes and not b.ordered
    assert out.test_stream is bench.test_stream and out.info["online"]["holds"] == [[20, 0, 0], [0, 20, 0], [0, 0, 20]]
    assert [ids(e) for e in online(bench, seed=3).train_stream] == [ids(e) for e in out.train_stream]


def test_blurry_moves_that_fraction_of_each_experience_to_the_others():
    bench = numbered()
    out = online(bench, blurry=0.25, seed=0)
    holds = torch.tensor(out.info["online"]["holds"])  # [new experience][stream experience]
    assert holds.diagonal().tolist() == [15, 15, 15]  # each keeps 20 - round(20 * 0.25)
    assert holds.sum(0).tolist() == [20, 20, 20]  # every sample once
    every = sorted(i for e in out.train_stream for i in ids(e))
    assert every == list(range(60))
    for k, e in enumerate(out.train_stream):  # the moved samples bring their classes
        own = set(bench.train_stream[k].classes)
        assert set(e.classes) >= own and (set(e.classes) > own) == bool(holds[k].sum() > holds[k, k])
        assert e.covers == (k,)


def test_without_boundaries_chunks_follow_the_stream_in_order():
    bench = numbered()
    out = online(bench, boundaries=False, chunk=8, seed=1)
    exps = out.train_stream
    assert [len(e) for e in exps] == [8] * 7 + [4] and all(e.ordered and e.task is None for e in exps)
    with_bounds = online(bench, seed=1)  # the same draws: the chunks cut the shuffled experiences' concatenation
    assert [i for e in exps for i in ids(e)] == [i for e in with_bounds.train_stream for i in ids(e)]
    assert exps[2].covers == (0, 1)  # samples 16-19 of experience 0, 20-23 of experience 1
    assert out.info["online"]["holds"][2] == [4, 4, 0] and out.info["online"]["chunk"] == 8
    assert len(online(bench, boundaries=False).train_stream) == 12  # default: a quarter of the mean experience


def test_an_ordered_experience_is_trained_in_dataset_order():
    seen: list[int] = []

    class Record(Plugin):
        @hookimpl
        def before_forward(self, strategy):
            seen.extend(strategy.batch.x.flatten().long().tolist())

    exps = online(numbered(), boundaries=False, chunk=12, seed=0).train_stream
    model = torch.nn.Linear(1, 6)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.01), plugins=[Record()], batch_size=5,
                        seed=0)
    strategy.train(exps[0])
    assert seen == ids(exps[0])


def test_bad_online_options_are_refused():
    bench = numbered()
    with pytest.raises(DataError, match="blurry"):
        online(bench, blurry=1.0)
    with pytest.raises(DataError, match="chunk"):
        online(bench, boundaries=False, chunk=0)
    with pytest.raises(DataError, match="without boundaries"):
        online(bench, chunk=10)
    task = image_benchmark(n_experiences=2, task_labels=True)
    with pytest.raises(DataError, match="task labels"):
        online(task, boundaries=False)
    assert len(online(task).train_stream) == 2


def test_config_online_table_builds_the_online_stream():
    cfg = config.parse({"benchmark": {"online": {"blurry": 0.1, "boundaries": False, "chunk": 500}}})
    assert cfg["benchmark"]["online"] == {"blurry": 0.1, "boundaries": False, "chunk": 500}
    with pytest.raises(ConfigError, match="benchmark.online has no argument 'blury'"):
        config.parse({"benchmark": {"online": {"blury": 0.1}}})
    with pytest.raises(ConfigError, match="benchmark.online.chunk"):
        config.parse({"benchmark": {"online": {"chunk": "big"}}})
    with pytest.raises(ConfigError, match="benchmark.online: blurry .* got 2"):  # refused before any data is read
        config.parse({"benchmark": {"online": {"blurry": 2}}})
    with pytest.raises(ConfigError, match="without boundaries"):
        config.parse({"benchmark": {"online": {"chunk": 100}}})
    assert config.PROTOCOLS["OSFM-5"]["train"] == {"epochs": 1, "batch_size": 10}


def test_online_run_through_the_runner_records_a_row_per_chunk(tmp_path):
    from streamcl.runner import run

    bench = online(image_benchmark(n_classes=4, n_experiences=2, n_per_class=10), boundaries=False, chunk=12)
    cfg = config.parse({"seed": 0, "train": {"epochs": 1, "batch_size": 4}, "model": {"hidden": [16]},
                        "method": {"name": "replay", "memory": 20, "selection": "reservoir"},
                        "log": {"tensorboard": False, "console": False}})
    out = run(cfg, tmp_path / "run", benchmark=bench)
    assert len(out["accuracy_matrix"]) == 4 and all(len(row) == 2 for row in out["accuracy_matrix"])
    assert out["accuracy_matrix"][0][1] is not None  # every test experience evaluated after every chunk


def test_osfm5_builds_the_online_fashion_mnist_stream():
    from streamcl.runner import build_benchmark

    cfg = config.parse({**config.PROTOCOLS["OSFM-5"], "seed": 1})
    bench = build_benchmark(cfg)
    assert [len(e) for e in bench.train_stream] == [12000] * 5 and not bench.train_stream[0].ordered
    assert bench.info["online"]["blurry"] == 0 and bench.train_stream[0].classes == (0, 1)
    cfg = config.parse({"benchmark": {"online": {"boundaries": False, "chunk": 7000}}})
    assert [len(e) for e in build_benchmark(cfg).train_stream] == [7000] * 8 + [4000]
