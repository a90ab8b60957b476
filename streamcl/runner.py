"""A whole run from a validated config: benchmark, model, optimizer, plugins, loop, results."""
from __future__ import annotations

import fcntl
import logging
import os
import random
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from streamcl import augment, config, schedule
from streamcl import distributed as dist
from streamcl.datasets import fashion_mnist
from streamcl.errors import ConfigError, DataError
from streamcl.loggers import ConsoleLogger, CSVLogger, JSONLogger, TensorBoardLogger
from streamcl.loggers.base import results
from streamcl.methods import build_method
from streamcl.models import build
from streamcl.models.backbones import load_backbone
from streamcl.registry import available_benchmarks, build_plugin
from streamcl.models.inputs import Standardize
from streamcl.scenarios import Benchmark, TensorData, class_incremental, domain_incremental, hold_out, online
from streamcl.strategy import Strategy


def _resume(strategy: Strategy, out: Path | None, cfg: dict) -> None:
    """Load ``out``'s last checkpoint; with none there (killed before the first), start from the beginning."""
    if out is None:
        raise ConfigError("resuming needs the output folder of the run to resume (--out)")
    if not strategy.checkpoint_path.exists():  # a directory there is refused by the load, not skipped
        if dist.is_main():
            logging.getLogger("streamcl").warning("no checkpoint at %s; starting from the beginning",
                                                  strategy.checkpoint_path)
        return
    def same_config(meta: dict) -> None:
        changed = sorted(_diff(meta.get("config"), cfg))
        if changed:
            raise ConfigError(f"{out} was written by a different config ({', '.join(changed)} differ); "
                              "resume with the same config, or use a new --out")
    strategy.load_checkpoint(check_meta=same_config)


def _diff(a, b, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k for key in a.keys() | b.keys() for k in _diff(a.get(key), b.get(key), f"{prefix}{key}.")}
    return set() if a == b else {prefix.rstrip(".")}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def lock_out(out: str | Path) -> Iterator[Path]:
    """Hold the run folder ``out`` for one run: create it, check that files can be written there, and lock
    ``out/.lock`` (which then holds this process's id) with ``fcntl.flock``, released when the block ends or
    the process dies. A file, a folder that cannot be written and a folder another run holds raise
    :class:`ConfigError`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; give a folder for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # a real write: permission bits say nothing when run as root
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(f"cannot write the run to {out} ({err.strerror}); give --out a folder you can write to") \
            from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"another streamcl run is writing to {out} (pid {pid}); wait until it ends, "
                              "or give another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield out
    finally:
        os.close(fd)


RUN_OUTPUTS = ("results.json", "scalars.csv", "tensorboard", "wandb", "checkpoints")


def prepare_out(out: str | Path, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse a run folder that holds an earlier run's outputs (its event files would be appended to, its
    results.json and checkpoint replaced) unless ``resume`` goes on with that run or ``overwrite`` replaces it:
    then those outputs are removed first (by rank 0 only under torchrun)."""
    out = Path(out)
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise ConfigError(f"--out {out} already holds a run ({', '.join(found)}); give --resume to go on with it, "
                          "--overwrite to replace it, or another --out")
    if os.environ.get("RANK", "0") == "0":  # before torchrun's process group exists: rank 0 by its variable
        for name in found:
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def physical_memory() -> int:
    """This machine's memory in bytes; 0 where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_permuted(train, test, n: int) -> None:
    """Refuse a permuted stream of ``n`` experiences that would hold an empty experience, or would not fit in
    memory: its experiences copy the data once, and its accuracy matrix has n * n cells, each held as a
    number, in results.json and in TensorBoard (about 100 bytes in all)."""
    most = min(len(train), len(test))
    if n > most:
        raise DataError(f"benchmark.n_experiences = {n} leaves experiences empty: permuted-fmnist cuts its "
                        f"{len(train)} training and {len(test)} test images into n_experiences parts; "
                        f"give at most {most}")
    need = sum(t.nbytes for d in (train, test) for t in (d.x, d.y)) + 100 * n * n
    have = physical_memory()
    if have and need > have:
        raise DataError(f"benchmark.n_experiences = {n}: the permuted stream needs about {need / 2**30:.3g} GiB, "
                        f"more than this machine's {have / 2**30:.3g} GiB of memory; give fewer experiences")


def build_benchmark(cfg: dict) -> Benchmark:
    """The stream ``[benchmark]`` names: SFM-5 / PFM-5 for "split-fmnist" / "permuted-fmnist", else the
    registered benchmark's function (``streamcl.benchmarks``) called with the keys given and ``benchmark.args``."""
    b = cfg["benchmark"]
    if b.get("online") is None:
        return _offline_benchmark(cfg)
    try:
        return online(_offline_benchmark(cfg), **b["online"], seed=cfg["seed"])
    except DataError as err:
        raise ConfigError(f"benchmark.online: {err}") from None


