"""Dataset loaders on small files in the real on-disk formats, the named benchmarks of the literature (class
orders, experience sizes), their config keys, online streams, and a third party's benchmark."""
from __future__ import annotations

import json
import pickle
import struct
import textwrap

import numpy as np
import pytest
import torch

from streamcl import DataError, DatasetNotFound, config, runner
from streamcl.datasets import cifar10, cifar100, cub200, tiny_imagenet
from streamcl.datasets.image_folder import ImageFiles, image_folder
from streamcl.datasets.mnist import mnist
from streamcl.errors import ConfigError
from streamcl.registry import available_benchmarks
from streamcl.scenarios import (catalog, permuted_mnist, split_cifar10, split_cifar100, split_classes, split_mnist,
                                split_online, split_tinyimagenet)
from tests.conftest import cifar_rows, colour, image_benchmark, write_cifar, write_image, write_mnist, write_tiny_imagenet

# PyCIL's CIFAR-100 class order (np.random.seed(1993); np.random.permutation(100)), as published in FACIL's
# src/datasets/dataset_config.py ('cifar100_icarl') and used by PyCIL's DataManager with shuffle and seed 1993.
PYCIL_CIFAR100 = [
    68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38, 58, 70, 77, 1, 85, 19, 17, 50,
    28, 53, 13, 81, 45, 82, 6, 59, 83, 16, 15, 44, 91, 41, 72, 60, 79, 52, 20, 10, 31, 54, 37, 95, 14, 71, 96,
    98, 97, 2, 64, 66, 42, 22, 35, 86, 24, 34, 87, 21, 99, 0, 88, 27, 18, 94, 11, 12, 47, 25, 30, 46, 62, 69,
    36, 61, 7, 63, 75, 5, 32, 4, 51, 48, 73, 93, 39, 67, 29, 49, 57, 33]


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    monkeypatch.delenv("STREAMCL_DATA", raising=False)


@pytest.fixture
def cifar100_root(tmp_path):
    return write_cifar(tmp_path / "data", 100, per_class=2, test_per_class=1)


def expected_images(n, offset=0):
    return torch.from_numpy(cifar_rows(n, offset)).reshape(n, 3, 32, 32)


# ------------------------------------------------------------------------------------------------ CIFAR
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar100_files_load_exactly(cifar100_root, protocol):
    write_cifar(cifar100_root, 100, per_class=2, test_per_class=1, protocol=protocol)
    train, test = cifar100(cifar100_root, download=False)
    assert train.x.shape == (200, 3, 32, 32) and train.x.dtype == torch.uint8 and train.y.dtype == torch.int64
    assert torch.equal(train.x, expected_images(200)) and torch.equal(test.x, expected_images(100, 1000))
    assert train.y.tolist() == [i % 100 for i in range(200)] and test.y.tolist() == list(range(100))
    # red plane first: pixel (row 1, column 2) of image 3 in channel 2 is byte 2048 + 32 + 2 of row 3
    assert int(train.x[3, 2, 1, 2]) == (3 + 2048 + 34) % 256


def test_cifar10_batches_concatenate_in_order(tmp_path):
    root = write_cifar(tmp_path, 10, per_class=3, test_per_class=2)
    train, test = cifar10(root / "cifar-10-batches-py", download=False)  # the batches folder itself works too
    assert train.x.shape == (30, 3, 32, 32) and test.x.shape == (20, 3, 32, 32)
    assert torch.equal(train.x, expected_images(30)) and train.y.tolist() == [i % 10 for i in range(30)]


