"""A checkpoint never runs code when read, and a corrupted, truncated, foreign or malformed one is refused.

Every refusal is a :class:`CheckpointError` (a ``StreamclError``: the CLI prints ``streamcl: error: ...``
and exits with 2), never a bare ``KeyError``/``IsADirectoryError``, and never a silent resume.
"""
from __future__ import annotations

import builtins
import io
import os
import random
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from streamcl import Strategy, checkpoint, cli, runner
from streamcl.checkpoint import CheckpointError
from streamcl.models import MLP
from streamcl.plugins import Cumulative
from tests.reliability import tiny_benchmark


# ------------------------------------------------------------------------------------------ helpers
def make(tmp_path, model: nn.Module | None = None, plugins=()) -> Strategy:
    """The strategy of test_resume's grown-head test: a growing MLP on tests.reliability's tiny stream."""
    torch.manual_seed(1)
    model = model if model is not None else MLP(8, [16], growing=True)
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), batch_size=16, seed=0,
                    plugins=list(plugins), checkpoint_dir=tmp_path)


def saved(tmp_path, plugins=()) -> tuple[Strategy, object]:
    """A strategy trained on one experience, and a checkpoint of it that later training leaves alone."""
    s = make(tmp_path, plugins=plugins)
    s.train(tiny_benchmark().train_stream[0])  # also writes tmp_path/last.pt, rewritten after each experience
    return s, s.save_checkpoint(tmp_path / "one.pt")


def write(path, obj, sign: bool = True):
    """``obj`` as ``torch.save`` writes it, with streamcl's checksum unless ``sign`` is false."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(checkpoint.signed(buf.getvalue()) if sign else buf.getvalue())
    return path


def weights(s: Strategy) -> dict:
    return {k: v.clone() for k, v in s.model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class RunsShell:
    """Unpickled by plain pickle, this runs ``touch MARKER`` through ``os.system``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class RunsExec:
    """Unpickled by plain pickle, this creates MARKER through ``builtins.exec``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


class RunsEval(RunsExec):
    def __reduce__(self):
        return builtins.eval, (f"open({self.marker!r}, 'w').close()",)


class Opaque:
    """An arbitrary class: not a module, not one of the few data classes a checkpoint holds."""


def a_function():
    return 1


# -------------------------------------------------------------------- a checkpoint never runs code
@pytest.mark.parametrize("evil", [RunsShell, RunsExec, RunsEval], ids=["os.system", "builtins.exec", "builtins.eval"])
@pytest.mark.parametrize("where", ["module", "meta", "plugin_state", "whole file"])
def test_a_crafted_checkpoint_runs_no_code_and_is_refused(tmp_path, evil, where):
    s, path = saved(tmp_path, plugins=[Cumulative()])
    marker = tmp_path / "pwned"
    state = torch.load(path, weights_only=False)  # our own file: trusted
    payload = evil(marker)
    if where == "module":
        state["module"] = payload
    elif where == "meta":
        state["meta"] = {"config": {"seed": payload}}
    elif where == "plugin_state":
        state["plugin_states"][0]["memory"] = payload
    else:
        state = payload
    write(path, state)  # with a valid checksum: the checksum is integrity, not trust

    # the file is a working exploit: plain torch.load(weights_only=False) would run it
    control = tmp_path / "control"
    write(tmp_path / "control.pt", evil(control))
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()

    before = weights(s)
    with pytest.raises(CheckpointError, match="refused as unsafe.*could run code"):
        s.load_checkpoint(path)
    assert not marker.exists()
    assert same(weights(s), before)


@pytest.mark.parametrize("thing", ["function", "class", "instance", "builtin"])
def test_functions_and_arbitrary_classes_are_refused(tmp_path, thing):
    s, path = saved(tmp_path)
    state = torch.load(path, weights_only=False)
    state["meta"] = {"x": {"function": a_function, "class": Opaque, "instance": Opaque(), "builtin": print}[thing]}
    write(path, state)
    with pytest.raises(CheckpointError, match="refused as unsafe"):
        s.load_checkpoint(path)


def test_reading_allows_globals_for_that_read_only(tmp_path):
    s, path = saved(tmp_path)
    before = set(torch.serialization.get_safe_globals())
    make(tmp_path).load_checkpoint(path)
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(Exception, match="Unsupported global.*MLP"):  # what streamcl allowed is allowed no more
        torch.load(path, weights_only=True)


def test_the_allow_list_is_modules_and_a_few_data_classes(tmp_path):
    s = make(tmp_path)
    allowed = checkpoint.allowed_globals(s)
    names = {f"{c.__module__}.{c.__qualname__}" for c in allowed}
    assert {"torch.nn.modules.linear.Linear", "streamcl.models.nets.MLP", "streamcl.scenarios.data.TensorData",
            "streamcl.batch.Batch", "streamcl.memory.budget.Budget"} <= names
    assert all(isinstance(c, type) for c in allowed)  # classes only: no function, no builtin
    others = [c for c in allowed if not issubclass(c, nn.Module)]
    assert {c.__name__ for c in others} == {"TensorData", "Batch", "Budget"}
    assert not any(n.startswith(("torch.nn.parallel", "os.", "builtins.", "posix.")) for n in names)


def test_the_users_own_model_class_comes_back_from_the_module(tmp_path):
    """A class outside torch.nn and streamcl is allowed because the strategy's model is made of it."""

    s = make(tmp_path, model=UserNet())
    s.train(tiny_benchmark().train_stream[0])
    path = s.save_checkpoint()
    assert isinstance(torch.load(path, weights_only=False)["module"], UserNet)  # the module itself was saved
    expected = weights(s)
    fresh = make(tmp_path, model=UserNet())
    fresh.load_checkpoint(path)
    assert same(weights(fresh), expected)


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 6)

    def forward(self, x):
        return self.head(self.body(x))


