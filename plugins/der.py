"""DER: a dynamically expandable representation, one frozen feature extractor per experience, masked and pruned."""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from streamcl import Plugin, hookimpl
from streamcl.errors import ConfigError
from streamcl.models.heads import IncrementalLinear
from streamcl.optim import sync_optimizer

# modules an expandable backbone may hold: fully connected layers and parameter-free ones
PASSIVE = (nn.Flatten, nn.ReLU, nn.Dropout, nn.Identity)
EMBEDDING_LIMIT = 6.0  # HAT's bound on the mask embeddings (``thres_emb``), so a closed unit can still reopen


def _uniform(shape: Sequence[int], fan_in: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """``nn.Linear``'s default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from ``generator``."""
    bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
    sample = torch.rand(tuple(shape), generator=generator, dtype=like.dtype) * 2 * bound - bound
    return sample.to(like.device)


def _fresh_linear(n_in: int, n_out: int, generator: torch.Generator, like: Tensor) -> nn.Linear:
    layer = nn.Linear(n_in, n_out).to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        layer.weight.copy_(_uniform((n_out, n_in), n_in, generator, like))
        layer.bias.copy_(_uniform((n_out,), n_in, generator, like))
    return layer


def check_model(model: nn.Module) -> None:
    """Refuse a model DER cannot expand: it needs a ``streamcl.models.Classifier`` whose backbone is an
    ``nn.Sequential`` of Linear layers (and ReLU, Flatten, Dropout, Identity) and whose head is linear."""
    backbone, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if not isinstance(backbone, nn.Sequential) or not isinstance(head, (nn.Linear, IncrementalLinear)):
        raise ConfigError(f"der needs a streamcl.models.Classifier whose backbone is an nn.Sequential and whose head "
                          f"is linear (the MLP: model.name = \"mlp\"); got {type(model).__name__}")
    bad = list(dict.fromkeys(type(m).__name__ for m in backbone if not isinstance(m, (nn.Linear, *PASSIVE))))
    if bad:
        raise ConfigError(f"der masks and prunes the units of fully connected layers only: the backbone may hold "
                          f"Linear, ReLU, Flatten, Dropout and Identity, not {', '.join(bad)} (use the MLP: "
                          f"model.name = \"mlp\"; the SmallCNN's convolutions are not supported)")
    linear = [m for m in backbone if isinstance(m, nn.Linear)]
    if not linear:
        raise ConfigError("der needs at least one Linear layer in the backbone: its units are the channels it masks")
    if linear[-1].out_features != head.in_features:
        raise ConfigError(f"der: the head reads {head.in_features} features but the backbone's last Linear gives "
                          f"{linear[-1].out_features}; the features must be that layer's units")


def aux_labels(y: Tensor, new_classes: Sequence[int]) -> Tensor:
    """The auxiliary classifier's targets: 0 for every class outside ``new_classes``, ``1 + i`` for the i-th of them."""
    table = torch.zeros(max(int(y.max()) if y.numel() else 0, *new_classes, 0) + 1, dtype=torch.long, device=y.device)
    table[torch.as_tensor(list(new_classes), dtype=torch.long, device=y.device)] = torch.arange(
        1, len(new_classes) + 1, device=y.device)
    return table[y]


class ConcatHead(nn.Module):
    """A linear classifier on the extractors' concatenated features, held as one weight block per extractor
    (``blocks[k]``: classes x width of extractor k) and one bias: the same map as one ``nn.Linear`` with
    weight ``cat(blocks, 1)``. A new extractor adds a block; pruning cuts the block's columns. A head made
    from a growing head (:class:`IncrementalLinear`) grows with the classes seen (``grow_to``)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.blocks = nn.ParameterList([nn.Parameter(head.weight.detach().clone())])
        self.bias = nn.Parameter(head.bias.detach().clone()) if head.bias is not None else None
        self.growing = isinstance(head, IncrementalLinear)

    @property
    def out_features(self) -> int:
        return self.blocks[0].shape[0]

    @property
    def in_features(self) -> int:
        return sum(b.shape[1] for b in self.blocks)

    def forward(self, features: Tensor) -> Tensor:
        weight = self.blocks[0] if len(self.blocks) == 1 else torch.cat(list(self.blocks), 1)
        return F.linear(features, weight, self.bias)

    @torch.no_grad()
    def add_block(self, width: int, generator: torch.Generator) -> None:
        """Columns for a new extractor's ``width`` features, initialised as a fresh ``nn.Linear`` over all features."""
        like = self.blocks[0]
        fan_in = self.in_features + width
        self.blocks.append(nn.Parameter(_uniform((self.out_features, width), fan_in, generator, like)))

    @torch.no_grad()
    def grow_to(self, n: int) -> bool:
        """Widen a growing head to ``n`` classes (new rows initialised as :class:`IncrementalLinear` does)."""
        old = self.out_features
        if not self.growing or n <= old:
            return False
        rows = IncrementalLinear(self.in_features, n - old).to(device=self.blocks[0].device, dtype=self.blocks[0].dtype)
        start = 0
        for k, block in enumerate(self.blocks):
            part = rows.weight[:, start:start + block.shape[1]]
            self.blocks[k] = nn.Parameter(torch.cat([block, part]))
            start += block.shape[1]
        if self.bias is not None:
            self.bias = nn.Parameter(torch.cat([self.bias, rows.bias]))
        return True

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} ({'+'.join(str(b.shape[1]) for b in self.blocks)}), " \
               f"out_features={self.out_features}"