def _offline_benchmark(cfg: dict) -> Benchmark:
    b = cfg["benchmark"]
    if b["name"] not in config.SCENARIOS:
        builder = available_benchmarks()[b["name"]].load()
        return builder(**config.benchmark_arguments(b, builder))
    train, test = fashion_mnist(b.get("root"))
    if b.get("train_range"):
        first, end = b["train_range"]
        if end > len(train):
            raise ConfigError(f"benchmark.train_range = {b['train_range']}: {b['name']} has {len(train)} training images")
        train = TensorData(train.x[first:end], train.y[first:end])
    if b["name"] == "permuted-fmnist":
        check_permuted(train, test, b["n_experiences"])
        return domain_incremental(train, test, b["n_experiences"], task_labels=b["task_labels"])
    return class_incremental(train, test, b["n_experiences"], class_order=b.get("class_order"),
                             seed=b.get("class_seed"), classes_per_exp=b.get("classes_per_exp"),
                             first_exp_classes=b.get("first_exp_classes"), task_labels=b["scenario"] == "task")


def build_model(cfg: dict, n_classes: int, sample_shape: tuple[int, ...]) -> nn.Module:
    """The model ``[model]`` names, with the weights of ``model.checkpoint`` (all but the head's) if given."""
    m = cfg["model"]
    args = {**({"hidden": m["hidden"]} if m["name"] == "mlp" else {}), **(m.get("args") or {})}
    model = build(m["name"], n_classes, sample_shape, growing=m["growing"], pretrained=m["pretrained"], **args)
    if m.get("checkpoint"):
        load_backbone(model, m["checkpoint"])
    return model


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg["train"]
    if t["optimizer"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    return torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])


def loop_options(t: dict) -> dict:
    """The Strategy's loop options from ``[train]``: schedule, clipping, precision, memory format, compilation
    and the DataLoader's settings (absent keys keep the Strategy's defaults)."""
    gamma = t.get("gamma")
    options = {"schedule": schedule.build(t.get("schedule"), t.get("warmup") or 0, t.get("milestones"),
                                          0.1 if gamma is None else gamma)}
    for key in ("clip_grad_norm", "precision", "channels_last", "compile", "num_workers", "pin_memory",
                "persistent_workers"):
        if t.get(key) is not None:
            options[key] = t[key]
    return options


def build_plugins(cfg: dict) -> tuple[list, bool]:
    """The plugin list (the ``[method]`` recipe's plugins, then each of ``[[plugins]]``) and whether the run is
    offline (Joint)."""
    plugins, offline = [], False
    if "method" in cfg:
        args = {k: v for k, v in cfg["method"].items() if k != "name"}
        plugins, recipe = build_method(cfg["method"]["name"], **args)
        offline = recipe.offline
    extra = [build_plugin(p["name"], **{k: v for k, v in p.items() if k != "name"}) for p in cfg["plugins"]]
    return [*plugins, *extra], offline


def build_metric(name: str):
    """The metric plugin ``name`` of ``[log] metrics``; a plugin that is not a metric (``metric = True``) is refused,
    naming the metrics there are."""
    from streamcl.registry import available_plugins
    entries = available_plugins()
    if name not in entries or not getattr(entries[name].load(), "metric", False):
        metrics = sorted(n for n, e in entries.items() if e.builtin and getattr(e.load(), "metric", False))
        raise ConfigError(f"[log] metrics names {name!r}, which is not a metric plugin; metrics: {', '.join(metrics)} "
                          "(a method's plugins go in [[plugins]])")
    return build_plugin(name)


def build_loggers(cfg: dict, out: Path | None, console: bool) -> list:
    """The loggers ``[log]`` asks for (rank 0 only under torchrun): results.json, scalars.csv, TensorBoard and
    Weights & Biases under ``out``, and the console."""
    log, loggers = cfg["log"], []
    if not dist.is_main():
        return loggers
    if out is not None:
        loggers.append(JSONLogger(out / "results.json", cfg))
        if log["csv"]:
            loggers.append(CSVLogger(out / "scalars.csv"))
        if log["tensorboard"]:
            loggers.append(TensorBoardLogger(out / "tensorboard", cfg))
    if log["wandb"]:
        from streamcl.loggers.wandb import WandbLogger
        loggers.append(WandbLogger(project=log.get("wandb_project") or "streamcl",
                                   mode=log.get("wandb_mode") or "offline", config=cfg,
                                   dir=out, name=None if out is None else out.name))
    if console:
        loggers.append(ConsoleLogger())
    return loggers