class HoldsAFunction(UserNet):
    def __init__(self):
        super().__init__()
        self.activation = torch.relu  # a function: the module cannot be stored safely, its weights can


def test_a_model_that_cannot_be_stored_safely_is_saved_as_weights(tmp_path):
    class Local(UserNet):  # defined in a function: pickle cannot find it again
        pass

    for model, fresh in ((HoldsAFunction(), HoldsAFunction()), (Local(), Local())):
        s = make(tmp_path, model=model)
        s.train(tiny_benchmark().train_stream[0])
        path = s.save_checkpoint()
        assert torch.load(path, weights_only=False)["module"] is None
        r = make(tmp_path, model=fresh)
        r.load_checkpoint(path)
        assert same(weights(r), weights(s))


class KeepsAFunction(Cumulative):
    def state_dict(self) -> dict:
        return {**super().state_dict(), "scale": a_function}


def test_a_plugin_state_that_cannot_be_read_back_is_refused_when_written_and_the_last_checkpoint_kept(tmp_path):
    s = make(tmp_path, plugins=[KeepsAFunction()])
    path = tmp_path / "last.pt"
    path.write_bytes(b"the previous checkpoint")
    with pytest.raises(CheckpointError, match=r"KeepsAFunction.*test_checkpoint_safety\.a_function.*could run code"):
        s.train(tiny_benchmark().train_stream[0])  # writes a checkpoint after the experience
    assert path.read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_a_round_trip_restores_every_generator(tmp_path):
    s, path = saved(tmp_path)
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    np.random.rand(3), random.random(), torch.rand(3)
    make(tmp_path).load_checkpoint(path)
    now = np.random.get_state()
    assert now[0] == np_state[0] and np.array_equal(now[1], np_state[1]) and now[2:] == np_state[2:]
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)


# --------------------------------------------------------------------- a corrupted file is refused
@pytest.mark.parametrize("where", [0, 0.1, 0.5, 0.9, -80, -1], ids=["first byte", "10%", "50%", "90%", "the tag",
                                                                    "the digest"])
