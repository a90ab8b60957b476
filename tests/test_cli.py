"""``streamcl run / methods / plugins``: the SFM-5 protocol end to end, and refusals of bad configs (exit code 2)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from streamcl import cli, registry

SFM5 = """\
seed = 0

[benchmark]
name = "split-fmnist"
scenario = "class"
n_experiences = 5
class_order = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]

[model]
name = "mlp"
hidden = [256, 256]

[train]
optimizer = "sgd"
lr = 0.01
momentum = 0.9
batch_size = 128
eval_batch_size = 512
epochs = 2
"""

RESULT_KEYS = {"accuracy_matrix", "final_accuracy", "avg_incremental_accuracy", "forgetting", "bwt",
               "train_seconds", "eval_seconds", "plugins", "config", "versions"}


def write(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------- the protocol end to end
@pytest.mark.slow
def test_run_sfm5_naive(tmp_path, capsys):
    cfg = write(tmp_path / "naive.toml", SFM5 + '\n[method]\nname = "naive"\n')
    out = tmp_path / "naive"
    rc, stdout, stderr = run_cli(capsys, "run", cfg, "--out", out, "--quiet")
    assert rc == 0, stderr
    res = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(res), f"missing: {RESULT_KEYS - set(res)}"

    R = res["accuracy_matrix"]
    assert len(R) == 5 and all(len(r) == 5 for r in R)
    assert res["final_accuracy"] == pytest.approx(sum(R[4]) / 5)
    assert 0.15 <= res["final_accuracy"] <= 0.25
    assert res["forgetting"] > 0.8
    assert res["bwt"] < -0.8
    assert 0.0 < res["avg_incremental_accuracy"] < 1.0
    assert res["train_seconds"] > 0 and res["eval_seconds"] > 0
    assert res["plugins"] == []
    assert res["config"]["method"] == {"name": "naive"}
    assert res["config"]["train"]["epochs"] == 2 and res["config"]["seed"] == 0
    assert {"streamcl", "torch", "numpy", "pluggy", "python"} <= set(res["versions"])
    # The console line agrees with results.json; the TensorBoard run sits beside it.
    assert f"final accuracy {res['final_accuracy']:.4f}" in stdout
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_run_sfm5_joint(tmp_path, capsys):
    cfg = write(tmp_path / "joint.toml", SFM5 + '\n[method]\nname = "joint"\n')
    out = tmp_path / "joint"
    rc, stdout, stderr = run_cli(capsys, "run", cfg, "--out", out, "--quiet")
    assert rc == 0, stderr
    res = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(res)
    # docs/protocols.md: Joint 0.860 (Avalanche, mean of seeds 0-2); streamcl's seed 0 measured 0.851.
    assert res["final_accuracy"] >= 0.845
    assert len(res["accuracy_matrix"][-1]) == 5


@pytest.mark.slow
def test_set_overrides_a_key(tmp_path, capsys):
    cfg = write(tmp_path / "one.toml", SFM5 + '\n[method]\nname = "naive"\n')
    out = tmp_path / "one"
    rc, _, stderr = run_cli(capsys, "run", cfg, "--out", out, "--quiet", "--set", "train.epochs=1",
                            "--set", "benchmark.n_experiences=2")
    assert rc == 0, stderr
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["train"]["epochs"] == 1
    assert len(res["accuracy_matrix"]) == 2 and len(res["accuracy_matrix"][0]) == 2


# ----------------------------------------------------------------------------- refusals: exit code 2, the key named
def refused(capsys, *argv) -> str:
    rc, stdout, stderr = run_cli(capsys, *argv)
    assert rc == 2, f"exit code {rc}; stdout {stdout!r}; stderr {stderr!r}"
    assert stderr.startswith("streamcl: error: "), stderr
    assert "Traceback" not in stderr
    return stderr


def test_unknown_key_is_named(tmp_path, capsys):
    cfg = write(tmp_path / "c.toml", """\
        [train]
        lr = 0.01
        learning_rate = 0.1
        """)
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o")
    assert "train.learning_rate" in err
    assert "lr" in err and "epochs" in err  # what [train] takes


def test_unknown_section_is_named(tmp_path, capsys):
    cfg = write(tmp_path / "c.toml", """\
        [optimiser]
        lr = 0.1
        """)
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o")
    assert "optimiser" in err
    assert "train" in err and "benchmark" in err


def test_unknown_top_level_key_is_named(tmp_path, capsys):
    cfg = write(tmp_path / "c.toml", "sed = 1\n")
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o")
    assert "'sed'" in err and "seed" in err


@pytest.mark.slow  # the plugin list is built after the data is loaded
def test_unknown_plugin_lists_known_ones(tmp_path, capsys):
    cfg = write(tmp_path / "c.toml", """\
        [[plugins]]
        name = "cumulativ"
        """)
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o")
    assert "'cumulativ'" in err
    assert "cumulative" in err.replace("'cumulativ'", "")
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.slow
def test_unknown_method_lists_known_ones(tmp_path, capsys):
    cfg = write(tmp_path / "c.toml", """\
        [method]
        name = "jiont"
        """)
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o")
    assert "'jiont'" in err
    for name in ("naive", "cumulative", "joint"):
        assert name in err


class Scaled:
    """A plugin with arguments, registered under a fake entry point for the bad-argument test; it checks its
    own arguments with a plain ValueError, as a third party's plugin may."""

    def __init__(self, memory: int = 10, alpha: float = 0.5):
        if alpha > 1:
            raise ValueError(f"alpha={alpha} must be at most 1")
        self.memory, self.alpha = memory, alpha


