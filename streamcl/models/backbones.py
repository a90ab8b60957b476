"""Backbones from timm by name, inputs fitted to them, and weights a user pre-trained (``[model]`` in a config).

``timm:<name>`` builds ``timm.create_model(name, num_classes=..., **args)`` (``pip install streamcl[pretrained]``);
``pretrained = true`` downloads its weights, ``pretrained = "file"`` reads them from a local file. ``checkpoint``
loads the weights of a backbone pre-trained elsewhere into any model the config builds (its head excluded);
the name ``"pt-sfm-5"`` is the PT-SFM-5 protocol's backbone, built once by ``benchmarks/pretrain.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from streamcl.errors import ConfigError
from streamcl.parts import find_head

PT_SFM_5 = "pt-sfm-5"
# the PT-SFM-5 protocol's vision transformer (docs/protocols.md): timm's VisionTransformer with these arguments
PT_SFM_5_ARGS = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 4, "num_heads": 4,
                 "mlp_ratio": 4.0}


def cache_dir() -> Path:
    """Where built backbones are kept: ``$STREAMCL_CACHE``, else ``~/.cache/streamcl``."""
    return Path(os.environ.get("STREAMCL_CACHE") or Path.home() / ".cache" / "streamcl")


def checkpoint_file(name: str) -> Path:
    """The file a ``[model] checkpoint`` value names: the cached PT-SFM-5 backbone for ``"pt-sfm-5"``, else a path."""
    return cache_dir() / "pt-sfm-5-vit.pt" if name == PT_SFM_5 else Path(name).expanduser()


class FitInput(nn.Module):
    """``model(x)`` after ``x`` is made the images ``model`` takes: flat rows reshaped to ``shape``, one grey
    channel repeated to ``channels``, the side resized (bilinear) to ``size``. The classifier is ``model``'s."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...], channels: int, size: tuple[int, int]):
        super().__init__()
        self.model, self.shape, self.channels, self.size = model, tuple(shape), channels, tuple(size)

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], *self.shape)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x[:, :self.channels]
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.model(x)


def image_shape(sample_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) of a benchmark's samples: flat square grey rows (784 -> 1x28x28) or images."""
    if len(sample_shape) == 3:
        return tuple(sample_shape)
    if len(sample_shape) == 2:
        return (1, *sample_shape)
    side = int(round(sample_shape[0] ** 0.5)) if len(sample_shape) == 1 else 0
    if side * side != (sample_shape[0] if len(sample_shape) == 1 else -1):
        raise ConfigError(f"a timm model takes images; samples of shape {sample_shape} are not square grey images")
    return (1, side, side)


def timm_model(name: str, n_classes: int, sample_shape: tuple[int, ...], *, pretrained: bool | str = False,
               args: dict | None = None) -> nn.Module:
    """``timm.create_model(name, ...)`` wrapped in :class:`FitInput` where the benchmark's samples differ from
    the images it takes. ``pretrained``: ``True`` downloads the weights, a path reads them from that file."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model.name = 'timm:{name}' needs timm: pip install 'streamcl[pretrained]'") from None
    if name not in timm.list_models() and name not in timm.list_pretrained():
        close = timm.list_models(f"{name.split('_')[0]}*")[:8]
        raise ConfigError(f"timm has no model '{name}'" + (f"; models of that family: {', '.join(close)}" if close else ""))
    options = dict(args or {})
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.pretrained = {pretrained!r}: no such weights file")
        options["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        model = timm.create_model(name, pretrained=bool(pretrained), num_classes=n_classes, **options)
    except TypeError as err:
        raise ConfigError(f"model.args do not fit timm's '{name}': {err}") from None
    except (OSError, RuntimeError) as err:  # no network (huggingface_hub's errors are OSErrors), or a bad file
        if pretrained is True:
            raise ConfigError(f"the pre-trained weights of timm's '{name}' cannot be downloaded here ({type(err).__name__}); "
                              "download them where you can (e.g. model.safetensors from huggingface.co/timm/...) and "
                              "give the file: [model] pretrained = \"/path/to/model.safetensors\"") from None
        raise ConfigError(f"timm's '{name}' cannot be built from model.pretrained = {pretrained!r}: {err}") from None
    patch = getattr(model, "patch_embed", None)
    if patch is not None and getattr(patch, "img_size", None) is not None:  # what the built model takes (args included)
        channels, size = patch.proj.in_channels, tuple(patch.img_size)
    else:
        from timm.data import resolve_model_data_config
        channels, *size = resolve_model_data_config(model)["input_size"]
    shape = image_shape(sample_shape)
    if tuple(sample_shape) == (channels, *size):
        return model
    return FitInput(model, shape, channels, tuple(size))


def load_backbone(model: nn.Module, name: str) -> None:
    """Load the weights in the file ``name`` (or the PT-SFM-5 backbone) into ``model``, all but its head's.

    The file holds a state dict (``torch.save``; a dict with a ``"state_dict"`` entry too) whose keys are those of
    the model, or of the model that :class:`FitInput` wraps. Every parameter outside the head must be there."""
    path = checkpoint_file(name)
    if not path.is_file():
        how = ("build it once with `python benchmarks/pretrain.py` (about ten minutes on a CPU)" if name == PT_SFM_5
               else "give the path of a file written by torch.save(model.state_dict())")
        raise ConfigError(f"model.checkpoint = {name!r}: there is no file at {path}; {how}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a file that is not its own
        raise ConfigError(f"model.checkpoint {path} cannot be read as a torch state dict: {str(err)[:200]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ConfigError(f"model.checkpoint {path} does not hold a state dict (names to tensors)")
    target = model.model if isinstance(model, FitInput) else model
    head = find_head(target)
    inside = (lambda k: head is not None and (k == head or k.startswith(head + "."))) if head else (lambda k: False)
    own = target.state_dict()
    state = {k: v for k, v in state.items() if not inside(k)}
    missing = sorted(k for k in own if not inside(k) and k not in state)
    unknown = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unknown or wrong:
        raise ConfigError(f"model.checkpoint {path} does not fit the model: "
                          + "; ".join(f"{what}: {', '.join(keys[:5])}" for what, keys in
                                      (("missing", missing), ("not in the model", unknown),
                                       ("other shapes", wrong)) if keys))
    target.load_state_dict(state, strict=False)
