import gzip
import struct

import numpy as np
import pytest
import torch

from streamcl import DatasetNotFound
from streamcl.datasets import fashion_mnist
from streamcl.datasets import fmnist
from streamcl.datasets.fmnist import read_idx


def write_idx(path, array: np.ndarray, gz: bool):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_by_hand(tmp_path, gz):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, arr, gz)
    assert np.array_equal(read_idx(path), arr)


def fake_root(tmp_path, n_train=6, n_test=4):
    root = tmp_path / "FashionMNIST" / "raw"
    root.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", np.full((n, 28, 28), 255, np.uint8), True)
        write_idx(root / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, False)
    return tmp_path


def test_loads_a_torchvision_style_root_and_normalises(tmp_path):
    train, test = fashion_mnist(fake_root(tmp_path), download=False)
    assert train.x.shape == (6, 784) and test.x.shape == (4, 784)
    assert torch.allclose(train.x, torch.full_like(train.x, (1.0 - 0.2860) / 0.3530))
    assert train.y.tolist() == [0, 1, 2, 3, 4, 5]
    img, _ = fashion_mnist(fake_root(tmp_path / "b"), download=False, flatten=False, normalize=False)
    assert img.x.shape == (6, 1, 28, 28) and img.x.max() == 1.0


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMCL_DATA", raising=False)
    monkeypatch.setattr(fmnist, "DEBIAN_ROOT", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFound) as err:
        fashion_mnist(tmp_path / "empty", download=False)
    message = str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in message and "STREAMCL_DATA" in message
    assert str(tmp_path / "empty") in message


def test_env_variable_is_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCL_DATA", str(fake_root(tmp_path)))
    monkeypatch.setattr(fmnist, "DEBIAN_ROOT", tmp_path / "nowhere")
    assert len(fashion_mnist(download=False)[0]) == 6


def test_real_fashion_mnist():
    train, test = fashion_mnist(download=False)
    assert train.x.shape == (60000, 784) and test.x.shape == (10000, 784)
    assert torch.bincount(train.y).tolist() == [6000] * 10 and torch.bincount(test.y).tolist() == [1000] * 10
    assert abs(float(train.x.mean())) < 0.01 and abs(float(train.x.std()) - 1) < 0.01
