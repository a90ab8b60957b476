"""Single process and ``torchrun --nproc_per_node=2`` (gloo, CPU) agree, for every built-in plugin and recipe.

One torchrun launch runs all of them on a tiny stream (tests/dist_worker.py). Tolerance: each
entry of the accuracy matrix within 0.05 (one test sample in 20; the two runs do the same
arithmetic up to the order of floating-point sums, so in practice they agree exactly).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamcl import distributed as dist
from tests.reliability import UNITS, numbers, tiny_run

TOLERANCE = 0.05
ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torchrun("tests/dist_worker.py", str(out))
    return out


def read(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_the_launch_had_two_ranks(launched):
    assert read(launched, "world")["world_size"] == 2


@pytest.mark.parametrize("label,part", UNITS, ids=[u[0] for u in UNITS])
def test_single_process_and_two_processes_agree(launched, label, part):
    single = numbers(tiny_run(part, n_experiences=2))
    multi = read(launched, label.replace(":", "_"))
    a, b = torch.tensor(single["accuracy_matrix"]), torch.tensor(multi["accuracy_matrix"])
    assert a.shape == b.shape
    assert (a - b).abs().max() <= TOLERANCE, f"{label}: {single['accuracy_matrix']} vs {multi['accuracy_matrix']}"


def test_resume_under_torchrun(launched):
    """The worker's crash-and-resume of Cumulative against the worker's uninterrupted Cumulative run."""
    if not (launched / "plugin_cumulative.json").is_file():
        pytest.skip("STREAMCL_TEST_UNITS leaves out plugin:cumulative, the uninterrupted run to compare with")
    assert read(launched, "resume") == read(launched, "plugin_cumulative")


def test_helpers_under_two_ranks(launched):
    h = read(launched, "helpers")
    assert h["shares"] == [0, 1, 2, 3, 4, 5, 6]  # contiguous shares of 4 and 3, in rank order
    assert h["gathered"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert h["told"] == {"from": 0} and h["summed"] == 3.0 and h["few"] == [0, 0] and h["main"]


def test_helpers_in_one_process():
    x = torch.arange(5)
    assert not dist.active() and dist.world_size() == 1 and dist.is_main()
    assert torch.equal(dist.shard(x), x) and torch.equal(dist.all_gather(x), x)
    assert dist.broadcast({"a": 1}) == {"a": 1} and torch.equal(dist.all_reduce(x.clone()), x)
    model = torch.nn.Linear(2, 2)
    assert dist.wrap(model, torch.device("cpu")) is model


@pytest.mark.slow
def test_streamcl_run_under_torchrun_on_sfm5(tmp_path):
    """The CLI under torchrun on real SFM-5 (1 epoch): one results.json and one TensorBoard run, from rank 0."""
    cfg = tmp_path / "naive.toml"
    cfg.write_text("seed = 0\n[train]\nepochs = 1\n")
    torchrun("-m", "streamcl", "run", str(cfg), "--out", str(tmp_path / "two"), "--quiet")
    subprocess.run([sys.executable, "-m", "streamcl", "run", str(cfg), "--out", str(tmp_path / "one"), "--quiet"],
                   check=True, capture_output=True)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    a, b = torch.tensor(one["accuracy_matrix"]), torch.tensor(two["accuracy_matrix"])
    assert (a - b).abs().max() <= TOLERANCE and abs(one["final_accuracy"] - two["final_accuracy"]) <= 0.02
    assert 0.15 < two["final_accuracy"] < 0.25
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert written == [".lock", "checkpoints", "results.json", "scalars.csv", "tensorboard"]  # .lock: runner.lock_out
    assert len(list((tmp_path / "two" / "checkpoints").iterdir())) == 1