def evaluate(strategy: Strategy, stream) -> dict:
    """``strategy.eval(stream)``; with plugins that correct the model's bias (``set_correction``: WA, BiC,
    DER's classifier stage), first once with the corrections off, kept as the numbers before correction."""
    if strategy.corrects:
        with strategy.uncorrected():
            strategy.eval(stream)
        strategy.metrics.note_uncorrected()
    return strategy.eval(stream)


def run(cfg: dict, out: str | Path | None = None, *, console: bool | None = None, resume: bool = False,
        benchmark: Benchmark | None = None, model: nn.Module | None = None) -> dict:
    """Train and evaluate as ``cfg`` says; write results.json, TensorBoard and checkpoints under ``out``.

    A checkpoint is written to ``out/checkpoints/last.pt`` after every experience (and every
    ``train.checkpoint_every`` iterations if set). With ``resume`` the run goes on from it and ends
    with the numbers an uninterrupted run gives. ``benchmark`` replaces the one the config names
    (tests use tiny synthetic streams), ``model`` the one it builds (a user's module). Returns the results.
    One run at a time writes to ``out``: it is held by :func:`lock_out` until the run ends.
    """
    device = dist.init(cfg["train"]["device"])  # joins torchrun's process group, if any
    out = None if out is None else Path(out)
    with lock_out(out) if out is not None and dist.is_main() else nullcontext():
        return _run(cfg, out, device, console, resume, benchmark, model)


def _run(cfg: dict, out: Path | None, device: torch.device, console: bool | None, resume: bool,
         benchmark: Benchmark | None, model: nn.Module | None) -> dict:
    seed_everything(cfg["seed"])
    bench = benchmark if benchmark is not None else build_benchmark(cfg)
    sample = bench.train_stream[0].dataset[0][0]
    sample_shape = tuple(sample.shape)
    model = build_model(cfg, bench.n_classes, sample_shape) if model is None else model
    if not sample.is_floating_point() and "mean" in bench.info:  # images stored as bytes
        model = Standardize(model, bench.info["mean"], bench.info["std"])
    plugins, offline = build_plugins(cfg)
    if cfg["benchmark"]["scenario"] == "task" and not any("task_head" in getattr(p, "owns", ()) for p in plugins):
        plugins.insert(0, build_plugin("task_mask"))  # SFM-5-TIL: predict among the given task's classes
    plugins += [build_metric(name) for name in cfg["log"].get("metrics") or ()]
    loggers = build_loggers(cfg, out, cfg["log"]["console"] if console is None else console)
    t = cfg["train"]
    train_stream = [bench.train_stream.joined()] if offline else list(bench.train_stream)
    validation: list = []  # the held-out parts of the experiences trained so far, evaluated after every epoch
    if t.get("validation"):
        parts = [hold_out(e, t["validation"], cfg["seed"] + i) for i, e in enumerate(train_stream)]
        train_stream, held = [p[0] for p in parts], [p[1] for p in parts]
    strategy = Strategy(model.to(device), build_optimizer(cfg, model), plugins=plugins, epochs=t["epochs"],
                        batch_size=t["batch_size"], eval_batch_size=t["eval_batch_size"], device=device,
                        loggers=loggers, seed=cfg["seed"], checkpoint_dir=None if out is None else out / "checkpoints",
                        checkpoint_every=t["checkpoint_every"] or None, augment=augment.build(t.get("augment"), sample_shape, t.get("crop_padding")),
                        eval_every=1 if t.get("validation") else None, eval_stream=validation, **loop_options(t))
    strategy.checkpoint_meta = {"config": cfg}
    if resume:
        _resume(strategy, out, cfg)
    done = len(strategy.trained)
    if done and not strategy.metrics.recorded(done):  # stopped between training and evaluation
        evaluate(strategy, bench.test_stream)
    for k, experience in enumerate(train_stream[done:], done):
        if t.get("validation"):
            validation[:] = held[:k + 1]
        strategy.train(experience)
        evaluate(strategy, bench.test_stream)
    strategy.close()
    return results(strategy, cfg)
