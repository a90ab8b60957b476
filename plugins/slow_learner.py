"""SLCA's slow learner: the representation trains at a much smaller learning rate than the classifier head."""
from __future__ import annotations

import math

from torch import nn

from streamcl import Plugin, hookimpl
from streamcl.errors import ConfigError


class SlowLearner(Plugin):
    """Slow learner (Zhang et al. 2023, "SLCA: Slow Learner with Classifier Alignment for Continual Learning
    on a Pre-trained Model", ICCV, Sec. 4.1): every parameter of the model outside its classifier head trains
    at ``backbone_lr`` and the head (``strategy.head``, found on any model) at ``head_lr``; paper and authors'
    code: 1e-4 and 1e-2 with SGD. Given as ``param_groups``, so the rates hold for the engine's optimizer
    whatever else the plugin list does, and follow the head when a plugin grows or replaces it; the other
    settings (momentum, weight decay) stay those of the user's optimizer. ``backbone_lr=0`` freezes the
    representation (``requires_grad`` off: no gradient is computed for it), the linear probe of
    ``joint_linear``. Parameters the user's optimizer leaves out stay out. A plugin listed after it that gives some
    parameters groups of its own (CWR's frozen layers, Piggyback's mask scores) sets those parameters' rates."""

    requires = frozenset({"head"})

    def __init__(self, backbone_lr: float = 1e-4, head_lr: float = 1e-2):
        for name, value in (("backbone_lr", backbone_lr), ("head_lr", head_lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"SlowLearner({name}={value!r}): a learning rate is a finite number >= 0")
        if head_lr == 0:
            raise ConfigError("SlowLearner(head_lr=0): the classifier head must learn; give head_lr > 0")
        self.backbone_lr, self.head_lr = float(backbone_lr), float(head_lr)

    def _split(self, strategy, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        head = {id(p) for p in strategy.head.parameters()}
        params = list(model.parameters())
        return [p for p in params if id(p) not in head], [p for p in params if id(p) in head]

    @hookimpl
    def adapt_model(self, strategy, model: nn.Module) -> nn.Module:
        if self.backbone_lr == 0:
            for p in self._split(strategy, model)[0]:
                p.requires_grad_(False)
        return model

    @hookimpl
    def param_groups(self, strategy, model: nn.Module) -> list[dict] | None:
        backbone, head = self._split(strategy, model)
        return [g for g in ({"params": backbone, "lr": self.backbone_lr}, {"params": head, "lr": self.head_lr})
                if g["params"]]
