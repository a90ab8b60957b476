"""streamcl.augment.CropFlip checked against every crop and flip written out by hand; the config key."""
import pytest
import torch

from plugins.replay import Replay
from streamcl import ConfigError, Strategy, config, runner
from streamcl.augment import CropFlip
from streamcl.models import MLP
from streamcl.scenarios.data import seeded
from tests.conftest import image_benchmark


def test_crop_flip_gives_exactly_the_padded_windows_and_their_mirrors():
    x = torch.tensor([[[[1., 2.], [3., 4.]]]])  # one 1x2x2 image
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))[0, 0]
    windows = [padded[i:i + 2, j:j + 2] for i in range(3) for j in range(3)]
    allowed = windows + [w.flip(-1) for w in windows]  # 18 outcomes, some equal (all-zero corners do not occur)
    with seeded(0):
        out = CropFlip(padding=1)(x.repeat(400, 1, 1, 1))
    assert out.shape == (400, 1, 2, 2)
    assert all(any(torch.equal(o[0], a) for a in allowed) for o in out)
    assert sum(any(torch.equal(o[0], a) for o in out) for a in allowed) == 18  # every outcome drawn
    assert torch.equal(CropFlip(padding=0, flip=False)(x), x)


def test_config_augment_trains_on_crops_and_keeps_clean_samples_in_memory():
    cfg = config.parse({"method": {"name": "replay", "memory": 8}, "model": {"hidden": [16]},
                        "train": {"epochs": 1, "batch_size": 8, "augment": "crop_flip"},
                        "log": {"tensorboard": False, "console": False}})
    bench = image_benchmark()
    res = runner.run(cfg, benchmark=bench)
    assert len(res["accuracy_matrix"]) == 2
    clean = torch.cat([e.dataset.x for e in bench.train_stream])
    torch.manual_seed(0)
    m = MLP(784, [16], 4)
    s = Strategy(m, torch.optim.SGD(m.parameters(), lr=0.01), plugins=[Replay(8)], batch_size=8, seed=0,
                 augment=CropFlip())
    for exp in bench.train_stream:
        s.train(exp)
    assert all(any(torch.equal(v, c) for c in clean) for v in s.memory.inputs())


@pytest.mark.parametrize("plugin", ["reservoir", "dark_replay"])
def test_online_memories_store_the_inputs_before_augmentation(plugin):
    from plugins.dark_replay import DarkReplay

    bench = image_benchmark()
    torch.manual_seed(0)
    m = MLP(784, [16], 4)
    p = Replay(8, selection="reservoir") if plugin == "reservoir" else DarkReplay(memory=8)
    s = Strategy(m, torch.optim.SGD(m.parameters(), lr=0.01), plugins=[p], batch_size=8, seed=0, augment=CropFlip())
    s.train(bench.train_stream[0])
    clean = bench.train_stream[0].dataset.x
    assert all(any(torch.equal(v, c) for c in clean) for v in p.memory.inputs())


def test_an_augment_that_fails_on_the_inputs_says_so():
    import torchvision

    bench = image_benchmark()
    flat = [type(e)(e.index, type(e.dataset)(e.dataset.x.flatten(1), e.dataset.y), e.classes, e.n_classes)
            for e in bench.train_stream]
    m = MLP(784, [16], 4)
    s = Strategy(m, torch.optim.SGD(m.parameters(), lr=0.01), batch_size=8, seed=0,
                 augment=torchvision.transforms.RandomCrop(28, padding=2))
    with pytest.raises(ConfigError, match=r"augment=RandomCrop.*failed on inputs of shape \(784,\)"):
        s.train(flat[0])
    s = Strategy(m, torch.optim.SGD(m.parameters(), lr=0.01), batch_size=8, seed=0, augment=CropFlip())
    with pytest.raises(ConfigError, match=r"CropFlip takes images"):
        s.train(flat[0])
    s = Strategy(m, torch.optim.SGD(m.parameters(), lr=0.01), batch_size=8, seed=0,
                 augment=CropFlip(image_shape=(1, 28, 28)))
    s.train(flat[0])  # flat images of a given shape
