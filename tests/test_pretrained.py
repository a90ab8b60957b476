"""Pre-trained backbones in configs: timm models by name, inputs fitted to them, local weights files, a user's
pre-trained checkpoint (the PT-SFM-5 backbone built by benchmarks/pretrain.py), and their refusals."""
import pickle

import pytest
import torch

from benchmarks.pretrain import pretrain
from streamcl import ConfigError, config, runner
from streamcl.models.backbones import FitInput, PT_SFM_5_ARGS, load_backbone, timm_model
from tests.conftest import rgb_benchmark


@pytest.fixture(scope="module")
def small_backbone(tmp_path_factory):
    """A PT-SFM-5 backbone pre-trained for one epoch on 2,000 images (the real one: 10 epochs on 30,000)."""
    path = tmp_path_factory.mktemp("backbone") / "vit.pt"
    summary = pretrain(path, epochs=1, images=2000, verbose=False, test_images=500)
    return path, summary


def pt_config(**model):
    """The PT-SFM-5 protocol's config with ``model`` settings changed (``None``: the key left out)."""
    part = config.PROTOCOLS["PT-SFM-5"]
    settings = {k: v for k, v in {**part["model"], **model}.items() if v is not None}
    return config.parse({**part, "model": settings})


def test_the_protocol_config_builds_the_papers_vision_transformer(small_backbone):
    cfg = pt_config(checkpoint=str(small_backbone[0]))
    model = runner.build_model(cfg, 10, (784,))
    assert isinstance(model, FitInput) and model.shape == (1, 28, 28) and model.size == (28, 28)
    vit = model.model
    assert (vit.patch_embed.proj.in_channels, vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (1, 64, 4, 4)
    assert vit.patch_embed.num_patches == 49 and model(torch.zeros(3, 784)).shape == (3, 10)


def test_pretrain_writes_the_backbone_without_its_head_and_is_deterministic(small_backbone, tmp_path):
    path, summary = small_backbone
    saved = torch.load(path, weights_only=True)
    assert not any(k.startswith("head.") for k in saved) and "cls_token" in saved and "blocks.3.mlp.fc2.weight" in saved
    assert summary["images"] == [0, 2000] and 0 < summary["upstream_test_accuracy"] <= 1
    again = pretrain(tmp_path / "again.pt", epochs=1, images=2000, verbose=False, test_images=500)
    other = torch.load(tmp_path / "again.pt", weights_only=True)
    assert all(torch.equal(saved[k], other[k]) for k in saved) and again["upstream_test_accuracy"] == \
        summary["upstream_test_accuracy"]


def test_the_checkpoint_is_loaded_into_everything_but_the_head(small_backbone):
    saved = torch.load(small_backbone[0], weights_only=True)
    model = runner.build_model(pt_config(checkpoint=str(small_backbone[0])), 10, (784,))
    state = model.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    fresh = runner.build_model(pt_config(checkpoint=None), 10, (784,))
    assert not torch.equal(fresh.model.cls_token, model.model.cls_token)


def test_the_train_range_takes_those_training_images_only():
    cfg = config.parse({"benchmark": {"train_range": [30000, 30600]}})
    bench = runner.build_benchmark(cfg)
    assert sum(len(e.dataset) for e in bench.train_stream) == 600 and len(bench.test_stream[0].dataset) > 0
    from streamcl.datasets import fashion_mnist
    train, _ = fashion_mnist()
    assert torch.equal(bench.train_stream.joined().dataset.y.sort().values, train.y[30000:30600].sort().values)


def test_inputs_are_fitted_to_the_model(tmp_path):
    model = timm_model("vit_tiny_patch16_224", 4, (784,), args={"depth": 1})  # 3x224x224 from flat 1x28x28
    assert isinstance(model, FitInput) and model.channels == 3 and model.size == (224, 224)
    seen = []
    model.model.patch_embed.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    assert model(torch.randn(2, 784)).shape == (2, 4) and seen == [(2, 3, 224, 224)]
    same = timm_model("vit_tiny_patch16_224", 4, (3, 224, 224), args={"depth": 1})
    assert not isinstance(same, FitInput)  # nothing to fit
    assert model.get_classifier() is model.model.head


def test_a_local_weights_file_is_read_with_pretrained_as_a_path(tmp_path):
    source = timm_model("vit_tiny_patch16_224", 1000, (3, 224, 224), args={"depth": 1})
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = timm_model("vit_tiny_patch16_224", 4, (3, 224, 224), pretrained=str(tmp_path / "weights.pth"),
                       args={"depth": 1})
    assert torch.equal(model.pos_embed, source.pos_embed) and model.head.out_features == 4
    with pytest.raises(ConfigError, match="no such weights file"):
        timm_model("vit_tiny_patch16_224", 4, (784,), pretrained=str(tmp_path / "absent.pth"))


def test_weights_that_cannot_be_downloaded_say_how_to_give_a_local_file(monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r'pretrained = "/path/to/model.safetensors"'):
        timm_model("vit_tiny_patch16_224", 10, (784,), pretrained=True)


def test_unknown_models_and_misplaced_keys_are_refused():
    with pytest.raises(ConfigError, match="timm has no model 'vit_enormous_patch1'"):
        timm_model("vit_enormous_patch1", 10, (784,))
    with pytest.raises(ConfigError, match="model.args do not fit"):
        timm_model("resnet18", 10, (784,), args={"no_such_argument": 3})
    with pytest.raises(ConfigError, match="'model.name' = 'vit'"):
        config.parse({"model": {"name": "vit"}})
    with pytest.raises(ConfigError, match="are for timm models"):
        config.parse({"model": {"name": "mlp", "pretrained": True}})
    with pytest.raises(ConfigError, match="train_range"):
        config.parse({"benchmark": {"train_range": [5, 5]}})
    with pytest.raises(ConfigError, match="has 60000 training images"):
        runner.build_benchmark(config.parse({"benchmark": {"train_range": [0, 60001]}}))


def test_a_missing_pt_sfm_5_backbone_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMCL_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="python benchmarks/pretrain.py"):
        runner.build_model(pt_config(), 10, (784,))


