"""Bad input through ``streamcl run`` (issue 12): exit status 2 and one line ``streamcl: error: ...`` on stderr,
never a traceback. Runs use a tiny fake Fashion-MNIST root, or a synthetic stream, so nothing trains for long."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from streamcl import Strategy, cli, config, runner
from streamcl.datasets import fmnist
from streamcl.scenarios import class_incremental
from tests.synthetic import blobs, tiny_benchmark

REPO = Path(__file__).resolve().parents[1]
DEAD_PID = 2**22 + 1  # above Linux's largest pid_max: no process has it


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def root(tmp_path) -> Path:
    """A Fashion-MNIST root of 20 training and 10 test images (labels 0-9)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for split, n in (("train", 20), ("t10k", 10)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", np.random.default_rng(0).integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


@pytest.fixture
def cfg(tmp_path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nepochs = 1\n[log]\ntensorboard = false\n")
    return path


def refused(capsys, *argv) -> str:
    """Run the CLI in this process; it must exit 2 with one ``streamcl: error:`` line and no traceback."""
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 2, f"exit code {rc}; stdout {out.out!r}; stderr {out.err!r}"
    assert out.err.startswith("streamcl: error: ") and "Traceback" not in out.err, out.err
    return out.err


def run_args(cfg, out, root, *sets) -> list:
    return ["run", cfg, "--out", out, "--quiet", "--set", f'benchmark.root="{root}"', *(a for s in sets
                                                                                         for a in ("--set", s))]


# --------------------------------------------------------------------------- 1. learning rate and the optimizer
@pytest.mark.parametrize("item, key", [("train.lr=1e300", "train.lr"), ("train.lr=1000.0", "train.lr"),
                                       ("train.lr=0", "train.lr"), ("train.momentum=1.0", "train.momentum"),
                                       ("train.momentum=1e300", "train.momentum"),
                                       ("train.weight_decay=1e300", "train.weight_decay")])
def test_absurd_optimizer_settings_are_refused(tmp_path, capsys, cfg, root, item, key):
    err = refused(capsys, *run_args(cfg, tmp_path / "o", root, item))
    assert key in err


def test_the_bounds_themselves_are_accepted():
    t = config.parse({}, ["train.lr=100.0", "train.momentum=0.99", "train.weight_decay=1.0"])["train"]
    assert (t["lr"], t["momentum"], t["weight_decay"]) == (100.0, 0.99, 1.0)


def test_a_loss_that_goes_non_finite_is_reported_not_raised(tmp_path, capsys, cfg, monkeypatch):
    train = blobs()
    train.x *= 1e30  # the logits overflow within the first steps
    bench = class_incremental(train, blobs(10, 4, seed=1), 2)
    monkeypatch.setattr(runner, "build_benchmark", lambda cfg: bench)
    err = refused(capsys, "run", cfg, "--out", tmp_path / "o", "--quiet")
    assert "non-finite loss" in err and "Lower the learning rate" in err


# --------------------------------------------------------------------------- 2. seeds
@pytest.mark.parametrize("seed", ["99999999999999999999999", str(2**64), str(2**63)])
def test_an_oversized_seed_is_refused(tmp_path, capsys, cfg, root, seed):
    err = refused(capsys, *run_args(cfg, tmp_path / "o", root, f"seed={seed}"))
    assert "'seed'" in err and "2**63-1" in err


def test_the_largest_seed_works():
    seed = config.parse({}, [f"seed={2**63 - 1}"])["seed"]
    runner.seed_everything(seed)
    torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- 3. layer widths
@pytest.mark.parametrize("hidden", ["[-5]", "[0]", "[256, 0]"])
def test_a_layer_without_units_is_refused(tmp_path, capsys, cfg, root, hidden):
    err = refused(capsys, *run_args(cfg, tmp_path / "o", root, f"model.hidden={hidden}"))
    assert "model.hidden" in err and "at least one unit" in err


# --------------------------------------------------------------------------- 4. devices
@pytest.mark.parametrize("device", ["meta", "mps", "xla"])
def test_a_device_that_cannot_train_is_refused(tmp_path, capsys, cfg, root, device):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    err = refused(capsys, *run_args(cfg, tmp_path / "o", root, f"train.device={device}"))
    assert f"train.device = '{device}'" in err and "'cpu'" in err


# --------------------------------------------------------------------------- 5. stream sizes
def test_a_permuted_stream_with_empty_experiences_is_refused(tmp_path, capsys, cfg, root):
    err = refused(capsys, *run_args(cfg, tmp_path / "o", root, "benchmark.name=permuted-fmnist",
                                    "benchmark.scenario=domain", "benchmark.n_experiences=70000"))
    assert "benchmark.n_experiences = 70000" in err and "at most 10" in err


def test_a_permuted_stream_larger_than_memory_is_refused(tmp_path, capsys, cfg, root, monkeypatch):
    monkeypatch.setattr(runner, "physical_memory", lambda: 1000)
    err = refused(capsys, *run_args(cfg, tmp_path / "o", root, "benchmark.name=permuted-fmnist",
                                    "benchmark.scenario=domain", "benchmark.n_experiences=5"))
    assert "needs about" in err and "GiB" in err and "fewer experiences" in err


def test_split_fmnist_keeps_its_bounds(tmp_path, capsys, cfg, root):
    err = refused(capsys, *run_args(cfg, tmp_path / "o", root, "benchmark.n_experiences=70000"))
    assert "70000" in err


# --------------------------------------------------------------------------- 6. the output folder
def test_out_that_is_a_file(tmp_path, capsys, cfg, root):
    (tmp_path / "afile").write_text("x")
    err = refused(capsys, *run_args(cfg, tmp_path / "afile", root))
    assert str(tmp_path / "afile") in err and "is a file" in err


def test_out_below_a_file(tmp_path, capsys, cfg, root):
    (tmp_path / "afile").write_text("x")
    err = refused(capsys, *run_args(cfg, tmp_path / "afile" / "run", root))
    assert str(tmp_path / "afile" / "run") in err and "cannot write" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder; test_out_below_a_file covers the "
                                              "same refusal in a way root cannot get around")
def test_out_that_is_read_only(tmp_path, capsys, cfg, root):
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    err = refused(capsys, *run_args(cfg, out, root))
    assert str(out) in err and "cannot write" in err


# --------------------------------------------------------------------------- 7. damaged dataset files
def copy_fmnist(tmp_path) -> Path:
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for stems in fmnist.FILES.values():
        for stem in stems:
            shutil.copy(fmnist.DEBIAN_ROOT / f"{stem}.gz", folder)
    return folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))