@pytest.mark.parametrize("target,words", [(f"{__name__}:Scaled", ["plugin 'scaled' (tests) refused", "alpha=2"]),
                                          ("no_such_module_xyz:Thing", ["'scaled' is registered by tests 0 as "
                                                                        "no_such_module_xyz:Thing, which cannot be loaded",
                                                                        "ModuleNotFoundError"])])
def test_a_third_partys_failing_plugin_is_a_streamcl_error(tmp_path, capsys, monkeypatch, target, words):
    real = registry.available_plugins()
    monkeypatch.setattr(registry, "available_plugins",
                        lambda: {**real, "scaled": registry.PluginInfo("scaled", target, "tests", "0")})
    cfg = write(tmp_path / "c.toml", """\
        [[plugins]]
        name = "scaled"
        alpha = 2.0
        """)
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o")
    assert all(w in err for w in words), err


@pytest.mark.slow
def test_bad_plugin_argument_names_it_and_the_allowed_ones(tmp_path, capsys, monkeypatch):
    real = registry.available_plugins()
    fake = registry.PluginInfo("scaled", f"{__name__}:Scaled", "tests", "0")
    monkeypatch.setattr(registry, "available_plugins", lambda: {**real, "scaled": fake})
    cfg = write(tmp_path / "c.toml", """\
        [[plugins]]
        name = "scaled"
        memroy = 500
        """)
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o")
    assert "'memroy'" in err
    assert "memory" in err.replace("'memroy'", "") and "alpha" in err


@pytest.mark.slow
def test_argument_to_a_plugin_without_arguments(tmp_path, capsys):
    cfg = write(tmp_path / "c.toml", """\
        [[plugins]]
        name = "cumulative"
        memory = 500
        """)
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o")
    assert "'memory'" in err and "cumulative" in err


@pytest.mark.slow
def test_bad_method_argument_is_named(tmp_path, capsys):
    cfg = write(tmp_path / "c.toml", """\
        [method]
        name = "naive"
        memory = 500
        """)
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o")
    assert "'memory'" in err and "naive" in err


