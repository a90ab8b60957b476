"""A third-party model, shipped as a user would: its own distribution with a ``streamcl.models`` entry point
(installed and uninstalled as tests/test_thirdparty.py does with a plugin)."""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import torch

from streamcl import config, registry, runner
from streamcl.errors import ConfigError
from streamcl.models import build
from tests.conftest import installed_package

MODEL_SOURCE = '''\
"""A third-party streamcl model: a linear classifier on the flattened samples, ``scale`` times its logits."""
import math

from torch import nn


class Scaled(nn.Module):
    def __init__(self, features, n_classes, scale):
        super().__init__()
        self.flatten, self.fc, self.scale = nn.Flatten(), nn.Linear(features, n_classes), scale

    def forward(self, x):
        return self.scale * self.fc(self.flatten(x))


def scaled_linear(n_classes, sample_shape, *, growing=False, scale=1.0):
    return Scaled(math.prod(sample_shape), n_classes, scale)
'''


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    suffix = uuid.uuid4().hex[:8]
    dist, module, name = f"streamcl-model-test-{suffix}", f"my_cl_model_{suffix}", f"scaled_linear_{suffix}"
    with installed_package(tmp_path_factory.mktemp("model_src"), dist, module, MODEL_SOURCE, "streamcl.models",
                           {name: f"{module}:scaled_linear"}, "0.2.0"):
        yield dist, module, name


def test_an_installed_model_is_found_built_by_name_and_listed(ext, tmp_path):
    dist, module, name = ext
    info = registry.available_models()[name]
    assert (info.distribution, info.version, info.target, info.builtin) == (dist, "0.2.0", f"{module}:scaled_linear",
                                                                          False)
    model = build(name, 4, (1, 28, 28), scale=2.0)
    assert model.fc.out_features == 4 and model.scale == 2.0
    with pytest.raises(ConfigError, match=rf"model '{name}' has no argument 'scael'; it takes: scale"):
        build(name, 4, (784,), scael=2.0)
    proc = subprocess.run([sys.executable, "-m", "streamcl", "models"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert f"{dist} 0.2.0" in rows[name] and f"{module}:scaled_linear" in rows[name]


def test_a_config_names_it_and_its_args_are_checked(ext):
    _, _, name = ext
    cfg = config.parse({"model": {"name": name, "args": {"scale": 3.0}}})
    torch.manual_seed(0)
    model = runner.build_model(cfg, 10, (784,))
    x = torch.randn(2, 784)
    assert torch.allclose(model(x), 3.0 * model.fc(x))
    with pytest.raises(ConfigError, match=rf"'model.args': model '{name}' has no argument 'scael'"):
        config.parse({"model": {"name": name, "args": {"scael": 3.0}}})