def py2_pickle(batch: dict) -> bytes:
    """A dict pickled as Python 2's cPickle wrote the CIFAR files (protocol 2, byte strings, numpy's
    ``_reconstruct``), opcode by opcode: str keys and values, lists of ints, 2-D uint8 arrays."""
    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def i(v: int) -> bytes:
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v) if v < 65536 else b"J" + struct.pack("<i", v)

    def value(v) -> bytes:
        if isinstance(v, str):
            return s(v.encode("latin1"))
        if isinstance(v, list):
            return b"](" + b"".join(value(x) for x in v) + b"e"
        if isinstance(v, int):
            return i(v)
        assert v.dtype == np.uint8 and v.ndim == 2
        dtype = b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R(" + i(3) + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + i(0) + b"tb"
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R("
                + i(1) + i(v.shape[0]) + i(v.shape[1]) + b"\x86" + dtype + b"\x89" + s(v.tobytes()) + b"tb")

    return b"\x80\x02}(" + b"".join(s(k.encode()) + value(v) for k, v in batch.items()) + b"u."


def test_cifar100_written_by_python2_loads(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n, offset in (("train", 6, 0), ("test", 3, 7)):
        batch = {"batch_label": "training batch 1 of 1", "fine_labels": list(range(n)), "coarse_labels": [0] * n,
                 "filenames": [f"f{i}.png" for i in range(n)], "data": cifar_rows(n, offset)}
        (folder / name).write_bytes(py2_pickle(batch))
        reference = pickle.loads((folder / name).read_bytes(), encoding="latin1")  # the encoder is right
        assert np.array_equal(reference["data"], batch["data"]) and reference["fine_labels"] == list(range(n))
    train, test = cifar100(tmp_path, download=False)
    assert torch.equal(train.x, expected_images(6)) and torch.equal(test.x, expected_images(3, 7))
    assert train.y.tolist() == list(range(6))


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_is_refused_without_running_it(tmp_path):
    root = write_cifar(tmp_path, 100, per_class=1, test_per_class=1)
    marker = tmp_path / "ran"
    with open(root / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"data": cifar_rows(100), "fine_labels": Payload(marker)}, f)
    with pytest.raises(DataError) as err:
        cifar100(root, download=False)
    assert str(root / "cifar-100-python" / "train") in str(err.value) and "system" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "not a dict", "float pixels"])
def test_damaged_cifar_file_is_named(tmp_path, damage):
    root = write_cifar(tmp_path, 100, per_class=1, test_per_class=1)
    path = root / "cifar-100-python" / "test"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    else:
        body = [1, 2] if damage == "not a dict" else {"data": np.zeros((100, 3072)), "fine_labels": list(range(100))}
        path.write_bytes(pickle.dumps(body))
    with pytest.raises(DataError, match=str(path)):
        cifar100(root, download=False)


# ------------------------------------------------------------------------------------------------ offline
@pytest.mark.parametrize("load, expected, source", [
    (cifar100, "cifar-100-python/train", "CIFAR100(root, download=True)"),
    (cifar10, "cifar-10-batches-py/data_batch_1", "CIFAR10(root, download=True)"),
    (mnist, "train-images-idx3-ubyte", "MNIST(root, download=True)"),
    (tiny_imagenet, "tiny-imagenet-200/wnids.txt", "tiny-imagenet-200.zip"),
])
def test_missing_dataset_names_the_path_and_the_download(tmp_path, monkeypatch, load, expected, source):
    with pytest.raises(DatasetNotFound) as err:
        load(tmp_path / "empty", download=False)
    message = str(err.value)
    assert str(tmp_path / "empty" / expected.split("/")[0]) in message and expected in message
    assert source in message and "STREAMCL_DATA" in message
    monkeypatch.setenv("STREAMCL_DATA", str(tmp_path / "env"))  # looked in too
    with pytest.raises(DatasetNotFound, match="env"):
        load(None, download=False)


@pytest.mark.parametrize("load, attr", [(cifar100, "CIFAR100"), (cifar10, "CIFAR10"), (mnist, "MNIST")])
def test_failed_download_is_reported(tmp_path, monkeypatch, load, attr):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("no route to host")
    monkeypatch.setattr(torchvision.datasets, attr, offline)
    with pytest.raises(DatasetNotFound, match="download into .* failed .*no route to host"):
        load(tmp_path, download=True)


# ------------------------------------------------------------------------------------------------ MNIST
@pytest.mark.parametrize("layout, gz", [("MNIST/raw", True), ("", False)])
def test_mnist_idx_files(tmp_path, layout, gz):
    write_mnist(tmp_path / layout, 20, 10, gz=gz)
    train, test = mnist(tmp_path, download=False)
    assert train.x.shape == (20, 1, 28, 28) and train.x.dtype == torch.uint8 and test.x.shape == (10, 1, 28, 28)
    assert train.x[:, 0, 5, 7].tolist() == list(range(20)) and train.y.tolist() == [i % 10 for i in range(20)]