def test_a_flipped_byte_is_refused_not_resumed(tmp_path, where):
    s, path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    i = where if isinstance(where, int) else int(len(data) * where)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
    before = weights(s)
    with pytest.raises(CheckpointError, match="corrupted|does not end with a streamcl checksum"):
        s.load_checkpoint(path)
    assert same(weights(s), before)


def test_a_flipped_weight_would_otherwise_load_silently(tmp_path):
    """Why the checksum: torch itself reads a file with a flipped weight without a word."""
    s, path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    largest = max(s.model.state_dict().values(), key=torch.Tensor.numel)
    at = bytes(data).find(largest.numpy().tobytes())  # torch.save stores tensors uncompressed
    assert at > 0
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=False)["model"][_key(s, largest)], largest)  # no complaint
    with pytest.raises(CheckpointError, match="corrupted: its SHA-256 checksum does not match"):
        s.load_checkpoint(path)


def _key(s: Strategy, tensor) -> str:
    return next(k for k, v in s.model.state_dict().items() if v is tensor or torch.equal(v, tensor))


@pytest.mark.parametrize("keep", [0.5, 0.99, 1], ids=["half", "all but the end", "all but one byte"])
def test_a_truncated_file_is_refused(tmp_path, keep):
    s, path = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)] if keep != 1 else data[:-1])
    with pytest.raises(CheckpointError, match="not a readable streamcl checkpoint|corrupted"):
        s.load_checkpoint(path)


# --------------------------------------------------------------------- every malformed file is refused
def test_a_directory_at_the_path_is_refused_reading_and_writing(tmp_path):
    s = make(tmp_path)
    (tmp_path / "last.pt").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        s.load_checkpoint()
    with pytest.raises(CheckpointError, match="is a directory"):
        s.save_checkpoint()


def test_a_missing_or_empty_file_is_refused(tmp_path):
    s = make(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        s.load_checkpoint()
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="the file is empty"):
        s.load_checkpoint()


def _other_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    return buf.getvalue()


@pytest.mark.parametrize("content", ["text", "random bytes", "unsigned torch.save", "signed other zip"])
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, content):
    s, path = saved(tmp_path)
    if content == "text":
        path.write_text("seed = 0\n[method]\nname = 'naive'\n")
    elif content == "random bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif content == "unsigned torch.save":  # what a streamcl before checkpoint format 2 wrote
        write(path, torch.load(path, weights_only=False), sign=False)
    else:
        path.write_bytes(checkpoint.signed(_other_zip()))
    with pytest.raises(CheckpointError, match="not a readable streamcl checkpoint"):
        s.load_checkpoint(path)


@pytest.mark.parametrize("key", list(checkpoint._SHAPE))
def test_a_missing_key_is_refused(tmp_path, key):
    s, path = saved(tmp_path)
    state = torch.load(path, weights_only=False)
    del state[key]
    write(path, state)
    with pytest.raises(CheckpointError, match=f"has no '{key}'|format"):
        s.load_checkpoint(path)


BAD_VALUES = {
    "the whole file a list": lambda st: [1, 2, 3],
    "the whole file a tensor": lambda st: torch.zeros(3),
    "another format": lambda st: {**st, "format": 1},
    "plugin_states a dict": lambda st: {**st, "plugin_states": {"0": {}}},
    "plugin_states too long": lambda st: {**st, "plugin_states": [{}]},
    "counters a string": lambda st: {**st, "counters": "global_step"},
    "counters naming an attribute": lambda st: {**st, "counters": {**st["counters"], "model": 0}},
    "model a list": lambda st: {**st, "model": [1.0]},
    "model holding a string": lambda st: {**st, "model": {"head.weight": "zeros"}},
    "module a tensor": lambda st: {**st, "module": torch.zeros(1)},
    "frozen numbers": lambda st: {**st, "frozen": [1]},
    "optimizer_params short": lambda st: {**st, "optimizer_params": []},
    "optimizer empty": lambda st: {**st, "optimizer": {}},
    "rng empty": lambda st: {**st, "rng": {}},
    "trained not experiences": lambda st: {**st, "trained": [{"index": 0}]},
    "position without order": lambda st: {**st, "position": {"experience": 0}},
    "meta a list": lambda st: {**st, "meta": []},
}


