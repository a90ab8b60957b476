"""Random configs on random small user models (or the config's own), one short run each: either a streamcl error that names the
cause, or a run that did what the config asked (every experience trained and measured, accuracies in [0, 1]).
Never a bare traceback. The draws are seeded, so a failing case repeats: its number is in the test id."""
from __future__ import annotations

import inspect
import math
import random

import pytest
import torch
from torch import nn

from streamcl import config, runner
from streamcl.errors import StreamclError
from streamcl.methods import RECIPES
from tests.conftest import image_benchmark, mlp, resnet18

CASES = 24


def cnn_bn(n_classes: int = 10) -> nn.Module:
    """A user's small CNN with BatchNorm (2d and 1d)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Flatten(), nn.Linear(8 * 7 * 7, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, n_classes))


MODELS = {"mlp": mlp, "cnn_bn": cnn_bn, "resnet18": resnet18}


def draw(case: int) -> tuple[dict, str, dict]:
    """A config (validated or not), a model name and the benchmark's arguments, from the case's seed."""
    r = random.Random(case)
    recipe = r.choice(sorted(RECIPES))
    method = {"name": recipe}
    accepts = inspect.signature(RECIPES[recipe].plugins).parameters
    if "memory" in accepts and r.random() < 0.7:
        method["memory"] = r.choice([1, 3, 8, 40, 0])
    train = {"epochs": r.choice([1, 2]), "batch_size": r.choice([1, 3, 16, 64]), "eval_batch_size": r.choice([1, 7, 64]),
             "lr": r.choice([1e-4, 0.01, 0.1, 1.0, 50.0]), "optimizer": r.choice(["sgd", "adam"]),
             "momentum": r.choice([0.0, 0.9]), "checkpoint_every": r.choice([0, 2])}
    if r.random() < 0.3:
        train["augment"] = "crop_flip"
    scenario = r.choice(["class", "task"])
    cfg = {"seed": r.randrange(1000), "method": method, "train": train,
           "benchmark": {"scenario": scenario, "n_experiences": 2},
           "log": {"tensorboard": False, "console": False}}
    data = {"n_classes": 4, "n_experiences": 2, "n_per_class": r.choice([1, 2, 8]), "task_labels": scenario == "task"}
    model = r.choices([*MODELS, "config"], weights=[2, 2, 1, 1])[0]
    if model == "config":  # the config's own model, as `streamcl run` builds it
        cfg["model"] = {"name": r.choice(["mlp", "cnn"]), "hidden": r.choice([[16], [8, 8], [0], [-5]]),
                        "growing": r.random() < 0.5}
    return cfg, model, data


@pytest.mark.parametrize("case", range(CASES))
def test_a_random_config_on_a_random_model_runs_as_asked_or_says_why_not(case, tmp_path):
    cfg, model_name, data = draw(case)
    torch.manual_seed(case)
    try:
        cfg = config.parse(cfg)
        model = MODELS[model_name](4) if model_name in MODELS else None
        res = runner.run(cfg, tmp_path / "run", benchmark=image_benchmark(**data), model=model)
    except StreamclError as err:
        assert str(err).strip(), "a streamcl error must say what is wrong"
        return
    rows = res["accuracy_matrix"]
    offline = RECIPES[cfg["method"]["name"]].offline
    assert len(rows) == (1 if offline else data["n_experiences"])
    cells = [c for row in rows for c in row if c is not None]
    assert cells and all(0.0 <= c <= 1.0 for c in cells)
    assert math.isfinite(res["final_accuracy"])
    assert (tmp_path / "run" / "results.json").exists()