@pytest.mark.skipif(not (fmnist.DEBIAN_ROOT / "train-labels-idx1-ubyte.gz").exists(),
                    reason="needs Debian's dataset-fashion-mnist to copy")
@pytest.mark.parametrize("name, damage", [("train-labels-idx1-ubyte.gz", truncate),
                                          ("t10k-labels-idx1-ubyte.gz", garble),
                                          ("train-images-idx3-ubyte.gz", lambda p: p.write_bytes(b"\x1f\x8b junk"))])
def test_a_damaged_dataset_file_is_named(tmp_path, capsys, cfg, name, damage):
    folder = copy_fmnist(tmp_path)
    damage(folder / name)
    err = refused(capsys, *run_args(cfg, tmp_path / "o", folder))
    assert str((folder / name).resolve()) in err and "damaged" in err
    assert "apt-get install --reinstall -y dataset-fashion-mnist" in err and "delete it" in err


def test_an_idx_file_with_missing_bytes_is_named(tmp_path, capsys, cfg, root):
    labels = root / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(labels, "rb") as f:
        raw = f.read()
    with gzip.open(labels, "wb") as f:
        f.write(raw[:-3])  # a valid gzip stream of a short IDX file
    err = refused(capsys, *run_args(cfg, tmp_path / "o", root))
    assert str(labels.resolve()) in err and "bytes of data for shape (10,)" in err


# --------------------------------------------------------------------------- 8. one run per output folder
def test_a_second_run_into_a_held_folder_is_refused(tmp_path, cfg, root):
    out = tmp_path / "o"
    with runner.lock_out(out):
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"
        second = subprocess.run([sys.executable, "-m", "streamcl", *map(str, run_args(cfg, out, root))],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert second.stderr.startswith(f"streamcl: error: another streamcl run is writing to {out} (pid {os.getpid()})")
    assert "Traceback" not in second.stderr
    assert not (out / "results.json").exists()


def test_the_python_api_is_held_too_and_released_after_the_run(tmp_path):
    out, cfg = tmp_path / "o", config.parse({}, ["train.epochs=1", "log.tensorboard=false"])
    with runner.lock_out(out):
        with pytest.raises(runner.ConfigError, match="another streamcl run is writing to"):
            runner.run(cfg, out, console=False, benchmark=tiny_benchmark())
    runner.run(cfg, out, console=False, benchmark=tiny_benchmark())
    with runner.lock_out(out):  # released when the run ended
        pass


# --------------------------------------------------------------------------- 9. leftovers of a killed checkpoint write
def test_a_new_strategy_removes_leftover_temporary_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.pt").write_bytes(b"the last checkpoint")
    leftovers = [folder / f".last.pt.{DEAD_PID}.tmp", folder / f".last.pt.{os.getpid()}.tmp"]
    kept = [folder / f".last.pt.{os.getppid()}.tmp",  # a live process may be writing it
            folder / "notes.tmp", folder / ".last.pt.tmp", folder / "last.pt.123.tmp"]
    for path in leftovers + kept:
        path.write_bytes(b"partial")
    model = torch.nn.Linear(8, 4)
    Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=folder)
    assert not any(p.exists() for p in leftovers)
    assert all(p.read_bytes() == b"partial" for p in kept)
    assert (folder / "last.pt").read_bytes() == b"the last checkpoint"


def test_resume_removes_leftover_temporary_checkpoints(tmp_path, capsys, cfg, monkeypatch):
    monkeypatch.setattr(runner, "build_benchmark", lambda cfg: tiny_benchmark())
    out = tmp_path / "o"
    assert cli.main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    last = (out / "checkpoints" / "last.pt").read_bytes()
    leftover = out / "checkpoints" / f".last.pt.{DEAD_PID}.tmp"
    leftover.write_bytes(b"partial")
    assert cli.main(["run", str(cfg), "--out", str(out), "--quiet", "--resume"]) == 0  # nothing left to train
    assert not leftover.exists()
    assert (out / "checkpoints" / "last.pt").read_bytes() == last


@pytest.mark.parametrize("name", ["nope", "replay"])
def test_log_metrics_takes_metric_plugins_only(tmp_path, capsys, cfg, root, name):
    err = refused(capsys, *run_args(cfg, tmp_path / "o", root, f'log.metrics=["{name}"]'))
    assert f"metrics names '{name}', which is not a metric plugin" in err and "train_accuracy" in err
