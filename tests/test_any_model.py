"""Every built-in plugin and recipe on the five kinds of model users bring (tests/conftest.py USER_MODELS):
each runs a short class-incremental stream to the end, or is refused when the Strategy is built, with a
message that names what the model lacks. Nothing may fail half-way."""
from __future__ import annotations

import math

import pytest
import torch

from streamcl import Strategy, StreamclError
from streamcl.runner import build_plugins, evaluate
from tests.conftest import USER_MODELS, image_benchmark
from tests.reliability import UNITS, tiny_config

# (unit, model) -> a phrase the refusal must contain; every other pair must run
MASKS = "der masks the units of fully connected layers"  # DER(masks=False) runs on these
LATERALS = "wires lateral adaptors between fully connected layers only"  # Progress & Compress, PNN
HAT = "hat masks the units of fully connected layers"
REFUSED: dict[tuple[str, str], str] = {
    **{(unit, model): MASKS for unit in ("plugin:der", "method:der") for model in ("resnet18", "vit", "resnet32")},
    **{(unit, model): HAT for unit in ("plugin:hat", "method:hat", "plugin:hat:task", "method:hat:task")
       for model in ("resnet18", "vit", "resnet32")},
    **{(unit, model): LATERALS for unit in ("plugin:progress_compress", "method:progress_compress",
                                            "plugin:progressive_networks", "method:pnn",
                                            "plugin:progressive_networks:task", "method:pnn:task")
       for model in ("resnet18", "vit", "resnet32")},
    **{(unit, model): "needs a timm VisionTransformer" for unit in ("plugin:l2p", "method:l2p", "plugin:dual_prompt",
                                                                    "method:dualprompt")
       for model in ("mlp", "sequential", "resnet18", "resnet32")}}


def _build(part: dict, model_name: str):
    torch.manual_seed(0)
    model = USER_MODELS[model_name]()
    part = {k: [{**p, "epochs": 2} if p.get("name") == "gdumb" else p for p in v] if k == "plugins" else
            {**v, "epochs": 2} if k == "method" and v.get("name") == "gdumb" else v for k, v in part.items()}
    cfg = tiny_config(part)  # GDumb retrains 2 epochs, not 128: the run's shape, at a test's cost
    plugins, offline = build_plugins(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    strategy = Strategy(model, opt, plugins=plugins, epochs=1, batch_size=8, eval_batch_size=16, seed=0)
    return strategy, offline


@pytest.mark.parametrize("model_name", sorted(USER_MODELS))
@pytest.mark.parametrize("label,part", UNITS, ids=[u[0] for u in UNITS])
def test_runs_or_is_refused_at_construction(label, part, model_name):
    expected = REFUSED.get((label, model_name))
    try:
        strategy, offline = _build(part, model_name)
    except StreamclError as err:
        assert expected is not None, f"{label} on {model_name} was refused: {err}"
        assert expected in str(err), str(err)
        return
    assert expected is None, f"{label} on {model_name} should be refused ({expected!r}) but was built"
    bench = image_benchmark()
    stream = [bench.train_stream.joined()] if offline else list(bench.train_stream)
    for exp in stream:
        strategy.train(exp)
        results = evaluate(strategy, bench.test_stream)
    assert all(math.isfinite(a) for a in results["accuracy"])
    strategy.close()