@pytest.mark.parametrize("change", list(BAD_VALUES))
def test_a_value_of_the_wrong_kind_is_refused(tmp_path, change):
    s, path = saved(tmp_path)
    write(path, BAD_VALUES[change](torch.load(path, weights_only=False)))
    before = weights(s)
    with pytest.raises(CheckpointError, match="not a valid streamcl checkpoint|format"):
        s.load_checkpoint(path)
    assert same(weights(s), before)


def test_a_plugin_state_that_does_not_fit_the_plugin_is_refused(tmp_path):
    s, path = saved(tmp_path, plugins=[Cumulative()])
    state = torch.load(path, weights_only=False)
    state["plugin_states"][0] = {"stored": 3}  # Cumulative's load_state_dict reads "memory"
    write(path, state)
    with pytest.raises(CheckpointError, match="does not fit this strategy.*KeyError.*memory"):
        make(tmp_path, plugins=[Cumulative()]).load_checkpoint(path)


def test_a_valid_checkpoint_still_loads_and_continues_exactly(tmp_path):
    bench = tiny_benchmark()
    a, path = saved(tmp_path)
    at_save = weights(a)
    a.train(bench.train_stream[1])
    b = make(tmp_path)
    b.load_checkpoint(path)  # restores the global generators too, so b draws what a drew
    assert same(weights(b), at_save)
    b.train(bench.train_stream[1])
    assert same(weights(b), weights(a))


# ------------------------------------------------------------------------------------ through the CLI
TINY = textwrap.dedent("""\
    seed = 0
    [model]
    hidden = [16]
    [train]
    epochs = 2
    batch_size = 16
    eval_batch_size = 32
    lr = 0.1
    checkpoint_every = 3
    [log]
    tensorboard = false
    console = false
    """)


@pytest.fixture
def cli_run(tmp_path, capsys, monkeypatch):
    """``streamcl run TINY --out OUT --quiet [args]`` on tests.reliability's tiny stream: (exit code, stderr)."""
    monkeypatch.setattr(runner, "build_benchmark", lambda cfg: tiny_benchmark())
    config = tmp_path / "tiny.toml"
    config.write_text(TINY + '[method]\nname = "replay"\n')

    def run(*args) -> tuple[int, str]:
        capsys.readouterr()
        rc = cli.main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet", *args])
        return rc, capsys.readouterr().err

    return run


def _assert_refused(rc: int, err: str, what: str) -> None:
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("streamcl: error: ") and what in last, err
    assert "Traceback" not in err


def test_cli_resume_refuses_a_corrupted_checkpoint(tmp_path, cli_run):
    assert cli_run()[0] == 0
    path = tmp_path / "out" / "checkpoints" / "last.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    _assert_refused(*cli_run("--resume"), "is corrupted")


def test_cli_resume_refuses_a_crafted_checkpoint_and_runs_nothing(tmp_path, cli_run):
    assert cli_run()[0] == 0
    path = tmp_path / "out" / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=False)
    state["module"] = RunsShell(tmp_path / "pwned")
    write(path, state)
    _assert_refused(*cli_run("--resume"), "refused as unsafe")
    assert not (tmp_path / "pwned").exists()


def test_cli_resume_refuses_a_checkpoint_without_plugin_states(tmp_path, cli_run):
    assert cli_run()[0] == 0
    path = tmp_path / "out" / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=False)
    del state["plugin_states"]
    write(path, state)
    _assert_refused(*cli_run("--resume"), "has no 'plugin_states'")


def test_cli_refuses_a_directory_at_the_checkpoint_path(tmp_path, cli_run):
    (tmp_path / "out" / "checkpoints" / "last.pt").mkdir(parents=True)
    _assert_refused(*cli_run("--resume"), "is a directory")
