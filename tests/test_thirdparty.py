"""A third-party plugin, as a user would ship it: its own distribution with a ``streamcl.plugins`` entry point.

The module-scoped fixture writes a throw-away package to a temporary folder, installs it into the
running interpreter with pip, and uninstalls it afterwards. Names carry a random suffix so that two
test sessions running at once (or a leftover from a crashed one) never claim the same plugin name.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass

import pytest
import torch

import streamcl
from streamcl import cli, registry
from streamcl.errors import ConfigError, PluginError
from tests.conftest import installed_package

PLUGIN_SOURCE = '''\
"""A third-party streamcl plugin: counts training iterations and adds a small L2 loss term."""
import json
from pathlib import Path

import streamcl
from streamcl import hookimpl


class Counter(streamcl.Plugin):
    """Counts iterations per experience into ``path`` (JSON) and adds ``weight * ||theta||^2`` as a loss term."""

    def __init__(self, path: str, weight: float = 1e-4):
        self.path, self.weight, self.counts = Path(path), weight, []

    @hookimpl
    def before_training_exp(self, strategy):
        self.counts.append(0)

    @hookimpl
    def after_training_iteration(self, strategy):
        self.counts[-1] += 1

    @hookimpl
    def loss_terms(self, strategy):
        return {"counter_l2": self.weight * sum(p.pow(2).sum() for p in strategy.model.parameters())}

    @hookimpl
    def after_training_exp(self, strategy):
        self.path.write_text(json.dumps({"iterations": self.counts, "last": strategy.experience.index}))


class Misspelled(streamcl.Plugin):
    """Implements a hook that does not exist (a typo of after_training_exp)."""

    @hookimpl
    def after_trainig_exp(self, strategy):
        pass
'''


@dataclass
class Ext:
    dist: str          # distribution name, as in its pyproject.toml
    version: str
    module: str
    counter: str       # entry-point name of Counter
    misspelled: str    # entry-point name of Misspelled


def _pip(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def ext(tmp_path_factory) -> Ext:
    suffix = uuid.uuid4().hex[:8]
    e = Ext(dist=f"streamcl-thirdparty-test-{suffix}", version="0.3.1", module=f"my_cl_ext_{suffix}",
            counter=f"my_counter_{suffix}", misspelled=f"my_misspelled_{suffix}")
    entries = {e.counter: f"{e.module}:Counter", e.misspelled: f"{e.module}:Misspelled"}
    with installed_package(tmp_path_factory.mktemp("ext_src"), e.dist, e.module, PLUGIN_SOURCE, "streamcl.plugins",
                           entries, e.version):
        yield e


def test_installed_plugin_is_discovered(ext):
    plugins = registry.available_plugins()
    assert ext.counter in plugins and ext.misspelled in plugins
    info = plugins[ext.counter]
    assert (info.distribution, info.version, info.target) == (ext.dist, ext.version, f"{ext.module}:Counter")
    assert not info.builtin
    assert plugins["cumulative"].builtin


def test_cli_plugins_lists_it_with_its_distribution(ext, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "streamcl", "plugins"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert ext.counter in rows, proc.stdout
    assert f"{ext.dist} {ext.version}" in rows[ext.counter]
    assert f"{ext.module}:Counter" in rows[ext.counter]
    assert "built-in" in rows["cumulative"]
    assert "built-in" not in rows[ext.counter]


def test_bad_argument_to_third_party_plugin_names_it_and_the_allowed_ones(ext):
    with pytest.raises(ConfigError) as err:
        registry.build_plugin(ext.counter, pth="x.json")
    msg = str(err.value)
    assert "'pth'" in msg and "path" in msg and "weight" in msg


@pytest.mark.slow
def test_cli_run_with_third_party_plugin_on_sfm5(ext, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    counts = tmp_path / "counts.json"
    cfg = tmp_path / "third.toml"
    cfg.write_text(textwrap.dedent(f"""\
        seed = 0

        [[plugins]]
        name = "{ext.counter}"
        path = {json.dumps(str(counts))}
        weight = 0.0001
        """))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "streamcl", "run", str(cfg), "--out", str(out),
                           "--set", "train.epochs=1", "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "final accuracy" in proc.stdout

    # The plugin's own output: every iteration of every experience was seen (12000 samples / 128 = 94).
    written = json.loads(counts.read_text())
    assert written == {"iterations": [94] * 5, "last": 4}

    res = json.loads((out / "results.json").read_text())
    # plugin_name() is the class name in snake case; the registered name would be acceptable too.
    assert res["plugins"] in (["counter"], [ext.counter])
    assert res["config"]["plugins"] == [{"name": ext.counter, "path": str(counts), "weight": 0.0001}]
    assert len(res["accuracy_matrix"]) == 5
    assert 0.15 <= res["final_accuracy"] <= 0.3

    # Its loss term is logged under its own name, every iteration, and is part of the total.
    acc = ea.EventAccumulator(str(out / "tensorboard"), size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    term, task, total = (acc.Scalars(f"loss/{t}") for t in ("counter_l2", "task", "total"))
    assert len(term) == len(task) == len(total) == 470
    assert all(s.value > 0 for s in term)
    for a, b, c in zip(term, task, total):
        assert c.value == pytest.approx(a.value + b.value, rel=1e-5)


def test_misspelled_hook_is_refused_naming_the_hook(ext):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PluginError) as err:
        streamcl.Strategy(model, opt, plugins=[ext.misspelled])
    assert "after_trainig_exp" in str(err.value)
    # ... and the same for an instance built from the loaded class.
    cls = registry.available_plugins()[ext.misspelled].load()
    with pytest.raises(PluginError, match="after_trainig_exp"):
        streamcl.Strategy(model, opt, plugins=[cls()])


@pytest.mark.slow
def test_cli_run_refuses_misspelled_hook_with_exit_code_2(ext, tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[[plugins]]\nname = "{ext.misspelled}"\n')
    rc = cli.main(["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "after_trainig_exp" in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_uninstall_path_is_the_dist_name(ext):
    """The finalizer uninstalls by distribution name: pip must know the package under that name."""
    proc = _pip("show", ext.dist)
    assert f"Name: {ext.dist}" in proc.stdout
    assert registry.available_plugins()[ext.counter].load().__module__ == ext.module
