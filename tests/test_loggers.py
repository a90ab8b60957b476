"""The run's one event stream: every logger gets the same values, one per name and step, from the engine, from
plugins and from private training loops; CSV and Weights & Biases files read back; console verbosity; warnings
attributed to the plugin's own line."""
from __future__ import annotations

import collections
import glob
import io
import json
import logging
import struct
import time
import warnings

import pytest

from streamcl import Plugin, hookimpl
from streamcl.loggers.csvlog import CSVLogger, read
from tests.reliability import tiny_run

STEPS = 3 * 2 * 3  # 3 experiences x 2 epochs x 3 minibatches of the tiny stream


def rows(out) -> list[dict]:
    return read(out / "scalars.csv")


def by_name(out) -> dict[str, list[tuple[int, float]]]:
    found = collections.defaultdict(list)
    for r in rows(out):
        found[r["name"]].append((r["step"], r["value"]))
    return found


def test_one_value_per_name_and_step_with_a_bias_correction(tmp_path):
    """BiC evaluates twice per experience (before and after its correction): the first goes under uncorrected/."""
    tiny_run({"method": {"name": "bic"}}, tmp_path)
    seen = collections.Counter((r["name"], r["axis"], r["step"]) for r in rows(tmp_path))
    assert max(seen.values()) == 1
    found = by_name(tmp_path)
    assert [s for s, _ in found["accuracy/mean"]] == [0, 1, 2]
    assert [s for s, _ in found["uncorrected/accuracy/mean"]] == [0, 1, 2]
    assert [s for s, _ in found["loss/total"]] == list(range(STEPS))
    assert len(found["loss/bic"]) == len(found["bic/alpha"]) == 2  # its bias layer fitted after experiences 1, 2
    assert all(after <= before + 1e-9 for (_, after), (_, before) in zip(found["loss/bic"], found["loss/bic_before"]))
    results = json.loads((tmp_path / "results.json").read_text())
    assert [v for _, v in found["accuracy/seen"]] == pytest.approx(results["seen_accuracy"])


def test_loss_total_is_the_sum_of_the_terms(tmp_path):
    tiny_run({"method": {"name": "lwf"}}, tmp_path)
    found = by_name(tmp_path)
    terms = [n for n in found if n.startswith("loss/") and n != "loss/total"]
    assert set(terms) == {"loss/task", "loss/lwf"}
    lwf = dict(found["loss/lwf"])
    for step, total in found["loss/total"]:
        assert total == pytest.approx(dict(found["loss/task"])[step] + lwf.get(step, 0.0), rel=1e-6)


def test_private_loops_log_each_epoch_on_their_own_axis(tmp_path):
    tiny_run({"method": {"name": "gdumb"}}, tmp_path)
    mine = [r for r in rows(tmp_path) if r["name"] == "loss/gdumb"]
    assert mine and {r["axis"] for r in mine} == {"gdumb epoch"}
    assert [r["step"] for r in mine] == list(range(len(mine)))  # counted over the run, not restarted


def test_er_ace_logs_its_two_terms(tmp_path):
    tiny_run({"method": {"name": "er_ace"}}, tmp_path)
    found = by_name(tmp_path)
    incoming, replayed, task = dict(found["loss/ace_incoming"]), dict(found["loss/ace_replay"]), dict(found["loss/task"])
    assert replayed, "the replayed term is logged once the memory replays"
    for step, value in task.items():
        assert value == pytest.approx(incoming[step] + replayed.get(step, 0.0), rel=1e-6)


class Shout(Plugin):
    """Logs a scalar of its own every iteration and warns once."""

    @hookimpl
    def after_training_iteration(self, strategy) -> None:
        strategy.log("shout/step_squared", strategy.global_step ** 2)
        if strategy.global_step == 1:
            from streamcl.plugin import warn
            warn("shout: a warning of the plugin's own")  # this line is the warning's location


