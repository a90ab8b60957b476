"""Shared pieces of the reliability tests: every built-in plugin and recipe, tiny runs, injected crashes."""
from __future__ import annotations

import os

import torch

from streamcl import config, runner
from streamcl.methods import RECIPES
from streamcl.registry import available_plugins
from streamcl.scenarios import class_incremental
from tests.synthetic import blobs

# metric plugins (class attribute ``metric = True``: they only observe) are left out of the generic tests, which run
# every pair and every unit; tests/test_metric_plugins.py runs all of them together beside two methods instead
METRIC_PLUGINS = sorted(n for n, info in available_plugins().items()
                         if info.builtin and getattr(info.load(), "metric", False))
BUILTIN_PLUGINS = sorted(n for n, info in available_plugins().items() if info.builtin and n not in METRIC_PLUGINS)
RECIPE_NAMES = sorted(RECIPES)
# what a plugin that needs a role runs beside: the plugin owning it
PARTNER = {"memory": {"name": "replay", "selection": "herding"}}


def plugin_part(name: str) -> dict:
    """A plugin alone, or after the partners of the roles it needs."""
    needs = getattr(available_plugins()[name].load(), "needs", ())
    return {"plugins": [PARTNER[r] for r in sorted(needs)] + [{"name": name}]}


# (label, config part) for every built-in plugin (with what it needs) and every recipe; while working
# on one plugin, STREAMCL_TEST_UNITS=plugin:ewc,method:ewc limits the generic tests (and torchrun's worker) to those
UNITS = [(f"plugin:{n}", plugin_part(n)) for n in BUILTIN_PLUGINS] + \
        [(f"method:{n}", {"method": {"name": n}}) for n in RECIPE_NAMES]
# units whose technique is about task labels (a head per task label) run again on the task-incremental tiny stream
# (every experience its own task label, at training and test time), labelled "<unit>:task" (the ensemble makes a
# member per experience with or without task labels, so its class-incremental runs already hold several)
TASK_UNITS = ("plugin:multi_head", "method:multihead", "plugin:progressive_networks", "method:pnn", "plugin:hat",
              "method:hat")
UNITS += [(f"{label}:task", {**part, "benchmark": {"scenario": "task"}}) for label, part in UNITS if label in TASK_UNITS]
# plugins and recipes that prompt a vision transformer (refused at construction on a model without a timm ViT) run on
# TinyViT instead of the config's MLP
VIT_PLUGINS, VIT_METHODS = ("l2p", "dual_prompt"), ("l2p", "dualprompt")
if os.environ.get("STREAMCL_TEST_UNITS"):
    UNITS = [u for u in UNITS if u[0] in os.environ["STREAMCL_TEST_UNITS"].split(",")]


class Crash(Exception):
    """Stands for the process dying: nothing after it runs."""


class TinyViT(torch.nn.Module):
    """A user's input-resizing wrapper around a timm ViT: the tiny stream's 8 features as a 1 x 2 x 4 image, a token per
    feature (patch 1), 3 blocks of width 16."""

    def __init__(self, n_classes: int):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer
        self.vit = VisionTransformer(img_size=(2, 4), patch_size=1, in_chans=1, num_classes=n_classes, embed_dim=16,
                                     depth=3, num_heads=2, mlp_ratio=2.0)

    def get_classifier(self) -> torch.nn.Module:
        return self.vit.get_classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x.reshape(len(x), 1, 2, 4))


def tiny_model(part: dict, n_classes: int) -> torch.nn.Module | None:
    """A :class:`TinyViT` (drawn from seed 0) when ``part`` lists a plugin or recipe that needs a ViT, else ``None``
    (the config's own model)."""
    names = {p.get("name") for p in part.get("plugins", [])}
    if not (names & set(VIT_PLUGINS) or part.get("method", {}).get("name") in VIT_METHODS):
        return None
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TinyViT(n_classes)


def tiny_config(part: dict, checkpoint_every: int = 3, seed: int = 0) -> dict:
    return config.parse({"seed": seed, "model": {"hidden": [16]},
                         "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 32, "lr": 0.1,
                                   "checkpoint_every": checkpoint_every},
                         "log": {"tensorboard": False, "console": False}, **part})


def tiny_benchmark(n_experiences: int = 3, task_labels: bool = False):
    """Experiences of 2 classes, 40 training samples each: 3 steps an epoch at batch 16 (``task_labels``:
    experience i is task i, at training and test time)."""
    n = 2 * n_experiences
    return class_incremental(blobs(n_classes=n), blobs(10, n, seed=1), n_experiences, task_labels=task_labels)


def tiny_run(part: dict, out=None, resume: bool = False, n_experiences: int = 3, **kwargs) -> dict:
    task = part.get("benchmark", {}).get("scenario") == "task"
    return runner.run(tiny_config(part, **kwargs), out, resume=resume,
                      benchmark=tiny_benchmark(n_experiences, task_labels=task), model=tiny_model(part, 2 * n_experiences))


def crash_at_step(monkeypatch, step: int) -> None:
    """Make the optimizer's ``step``-th update (1-based) raise :class:`Crash` before it changes anything."""
    original, calls = torch.optim.SGD.step, [0]

    def step_or_crash(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            raise Crash(f"crash at step {step}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step_or_crash)


NUMBERS = ("accuracy_matrix", "final_accuracy", "avg_incremental_accuracy", "forgetting", "bwt",
           "seen_accuracy", "old_accuracy", "new_accuracy")


def numbers(results: dict) -> dict:
    return {k: results[k] for k in NUMBERS}