class DERNet(nn.Module):
    """The super-feature extractor of DER: ``extractors`` (the first is the wrapped model's own backbone, each
    later one a re-initialised copy of its architecture), the classifier ``head`` on their concatenated
    features, and, while the newest extractor trains, its auxiliary classifier ``aux`` and its mask embeddings
    ``mask_logits`` (one vector per Linear layer: one entry per unit).

    The newest extractor's units are multiplied by ``m = sigmoid(s * e)`` (eq. 5), ``s`` set by the plugin each
    step during training and ``s_max`` in evaluation. The value is exactly that; its gradient with respect to ``e``
    is HAT's compensated one, ``s_max * sigmoid'(e)`` times the gradient with respect to ``m`` (Serra et al. 2018,
    "Overcoming Catastrophic Forgetting with Hard Attention to the Task": the gradient of ``sigmoid(s e)``
    rescaled by ``s_max [cosh(s e) + 1] / (s [cosh(e) + 1])``), which does not vanish as ``s`` grows.
    The extractors before the newest are frozen (``requires_grad`` off) and always run in evaluation mode.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        check_model(model)
        self.extractors = nn.ModuleList([model.backbone])
        self.head = ConcatHead(model.head)
        self.mask_logits = nn.ParameterList()
        self.aux: nn.Linear | None = None
        # the backbone's architecture, to build fresh extractors and count what pruning saved
        self.layers = [(m.in_features, m.out_features) for m in model.backbone if isinstance(m, nn.Linear)]
        self.s, self.s_max = 1.0, 1.0

    # ------------------------------------------------------------------------------ shape
    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def widths(self, k: int = -1) -> list[int]:
        """The number of units of each Linear layer of extractor ``k``."""
        return [m.out_features for m in self.extractors[k] if isinstance(m, nn.Linear)]

    def unpruned_parameters(self) -> int:
        """How many parameters this model would hold with every extractor at the backbone's full width (no aux)."""
        per_extractor = sum(i * o + o for i, o in self.layers)
        head = self.head.out_features * self.layers[-1][1] * len(self.extractors)
        return per_extractor * len(self.extractors) + head + (0 if self.head.bias is None else self.head.bias.numel())

    # ------------------------------------------------------------------------------ forward
    def masks(self) -> list[Tensor]:
        """The newest extractor's unit masks, ``sigmoid(s e)`` (eq. 5), with HAT's compensated gradient."""
        s = self.s if self.training else self.s_max
        out = []
        for e in self.mask_logits:
            soft = torch.sigmoid(e)
            out.append(torch.sigmoid(s * e).detach() + self.s_max * (soft - soft.detach()))
        return out

    def extract(self, k: int, x: Tensor) -> Tensor:
        """Extractor ``k``'s features of ``x`` (the newest masked while it has masks)."""
        masks = self.masks() if k == len(self.extractors) - 1 and len(self.mask_logits) else None
        j = 0
        for m in self.extractors[k]:
            x = m(x)
            if masks is not None and isinstance(m, nn.Linear):
                x = x * masks[j]  # on the unit's pre-activation: m relu(z) = relu(m z) for m >= 0
                j += 1
        return x

    def forward(self, x: Tensor, return_features: bool = False):
        feats = [self.extract(k, x) for k in range(len(self.extractors))]
        features = feats[0] if len(feats) == 1 else torch.cat(feats, 1)
        logits = self.head(features)
        return (logits, features) if return_features else logits

    def aux_logits(self, features: Tensor) -> Tensor:
        """The auxiliary classifier on the newest extractor's features (the last columns of ``features``)."""
        return self.aux(features[:, features.shape[1] - self.aux.in_features:])

    def sparsity(self) -> Tensor:
        """Eq. 8: the share of the newest extractor's weights its masks keep,
        ``sum_l ||m_{l-1}||_1 ||m_l||_1 / sum_l c_{l-1} c_l`` (``m_0``: the inputs, all kept; a unit of layer ``l``
        weighs as many weights as the units it reads, the kernel size being 1)."""
        masks, out = self.masks(), 0.0
        total, previous = 0, None
        for (n_in, n_out), m in zip(self.layers, masks):
            kept_in = previous if previous is not None else n_in
            out = out + kept_in * m.sum()
            total += n_in * n_out
            previous = m.sum()
        return out / total

    def train(self, mode: bool = True) -> "DERNet":
        super().train(mode)
        for ext in self.extractors[:-1]:
            ext.train(False)
        return self

    # ------------------------------------------------------------------------------ growth
    @torch.no_grad()
    def add_masks(self, generator: torch.Generator, s_max: float) -> None:
        """Mask embeddings for the newest extractor, ``e ~ N(0, 1)`` (HAT's initialisation)."""
        like = self.head.blocks[0]
        self.s_max, self.s = float(s_max), float(s_max)
        self.mask_logits = nn.ParameterList([
            nn.Parameter(torch.randn(n, generator=generator, dtype=like.dtype).to(like.device))
            for n in self.widths()])

    @torch.no_grad()
    def expand(self, generator: torch.Generator, n_new: int) -> None:
        """Freeze every extractor, add a fresh one (the backbone's architecture, re-initialised from ``generator``),
        its block of head columns, and an auxiliary classifier with ``n_new + 1`` outputs."""
        for ext in self.extractors:
            for p in ext.parameters():
                p.requires_grad_(False)
                p.grad = None
        like = self.head.blocks[0]
        new = copy.deepcopy(self.extractors[0])
        layers = iter(self.layers)
        for i, m in enumerate(new):
            if isinstance(m, nn.Linear):
                new[i] = _fresh_linear(*next(layers), generator, like)
        self.extractors.append(new)
        width = self.layers[-1][1]
        self.head.add_block(width, generator)
        self.aux = _fresh_linear(width, n_new + 1, generator, like)
        self.mask_logits = nn.ParameterList()
        self.train(self.training)

    @torch.no_grad()
    def prune(self, masks: Sequence[Tensor] | None = None) -> list[int]:
        """Remove the newest extractor's units whose mask is below 0.5 (at least one unit per layer stays), fold the
        kept masks into their rows (so the outputs are those of the masked extractor with the dropped units' masks
        at 0), cut the matching columns of the next layer and of the head's block, and drop the auxiliary classifier
        and the masks. ``masks``: the values to use (default: ``sigmoid(s_max e)``). Returns the units kept per
        layer."""
        if masks is None:
            masks = [torch.sigmoid(self.s_max * e) for e in self.mask_logits]
        masks = [m.detach() for m in masks]
        ext = self.extractors[-1]
        index = [i for i, m in enumerate(ext) if isinstance(m, nn.Linear)]
        if len(masks) != len(index):
            raise ValueError(f"der: {len(masks)} masks for {len(index)} layers")
        previous, kept = None, []
        for i, m in zip(index, masks):
            layer = ext[i]
            keep = m >= 0.5
            if not keep.any():
                keep[m.argmax()] = True
            keep = torch.nonzero(keep).flatten()
            weight = layer.weight[keep] if previous is None else layer.weight[keep][:, previous]
            smaller = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None)
            smaller = smaller.to(device=weight.device, dtype=weight.dtype)
            smaller.weight.copy_(weight * m[keep, None])
            if layer.bias is not None:
                smaller.bias.copy_(layer.bias[keep] * m[keep])
            smaller.requires_grad_(layer.weight.requires_grad)
            ext[i] = smaller
            previous = keep
            kept.append(len(keep))
        block = self.head.blocks[-1]
        self.head.blocks[-1] = nn.Parameter(block[:, previous].clone(), requires_grad=block.requires_grad)
        self.aux, self.mask_logits = None, nn.ParameterList()
        return kept


