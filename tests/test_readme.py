"""The README's tour runs as written, on real Fashion-MNIST, with a user's plain nn.Sequential."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_the_tour_runs_on_a_plain_sequential(tmp_path, monkeypatch, capsys):
    tour = next(b for b in python_blocks() if "nn.Sequential" in b)
    monkeypatch.chdir(tmp_path)  # its TensorBoard run lands under runs/ here
    namespace: dict = {}
    exec(compile(tour, "README.md", "exec"), namespace)
    results = namespace["results"]
    assert len(results["accuracy_matrix"]) == 5 and results["final_accuracy"] > 0.7
    assert list((tmp_path / "runs").iterdir())


def test_the_pre_trained_config_is_valid():
    import tomllib

    from streamcl import config
    block = next(b for b in re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S) if "timm:" in b)
    cfg = config.parse(tomllib.loads(block))
    assert cfg["model"]["name"] == "timm:vit_base_patch16_224" and cfg["method"]["name"] == "slca"


def test_the_cifar_config_is_valid():
    import tomllib

    from streamcl import config
    block = next(b for b in re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S) if "split_cifar100" in b)
    cfg = config.parse(tomllib.loads(block), ["train.device=cpu"])  # this machine has no GPU
    assert (cfg["benchmark"]["name"], cfg["model"]["name"], cfg["train"]["schedule"]) == \
        ("split_cifar100", "resnet32", "cosine")
