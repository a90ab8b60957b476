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
from streamcl.batch import Batch
from streamcl.errors import ConfigError
from streamcl.masks import MaskedSequential, annealed_scale, find_units
from streamcl.models.heads import IncrementalLinear
from streamcl.parts import model_as, replace_module
from streamcl.plugin import warn


def _uniform(shape: Sequence[int], fan_in: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """``nn.Linear``'s default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from ``generator``."""
    bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
    sample = torch.rand(tuple(shape), generator=generator, dtype=like.dtype) * 2 * bound - bound
    return sample.to(like.device)


def _fresh_linear(n_in: int, n_out: int, generator: torch.Generator, like: Tensor) -> nn.Linear:
    layer = nn.utils.skip_init(nn.Linear, n_in, n_out, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        layer.weight.copy_(_uniform((n_out, n_in), n_in, generator, like))
        layer.bias.copy_(_uniform((n_out,), n_in, generator, like))
    return layer


def _resized(layer: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A copy of the linear ``layer`` (``nn.Linear`` or :class:`IncrementalLinear`) holding ``weight`` and ``bias``
    (``bias`` stays the very parameter when it is ``layer.bias``, so its optimizer state survives)."""
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(weight.detach())
    new.bias = bias if bias is None or bias is layer.bias else nn.Parameter(bias.detach())
    new.in_features = weight.shape[1]
    if isinstance(new, nn.Linear):
        new.out_features = weight.shape[0]
    return new


def aux_labels(y: Tensor, new_classes: Sequence[int]) -> Tensor:
    """The auxiliary classifier's targets: 0 for every class outside ``new_classes``, ``1 + i`` for the i-th of them."""
    table = torch.zeros(max(int(y.max()) if y.numel() else 0, *new_classes, 0) + 1, dtype=torch.long, device=y.device)
    table[torch.as_tensor(list(new_classes), dtype=torch.long, device=y.device)] = torch.arange(
        1, len(new_classes) + 1, device=y.device)
    return table[y]


@contextmanager
def _seeded(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Torch's global generators (CPU and the model's CUDA device) forked and seeded from ``generator``: modules'
    ``reset_parameters()`` draw reproducibly, and the global state is as before afterwards."""
    seed = int(torch.randint(2 ** 62, (1,), generator=generator))
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class _Values(nn.Module):
    """Tensors kept as buffers ``v0, v1, ...`` (moved and saved with the model, not trained)."""

    def __init__(self, values: Sequence[Tensor]):
        super().__init__()
        for i, v in enumerate(values):
            self.register_buffer(f"v{i}", v)

    def values(self) -> list[Tensor]:
        return list(self.buffers())


class DERNet(nn.Module):
    """The super-feature extractor of DER (Yan et al. 2021, Sec. 3.2): ``extractors`` (inputs -> features; the
    first is the user's model with its head replaced by ``nn.Identity``, each later one a re-initialised copy), the
    classifier ``head`` (the user's head, widened) on their concatenated features, and, while the newest extractor
    trains, its auxiliary classifier ``aux``.

    ``units`` (masks): the path, inside each extractor, of the ``nn.Sequential`` of Linear layers whose units the
    newest extractor masks (:class:`streamcl.masks.MaskedSequential` in its place while it trains) and pruning cuts
    (see :func:`streamcl.masks.find_units`); ``None``: no masks. The extractors before the newest are frozen
    (``requires_grad`` off) and always run in evaluation mode.
    """

    def __init__(self, extractor: nn.Module, head: nn.Module, units: str | None = None):
        super().__init__()
        if not isinstance(head, (nn.Linear, IncrementalLinear)):
            raise ConfigError(f"der widens the classifier head with columns for each new extractor's features: it "
                              f"needs an nn.Linear or IncrementalLinear head, not {type(head).__name__}")
        self.extractors = nn.ModuleList([extractor])
        self.head = copy.deepcopy(head)
        self.aux: nn.Linear | None = None
        self.units = units
        self.width = int(head.in_features)  # one extractor's features, at full width
        self.extractor_params = sum(p.numel() for p in extractor.parameters())
        # the full-width Linear layers (in, out, bias) of the masked nn.Sequential, to rebuild and to count
        self.layers = [] if units is None else [(m.in_features, m.out_features, m.bias is not None)
                                                for m in self._seq(0) if isinstance(m, nn.Linear)]
        # what no reset_parameters() re-initialises (timm's position embedding and class token): its first values
        covered = {id(t) for m in extractor.modules() if callable(getattr(m, "reset_parameters", None))
                   for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
        rest = [(n, t) for n, t in (*extractor.named_parameters(), *extractor.named_buffers()) if id(t) not in covered]
        self.initial_names = [n for n, _ in rest]
        self.initial = _Values([t.detach().clone() for _, t in rest])

    # ------------------------------------------------------------------------------ parts
    def _at(self, k: int) -> nn.Module:
        return self._at_in(self.extractors[k])

    def _at_in(self, extractor: nn.Module) -> nn.Module:
        return extractor.get_submodule(self.units) if self.units else extractor

    def _put(self, k: int, module: nn.Module) -> None:
        if self.units:
            replace_module(self.extractors[k], self.units, module)
        else:
            self.extractors[k] = module

    def _seq(self, k: int) -> nn.Sequential:
        module = self._at(k)
        return module.seq if isinstance(module, MaskedSequential) else module

    def masked(self) -> MaskedSequential | None:
        """The newest extractor's masked layers, while it has masks."""
        if self.units is None:
            return None
        module = self._at(-1)
        return module if isinstance(module, MaskedSequential) else None

    @property
    def feature_dim(self) -> int:
        return int(self.head.in_features)

    def widths(self, k: int = -1) -> list[int]:
        """The units of each masked Linear layer of extractor ``k``; without masks, its number of features."""
        if self.units is None:
            return [self.width]
        return [m.out_features for m in self._seq(k) if isinstance(m, nn.Linear)]

    def unpruned_parameters(self) -> int:
        """How many parameters this model would hold with every extractor at full width (no aux)."""
        n = len(self.extractors)
        bias = 0 if self.head.bias is None else self.head.bias.numel()
        return n * self.extractor_params + self.head.out_features * self.width * n + bias

    # ------------------------------------------------------------------------------ forward
    def extract(self, k: int, x: Tensor) -> Tensor:
        """Extractor ``k``'s features of ``x`` (the newest masked while it has masks)."""
        return self.extractors[k](x)

    def forward(self, x: Tensor) -> Tensor:
        feats = [ext(x) for ext in self.extractors]
        return self.head(feats[0] if len(feats) == 1 else torch.cat(feats, 1))

    def aux_logits(self, features: Tensor) -> Tensor:
        """The auxiliary classifier on the newest extractor's features (the last columns of ``features``)."""
        return self.aux(features[:, features.shape[1] - self.aux.in_features:])

    def sparsity(self) -> Tensor:
        """Eq. 8: the share of the newest extractor's weights its masks keep,
        ``sum_l ||m_{l-1}||_1 ||m_l||_1 / sum_l c_{l-1} c_l`` (``m_0``: the inputs, all kept; a unit of layer ``l``
        weighs as many weights as the units it reads, the kernel size being 1)."""
        out, total, previous = 0.0, 0, None
        for (n_in, n_out, _), m in zip(self.layers, self.masked().masks()):
            out = out + (previous if previous is not None else n_in) * m.sum()
            total += n_in * n_out
            previous = m.sum()
        return out / total

    def train(self, mode: bool = True) -> DERNet:
        super().train(mode)
        for ext in self.extractors[:-1]:
            ext.train(False)
        return self

    # ------------------------------------------------------------------------------ growth
    @torch.no_grad()
    def add_masks(self, generator: torch.Generator, s_max: float) -> None:
        """Masks on the newest extractor's Linear units, embeddings ``e ~ N(0, 1)`` (HAT's initialisation)."""
        seq = self._at(-1)
        like = self.head.weight
        embeddings = [torch.randn(m.out_features, generator=generator, dtype=like.dtype).to(like.device)
                      for m in seq if isinstance(m, nn.Linear)]
        self._put(-1, MaskedSequential(seq, embeddings, s_max))

    @torch.no_grad()
    def expand(self, generator: torch.Generator, n_new: int) -> None:
        """Freeze every extractor (the newest pruned first if it has masks), add a fresh one (:meth:`fresh`), its
        columns of the head (drawn as a fresh ``nn.Linear``'s over all features) and an auxiliary classifier with
        ``n_new + 1`` outputs."""
        if self.masked() is not None:
            self.prune()
        for p in self.extractors.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.extractors.append(self.fresh(generator))
        head, like = self.head, self.head.weight
        block = _uniform((head.out_features, self.width), head.in_features + self.width, generator, like)
        self.head = _resized(head, torch.cat([head.weight, block], 1), head.bias)
        self.aux = _fresh_linear(self.width, n_new + 1, generator, like)
        self.train(self.training)

    @torch.no_grad()
    def fresh(self, generator: torch.Generator) -> nn.Module:
        """A copy of the first extractor, re-initialised: masked Linear layers rebuilt at full width, values no
        ``reset_parameters()`` covers set back to the first extractor's initial ones, then every Linear layer drawn
        from ``generator`` as ``nn.Linear`` initialises (U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weight then bias, in
        module order) and every other sub-module with ``reset_parameters()`` reset from torch's generators, forked
        and seeded from ``generator``."""
        new = copy.deepcopy(self.extractors[0])
        like = self.head.weight
        if self.units is not None:
            seq, layers = self._at_in(new), iter(self.layers)
            for i, m in enumerate(seq):
                if isinstance(m, nn.Linear):
                    n_in, n_out, bias = next(layers)
                    seq[i] = nn.utils.skip_init(nn.Linear, n_in, n_out, bias=bias, device=m.weight.device,
                                                dtype=m.weight.dtype)
        state = {**dict(new.named_parameters()), **dict(new.named_buffers())}
        for name, value in zip(self.initial_names, self.initial.values()):
            state[name].copy_(value)
        others = []
        for m in new.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(_uniform(m.weight.shape, m.in_features, generator, m.weight))
                if m.bias is not None:
                    m.bias.copy_(_uniform(m.bias.shape, m.in_features, generator, m.bias))
            elif callable(getattr(m, "reset_parameters", None)):
                others.append(m)
        if others:
            with _seeded(generator, like.device):
                for m in others:
                    m.reset_parameters()
        for p in new.parameters():
            p.requires_grad_(True)
        return new.train(self.training)

    @torch.no_grad()
    def prune(self, masks: Sequence[Tensor] | None = None) -> list[int]:
        """Remove the newest extractor's units whose mask is below 0.5 (at least one unit per layer stays), fold the
        kept masks into their rows (so the outputs are those of the masked extractor with the dropped units' masks
        at 0), cut the matching columns of the next layer and of the head, and drop the masks and the auxiliary
        classifier. ``masks``: the values to use (default: ``sigmoid(s_max e)``). Returns the units kept per
        layer."""
        masked = self.masked()
        values = list(masks) if masks is not None else [torch.sigmoid(masked.s_max * e.detach())
                                                         for e in masked.mask_logits]
        seq, previous, kept = masked.seq, None, []
        full = masked.linear[-1].out_features
        j = 0
        for i, m in enumerate(seq):
            if not isinstance(m, nn.Linear):
                continue
            v = values[j].to(m.weight)
            j += 1
            keep = (v >= 0.5).nonzero().flatten()
            if not len(keep):
                keep = v.argmax().view(1)
            weight = m.weight[keep] * v[keep, None]
            if previous is not None:
                weight = weight[:, previous]
            bias = None if m.bias is None else m.bias[keep] * v[keep]
            seq[i] = _resized(m, weight, bias)
            previous = keep
            kept.append(len(keep))
        self._put(-1, seq)
        head = self.head
        start = head.in_features - full
        self.head = _resized(head, torch.cat([head.weight[:, :start], head.weight[:, start:][:, previous]], 1),
                             head.bias)
        self.aux = None
        return kept


class DER(Plugin):
    """DER (Yan, Xie & He 2021, "DER: Dynamically Expandable Representation for Class Incremental Learning",
    CVPR, Sec. 3).

    Expansion: ``adapt_model`` wraps the strategy's model at the first experience into a :class:`DERNet`, whose
    first feature extractor ``F_1`` is ``strategy.extractor()`` (the model with its head replaced by
    ``nn.Identity``: inputs -> features) and whose classifier ``H`` (``strategy.head``, widened) reads the
    extractors' concatenated features. At every later experience the extractors so far are frozen
    (``requires_grad`` off, evaluation mode) and a new one ``F_t`` is added: a copy of ``F_1`` at full width,
    re-initialised (:meth:`DERNet.fresh`): Linear layers drawn from ``strategy.generator`` as ``nn.Linear``
    initialises, every other sub-module with ``reset_parameters()`` (convolutions, norms) reset from torch's
    generators forked and seeded from ``strategy.generator``; values nothing resets, such as timm's position
    embedding, start from ``F_1``'s first values. The classifier keeps its columns for the old features (``H_t``
    starts from ``H_{t-1}``); the new features' columns are drawn as a fresh ``nn.Linear``'s. An auxiliary
    classifier ``H^a_t`` reads ``F_t``'s features alone, with ``|new classes| + 1`` outputs: label ``1 + i`` for the
    experience's i-th class and 0 for every other label, so every replayed old class is one class (see
    :func:`aux_labels`). The wrapper exposes ``head``, so the engine finds the new classifier; the optimizer
    follows (the head's weight is a new parameter at each expansion and pruning, so its momentum starts afresh;
    on SFM-5 keeping it for the old columns made no difference, 0.792 against 0.793 on seed 1). The loss is the paper's

        L = L_H + aux_weight * L_aux + sparsity_weight * L_S,

    ``L_H`` the task loss, ``L_aux`` the auxiliary cross-entropy over the whole minibatch, replayed samples
    included (``loss/der_aux``; from the second experience on, when there are old classes), ``L_S`` the
    sparsity loss (``loss/der_sparsity``).

    Masks and pruning (``masks=True``, the paper's): where the extractor allows it, an ``nn.Sequential`` of Linear
    layers and parameter-free modules (ReLU, LeakyReLU, Dropout, Flatten, Identity) holding all its parameters
    and giving its features (the MLP's backbone, a user's ``nn.Sequential`` without its last Linear; see
    :func:`streamcl.masks.find_units`), every unit of every Linear layer of ``F_t`` (the first extractor's too) is
    multiplied by ``m = sigmoid(s e)`` (eq. 5), ``e`` learned, ``e ~ N(0, 1)`` at the start as in HAT (Serra et
    al. 2018, which DER's masks follow); ``s`` anneals within each epoch from ``1/s_max`` to ``s_max``,
    ``s = 1/s_max + (s_max - 1/s_max) (b - 1)/(B - 1)`` at batch ``b`` of ``B`` (eq. 6). The gradient reaching
    ``e`` is HAT's compensated one, ``s_max sigmoid'(e)`` times the gradient with respect to ``m``, and ``e`` is
    clipped to [-6, 6] after each update (HAT). ``L_S`` is eq. 8, the share of ``F_t``'s weights the masks keep:
    ``sum_l ||m_{l-1}||_1 ||m_l||_1 / sum_l c_{l-1} c_l`` (kernel size 1; ``m_0`` the inputs, all kept). After the
    experience (``after_training_exp``) the units with ``sigmoid(s_max e) < 0.5`` are removed for good: smaller
    Linear layers, the next layer's and the classifier's columns cut, the kept masks folded into the weights (at
    least one unit per layer stays); the auxiliary classifier and the masks go, and the optimizer follows
    (``strategy.model_changed()``). So each experience adds fewer parameters than one extractor. Other extractors
    (a ResNet's convolutions and batch norms, a ViT's attention) are refused with ``masks=True`` when the Strategy
    is built, naming what they hold; ``masks=False`` is DER without masks and pruning (expansion and auxiliary
    loss), on any model with a linear head. ``params_per_experience`` holds the model's parameter count after
    each experience, ``unpruned_params_per_experience`` the count with every extractor at full width (DER without
    pruning), ``units_per_experience`` the units each new extractor kept in each masked layer (without masks: its
    number of features).

    Classifier learning stage (``classifier_epochs > 0``): after each experience from the second on, the
    classifier alone is retrained for that many epochs (``strategy.fit``, ``loss/der_classifier``) on the features
    (``strategy.embed``) of the replay memory (``strategy.memory``, class-balanced with Replay's default selection;
    the plugin owning "memory" must be listed before der), with the logits divided by ``classifier_temperature``.
    Departure: the authors' code re-initialises the classifier before this stage; on SFM-5 (seed 0, 30 epochs,
    temperature 5, lr 0.01) that gave 0.775 against 0.807 fine-tuning it, so it is fine-tuned. The stage is a bias
    correction: ``set_correction(active=False)`` puts back the classifier of before the last stage (the runner's
    evaluation of the uncorrected model), ``active=True`` the retrained one, exactly.

    Growth: each experience adds an extractor (pruned with masks), so the parameters grow with the stream as the
    paper defines it (``params_per_experience``); a warning is given once they pass ``warn_growth`` times the first
    experience's count. ``max_extractors`` caps them: from then on no extractor is added and the newest goes on
    learning every later experience, without masks, pruning or auxiliary classifier (the classifier stage stays).

    Defaults: ``aux_weight = 1`` (the paper's lambda_a); ``s_max = 400`` (HAT's); ``sparsity_weight = 1``,
    measured (the paper's lambda_s is for ResNets): SFM-5 with Replay-500 and the classifier stage (30 epochs,
    temperature 5, as in the authors' configuration), seeds 0-2, gives 0.806 (0.805, 0.810, 0.805) with 55-66
    thousand parameters after five experiences (the first layer of each extractor keeps 7-18 of 256 units, the
    second 100-125); measured before DER took any model, 0.808 with 0.3 (224-234 thousand) and 0.808 without
    pruning (1.35 million), without the classifier stage 0.798. The stage is off by default since it needs a
    replay memory (the ``der`` recipe turns it on); ``classifier_temperature = 5`` is the authors'
    configuration's. The head must be an ``nn.Linear`` or an :class:`IncrementalLinear`. It owns the role
    ``architecture``: it replaces the model, as HyperNetwork, ProgressCompress and LatentReplay do.
    """

    owns = frozenset({"architecture", "head_rows"})
    requires = frozenset({"head"})

    def __init__(self, aux_weight: float = 1.0, sparsity_weight: float = 1.0, s_max: float = 400.0,
                 masks: bool = True, classifier_epochs: int = 0, classifier_temperature: float = 5.0,
                 max_extractors: int | None = None, warn_growth: float | None = 10.0):
        for name, value in (("aux_weight", aux_weight), ("sparsity_weight", sparsity_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"der {name}={value!r}: it must be a finite number >= 0")
        if isinstance(s_max, bool) or not isinstance(s_max, (int, float)) or not 1 <= s_max <= 1e4:
            raise ConfigError(f"der s_max={s_max!r}: the masks' final scale, a number from 1 to 10000 "
                              "(sigmoid(s_max e) must tend to 0 or 1)")
        if not isinstance(masks, bool):
            raise ConfigError(f"der masks={masks!r}: use true (masks, sparsity loss and pruning) or false "
                              "(expansion only, any backbone)")
        if isinstance(classifier_epochs, bool) or not isinstance(classifier_epochs, int) or classifier_epochs < 0:
            raise ConfigError(f"der classifier_epochs={classifier_epochs!r}: a whole number >= 0 (0: no classifier "
                              "learning stage)")
        if (isinstance(classifier_temperature, bool) or not isinstance(classifier_temperature, (int, float))
                or not math.isfinite(classifier_temperature) or classifier_temperature <= 0):
            raise ConfigError(f"der classifier_temperature={classifier_temperature!r}: a finite number > 0")
        if max_extractors is not None and (isinstance(max_extractors, bool) or not isinstance(max_extractors, int)
                                           or max_extractors < 1):
            raise ConfigError(f"der max_extractors={max_extractors!r}: a whole number >= 1, or none (no cap)")
        if warn_growth is not None and (isinstance(warn_growth, bool) or not isinstance(warn_growth, (int, float))
                                        or not warn_growth > 1):
            raise ConfigError(f"der warn_growth={warn_growth!r}: a multiple > 1 of the first experience's parameter "
                              "count, or none (no warning)")
        self.max_extractors, self.warn_growth, self._warned = max_extractors, warn_growth, False
        self.aux_weight, self.sparsity_weight, self.s_max = float(aux_weight), float(sparsity_weight), float(s_max)
        self.masks, self.classifier_epochs = masks, classifier_epochs
        self.classifier_temperature = float(classifier_temperature)
        self.params_per_experience: list[int] = []
        self.unpruned_params_per_experience: list[int] = []
        self.units_per_experience: list[list[int]] = []
        self.head_before_stage: dict[str, Tensor] | None = None  # the classifier before the last classifier stage
        self._units: str | None = None  # where the masks go in the extractor (found at setup)
        self._swapped: tuple[nn.Module, dict[str, Tensor]] | None = None  # the retrained classifier, while off

    # ------------------------------------------------------------------------------ refusals
    @hookimpl
    def setup(self, strategy) -> None:
        head = strategy.head
        if not isinstance(head, (nn.Linear, IncrementalLinear)):
            raise ConfigError(f"der widens the classifier head with columns for each new extractor's features: it "
                              f"needs an nn.Linear or IncrementalLinear head, and the head at {strategy.head_path!r} "
                              f"is a {type(head).__name__}")
        extractor = strategy.extractor()
        if self.masks:
            self._units = find_units(extractor, type(strategy.model).__name__, "der", "use DER(masks=False)")
        if strategy.owner("memory") is None and not self.classifier_epochs:
            warn("der without a replay memory: nothing is rehearsed and there is no classifier stage (Sec. 3.4), so "
                 "the old classes' head columns are pushed down by the new samples alone (the paper's DER keeps "
                 "exemplars); list a plugin that owns 'memory' (replay) before der and set classifier_epochs")
        if self.classifier_epochs:
            owner = strategy.owner("memory")
            if owner is None:
                raise ConfigError("der classifier_epochs > 0 retrains the classifier on the replay memory: list a "
                                  "plugin that owns 'memory' (replay) before der, or set classifier_epochs = 0")
            if strategy.plugins.index(owner) > strategy.plugins.index(self):
                raise ConfigError(f"der classifier_epochs > 0 retrains the classifier on the memory once it holds the "
                                  f"experience's classes: list {type(owner).__name__} before der")

    # ------------------------------------------------------------------------------ growth
    @hookimpl
    def adapt_model(self, strategy, model: nn.Module, experience) -> nn.Module:
        if isinstance(model, DERNet):
            if self.max_extractors is not None and len(model.extractors) >= self.max_extractors:
                return model  # capped: no new extractor; the newest goes on learning, without masks or aux
            model.expand(strategy.generator, len(experience.classes))
        else:
            model = DERNet(strategy.extractor(model), strategy.head, self._units if self.masks else None)
        if self.masks:
            model.add_masks(strategy.generator, self.s_max)
        return model

    @staticmethod
    def _net(strategy) -> DERNet:
        return model_as(strategy, DERNet, "der", "DER's expandable network")

    # ------------------------------------------------------------------------------ masks and losses
    @hookimpl
    def before_training_iteration(self, strategy) -> None:
        masked = self._net(strategy).masked()
        if masked is not None:  # eq. 6 over the B batches of an epoch
            n = math.ceil(len(strategy.train_dataset) / strategy.batch_size)
            masked.s = annealed_scale(strategy.iteration, n, masked.s_max)

    @hookimpl
    def loss_terms(self, strategy, batch, output) -> dict[str, Tensor] | None:
        model, terms = self._net(strategy), {}
        if model.aux is not None and self.aux_weight > 0:
            targets = aux_labels(batch.y, strategy.experience.classes)
            terms["der_aux"] = self.aux_weight * F.cross_entropy(model.aux_logits(output.features), targets)
        if model.masked() is not None and self.sparsity_weight > 0:
            terms["der_sparsity"] = self.sparsity_weight * model.sparsity()
        return terms or None

    @hookimpl
    def after_update(self, strategy) -> None:
        masked = self._net(strategy).masked()
        if masked is not None:
            masked.clamp_()

    # ------------------------------------------------------------------------------ pruning and the classifier stage
    @hookimpl
    def after_training_exp(self, strategy) -> None:
        model = self._net(strategy)
        self.head_before_stage = None
        self.units_per_experience.append(model.prune() if model.masked() is not None else model.widths())
        model.aux = None  # used in training only
        strategy.model_changed()
        if self.classifier_epochs and len(model.extractors) > 1:  # the first experience's data is balanced already
            self._learn_classifier(strategy)
        self.params_per_experience.append(sum(p.numel() for p in model.parameters()))
        self.unpruned_params_per_experience.append(model.unpruned_parameters())
        first, now = self.params_per_experience[0], self.params_per_experience[-1]
        if self.warn_growth is not None and not self._warned and now > self.warn_growth * first:
            self._warned = True
            warn(f"der: the model holds {now:,} parameters after {len(self.params_per_experience)} experiences, "
                 f"{now / first:.1f} times the first experience's {first:,} (DER adds an extractor per experience); "
                 "DER(max_extractors=...) caps the extractors", RuntimeWarning)

    def _learn_classifier(self, strategy) -> None:
        """Sec. 3.4: the head retrained on the replay memory's features, logits divided by the temperature."""
        memory = strategy.memory
        if memory is None or not len(memory):
            return
        data = memory.batch()
        features = strategy.embed(data)  # the extractors are fixed here: their features once, in evaluation mode
        head, temperature = strategy.head, self.classifier_temperature
        self.head_before_stage = {k: v.detach().clone() for k, v in head.state_dict().items()}
        strategy.fit(Batch(features, data.y.to(features.device), data.t.to(features.device)),
                     lambda b: F.cross_entropy(head(b.x) / temperature, b.y), head.parameters(),
                     epochs=self.classifier_epochs, name="der_classifier")

    @hookimpl
    def set_correction(self, strategy, active: bool) -> None:
        """Off: the classifier of before the last classifier stage; on: the retrained one, exactly as it was."""
        if active:
            if self._swapped is not None:
                head, current = self._swapped
                head.load_state_dict(current)
                self._swapped = None
            return
        before = self.head_before_stage
        if before is None or self._swapped is not None or not isinstance(strategy.model, DERNet):
            return
        head = strategy.head
        current = {k: v.detach().clone() for k, v in head.state_dict().items()}
        if {k: v.shape for k, v in current.items()} != {k: v.shape for k, v in before.items()}:
            return  # the model grew since the stage: nothing to undo
        head.load_state_dict(before)
        self._swapped = (head, current)

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
        counts = self.params_per_experience
        self._warned = self.warn_growth is not None and any(n > self.warn_growth * counts[0] for n in counts)
        before = state["head_before_stage"]
        self.head_before_stage = None if before is None else {k: v.clone() for k, v in before.items()}