def test_a_plugins_scalar_reaches_the_csv_and_its_warning_names_its_line(tmp_path):
    import inspect

    import torch

    from streamcl import Strategy, config, runner
    from tests.reliability import tiny_benchmark

    cfg = config.parse({"seed": 0, "model": {"hidden": [16]}, "train": {"epochs": 1, "batch_size": 16},
                        "log": {"tensorboard": False, "console": False}})
    model = runner.build_model(cfg, 6, (8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[Shout()], batch_size=16,
                     loggers=[CSVLogger(tmp_path / "scalars.csv")])
        s.train(tiny_benchmark().train_stream[0])
        s.close()
    assert [(r["step"], r["value"]) for r in rows(tmp_path) if r["name"] == "shout/step_squared"] == \
        [(i, float(i * i)) for i in range(3)]
    mine = [w for w in caught if "plugin's own" in str(w.message)]
    line = next(i for i, text in enumerate(inspect.getsource(Shout).splitlines()) if "this line" in text)
    assert mine[0].filename == __file__ and mine[0].lineno == inspect.getsourcelines(Shout)[1] + line


def test_csv_cut_back_to_the_checkpoint_on_resume(tmp_path):
    logger = CSVLogger(tmp_path / "scalars.csv")
    for step in range(3):
        logger.log_value("loss/total", 1.0 / (step + 1), step, "step")
    state = logger.state_dict()
    logger.log_value("loss/total", 9.0, 3, "step")  # written after the checkpoint by a run that died
    logger.file.flush()
    again = CSVLogger(tmp_path / "scalars.csv")
    again.load_state_dict(state)
    again.log_value("loss/total", 0.25, 3, "step")
    again.close(None)
    assert [(r["step"], r["value"]) for r in rows(tmp_path)] == [(0, 1.0), (1, 0.5), (2, 1 / 3), (3, 0.25)]


def test_a_killed_run_resumed_logs_each_value_once(tmp_path, monkeypatch):
    from tests.reliability import Crash, crash_at_step

    whole = tmp_path / "whole"
    tiny_run({"method": {"name": "replay"}}, whole)
    crash_at_step(monkeypatch, 8)
    with pytest.raises(Crash):
        tiny_run({"method": {"name": "replay"}}, tmp_path / "killed")
    monkeypatch.undo()
    tiny_run({"method": {"name": "replay"}}, tmp_path / "killed", resume=True)
    a, b = rows(whole), rows(tmp_path / "killed")
    assert [(r["name"], r["step"]) for r in a] == [(r["name"], r["step"]) for r in b]
    assert [r["value"] for r in a] == pytest.approx([r["value"] for r in b], rel=1e-5)


# ----------------------------------------------------------------------------- Weights & Biases, offline
def wandb_records(folder) -> list:
    """The protobuf ``Record``s of the offline W&B run under ``folder``, read from its ``.wandb`` file (a log of
    32 KiB blocks of records, each with a 7-byte header: CRC, length, kind)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = open(glob.glob(str(folder / "wandb" / "offline-run-*" / "run-*.wandb"))[0], "rb").read()
    assert raw[:4] == b":W&B"
    records, part, pos = [], b"", 7
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        part, pos = part + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def wandb_history(folder, wait: float = 120.0) -> list[dict]:
    """The history rows of the offline W&B run under ``folder``. W&B's service process writes the file and may
    flush its last block after ``finish()`` returns (seen under load: a file without its records), so this reads
    until the run's exit record is there, for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        records = wandb_records(folder)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def test_wandb_offline_holds_the_same_values_as_the_csv(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny_run({"method": {"name": "replay"}, "log": {"tensorboard": False, "console": False, "wandb": True}}, tmp_path)
    history = wandb_history(tmp_path)
    csv = by_name(tmp_path)
    logged = [(h["step"], h["loss/total"]) for h in history if "loss/total" in h]
    assert logged == [(s, pytest.approx(v, rel=1e-6)) for s, v in csv["loss/total"]]
    accuracy = [(h["experience"], h["accuracy/mean"]) for h in history if "accuracy/mean" in h]
    assert accuracy == [(s, pytest.approx(v, rel=1e-6)) for s, v in csv["accuracy/mean"]]
    assert any("accuracy_matrix/path" in h for h in history)  # the heat map as an image


def test_wandb_missing_is_refused_with_the_install_command(monkeypatch):
    import builtins

    from streamcl import ConfigError
    from streamcl.loggers.wandb import WandbLogger
    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    monkeypatch.delitem(__import__("sys").modules, "wandb", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'streamcl\[wandb\]'"):
        WandbLogger()


# ----------------------------------------------------------------------------- the console
def console_text(level: int) -> str:
    from streamcl.loggers.console import configure
    stream = io.StringIO()
    configure(level, stream)
    try:
        from streamcl import runner
        from tests.reliability import tiny_benchmark, tiny_config
        runner.run(tiny_config({"method": {"name": "replay"}}), None, console=True, benchmark=tiny_benchmark())
    finally:
        configure(0)
    return stream.getvalue()


@pytest.mark.parametrize("level", [-1, 0, 1])
def test_console_verbosity(level):
    text = console_text(level)
    if level < 0:
        assert text == ""
        return
    assert "trained experience 2" in text and "accuracy per experience" in text and "final accuracy" in text
    assert text.count("final accuracy") == 1
    assert ("epoch 2/2: loss" in text) == (level > 0)


def test_progress_shows_epoch_loss_and_last_accuracy():
    from types import SimpleNamespace

    from streamcl.loggers.console import ConsoleLogger
    console = ConsoleLogger(io.StringIO())
    console.log_value("loss/total", 2.0, 0, "step")
    console.log_value("loss/total", 1.0, 1, "step")
    console.log_value("accuracy/mean", 0.75, 0, "experience")
    console.log_value("uncorrected/accuracy/mean", 0.5, 0, "experience")
    assert console._postfix(SimpleNamespace(epoch=0, epochs=3)) == "epoch 1/3, loss 1.9000, last acc 0.750"
    logging.getLogger("streamcl").handlers.clear()
