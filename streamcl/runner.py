"""A whole run from a validated config: benchmark, model, optimizer, plugins, loop, results."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from streamcl.datasets import fashion_mnist
from streamcl.loggers import ConsoleLogger, JSONLogger, TensorBoardLogger
from streamcl.loggers.base import results
from streamcl.methods import build_method
from streamcl.models import MLP, SmallCNN
from streamcl.registry import build_plugin
from streamcl.scenarios import Benchmark, class_incremental, domain_incremental
from streamcl.strategy import Strategy


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_benchmark(cfg: dict) -> Benchmark:
    b = cfg["benchmark"]
    train, test = fashion_mnist(b.get("root"))
    if b["name"] == "permuted-fmnist":
        return domain_incremental(train, test, b["n_experiences"])
    return class_incremental(train, test, b["n_experiences"], class_order=b.get("class_order"),
                             seed=b.get("class_seed"), classes_per_exp=b.get("classes_per_exp"),
                             first_exp_classes=b.get("first_exp_classes"), task_labels=b["scenario"] == "task")


def build_model(cfg: dict, n_classes: int, n_features: int) -> nn.Module:
    m = cfg["model"]
    if m["name"] == "cnn":
        return SmallCNN(1, n_classes, growing=m["growing"])
    return MLP(n_features, m["hidden"], n_classes, growing=m["growing"])


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg["train"]
    if t["optimizer"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    return torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])


def build_plugins(cfg: dict) -> tuple[list, bool]:
    """The plugin list (from ``[method]`` or ``[[plugins]]``) and whether the run is offline (Joint)."""
    if "method" in cfg:
        args = {k: v for k, v in cfg["method"].items() if k != "name"}
        plugins, recipe = build_method(cfg["method"]["name"], **args)
        return plugins, recipe.offline
    return [build_plugin(p["name"], **{k: v for k, v in p.items() if k != "name"}) for p in cfg["plugins"]], False


def run(cfg: dict, out: str | Path | None = None, *, console: bool | None = None) -> dict:
    """Train and evaluate as ``cfg`` says; write results.json and TensorBoard under ``out``; return the results."""
    seed_everything(cfg["seed"])
    bench = build_benchmark(cfg)
    n_features = bench.train_stream[0].dataset[0][0].numel()
    model = build_model(cfg, bench.n_classes, n_features)
    plugins, offline = build_plugins(cfg)
    loggers: list = []
    if out is not None:
        out = Path(out)
        loggers.append(JSONLogger(out / "results.json", cfg))
        if cfg["log"]["tensorboard"]:
            loggers.append(TensorBoardLogger(out / "tensorboard", cfg))
    if cfg["log"]["console"] if console is None else console:
        loggers.append(ConsoleLogger())
    t = cfg["train"]
    device = torch.device(t["device"])
    strategy = Strategy(model.to(device), build_optimizer(cfg, model), plugins=plugins, epochs=t["epochs"],
                        batch_size=t["batch_size"], eval_batch_size=t["eval_batch_size"], device=device,
                        loggers=loggers, seed=cfg["seed"])
    train_stream = [bench.train_stream.joined()] if offline else bench.train_stream
    for experience in train_stream:
        strategy.train(experience)
        strategy.eval(bench.test_stream)
    strategy.close()
    return results(strategy, cfg)
