"""LUCIR's cosine-normalised classifier: a learnable scale times the cosine of features and class weights."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from streamcl import Plugin, hookimpl
from streamcl.errors import ConfigError
from streamcl.models.heads import IncrementalLinear
from streamcl.plugins.nme import class_means
from streamcl.scenarios import as_batch


class CosineLinear(nn.Module):
    """``scale * <w_bar_c, f_bar>`` for every class ``c``: the cosine of the input ``f`` and the weight row
    ``w_c`` (both L2-normalised), times one scalar ``scale`` (learned, or a fixed buffer). No bias. The
    outputs lie in ``[-|scale|, |scale|]``; :meth:`cosine` gives the scores before the scale. ``scale`` has
    shape (1,)."""

    def __init__(self, weight: Tensor, scale: float = 1.0, learn_scale: bool = True):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        # shape (1,), not a 0-d tensor: code that walks parameters by rows (SI's and MAS's accumulate) takes it
        value = torch.full((1,), float(scale), dtype=weight.dtype, device=weight.device)
        if learn_scale:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def cosine(self, x: Tensor) -> Tensor:
        """``<w_bar_c, f_bar>``, shape (N, out_features), in [-1, 1]."""
        return F.linear(F.normalize(x.flatten(1), dim=1), F.normalize(self.weight, dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.cosine(x)

    def extra_repr(self) -> str:
        learned = "learned" if isinstance(self.scale, nn.Parameter) else "fixed"
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={learned}"


class CosineHead(Plugin):
    """Cosine normalisation and weight imprinting (Hou et al. 2019, "Learning a Unified Classifier
    Incrementally via Rebalancing" (LUCIR), CVPR, cosine normalisation, eq. 4).

    At the first experience ``adapt_model`` replaces ``model.head`` (an ``nn.Linear`` or a growing
    :class:`~streamcl.models.IncrementalLinear`, e.g. the MLP's 256 -> 10) by a :class:`CosineLinear`
    with the same weight rows and no bias: the logits become ``eta * <w_bar_c, f_bar(x)>`` (eq. 4), with
    ``eta`` one learnable scalar starting at ``scale`` (1, as in the authors' code; ``learn_scale=False``
    keeps it fixed). Every row of the head stays (the protocol's head has all 10 outputs from the start);
    a growing head keeps growing, its new rows drawn from ``strategy.generator`` as ``nn.Linear`` draws them.

    Imprinting (``imprint=True``; LUCIR's initialisation of new-class weights, after Qi et al. 2018,
    "Low-Shot Learning with Imprinted Weights"): at ``before_training_exp`` of every experience after the
    first, the row of each class of the experience not seen before is set to the normalised mean of the
    normalised features of its training samples (``model(x, return_features=True)``, eval mode), times
    the mean norm of the rows of the classes seen before (as the authors' code does; the norm sets how
    fast SGD turns the row).
    The momentum of those rows is cleared, so the first step starts from the imprinted direction.

    ``drop_last_relu=True`` turns a final ``nn.ReLU`` of an ``nn.Sequential`` ``model.backbone`` (the
    MLP's) into ``nn.Identity``, as LUCIR removes the last ReLU of its ResNet so that features, and so
    the cosines, can be negative (the authors' code; the features other plugins see change with it).

    Defaults are the paper's; on SFM-5 (Replay-500 + the three LUCIR parts, seed 0) neither choice
    matters much: 0.796 as is, 0.795 keeping the ReLU, 0.797 without imprinting.

    It owns the roles ``classifier_head`` (it replaces the head: one plugin per strategy may) and
    ``architecture`` (plugins that rebuild or cut the model's own layers, and read its head as a plain
    linear layer: progress & compress, hypernetwork, latent replay, cannot run beside it). Beside
    :class:`~streamcl.plugins.nme.NMEClassifier` (role ``classifier``) it trains the features and the
    nearest-mean rule predicts at evaluation.
    """

    owns = frozenset({"classifier_head", "architecture"})

    def __init__(self, scale: float = 1.0, learn_scale: bool = True, imprint: bool = True,
                 drop_last_relu: bool = True):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"cosine_head scale={scale!r}: the initial scale eta, a finite number > 0")
        for name, value in (("learn_scale", learn_scale), ("imprint", imprint), ("drop_last_relu", drop_last_relu)):
            if not isinstance(value, bool):
                raise ConfigError(f"cosine_head {name}={value!r}: use true or false")
        self.scale, self.learn_scale = float(scale), learn_scale
        self.imprint, self.drop_last_relu = imprint, drop_last_relu
        self.classes: list[int] = []  # classes of the experiences trained so far, in order of arrival
        self.growing = False  # the head it replaced grew with the classes, so this one grows too

    # ------------------------------------------------------------------------------ the head
    @hookimpl
    def adapt_model(self, strategy, model: nn.Module, experience) -> nn.Module:
        head = getattr(model, "head", None)
        if isinstance(head, CosineLinear):
            if self.growing:
                self._grow(strategy, head, experience)
            return model
        if not isinstance(head, (nn.Linear, IncrementalLinear)):
            raise ConfigError(f"cosine_head replaces a linear head: {type(model).__name__} has "
                              f"{'no .head' if head is None else 'a ' + type(head).__name__ + ' .head'}; use a "
                              "streamcl.models.Classifier (mlp or cnn) and list cosine_head before plugins that "
                              "replace the model")
        self.growing = isinstance(head, IncrementalLinear)
        model.head = CosineLinear(head.weight, self.scale, self.learn_scale)
        backbone = getattr(model, "backbone", None)
        if self.drop_last_relu and isinstance(backbone, nn.Sequential) and isinstance(backbone[-1], nn.ReLU):
            backbone[-1] = nn.Identity()
        return model

    @staticmethod
    @torch.no_grad()
    def _grow(strategy, head: CosineLinear, experience) -> None:
        seen = max([*experience.classes, *(c for e in strategy.trained for c in e.classes), -1]) + 1
        old = head.out_features
        if seen <= old:
            return
        bound = 1 / math.sqrt(head.in_features)  # nn.Linear's default initialisation
        rows = (torch.rand(seen - old, head.in_features, generator=strategy.generator) * 2 - 1) * bound
        head.weight = nn.Parameter(torch.cat([head.weight, rows.to(head.weight)]))

    # ------------------------------------------------------------------------------ imprinting
    @hookimpl
    def before_training_exp(self, strategy) -> None:
        exp = strategy.experience
        new = [c for c in exp.classes if c not in self.classes]
        if not (self.imprint and self.classes and new):
            return
        head = getattr(strategy.model, "head", None)
        if not isinstance(head, CosineLinear):
            raise ConfigError("cosine_head: strategy.model.head is no longer its cosine head; another plugin "
                              "replaced it, and a strategy takes one plugin per head")
        data = as_batch(exp.dataset, strategy.device)
        keep = torch.isin(data.y, torch.tensor(new, device=data.y.device))
        classes, means = class_means(strategy.model, data.select(keep))
        self.imprint_rows(head, classes, means, self.classes)
        state = strategy.optimizer.state.get(head.weight, {})
        buffer = state.get("momentum_buffer")
        if buffer is not None:  # stale momentum of the rows' earlier (untrained) life would turn them at once
            buffer[classes.to(buffer.device)] = 0

    @staticmethod
    @torch.no_grad()
    def imprint_rows(head: CosineLinear, classes: Tensor, means: Tensor, old: list[int]) -> None:
        """Rows ``classes`` of ``head`` := the unit directions ``means`` times the mean norm of the rows ``old``."""
        w = head.weight
        old_rows = torch.tensor([c for c in old if c < w.shape[0]], dtype=torch.long, device=w.device)
        norm = w[old_rows].norm(dim=1).mean() if len(old_rows) else w.norm(dim=1).mean()
        keep = classes < w.shape[0]
        w[classes[keep].to(w.device)] = (F.normalize(means[keep], dim=1) * norm).to(w)

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        self.classes += [c for c in strategy.experience.classes if c not in self.classes]

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"classes": list(self.classes), "growing": self.growing}

    def load_state_dict(self, state: dict) -> None:
        self.classes, self.growing = list(state["classes"]), bool(state["growing"])