@pytest.mark.parametrize("body, key", [
    ('[train]\nepochs = "two"\n', "train.epochs"),
    ("[train]\nlr = true\n", "train.lr"),
    ('[model]\nhidden = [256, "wide"]\n', "model.hidden"),
    ('seed = "zero"\n', "seed"),
    ("train = 3\n", "train"),
    ('[benchmark]\nscenario = "online"\n', "benchmark.scenario"),
])
def test_wrong_type_or_value_is_named(tmp_path, capsys, body, key):
    cfg = write(tmp_path / "c.toml", body)
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o")
    assert key in err


def test_wrong_type_through_set(tmp_path, capsys):
    cfg = write(tmp_path / "c.toml", "")
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o", "--set", 'train.batch_size="big"')
    assert "train.batch_size" in err


@pytest.mark.parametrize("item", ["train.epochs", "=1", "train.epochs.x=1"])
def test_bad_set_syntax_is_named(tmp_path, capsys, item):
    cfg = write(tmp_path / "c.toml", "[train]\nepochs = 2\n")
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o", "--set", item)
    assert item in err or item.split("=")[0] in err
    assert "--set" in err


def test_unknown_key_through_set(tmp_path, capsys):
    cfg = write(tmp_path / "c.toml", "")
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o", "--set", "train.epoch=1")
    assert "train.epoch" in err


def test_missing_config_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "sfm5.toml"
    err = refused(capsys, "run", missing, "--out", tmp_path / "o")
    assert str(missing) in err


def test_config_path_that_is_a_folder(tmp_path, capsys):
    err = refused(capsys, "run", tmp_path, "--out", tmp_path / "o")
    assert str(tmp_path) in err


def test_config_file_that_is_not_text(tmp_path, capsys):
    cfg = tmp_path / "model.toml"
    cfg.write_bytes(b"\x80\x04\x95\xff\xfe binary, not TOML")
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o")
    assert str(cfg) in err


def test_invalid_toml_is_named(tmp_path, capsys):
    cfg = write(tmp_path / "broken.toml", "[train\nepochs = 2\n")
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o")
    assert "broken.toml" in err and "TOML" in err


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([])
    assert exit_.value.code == 2
    assert "usage: streamcl" in capsys.readouterr().err


# ----------------------------------------------------------------------------- listings
def test_methods_lists_the_recipes(capsys):
    rc, stdout, _ = run_cli(capsys, "methods")
    assert rc == 0
    names = {line.split()[0] for line in stdout.splitlines()[2:] if line.strip()}
    assert {"naive", "cumulative", "joint"} <= names


def test_plugins_lists_builtins(capsys):
    registry.available_plugins.cache_clear()
    rc, stdout, _ = run_cli(capsys, "plugins")
    assert rc == 0
    rows = {line.split()[0]: line for line in stdout.splitlines()[2:] if line.strip()}
    assert "cumulative" in rows
    assert "built-in" in rows["cumulative"] and "streamcl.plugins.cumulative:Cumulative" in rows["cumulative"]


