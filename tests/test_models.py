import torch

from streamcl.models import MLP, IncrementalLinear, SmallCNN, grow_heads
from streamcl.optim import ParamGroups


def test_incremental_linear_grows_keeping_old_rows():
    head = IncrementalLinear(5, 2)
    w, b = head.weight.detach().clone(), head.bias.detach().clone()
    assert head.grow_to(4) and not head.grow_to(3)
    assert head.weight.shape == (4, 5) and torch.equal(head.weight[:2], w) and torch.equal(head.bias[:2], b)
    x = torch.randn(3, 5)
    assert torch.allclose(head(x), x @ head.weight.T + head.bias)


def test_models_shapes_and_features():
    x = torch.randn(6, 784)
    mlp = MLP()
    logits, feats = mlp(x), mlp.backbone(x)
    assert logits.shape == (6, 10) and feats.shape == (6, 256) and torch.equal(mlp.head(feats), logits)
    assert SmallCNN()(x).shape == (6, 10)
    assert SmallCNN()(x.reshape(6, 1, 28, 28)).shape == (6, 10)
    m = MLP(784, [32], growing=True)
    assert m(x).shape == (6, 0) and grow_heads(m, 3) and m(x).shape == (6, 3)


def test_sync_optimizer_keeps_momentum_of_surviving_parameters():
    m = MLP(4, [3], 2, growing=True)
    grow_heads(m, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    kept = m.backbone[1].weight
    buf = opt.state[kept]["momentum_buffer"].clone()
    groups = ParamGroups(opt, m)
    assert not groups.sync(opt, m)  # nothing changed
    grow_heads(m, 3)
    assert groups.sync(opt, m)
    assert torch.equal(opt.state[kept]["momentum_buffer"], buf)
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in m.parameters()}
    assert opt.param_groups[0]["lr"] == 0.5 and m.head.weight not in opt.state


# ------------------------------------------------------------------------------ the ResNets and the registry
import pytest  # noqa: E402
from torch import nn  # noqa: E402

from streamcl import config, registry, runner  # noqa: E402
from streamcl.errors import ConfigError  # noqa: E402
from streamcl.models import build  # noqa: E402
from streamcl.models.resnets import ZeroPadShortcut  # noqa: E402


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,shape,features,params", [
    ("resnet32", (3, 32, 32), 64, 464_154),             # He et al. 2016, Table 6: 0.46M
    ("resnet18", (3, 64, 64), 512, 11_181_642),         # torchvision's resnet18 with a 10-way fc
    ("resnet18_cifar", (3, 32, 32), 512, 11_173_962),   # 3x3 stem: 64 * 3 * (49 - 9) fewer
    ("slim_resnet18", (3, 32, 32), 160, 1_094_750),     # GEM's nf = 20
])
def test_resnets_shapes_features_and_parameter_counts(name, shape, features, params):
    torch.manual_seed(0)
    model = build(name, n_classes=10, sample_shape=shape)
    assert n_params(model) == params and model.feature_dim == features
    assert isinstance(model.head, nn.Linear) and model.head.in_features == features
    x = torch.randn(3, *shape)
    model.eval()
    feats, logits = model.backbone(x), model(x)
    assert feats.shape == (3, features) and logits.shape == (3, 10) and torch.equal(model.head(feats), logits)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    grown = build(name, 10, shape, growing=True)
    assert grown(x).shape == (3, 0) and grow_heads(grown, 5) and grown(x).shape == (3, 5)


def test_resnet32_is_6n_plus_2_layers_with_option_a_shortcuts():
    model = build("resnet32", 100, (3, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 32 and all(c.kernel_size == (3, 3) for c in convs)  # 31 convolutions and the head
    assert [c.out_channels for c in convs] == [16] * 11 + [32] * 10 + [64] * 10
    pads = [m for m in model.modules() if isinstance(m, ZeroPadShortcut)]
    assert [(p.extra, p.stride) for p in pads] == [(16, 2), (32, 2)]
    x = torch.arange(2 * 4 * 4, dtype=torch.float).reshape(1, 2, 4, 4)
    assert torch.equal(pads[0](x), torch.cat([x[:, :, ::2, ::2], torch.zeros(1, 16, 2, 2)], 1))
    projected = build("resnet32", 10, (3, 32, 32), shortcut="B")  # FACIL's form: 1x1 projections
    assert n_params(projected) == 464_154 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert build("resnet32", 10, (3, 32, 32), width=4).feature_dim == 16
    assert model.head.out_features == 100


def test_the_two_resnet18_stems():
    imagenet, cifar = build("resnet18", 10, (3, 32, 32)), build("resnet18_cifar", 10, (3, 32, 32))
    conv = imagenet.backbone.conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (2, 2), (3, 3))
    assert isinstance(imagenet.backbone.maxpool, nn.MaxPool2d) and imagenet.backbone.maxpool.stride == 2
    conv = cifar.backbone.conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in cifar.modules())
    # the feature map before pooling: 32 -> 1 (ImageNet form) and 32 -> 4 (CIFAR form)
    x = torch.randn(2, 3, 32, 32)
    assert imagenet.backbone[:-2](x).shape == (2, 512, 1, 1) and cifar.backbone[:-2](x).shape == (2, 512, 4, 4)
    slim = build("slim_resnet18", 10, (3, 32, 32))
    assert [m.out_channels for m in slim.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)] == \
        [40, 80, 160]  # projection shortcuts where a stage starts (GEM's BasicBlock)