def test_split_and_permuted_mnist_follow_the_literature(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", 40, 20)
    bench = split_mnist(tmp_path, download=False)
    assert [e.classes for e in bench.train_stream] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert bench.info["mean"] == (0.1307,) and bench.info["std"] == (0.3081,)
    train, _ = mnist(tmp_path, download=False)
    perm = permuted_mnist(tmp_path, download=False)
    assert len(perm.train_stream) == 10 and perm.scenario == "domain"
    rng = np.random.RandomState(0)  # Avalanche's PermutedMNIST(seed=0): every experience permuted, drawn in turn
    for exp in perm.train_stream:
        p = torch.from_numpy(rng.permutation(784))
        assert len(exp) == 40 and torch.equal(exp.dataset.x.reshape(40, -1), train.x.reshape(40, -1)[:, p])
    kept = permuted_mnist(tmp_path, n_experiences=3, keep_first=True, task_labels=True, download=False)
    assert torch.equal(kept.train_stream[0].dataset.x, train.x) and [e.task for e in kept.test_stream] == [0, 1, 2]
    gem = permuted_mnist(tmp_path, n_experiences=4, split_data=True, download=False)
    assert [len(e) for e in gem.train_stream] == [10] * 4


# ------------------------------------------------------------------------------------------------ image files
def test_tiny_imagenet_layout(tmp_path):
    root = write_tiny_imagenet(tmp_path, wnids=("n03", "n01", "n02"), per_class=2)
    train, test, wnids = tiny_imagenet(root, download=False)
    assert wnids == ["n01", "n02", "n03"]  # sorted WordNet ids, not wnids.txt's order
    assert train.x.shape == (6, 3, 64, 64) and train.x.dtype == torch.uint8 and test.x.shape == (3, 3, 64, 64)
    assert train.y.tolist() == [0, 0, 1, 1, 2, 2] and test.y.tolist() == [0, 1, 2]
    for k in range(3):  # flat colours survive JPEG within a step or two
        assert (train.x[2 * k].float().mean((1, 2)) - torch.tensor(colour(k), dtype=torch.float)).abs().max() < 3
    lazy, _, _ = tiny_imagenet(root, download=False, in_memory=False)
    assert isinstance(lazy, ImageFiles) and torch.equal(lazy[3][0], train.x[3])
    bench = split_tinyimagenet(root, class_order=[2, 0, 1], classes_per_exp=1, download=False)
    assert [e.classes for e in bench.train_stream] == [(2,), (0,), (1,)] and bench.info["class_names"] == wnids


def write_folder(root, sizes=(3, 3, 3, 3), suffixes=(".png", ".jpg", ".jpeg"), side=20):
    for k, n in enumerate(sizes):
        for i in range(n):
            write_image(root / f"class_{k}" / f"img{i}{suffixes[i % len(suffixes)]}", colour(k), (side, side + 4))


def test_image_folder_train_and_test_dirs(tmp_path):
    write_folder(tmp_path / "train", (3, 3, 3))
    write_folder(tmp_path / "test", (1, 1, 1))
    train, test, classes = image_folder(tmp_path, image_size=16)
    assert classes == ["class_0", "class_1", "class_2"] and isinstance(train, ImageFiles)
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and int(y) == 0
    assert torch.equal(x, torch.tensor(colour(0), dtype=torch.uint8)[:, None, None].expand(3, 16, 16))  # the PNG
    full, _, _ = image_folder(tmp_path, image_size=None, in_memory=True)
    assert full.x.shape == (9, 3, 24, 20) and full.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(full.x[3], torch.tensor(colour(1), dtype=torch.uint8)[:, None, None].expand(3, 24, 20))
    assert len(test) == 3 and test.targets.tolist() == [0, 1, 2]


def test_image_folder_fraction_split_is_per_class_and_seeded(tmp_path):
    write_folder(tmp_path / "imagenet-r", (10, 5, 10, 20))
    train, test, _ = image_folder(tmp_path / "imagenet-r", test_fraction=0.2, split_seed=3, image_size=8)
    assert test.targets.bincount().tolist() == [2, 1, 2, 4] and train.targets.bincount().tolist() == [8, 4, 8, 16]
    assert not set(train.paths) & set(test.paths)
    again, _, _ = image_folder(tmp_path / "imagenet-r", test_fraction=0.2, split_seed=3, image_size=8)
    assert again.paths == train.paths
    other, _, _ = image_folder(tmp_path / "imagenet-r", test_fraction=0.2, split_seed=4, image_size=8)
    assert other.paths != train.paths
    bench = catalog.image_folder(tmp_path / "imagenet-r", test_fraction=0.2, image_size=8, n_experiences=2,
                                 in_memory=True)
    assert [e.classes for e in bench.train_stream] == [(0, 1), (2, 3)] and bench.info["mean"] == (0.485, 0.456, 0.406)
    with pytest.raises(DatasetNotFound, match="test_dir"):
        image_folder(tmp_path / "imagenet-r")  # no train/ and test/ there


def test_cub200_official_layout(tmp_path):
    base = tmp_path / "CUB_200_2011"
    rows = [(1, "001.Black_footed_Albatross/a.jpg", 1, 1), (2, "001.Black_footed_Albatross/b.jpg", 1, 0),
            (3, "002.Laysan_Albatross/c.jpg", 2, 1), (4, "002.Laysan_Albatross/d.png", 2, 0)]
    for i, path, c, _ in rows:
        write_image(base / "images" / path, colour(c), (10, 10))
    (base / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in rows))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (base / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    train, test, classes = cub200(tmp_path, image_size=8)
    assert classes == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    assert train.targets.tolist() == [0, 1] and test.targets.tolist() == [0, 1] and train.paths[1].name == "c.jpg"
    bench = catalog.cub200(tmp_path, image_size=8, n_experiences=2)
    assert [e.classes for e in bench.train_stream] == [(0,), (1,)]
    with pytest.raises(DatasetNotFound, match="CUB_200_2011/images.txt"):
        cub200(tmp_path / "none")


# ------------------------------------------------------------------------------------------------ class orders
def test_pycil_cifar100_order_is_the_published_one():
    assert catalog.seeded_order(100, 1993) == PYCIL_CIFAR100
    assert catalog.seeded_order(5, None) == [0, 1, 2, 3, 4]


def test_split_cifar100_default_is_b0_inc10_in_pycil_order(cifar100_root):
    bench = split_cifar100(cifar100_root, download=False)
    assert [len(e.classes) for e in bench.train_stream] == [10] * 10
    assert list(bench.train_stream[0].classes) == PYCIL_CIFAR100[:10]  # experience 0: classes 68, 56, 78, ...
    assert bench.info["class_order"] == PYCIL_CIFAR100 and [len(e) for e in bench.train_stream] == [20] * 10
    assert bench.info["mean"] == (0.5071, 0.4865, 0.4409) and bench.info["std"] == (0.2673, 0.2564, 0.2762)
    assert bench.train_stream[0].dataset.x.dtype == torch.uint8


def test_b50_and_unequal_experiences(cifar100_root):
    b50 = split_cifar100(cifar100_root, first_exp_classes=50, download=False)
    assert [len(e.classes) for e in b50.train_stream] == [50, 10, 10, 10, 10, 10]
    assert [len(e) for e in b50.train_stream] == [100, 20, 20, 20, 20, 20]
    assert [len(e) for e in b50.test_stream] == [50, 10, 10, 10, 10, 10]
    assert list(b50.train_stream[1].classes) == PYCIL_CIFAR100[50:60]
    inc5 = split_cifar100(cifar100_root, first_exp_classes=50, classes_per_exp=5, download=False)
    assert len(inc5.train_stream) == 11
    uneven = split_cifar100(cifar100_root, classes_per_exp=[40, 30, 20, 10], class_seed=None, download=False)
    assert [e.classes for e in uneven.train_stream][3] == tuple(range(90, 100))
    assert [len(e.classes) for e in uneven.train_stream] == [40, 30, 20, 10]
    task = split_cifar100(cifar100_root, n_experiences=4, scenario="task", download=False)
    assert [e.task for e in task.test_stream] == [0, 1, 2, 3]


def test_split_classes_with_a_list_of_sizes():
    assert split_classes(range(6), classes_per_exp=[3, 2, 1]) == [[0, 1, 2], [3, 4], [5]]
    assert split_classes(range(6), first=2, classes_per_exp=[1, 3]) == [[0, 1], [2], [3, 4, 5]]
    for bad in ([3, 2], [3, 3, 0], []):
        with pytest.raises(DataError, match="add up"):
            split_classes(range(6), classes_per_exp=bad)
    with pytest.raises(DataError, match="not n_experiences"):
        split_classes(range(6), 2, classes_per_exp=[3, 2, 1])


def test_split_cifar10_label_order(tmp_path):
    bench = split_cifar10(write_cifar(tmp_path, 10, per_class=2), download=False)
    assert [e.classes for e in bench.train_stream] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert bench.info["std"] == (0.2470, 0.2435, 0.2616)


def test_fashion_mnist_benchmarks_are_the_sfm5_and_pfm5_streams():
    part = {"train_range": [1000, 4000]}  # the whole training set takes seconds; any part shows the same
    for legacy, name, extra in (("split-fmnist", "split_fmnist", {}),
                                ("permuted-fmnist", "permuted_fmnist", {"scenario": "domain"})):
        old = runner.build_benchmark(config.parse({"benchmark": {"name": legacy, **extra, **part}}))
        new = runner.build_benchmark(config.parse({"benchmark": {"name": name, **part}}))
        assert "mean" not in new.info and new.train_stream[0].dataset.x.dtype == torch.float32
        for a, b in zip([*old.train_stream, *old.test_stream], [*new.train_stream, *new.test_stream]):
            assert a.classes == b.classes and torch.equal(a.dataset.x, b.dataset.x) and torch.equal(a.dataset.y, b.dataset.y)


# ------------------------------------------------------------------------------------------------ config, runner
def test_every_catalog_benchmark_is_registered():
    found = available_benchmarks()
    assert set(catalog.BENCHMARKS) <= set(found)
    assert all(found[n].builtin and found[n].load() is f for n, f in catalog.BENCHMARKS.items())


def test_config_takes_registered_benchmarks_with_their_defaults(cifar100_root):
    cfg = config.parse({"benchmark": {"name": "split_cifar100", "root": str(cifar100_root),
                                      "classes_per_exp": [50, 50], "args": {"download": False}}})
    b = cfg["benchmark"]
    assert "n_experiences" not in b and "task_labels" not in b and b["scenario"] == "class"
    bench = runner.build_benchmark(cfg)
    assert [len(e.classes) for e in bench.train_stream] == [50, 50]
    assert config.parse({"benchmark": {"name": "permuted_mnist"}})["benchmark"]["scenario"] == "domain"
    assert config.parse({})["benchmark"] == {"name": "split-fmnist", "scenario": "class", "n_experiences": 5,
                                             "task_labels": False}  # SFM-5's config, as before


@pytest.mark.parametrize("bench, words", [
    ({"name": "split_cifar"}, ["split_cifar100", "split-fmnist", "permuted_mnist"]),
    ({"name": "split_cifar100", "scenario": "domain"}, ["benchmark.scenario", "class, task"]),
    ({"name": "split_cifar100", "args": {"dowload": False}}, ["'dowload'", "download"]),
    ({"name": "split_cifar100", "args": {"n_experiences": 5}}, ["benchmark.n_experiences"]),
    ({"name": "split_cifar100", "task_labels": True}, ["'task_labels'"]),
    ({"name": "split-fmnist", "args": {"download": False}}, ["split_fmnist"]),
    ({"classes_per_exp": [2, 0]}, ["classes_per_exp"]),
])
def test_bad_benchmark_config_is_named(bench, words):
    with pytest.raises(ConfigError) as err:
        config.parse({"benchmark": bench})
    assert all(w in str(err.value) for w in words), str(err.value)


# ------------------------------------------------------------------------------------------------ online
def test_split_online_cuts_each_experience_in_order():
    bench = image_benchmark(n_classes=4, n_experiences=2, n_per_class=5)  # experiences of 10 samples
    online = split_online(bench, 4)
    assert [len(e) for e in online.train_stream] == [4, 4, 2, 4, 4, 2]
    assert [e.covers for e in online.train_stream] == [(0,), (0,), (0,), (1,), (1,), (1,)]
    assert online.info["online"]["parents"] == [0, 0, 0, 1, 1, 1] and online.test_stream is bench.test_stream
    first = bench.train_stream[0].dataset
    assert torch.equal(torch.cat([e.dataset.x for e in online.train_stream[:3]]), first.x)
    assert online.train_stream[0].classes == (0,) and online.train_stream[1].classes == (0, 1)
    assert [len(e) for e in split_online(bench, 4, drop_last=True).train_stream] == [4, 4, 4, 4]
    task = split_online(image_benchmark(n_experiences=2, task_labels=True), 3, shuffle=True)
    assert [e.task for e in task.train_stream] == [0] * 6 + [1] * 6
    assert all(set(e.classes) <= set(bench.train_stream[e.covers[0]].classes) for e in task.train_stream)
    with pytest.raises(DataError, match="experience_size"):
        split_online(bench, 0)


def test_online_stream_trains_in_one_pass_with_one_column_per_experience():
    from streamcl import Strategy
    from streamcl.models import MLP

    bench = image_benchmark(n_classes=4, n_experiences=2, n_per_class=6)
    online = split_online(bench, 4)
    model = MLP(784, [16], 4)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, batch_size=4, seed=0)
    for exp in online.train_stream:
        strategy.train(exp)
        strategy.eval(online.test_stream)
    matrix = strategy.metrics.matrix
    assert len(matrix) == len(online.train_stream) and all(len(row) == 2 for row in matrix)
    assert strategy.global_step == len(online.train_stream)  # one step each: a single pass