def test_version_and_a_closed_pipe():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "streamcl", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("streamcl ")
    # the reader is gone before the listing is written (as `streamcl plugins | head -1` ends): no traceback, status 0
    proc = subprocess.Popen([sys.executable, "-m", "streamcl", "plugins"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the child has imported torch and written a line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    from streamcl import cli
    cfg = tmp_path / "naive.toml"
    cfg.write_text('seed = 0\n[benchmark]\ntrain_range = [0, 600]\n[train]\nepochs = 1\n[log]\ntensorboard = true\n')
    out = tmp_path / "run"
    assert cli.main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    events = sorted((out / "tensorboard").rglob("events.*"))
    assert cli.main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "already holds a run (results.json, scalars.csv, tensorboard, checkpoints); give --resume" in capsys.readouterr().err
    assert sorted((out / "tensorboard").rglob("events.*")) == events  # nothing appended
    assert cli.main(["run", str(cfg), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert len(list((out / "tensorboard").rglob("events.*"))) == len(events)  # one run's event files, afresh
    assert cli.main(["run", str(cfg), "--out", str(out), "--quiet", "--resume"]) == 0


def test_ctrl_c_stops_at_a_step_with_a_checkpoint_and_prints_the_resume_command(tmp_path):
    """SIGINT under `streamcl run`: the run ends at the next step boundary with a checkpoint of that point, says
    so, prints the exact command that goes on, and that command ends with the uninterrupted run's numbers."""
    import json
    import shlex
    import signal
    import subprocess
    import sys
    import time

    from streamcl import cli
    cfg = tmp_path / "naive.toml"
    cfg.write_text('seed = 0\n[benchmark]\ntrain_range = [0, 6000]\n[train]\nepochs = 4\n[log]\ntensorboard = false\n')
    whole = tmp_path / "whole"
    assert cli.main(["run", str(cfg), "--out", str(whole), "--quiet"]) == 0
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "streamcl", "run", str(cfg), "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)  # the checkpoint after experience 0: the run is inside experience 1 or later
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped after experience" in err and "Traceback" not in err, err
    command = err.split("resume with: ")[1].strip()
    assert command == shlex.join(["streamcl", "run", str(cfg), "--out", str(out), "--quiet", "--resume"])
    assert cli.main(shlex.split(command)[1:]) == 0
    done = json.loads((out / "results.json").read_text())
    assert done["accuracy_matrix"] == json.loads((whole / "results.json").read_text())["accuracy_matrix"]


def test_demo_prints_each_methods_numbers_and_a_table_and_runs_again(tmp_path, capsys):
    from streamcl import cli
    argv = ["demo", "--out", str(tmp_path / "demo"), "--methods", "naive", "joint",
            "--set", "benchmark.train_range=[0, 1200]", "--set", "train.epochs=1", "--set", "log.tensorboard=false"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "  naive: final accuracy 0." in out and "  joint: final accuracy 0." in out
    assert out.count("avg inc acc") == 1  # one table
    report = tmp_path / "demo" / "report.md"  # and a report of its runs, its paths on the last lines
    assert out.splitlines()[-2:] == [f"report: {report}", f"accuracy curves: {tmp_path / 'demo' / 'accuracy_curves.png'}"]
    assert "| naive | naive |" in report.read_text() and "| joint | joint |" in report.read_text()
    assert cli.main(argv) == 0  # a second demo replaces the first's runs
    assert (tmp_path / "demo" / "joint" / "results.json").is_file()


def test_a_named_recipe_takes_one_more_plugin():
    import torch

    from streamcl import PluginError, Strategy, config, runner
    from streamcl.models import MLP

    plugins, offline = runner.build_plugins(config.parse({"method": {"name": "replay", "memory": 100},
                                                         "plugins": [{"name": "wa"}]}))
    assert [type(p).__name__ for p in plugins] == ["Replay", "WA"] and not offline
    twice, _ = runner.build_plugins(config.parse({"method": {"name": "replay"}, "plugins": [{"name": "replay"}]}))
    model = MLP()
    with pytest.raises(PluginError, match="both own the role"):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=twice)


def test_one_labelled_summary_with_or_without_the_console(tmp_path, capsys):
    cfg = write(tmp_path / "c.toml", 'seed = 0\n[benchmark]\ntrain_range = [0, 600]\n[train]\nepochs = 1\n'
                                     '[log]\ntensorboard = false\n')
    for extra in ([], ["--quiet"]):
        rc, stdout, stderr = run_cli(capsys, "run", cfg, "--out", tmp_path / f"o{len(extra)}", *extra)
        both = stdout + stderr  # the console logger writes to stderr, the quiet summary to stdout
        assert rc == 0 and both.count("final accuracy ") == 1, both
        assert "| forgetting " in both and "| train " in both