def test_flat_and_grey_samples_are_reshaped_and_channels_follow_the_samples():
    torch.manual_seed(0)
    for name in ("resnet32", "resnet18", "resnet18_cifar", "slim_resnet18"):
        flat = build(name, 4, (784,))
        assert flat.backbone.to_image.shape == (1, 28, 28) and flat.backbone.conv1.in_channels == 1
        assert flat(torch.randn(2, 784)).shape == (2, 4) and flat(torch.randn(2, 1, 28, 28)).shape == (2, 4)
        assert build(name, 4, (3 * 32 * 32,)).backbone.to_image.shape == (3, 32, 32)
        grey = build(name, 4, (1, 28, 28))
        assert not hasattr(grey.backbone, "to_image") and grey.backbone.conv1.in_channels == 1
    with pytest.raises(ConfigError, match=r"model 'resnet32' takes images; samples of shape \(10,\)"):
        build("resnet32", 4, (10,))


def test_registry_lists_every_model_and_build_refuses_what_it_does_not_know():
    models = registry.available_models()
    assert set(models) >= {"mlp", "cnn", "resnet32", "resnet18", "resnet18_cifar", "slim_resnet18"}
    assert all(info.builtin for info in models.values() if info.target.startswith("streamcl."))
    assert models["resnet32"].load()(100, (3, 32, 32)).head.out_features == 100
    with pytest.raises(ConfigError, match=r"unknown model 'resnet33'; known models: cnn, mlp, .*timm:<name>"):
        build("resnet33", 10, (3, 32, 32))
    with pytest.raises(ConfigError, match=r"model 'resnet32' has no argument 'widht'; it takes: width, shortcut"):
        build("resnet32", 10, (3, 32, 32), widht=8)
    with pytest.raises(ConfigError, match="pretrained weights are for timm models"):
        build("resnet32", 10, (3, 32, 32), pretrained=True)
    for bad in ({"width": 0}, {"shortcut": "C"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build("resnet32", 10, (3, 32, 32), **bad)


def test_config_names_every_registered_model_and_checks_its_args():
    cfg = config.parse({"model": {"name": "resnet32", "args": {"width": 4}}})
    model = runner.build_model(cfg, 10, (784,))
    assert model.feature_dim == 16 and model.backbone.conv1.in_channels == 1
    assert isinstance(runner.build_model(config.parse({"model": {"name": "mlp", "args": {"dropout": 0.5}}}), 10,
                                         (784,)).backbone[3], nn.Dropout)
    with pytest.raises(ConfigError, match=r"'model.name' = 'resnet33' is not one of: cnn, mlp, resnet18, "
                                          r"resnet18_cifar, resnet32, slim_resnet18.*timm:<name>"):
        config.parse({"model": {"name": "resnet33"}})
    with pytest.raises(ConfigError, match=r"'model.args': model 'resnet32' has no argument 'widht'; "
                                          "it takes: width, shortcut"):
        config.parse({"model": {"name": "resnet32", "args": {"widht": 4}}})
    with pytest.raises(ConfigError, match=r"has no argument 'n_classes'; it takes: hidden, dropout"):
        config.parse({"model": {"name": "mlp", "args": {"n_classes": 4}}})
    with pytest.raises(ConfigError, match=r"'model.hidden', not 'model.args.hidden'"):
        config.parse({"model": {"name": "mlp", "args": {"hidden": [4]}}})


def test_mlp_and_cnn_from_the_registry_are_the_models_of_old_bit_for_bit():
    for name, old in (("mlp", lambda: MLP(784, [256, 256], 10)), ("cnn", lambda: SmallCNN(1, 10))):
        torch.manual_seed(0)
        new = runner.build_model(config.parse({"model": {"name": name}}), 10, (784,))
        torch.manual_seed(0)
        ref = old()
        assert [(k, v.shape) for k, v in new.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
        assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), ref.state_dict().values()))


def test_cli_lists_models_and_benchmarks_as_it_lists_plugins(capsys):
    from streamcl import cli

    assert cli.main(["models"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {*registry.available_models(), "timm:<name>"}
    assert "built-in" in rows["resnet32"] and "streamcl.models.resnets:resnet32" in rows["resnet32"]
    assert cli.main(["benchmarks"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["benchmark", "from", "object"]
    assert {line.split()[0] for line in out[2:]} == set(registry.available_benchmarks())