# ------------------------------------------------------------------------------------------------ third party
BENCHMARK_SOURCE = '''\
"""A third party's benchmark: two experiences of tiny tensors."""
import torch

from streamcl.scenarios import TensorData, class_incremental
from streamcl.scenarios.catalog import scenarios


@scenarios("class")
def tiny(root=None, *, n_experiences=2, scale=1.0):
    x = torch.arange(16, dtype=torch.float32).reshape(8, 2) * scale
    y = torch.arange(8) % 4
    return class_incremental(TensorData(x, y), TensorData(x, y), n_experiences)
'''


def test_third_party_benchmark_by_entry_point(tmp_path):
    import uuid

    from streamcl import registry
    from tests.conftest import installed_package

    suffix = uuid.uuid4().hex[:8]
    dist, module, name = f"streamcl-bench-test-{suffix}", f"my_bench_{suffix}", f"tiny_{suffix}"
    with installed_package(tmp_path, dist, module, BENCHMARK_SOURCE, "streamcl.benchmarks", {name: f"{module}:tiny"}):
        info = registry.available_benchmarks()[name]
        assert info.distribution == dist and not info.builtin
        cfg = config.parse({"benchmark": {"name": name, "args": {"scale": 2.0}}})
        bench = runner.build_benchmark(cfg)
        assert [e.classes for e in bench.train_stream] == [(0, 1), (2, 3)] and float(bench.train_stream[0].dataset.x.max()) == 22.0
        with pytest.raises(ConfigError, match="'scal'.*scale"):
            config.parse({"benchmark": {"name": name, "args": {"scal": 2.0}}})
        with pytest.raises(ConfigError, match="class"):
            config.parse({"benchmark": {"name": name, "scenario": "task"}})


