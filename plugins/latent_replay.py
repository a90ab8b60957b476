"""Latent replay: a memory of activations at an inner layer, replayed into the layers above it."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from streamcl import Batch, Plugin, hookimpl
from streamcl.errors import ConfigError
from streamcl.memory import Budget, Codec, Memory, balanced, random_pick
from streamcl.scenarios import as_batch


class LatentReplay(Plugin):
    """Latent replay (Pellegrini et al. 2020, "Latent Replay for Real-Time Continual Learning", Sec. III, Alg. 1).

    The model's ``backbone`` (an ``nn.Sequential``) is cut at index ``layer``: ``lower = backbone[:layer]``
    and ``upper = backbone[layer:]`` followed by ``head``. The memory stores the activations
    ``z = lower(x)`` (latents), not the inputs. From the second experience on, each training step adds

        L_latent = CE(head(upper(z_mem)), y_mem)

    over ``batch_size`` latents drawn uniformly from memory (default: the strategy's batch size),
    logged as ``loss/latent_replay``. Inputs and latents are per-sample through ``upper`` (no batch
    normalisation in the MLP), so this equals the paper's minibatch of new patterns concatenated with
    replayed latents at the latent layer, up to weighting: with ``n`` new and ``m`` replayed samples
    the paper's loss is the joint mean ``(n L_new + m L_latent) / (n + m)``, here it is
    ``L_new + L_latent``; with ``m = n`` (default) that is twice the joint mean, the same gradient
    direction at twice the step (on SFM-5 the sum did better than the exact joint mean: 0.759 vs
    0.748). The latent logits are the head's raw output: no ``adapt_logits`` runs on them.

    The lower layers are what keeps the stored latents valid. With ``lower_lr=0`` (default, the paper's
    freezing of every layer below the latent replay layer) their parameters stop learning after the
    first experience: ``requires_grad`` is turned off in ``adapt_model`` (before the engine wraps the
    model in DDP, so DDP never waits for their gradients, and backward skips them), and they sit in an
    optimizer group with learning rate 0, so they stay fixed on every path, a resumed run included.
    With ``0 < lower_lr`` they keep learning at ``lower_lr`` times the optimizer's learning rate (the
    paper's "slow-down" of the layers below); the stored latents then go stale, as the paper notes,
    since they are never recomputed (on SFM-5, from scratch, factors 0.1 and 0.01 gave a final
    accuracy of 0.26 and 0.45 against 0.76 frozen).

    The memory holds ``memory`` latents in total (or as many as fit in ``memory_bytes``, at 4 bytes a
    float plus 16 for the two labels: 1040 bytes for the MLP's 256-float latents against 3152 for a
    784-pixel input) with their labels and task labels. After each experience it is split evenly over
    the classes seen (stored classes keep their earliest picks), new classes get a random pick of the
    experience's samples, and their latents are computed by ``lower`` in eval mode.

    ``layer=None`` cuts just before the backbone's last ``nn.Linear``: for the MLP 784-256-256-10
    (``[Flatten, Linear, ReLU, Linear, ReLU]``) that is index 3, after the first hidden layer's ReLU,
    so latents have 256 floats, and the second hidden layer and the head learn at full pace. Defaults:
    ``memory=500`` (the protocol's Replay-500 budget; the paper used 1500 latents on CORe50),
    ``batch_size`` the strategy's, frozen lower layers. SFM-5, seeds 0-2: 0.759 (500 latents), 0.771
    (2000), 0.768 (``memory_bytes`` of 500 inputs = 1515 latents); Replay-500 on inputs: 0.784.
    """

    # "architecture": it cuts and freezes the model's own backbone, which a plugin that replaces the model
    # (HyperNetwork) takes away
    owns = frozenset({"memory", "architecture"})

    def __init__(self, memory: int | None = 500, layer: int | None = None, batch_size: int | None = None,
                 memory_bytes: int | None = None, lower_lr: float = 0.0):
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 1):
            raise ConfigError(f"latent replay layer={layer!r}: give an index >= 1 into the model's backbone "
                              "(the latents are backbone[:layer](x)), or None for the default")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size <= 0):
            raise ConfigError(f"latent replay batch_size={batch_size!r}: it must be a positive whole number")
        if isinstance(lower_lr, bool) or not isinstance(lower_lr, (int, float)) or not 0 <= lower_lr < float("inf"):
            raise ConfigError(f"lower_lr={lower_lr!r}: a learning-rate factor >= 0 for the layers below "
                              "the latent layer (0 freezes them)")
        if memory_bytes is not None:
            if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0:
                raise ConfigError(f"memory budget memory_bytes={memory_bytes!r}: it must be a positive number of bytes")
            self.budget = None
        elif memory is None:
            raise ConfigError("latent replay needs a budget: memory= (a number of latents) or memory_bytes=")
        else:
            self.budget = Budget(total=memory)
        self.layer, self.batch_size, self.memory_bytes, self.lower_lr = layer, batch_size, memory_bytes, float(lower_lr)
        self.memory: Memory | None = None
        self.classes: list[int] = []  # in order of arrival
        self.experiences = 0

    @property
    def capacity(self) -> int | None:
        """How many latents the memory holds at most (known once the first latents arrive)."""
        return None if self.memory is None else self.memory.capacity

    # ------------------------------------------------------------------------------ the split
    def split(self, model: nn.Module) -> int:
        """The backbone index where ``model`` is cut (``layer``, or the default), checked."""
        backbone = getattr(model, "backbone", None)
        if not isinstance(backbone, nn.Sequential) or not isinstance(getattr(model, "head", None), nn.Module):
            raise ConfigError(f"latent replay needs a model with an nn.Sequential .backbone and a .head "
                              f"(streamcl.models.Classifier, e.g. MLP or SmallCNN); got {type(model).__name__}")
        if self.layer is None:
            linear = [i for i, m in enumerate(backbone) if isinstance(m, nn.Linear)]
            if not linear:
                raise ConfigError("latent replay: the backbone has no nn.Linear to cut before; give layer=")
            return linear[-1]
        if self.layer > len(backbone):
            raise ConfigError(f"latent replay layer={self.layer} is out of range: the backbone has "
                              f"{len(backbone)} modules, so layer goes from 1 to {len(backbone)}")
        return self.layer

    def lower(self, model: nn.Module) -> nn.Sequential:
        at = self.split(model)
        return model.backbone[:at]

    def upper(self, model: nn.Module, z: Tensor) -> Tensor:
        """The logits of latents ``z``: the backbone above the cut, then the head."""
        at = self.split(model)
        return model.head(model.backbone[at:](z))

    def _lower_params(self, model: nn.Module) -> list[nn.Parameter]:
        return list(self.lower(model).parameters())

    # ------------------------------------------------------------------------------ freezing
    @hookimpl
    def adapt_model(self, strategy, model: nn.Module) -> nn.Module:
        params = self._lower_params(model)  # checks the model on every experience
        if self.experiences and self.lower_lr == 0:
            for p in params:
                p.requires_grad_(False)
        return model

    @hookimpl
    def param_groups(self, strategy, model: nn.Module) -> list[dict] | None:
        params = self._lower_params(model)
        if not self.experiences or not params:
            return None
        return [{"params": params, "lr": self.lower_lr * strategy.optimizer.defaults["lr"]}]

    # ------------------------------------------------------------------------------ replay
    @hookimpl
    def loss_terms(self, strategy, batch: Batch, output) -> dict | None:
        if self.memory is None or len(self.memory) == 0:
            return None
        _, mem = self.memory.sample(self.batch_size or strategy.batch_size, strategy.generator)
        return {"latent_replay": strategy.criterion(self.upper(strategy.model, mem.x), mem.y)}

    # ------------------------------------------------------------------------------ memory update
    @hookimpl
    def after_training_exp(self, strategy) -> None:
        exp = strategy.experience
        new = as_batch(exp.dataset, strategy.device)
        y, t = new.y, new.t
        if self.memory is None:
            self._create(self._latents(strategy, new.x[:1]))
        self.classes += [c for c in exp.classes if c not in self.classes]
        self.experiences += 1
        quotas = self.budget.quotas(self.classes)
        self.memory.keep(balanced(self.memory.labels, {c: q for c, q in quotas.items() if c not in exp.classes}))
        picks = []
        for c in self.classes:
            if c in exp.classes:
                members = torch.nonzero(y == c).flatten()
                picks.append(members[random_pick(len(members), quotas[c], strategy.generator).to(members.device)])
        index = torch.cat(picks)
        self.memory.append(self._latents(strategy, new.x[index]), y[index], t[index])

    def _create(self, z: Tensor) -> None:
        """The memory, once the first latent tells its size (for ``memory_bytes``)."""
        if self.budget is None:
            per_latent = Codec().bytes_per_sample(tuple(z.shape[1:]), z.dtype)
            if self.memory_bytes < per_latent:
                raise ConfigError(f"memory_bytes={self.memory_bytes} holds no latent of {per_latent} bytes")
            self.budget = Budget(total=self.memory_bytes // per_latent)
        self.memory = Memory(self.budget.total)

    @torch.no_grad()
    def _latents(self, strategy, x: Tensor) -> Tensor:
        """``lower(x)``, in eval mode."""
        model, was_training = strategy.model, strategy.model.training
        lower = self.lower(model)
        model.eval()
        try:
            out = [lower(x[i:i + 1024]) for i in range(0, len(x), 1024)]
        finally:
            model.train(was_training)
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"memory": None if self.memory is None else self.memory.state_dict(),
                "capacity": self.capacity, "budget": self.budget, "classes": list(self.classes),
                "experiences": self.experiences}

    def load_state_dict(self, state: dict) -> None:
        self.budget, self.classes, self.experiences = state["budget"], list(state["classes"]), state["experiences"]
        self.memory = None
        if state["memory"] is not None:
            self.memory = Memory(state["capacity"])
            self.memory.load_state_dict(state["memory"])

