"""Kill-and-resume gives the numbers of an uninterrupted run, bit for bit, for every built-in plugin and recipe."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from streamcl import Strategy
from streamcl.checkpoint import CheckpointError
from streamcl.errors import ConfigError
from streamcl.methods import RECIPES
from streamcl import runner
from tests.reliability import UNITS, Crash, crash_at_step, numbers, tiny_benchmark, tiny_config, tiny_run

# steps 1-6 train experience 0, 7-12 experience 1, 13-18 experience 2 (joint: 1-16 on the joined stream);
# checkpoints every 3 steps and after each experience, so these crash between, on and just after checkpoints
CRASH_STEPS = [2, 4, 7, 12, 16]


class Uninterrupted(dict):
    """Each unit's uninterrupted numbers, run the first time a test asks for them."""

    def __missing__(self, label):
        self[label] = numbers(tiny_run(dict(UNITS)[label]))
        return self[label]


@pytest.fixture(scope="module")
def uninterrupted():
    return Uninterrupted()


@pytest.mark.parametrize("label,part", UNITS, ids=[u[0] for u in UNITS])
@pytest.mark.parametrize("step", CRASH_STEPS)
def test_crash_and_resume_matches_uninterrupted(tmp_path, monkeypatch, uninterrupted, label, part, step):
    with monkeypatch.context() as m:
        crash_at_step(m, step)
        with pytest.raises(Crash):
            tiny_run(part, tmp_path)
    assert (tmp_path / "checkpoints" / "last.pt").is_file() == (step > 3)  # the first checkpoint is at step 3
    resumed = tiny_run(part, tmp_path, resume=True)
    assert numbers(resumed) == uninterrupted[label]
    assert json.loads((tmp_path / "results.json").read_text())["accuracy_matrix"] == resumed["accuracy_matrix"]


@pytest.mark.parametrize("label,part", UNITS, ids=[u[0] for u in UNITS])
def test_crash_between_training_and_evaluation(tmp_path, monkeypatch, uninterrupted, label, part):
    calls = [0]
    original = Strategy.eval
    offline = label.startswith("method:") and RECIPES[label.split(":")[1]].offline

    def eval_or_crash(self, stream):
        calls[0] += 1
        if calls[0] == 2 or (offline and calls[0] == 1):  # an offline recipe evaluates once
            raise Crash("crash in evaluation")
        return original(self, stream)

    with monkeypatch.context() as m:
        m.setattr(Strategy, "eval", eval_or_crash)
        with pytest.raises(Crash):
            tiny_run(part, tmp_path, checkpoint_every=0)
    assert numbers(tiny_run(part, tmp_path, resume=True, checkpoint_every=0)) == uninterrupted[label]


def test_resume_refuses_another_config(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        crash_at_step(m, 5)
        with pytest.raises(Crash):
            tiny_run({}, tmp_path)
    cfg = tiny_config({})
    cfg["model"]["growing"] = True
    with pytest.raises(ConfigError, match="model.growing"):
        runner.run(cfg, tmp_path, resume=True, benchmark=tiny_benchmark())


def test_a_checkpoint_of_other_plugins_or_a_broken_file_is_refused(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        crash_at_step(m, 5)
        with pytest.raises(Crash):
            tiny_run({"plugins": [{"name": "cumulative"}]}, tmp_path)
    with pytest.raises(CheckpointError, match="plugins"):
        tiny_run({}, tmp_path, resume=True)
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"half a file")
    with pytest.raises(CheckpointError, match="not a readable streamcl checkpoint"):
        tiny_run({"plugins": [{"name": "cumulative"}]}, tmp_path, resume=True)


def test_a_grown_head_comes_back_from_a_checkpoint(tmp_path):
    from streamcl.models import MLP
    from tests.reliability import tiny_benchmark

    bench = tiny_benchmark()

    def strategy():
        torch.manual_seed(1)
        model = MLP(8, [16], growing=True)
        return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), batch_size=16,
                        seed=0, checkpoint_dir=tmp_path)

    a = strategy()
    a.train(bench.train_stream[:2])
    saved = a.save_checkpoint(tmp_path / "after-two.pt")
    weights = {k: v.clone() for k, v in a.model.state_dict().items()}
    a.train(bench.train_stream[2])
    b = strategy()  # the global RNG is restored by the load, so b draws what a drew
    b.load_checkpoint(saved)
    assert b.model.head.out_features == 4
    assert all(torch.equal(weights[k], v) for k, v in b.model.state_dict().items())
    b.train(bench.train_stream[2])
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))


@pytest.mark.slow
def test_sigkill_of_a_real_run_and_resume(tmp_path):
    """A real `streamcl run` on SFM-5 (Replay-500, 1 epoch), SIGKILLed mid-stream, resumed: same results.json numbers."""
    cfg = tmp_path / "replay.toml"
    cfg.write_text('seed = 0\n[method]\nname = "replay"\n[train]\nepochs = 1\ncheckpoint_every = 25\n'
                   '[log]\ntensorboard = false\n')
    cmd = [sys.executable, "-m", "streamcl", "run", str(cfg), "--quiet"]
    subprocess.run(cmd + ["--out", str(tmp_path / "full")], check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and torch.load(ckpt, weights_only=False)["counters"]["global_step"] >= 200:
            break  # inside experience 2 or later, with a few checkpoints behind it
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(ckpt, weights_only=False)["counters"]["global_step"]
    assert killed_at < 470  # 5 experiences of 94 steps: it did not finish
    subprocess.run(cmd + ["--out", str(out), "--resume"], check=True, capture_output=True)
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    resumed = json.loads((out / "results.json").read_text())
    assert numbers(resumed) == numbers(full)
    assert 0.60 < full["final_accuracy"] < 0.95


def test_frozen_parameters_stay_frozen_after_a_resume(tmp_path):
    from streamcl.models import MLP

    torch.manual_seed(0)
    model = MLP(8, [16], 4)
    model.backbone[1].weight.requires_grad_(False)
    a = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=16, checkpoint_dir=tmp_path)
    a.save_checkpoint()
    fresh = MLP(8, [16], 4)
    b = Strategy(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), batch_size=16, checkpoint_dir=tmp_path)
    b.load_checkpoint()
    assert not b.model.backbone[1].weight.requires_grad and b.model.backbone[1].bias.requires_grad