# ------------------------------------------------------------------------------------------------ end to end
def test_cli_runs_split_cifar100_with_resnet32(tmp_path, capsys):
    from streamcl import cli

    cifar100_root = write_cifar(tmp_path / "data", 100, per_class=1, test_per_class=1)

    cfg = tmp_path / "cifar.toml"
    cfg.write_text(textwrap.dedent(f"""\
        seed = 0

        [benchmark]
        name = "split_cifar100"
        root = {json.dumps(str(cifar100_root))}
        first_exp_classes = 50
        classes_per_exp = 50
        args = {{ download = false }}

        [model]
        name = "resnet32"

        [train]
        epochs = 1
        batch_size = 50
        eval_batch_size = 100

        [log]
        tensorboard = false
        """))
    out = tmp_path / "out"
    rc = cli.main(["run", str(cfg), "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert len(res["accuracy_matrix"]) == 2 and res["config"]["benchmark"]["name"] == "split_cifar100"


def test_image_folder_runs_through_dataloader_workers_standardised_and_augmented(tmp_path):
    """Image files read lazily by two DataLoader workers, kept as bytes, cropped and flipped on the device,
    standardised by the model's first step: the run gives the numbers of the same images decoded in memory."""
    from streamcl import config, runner
    from streamcl.models.inputs import Standardize

    write_folder(tmp_path / "train", (4, 4, 4, 4))
    write_folder(tmp_path / "test", (2, 2, 2, 2))
    models = []

    def run(**train):
        cfg = config.parse({"seed": 0, "benchmark": {"name": "image_folder", "root": str(tmp_path), "n_experiences": 2,
                                                     "args": {"image_size": 16, "in_memory": not train}},
                            "model": {"name": "cnn"},
                            "train": {"epochs": 2, "batch_size": 4, "augment": "crop_flip", **train},
                            "method": {"name": "replay", "memory": 4}, "log": {"tensorboard": False, "console": False}})
        original = runner.Strategy

        def spy(model, *args, **kwargs):
            models.append(model)
            return original(model, *args, **kwargs)

        runner.Strategy = spy
        try:
            return runner.run(cfg)["accuracy_matrix"]
        finally:
            runner.Strategy = original

    in_memory = run()
    assert run(num_workers=2) == in_memory
    assert all(isinstance(m, Standardize) for m in models)
