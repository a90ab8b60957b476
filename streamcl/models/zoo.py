"""Models by name. Every model is a factory registered under the ``streamcl.models`` entry-point group (built-in
and third-party alike) with one signature::

    factory(n_classes: int, sample_shape: tuple, *, growing: bool = False, **model_args) -> nn.Module

``model_args`` are the factory's own keyword arguments (``[model] args`` in a config), checked by name.
``timm:<name>`` is any timm model (:func:`streamcl.models.backbones.timm_model`).
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from streamcl.errors import ConfigError
from streamcl.models.nets import MLP, SmallCNN
from streamcl.models.resnets import image_input

TIMM = "timm:"
FIXED = ("n_classes", "sample_shape", "growing")  # given by the benchmark and model.growing, not by model.args


def mlp(n_classes: int, sample_shape: Sequence[int], *, growing: bool = False, hidden: Sequence[int] = (256, 256),
        dropout: float = 0.0) -> MLP:
    """:class:`MLP` on the flattened samples (``hidden``: the layer widths)."""
    return MLP(math.prod(sample_shape), list(hidden), n_classes, growing=growing, dropout=dropout)


def cnn(n_classes: int, sample_shape: Sequence[int], *, growing: bool = False) -> SmallCNN:
    """:class:`SmallCNN` on square images (flat 784-value rows: 1x28x28)."""
    channels, side = image_input(sample_shape, "cnn")
    return SmallCNN(channels, n_classes, image_size=side or int(sample_shape[-1]), growing=growing)


def names() -> list[str]:
    """The registered model names, and ``timm:<name>``."""
    from streamcl.registry import available_models

    return [*available_models(), f"{TIMM}<name>"]


def factory(name: str):
    """The registered factory of ``name``; :class:`ConfigError` listing the known names if there is none."""
    from streamcl.registry import available_models

    models = available_models()
    if name not in models:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(names())}")
    return models[name].load()


def check_args(name: str, args: dict, what: str = "model") -> None:
    """Refuse, naming them, arguments the model ``name`` does not take (timm's are checked when it is built)."""
    if name.startswith(TIMM):
        return
    from streamcl.registry import check_arguments

    check_arguments(factory(name), args, f"{what} '{name}'", fixed=FIXED)


def build(name: str, n_classes: int, sample_shape: Sequence[int], *, growing: bool = False,
          pretrained: bool | str = False, **model_args) -> nn.Module:
    """The model registered as ``name`` (or timm's, for ``timm:<name>``) for ``n_classes`` classes and samples of
    ``sample_shape``, e.g. ``build("resnet32", n_classes=100, sample_shape=(3, 32, 32))``. ``pretrained`` is for
    timm models (``True``: download the weights; a path: read them from that file)."""
    if name.startswith(TIMM) and len(name) > len(TIMM):
        from streamcl.models.backbones import timm_model

        return timm_model(name[len(TIMM):], n_classes, tuple(sample_shape), pretrained=pretrained, args=model_args)
    if pretrained is not False:
        raise ConfigError(f"pretrained weights are for timm models (timm:<name>), not {name!r}")
    check_args(name, model_args)
    return factory(name)(n_classes, tuple(sample_shape), growing=growing, **model_args)