def test_a_corrupt_or_crafted_checkpoint_is_refused(small_backbone, tmp_path):
    model = timm_model("vit_tiny_patch16_224", 10, (784,), args=PT_SFM_5_ARGS)
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_backbone(model, str(tmp_path / "junk.pt"))

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))
    (tmp_path / "crafted.pt").write_bytes(pickle.dumps({"cls_token": Payload()}))
    with pytest.raises(ConfigError, match="cannot be read"):
        load_backbone(model, str(tmp_path / "crafted.pt"))
    saved = torch.load(small_backbone[0], weights_only=True)
    torch.save({k: v for k, v in saved.items() if k != "pos_embed"}, tmp_path / "part.pt")
    with pytest.raises(ConfigError, match="missing: pos_embed"):
        load_backbone(model, str(tmp_path / "part.pt"))
    torch.save({**saved, "cls_token": torch.zeros(1, 1, 32)}, tmp_path / "shape.pt")
    with pytest.raises(ConfigError, match="other shapes: cls_token"):
        load_backbone(model, str(tmp_path / "shape.pt"))


PRE_TRAINED_METHODS = {"slca": ["slow_learner", "current_classes", "classifier_alignment"], "l2p": ["l2p"], "dualprompt": ["dual_prompt"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_224"])
@pytest.mark.parametrize("method", list(PRE_TRAINED_METHODS))
def test_every_pre_trained_model_method_trains_and_evaluates_on_the_real_architecture(name, method):
    """Randomly initialised timm ViTs as users run them (224 x 224 x 3 inputs), a training step per experience."""
    from streamcl import Strategy
    from streamcl.methods import build_method

    torch.manual_seed(0)
    model = timm_model(name, 4, (3, 224, 224))
    plugins, _ = build_method(method, **({"samples": 4, "epochs": 1} if method == "slca" else {}))
    assert sorted(type(p).__module__.rsplit(".", 1)[-1] for p in plugins) == sorted(PRE_TRAINED_METHODS[method])
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), plugins=plugins, epochs=1,
                        batch_size=4, eval_batch_size=4)
    bench = rgb_benchmark()
    for exp in bench.train_stream:
        strategy.train(exp)
        result = strategy.eval(bench.test_stream)
    assert len(strategy.trained) == 2 and len(result["accuracy"]) == 2
    assert all(0 <= a <= 1 for a in result["accuracy"]) and strategy.predict(torch.zeros(2, 3, 224, 224)).shape == (2, 4)


@pytest.mark.slow
def test_the_short_form_of_pt_sfm_5(small_backbone):
    """PT-SFM-5 on the small backbone, 2,000 downstream images, one epoch, 2,000 test images: the slow learner keeps
    what sequential fine-tuning forgets, and classifier alignment adds to it (the full protocol: docs/results.md)."""
    from streamcl.datasets import fashion_mnist
    from streamcl.scenarios import TensorData, class_incremental

    train, test = fashion_mnist()
    part = config.PROTOCOLS["PT-SFM-5"]
    final = {}
    for method in ("seq_ft", "slow_learner", "slca"):
        bench = class_incremental(TensorData(train.x[30000:32000], train.y[30000:32000]),
                                  TensorData(test.x[:2000], test.y[:2000]), 5)
        cfg = config.parse({**part, "model": {**part["model"], "checkpoint": str(small_backbone[0])},
                            "train": {"epochs": 1}, "method": {"name": method},
                            "log": {"tensorboard": False, "console": False}})
        final[method] = runner.run(cfg, benchmark=bench)["final_accuracy"]
    # on the whole test set: 0.096, 0.192, 0.285; the full protocol on the real backbone: 0.150, 0.718, 0.833
    assert final["slow_learner"] >= final["seq_ft"] + 0.05 and final["slca"] >= final["slow_learner"] + 0.05, final