class DER(Plugin):
    """DER (Yan, Xie & He 2021, "DER: Dynamically Expandable Representation for Class Incremental Learning",
    CVPR, Sec. 3).

    Expansion: ``adapt_model`` wraps the strategy's model at the first experience into a :class:`DERNet`, whose
    first feature extractor ``F_1`` is the model's own backbone and whose classifier ``H`` reads the extractors'
    concatenated features. At every later experience the extractors so far are frozen (``requires_grad`` off,
    evaluation mode) and a new one ``F_t`` is added: the backbone's architecture at full width, re-initialised
    from ``strategy.generator``. The classifier keeps its columns for the old features (``H_t`` starts from
    ``H_{t-1}``); the new features' columns are drawn as a fresh ``nn.Linear``'s. An auxiliary classifier
    ``H^a_t`` reads ``F_t``'s features alone, with ``|new classes| + 1`` outputs: label ``1 + i`` for the
    experience's i-th class and 0 for every other label, so every replayed old class is one class (see
    :func:`aux_labels`). The engine's optimizer follows the new parameters. The loss is the paper's

        L = L_H + aux_weight * L_aux + sparsity_weight * L_S,

    ``L_H`` the task loss, ``L_aux`` the auxiliary cross-entropy over the whole minibatch, replayed samples
    included (``loss/der_aux``; from the second experience on, when there are old classes), ``L_S`` the
    sparsity loss (``loss/der_sparsity``).

    Masks and pruning (``prune=True``): every unit of every Linear layer of ``F_t`` (the MLP's channels, the
    first extractor's too) is multiplied by ``m = sigmoid(s e)`` (eq. 5), ``e`` learned, ``e ~ N(0, 1)`` at the
    start as in HAT (Serra et al. 2018, which DER's masks follow); ``s`` anneals within each epoch from
    ``1/s_max`` to ``s_max``, ``s = 1/s_max + (s_max - 1/s_max) (b - 1)/(B - 1)`` at batch ``b`` of ``B``
    (eq. 6). The gradient reaching ``e`` is HAT's compensated one, ``s_max sigmoid'(e)`` times the gradient with
    respect to ``m``, and ``e`` is clipped to [-6, 6] after each update (HAT). ``L_S`` is eq. 8, the share of
    ``F_t``'s weights the masks keep: ``sum_l ||m_{l-1}||_1 ||m_l||_1 / sum_l c_{l-1} c_l`` (kernel size 1;
    ``m_0`` the inputs, all kept). After the experience (``after_training_exp``) the units with
    ``sigmoid(s_max e) < 0.5`` are removed for good: smaller Linear layers, the next layer's and the classifier's
    columns cut, the kept masks folded into the weights (at least one unit per layer stays); the auxiliary
    classifier and the masks go, and the optimizer follows. So each experience adds fewer parameters than one
    backbone. ``params_per_experience`` holds the model's parameter count after each experience,
    ``unpruned_params_per_experience`` the count with every extractor at full width (DER without pruning),
    ``units_per_experience`` the units each new extractor kept in each layer. ``prune=False`` is DER without
    masks and pruning (expansion and auxiliary loss only).

    Classifier learning stage (``classifier_epochs > 0``): after each experience from the second on, the
    classifier alone is retrained for that many epochs on the replay memory (class-balanced with Replay's
    default selection; the plugin owning "memory" must be listed before der), with the logits divided by
    ``classifier_temperature``, by an optimizer of the strategy's kind and settings, minibatches of the
    strategy's size in an order drawn from ``strategy.generator``. Departure: the authors' code re-initialises
    the classifier before this stage; on SFM-5 (seed 0, 30 epochs, temperature 5, lr 0.01) that gave 0.775
    against 0.807 fine-tuning it, so it is fine-tuned.

    Defaults: ``aux_weight = 1`` (the paper's lambda_a); ``s_max = 400`` (HAT's); ``sparsity_weight = 1``,
    measured (the paper's lambda_s is for ResNets): SFM-5 with Replay-500 and the classifier stage (30 epochs,
    temperature 5, as in the authors' configuration), seeds 0-2, gives 0.806 with 56-66 thousand parameters
    after five experiences (the first layer of each extractor keeps 7-17 of 256 units, the second 100-130),
    0.808 with 0.3 (224-234 thousand) and 0.808 without pruning (1.35 million); without the classifier stage
    0.798. The stage is off by default since it needs a replay memory (the ``der`` recipe turns it on);
    ``classifier_temperature = 5`` is the authors' configuration's.
    The model must be a :class:`streamcl.models.Classifier` with an ``nn.Sequential`` backbone of Linear (and
    ReLU, Flatten, Dropout, Identity) layers and a linear head, the MLP; others (the SmallCNN) are refused with
    a ConfigError. It owns the role ``architecture``: it replaces the model, as HyperNetwork, ProgressCompress
    and LatentReplay do.
    """

    owns = frozenset({"architecture"})

    def __init__(self, aux_weight: float = 1.0, sparsity_weight: float = 1.0, s_max: float = 400.0,
                 prune: bool = True, classifier_epochs: int = 0, classifier_temperature: float = 5.0):
        for name, value in (("aux_weight", aux_weight), ("sparsity_weight", sparsity_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"der {name}={value!r}: it must be a finite number >= 0")
        if isinstance(s_max, bool) or not isinstance(s_max, (int, float)) or not 1 <= s_max <= 1e4:
            raise ConfigError(f"der s_max={s_max!r}: the masks' final scale, a number from 1 to 10000 "
                              "(sigmoid(s_max e) must tend to 0 or 1)")
        if not isinstance(prune, bool):
            raise ConfigError(f"der prune={prune!r}: use true (masks, sparsity loss and pruning) or false "
                              "(expansion only)")
        if isinstance(classifier_epochs, bool) or not isinstance(classifier_epochs, int) or classifier_epochs < 0:
            raise ConfigError(f"der classifier_epochs={classifier_epochs!r}: a whole number >= 0 (0: no classifier "
                              "learning stage)")
        if (isinstance(classifier_temperature, bool) or not isinstance(classifier_temperature, (int, float))
                or not math.isfinite(classifier_temperature) or classifier_temperature <= 0):
            raise ConfigError(f"der classifier_temperature={classifier_temperature!r}: a finite number > 0")
        self.aux_weight, self.sparsity_weight, self.s_max = float(aux_weight), float(sparsity_weight), float(s_max)
        self.prune, self.classifier_epochs = prune, classifier_epochs
        self.classifier_temperature = float(classifier_temperature)
        self.params_per_experience: list[int] = []
        self.unpruned_params_per_experience: list[int] = []
        self.units_per_experience: list[list[int]] = []
        self.head_before_stage: dict[str, Tensor] | None = None  # the classifier before the last classifier stage
        self._model: DERNet | None = None  # the model the hooks last saw (for uncorrected())
        self._off, self._swapped = False, None

    # ------------------------------------------------------------------------------ growth
    @hookimpl
    def adapt_model(self, strategy, model: nn.Module, experience) -> nn.Module:
        if isinstance(model, DERNet):
            model.expand(strategy.generator, len(experience.classes))
        else:
            model = DERNet(model)
        if self.prune:
            model.add_masks(strategy.generator, self.s_max)
        return model

    def _net(self, strategy) -> DERNet:
        model = strategy.model
        if not isinstance(model, DERNet):
            raise ConfigError("der: strategy.model is no longer DER's expandable network; list der after plugins "
                              "that replace the model")
        return model

    # ------------------------------------------------------------------------------ masks and losses
    @hookimpl
    def before_training_iteration(self, strategy) -> None:
        model = self._net(strategy)
        if not len(model.mask_logits):
            return
        n = math.ceil(len(strategy.train_dataset) / strategy.batch_size)  # B, the batches of an epoch
        b = min(strategy.iteration, n - 1)
        s_max = model.s_max
        model.s = s_max if n <= 1 else 1 / s_max + (s_max - 1 / s_max) * b / (n - 1)  # eq. 6

    @hookimpl
    def loss_terms(self, strategy, batch, output) -> dict[str, Tensor] | None:
        model, terms = self._net(strategy), {}
        if model.aux is not None and self.aux_weight > 0:
            targets = aux_labels(batch.y, strategy.experience.classes)
            terms["der_aux"] = self.aux_weight * F.cross_entropy(model.aux_logits(output.features), targets)
        if len(model.mask_logits) and self.sparsity_weight > 0:
            terms["der_sparsity"] = self.sparsity_weight * model.sparsity()
        return terms or None

    @hookimpl
    def after_update(self, strategy) -> None:
        with torch.no_grad():
            for e in strategy.model.mask_logits if isinstance(strategy.model, DERNet) else ():
                e.clamp_(-EMBEDDING_LIMIT, EMBEDDING_LIMIT)

    # ------------------------------------------------------------------------------ pruning
    @hookimpl
    def after_training_exp(self, strategy) -> None:
        model = self._net(strategy)
        self._model, self.head_before_stage = model, None
        if len(model.mask_logits):
            self.units_per_experience.append(model.prune())
        else:
            self.units_per_experience.append(model.widths())
        model.aux = None  # used in training only
        self._sync_optimizer(strategy, model)
        if self.classifier_epochs and len(model.extractors) > 1:  # the first experience's data is balanced already
            self._learn_classifier(strategy, model)
        self.params_per_experience.append(sum(p.numel() for p in model.parameters()))
        self.unpruned_params_per_experience.append(model.unpruned_parameters())

    @staticmethod
    def _sync_optimizer(strategy, model: nn.Module) -> None:
        """The optimizer on the pruned model's parameters (a checkpoint names each of its parameters)."""
        groups = [g for gs in strategy.pm.hook.param_groups(strategy=strategy, model=model) if gs for g in gs]
        sync_optimizer(strategy.optimizer, model, groups)

    @hookimpl
    def before_training(self, strategy) -> None:
        if self.classifier_epochs:
            self._memory(strategy)  # refuse a list that cannot run the classifier stage before any training

    def _memory(self, strategy):
        """The replay memory the classifier stage retrains on; refuses a list without one, or with it after der."""
        owner = strategy.owner("memory")
        if owner is None or not hasattr(owner, "memory"):
            raise ConfigError("der classifier_epochs > 0 retrains the classifier on the replay memory: list a plugin "
                              "that owns 'memory' (replay) before der, or set classifier_epochs = 0")
        if strategy.plugins.index(owner) > strategy.plugins.index(self):
            raise ConfigError(f"der classifier_epochs > 0 retrains the classifier on the memory once it holds the "
                              f"experience's classes: list {type(owner).__name__} before der")
        return owner.memory

    def _learn_classifier(self, strategy, model: DERNet) -> None:
        """Sec. 3.4: the head retrained on the class-balanced replay memory, logits divided by the temperature."""
        memory = self._memory(strategy)
        if memory is None or not len(memory):
            return
        data = memory.batch()
        self.head_before_stage = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
        params = list(model.head.parameters())
        opt = strategy.optimizer
        group = next((g for g in opt.param_groups if not g.get("from_plugin")), None) or opt.defaults
        optimizer = type(opt)(params, **{k: group[k] for k in opt.defaults if k in group})
        was_training = model.training
        model.eval()  # the extractors are fixed here: their features once, without dropout
        with torch.no_grad():
            features = torch.cat([model(data.x[i:i + 1024], return_features=True)[1]
                                  for i in range(0, len(data), 1024)])
        with torch.enable_grad():
            for _ in range(self.classifier_epochs):
                order = torch.randperm(len(data), generator=strategy.generator).to(data.y.device)
                for i in range(0, len(order), strategy.batch_size):
                    idx = order[i:i + strategy.batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    logits = model.head(features[idx]) / self.classifier_temperature
                    F.cross_entropy(logits, data.y[idx]).backward()
                    optimizer.step()
        model.train(was_training)

    # ------------------------------------------------------------------------------ before / after the stage
    @property
    def uncorrected(self):
        """With the classifier stage on, a context within which the model predicts with the classifier as it was
        before the last classifier stage (the runner's evaluation of the uncorrected model); on exit the retrained
        classifier is put back exactly. ``None`` without the stage."""
        return self._uncorrected if self.classifier_epochs else None

    @contextmanager
    def _uncorrected(self) -> Iterator[DER]:
        self._off = True
        try:
            if self._model is not None:
                self._swap_in(self._model)  # else at the evaluation's before_eval (after a resume)
            yield self
        finally:
            self._off = False
            if self._swapped is not None:
                head, current = self._swapped
                head.load_state_dict(current)
                self._swapped = None

    @hookimpl
    def before_eval(self, strategy) -> None:
        if isinstance(strategy.model, DERNet):
            self._model = strategy.model
            if self._off:
                self._swap_in(strategy.model)

    def _swap_in(self, model: DERNet) -> None:
        before = self.head_before_stage
        if before is None or self._swapped is not None:
            return
        current = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
        if {k: v.shape for k, v in current.items()} != {k: v.shape for k, v in before.items()}:
            return  # the model grew since the stage: nothing to undo
        model.head.load_state_dict(before)
        self._swapped = (model.head, current)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"params_per_experience": list(self.params_per_experience),
                "unpruned_params_per_experience": list(self.unpruned_params_per_experience),
                "units_per_experience": [list(u) for u in self.units_per_experience],
                "head_before_stage": None if self.head_before_stage is None else
                {k: v.clone() for k, v in self.head_before_stage.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.params_per_experience = list(state["params_per_experience"])
        self.unpruned_params_per_experience = list(state["unpruned_params_per_experience"])
        self.units_per_experience = [list(u) for u in state["units_per_experience"]]
        before = state["head_before_stage"]
        self.head_before_stage = None if before is None else {k: v.clone() for k, v in before.items()}
