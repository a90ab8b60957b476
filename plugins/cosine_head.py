"""LUCIR's cosine-normalised classifier: a learnable scale times the cosine of features and class weights."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import default_collate

from streamcl import Plugin, hookimpl
from streamcl.batch import Batch
from streamcl.errors import ConfigError
from streamcl.parts import check_first, replace_module
from streamcl.plugins.nme import class_means
from streamcl.plugins.wa import head_rows
from streamcl.scenarios import TensorData, as_batch


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
        self.register_buffer("frozen", torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device))

    def freeze(self, rows: Tensor) -> None:
        """Mark ``rows`` (indices below ``out_features``) frozen: from now on they get no gradient."""
        self.frozen[rows.to(self.frozen.device)] = True

    def rows(self) -> Tensor:
        """The weight, its frozen rows detached."""
        frozen = getattr(self, "frozen", None)  # None: a head pickled before the buffer existed
        if frozen is None or not bool(frozen.any()):
            return self.weight
        return torch.where(frozen[:, None], self.weight.detach(), self.weight)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def cosine(self, x: Tensor) -> Tensor:
        """``<w_bar_c, f_bar>``, shape (N, out_features), in [-1, 1]."""
        return F.linear(F.normalize(x.flatten(1), dim=1), F.normalize(self.rows(), dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.cosine(x)

    def extra_repr(self) -> str:
        learned = "learned" if isinstance(self.scale, nn.Parameter) else "fixed"
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={learned}"


def final_relu(strategy, sample: Batch) -> str | None:
    """The path of the ``nn.ReLU`` module whose output is the head's input, found by running the model on ``sample``:
    the head must be called once, and the ReLU module called once and registered at one path (so that replacing it
    removes that one ReLU and no other). ``None`` when there is none (a functional ``relu``, another activation, a
    pooling or normalisation between them)."""
    head, model = strategy.head, strategy.model
    paths: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.ReLU):
            paths.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    if not modules:
        return None
    inputs: list[Tensor] = []
    outputs: dict[int, list[Tensor]] = {key: [] for key in modules}

    def keep_output(key):
        return lambda _module, _args, out: outputs[key].append(out)

    handles = [head.register_forward_pre_hook(lambda _module, args: inputs.append(args[0] if args else None))]
    handles += [m.register_forward_hook(keep_output(key)) for key, m in modules.items()]
    try:
        strategy.infer(sample, adapt=False, batch_size=len(sample))
    finally:
        for handle in handles:
            handle.remove()
    if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
        return None
    x = inputs[0]
    feeding = [key for key, outs in outputs.items() if len(outs) == 1 and isinstance(outs[0], Tensor)
               and (outs[0] is x or (outs[0].data_ptr() == x.data_ptr() and outs[0].numel() == x.numel()))]
    if len(feeding) != 1 or len(paths[feeding[0]]) != 1:
        return None
    return paths[feeding[0]][0]


def first_sample(dataset) -> Batch:
    """The first sample of ``dataset`` as a Batch of one (no DataLoader: no draw from the global generator)."""
    if isinstance(dataset, TensorData):
        return Batch(dataset.x[:1], dataset.y[:1], dataset.t[:1])
    return Batch.from_sample(default_collate([dataset[0]]))


class CosineHead(Plugin):
    """Cosine normalisation and weight imprinting (Hou et al. 2019, "Learning a Unified Classifier
    Incrementally via Rebalancing" (LUCIR), CVPR, cosine normalisation, eq. 4).

    At the first experience ``adapt_model`` puts in the place of the model's classifier head (``strategy.head``,
    found for any model: the MLP's 256 -> 10, a plain ``nn.Sequential``'s last ``nn.Linear``, ResNet's ``fc``,
    a ViT's ``head``) a :class:`CosineLinear` with the same weight rows and no bias (``strategy.set_head``; the
    optimizer follows): the logits become ``eta * <w_bar_c, f_bar(x)>`` (eq. 4), with ``eta`` one learnable
    scalar starting at ``scale`` (1, as in the authors' code; ``learn_scale=False`` keeps it fixed). Every row
    of the head stays (the protocol's head has all 10 outputs from the start); when later classes need more
    outputs (a growing head), new rows are drawn from ``strategy.generator`` as ``nn.Linear`` draws them.
    A head without a weight of one row per class is refused when the Strategy is built.

    Imprinting (``imprint=True``; LUCIR's initialisation of new-class weights, after Qi et al. 2018,
    "Low-Shot Learning with Imprinted Weights"): at ``before_training_exp`` of every experience after the
    first, the row of each class of the experience not seen before is set to the normalised mean of the
    normalised features of its training samples (``strategy.embed``: the head's input, eval mode), times
    the mean norm of the rows of the classes seen before (as the authors' code does; the norm sets how
    fast SGD turns the row). The optimizer's running state of those rows is cleared
    (``strategy.forget_momentum``), so the first step starts from the imprinted direction.

    Fixed old-class weights (``freeze_old=True``, default): at ``before_training_exp`` of every experience after
    the first, the rows of the classes seen before are frozen (:meth:`CosineLinear.freeze`: no loss reaches
    them) and their optimizer state cleared, so only the new classes' rows (and the scale and the layers
    below) learn, as in the authors' code under the less-forget constraint (github.com/hshustc/
    CVPR19_Incremental_Learning: the old classifier ``fc1`` at learning rate 0) and FACIL's lucir. On SFM-5
    (``lucir``, seeds 0-2) frozen rows measure 0.811 / 0.809 / 0.816, forgetting 0.058, against 0.794 / 0.800 /
    0.802, forgetting 0.155, with ``freeze_old=False`` (every row keeps learning: the earlier behaviour).

    ``drop_last_relu=True`` turns the ``nn.ReLU`` module whose output is the head's input into ``nn.Identity``,
    as LUCIR removes the last ReLU of its ResNet so that features, and so the cosines, can be negative (the
    authors' code; the features other plugins see change with it). That ReLU is found by running the model
    on one sample of the first experience (:func:`final_relu`): the MLP's last ``backbone`` ReLU, the ReLU right
    before a plain ``nn.Sequential``'s last Linear. Where no such module feeds the head — torchvision's ResNet
    (pooling between), a ViT (normalisation), a ``relu`` called as a function, a ReLU module used twice — the
    model is left as it is; ``dropped_relu`` says which path was replaced (``None``: none).

    Defaults are the paper's; on SFM-5 (Replay-500 + the three LUCIR parts, seed 0) neither choice
    matters much: 0.796 as is, 0.795 keeping the ReLU, 0.797 without imprinting.

    It owns the roles ``classifier_head`` (it replaces the head: one plugin per strategy may) and
    ``architecture`` (plugins that rebuild or cut the model's own layers, or read its head as a plain
    linear layer: progress & compress, hypernetwork, latent replay, WA, COIL, cannot run beside it). Beside
    :class:`~streamcl.plugins.nme.NMEClassifier` (role ``classifier``) it trains the features and the
    nearest-mean rule predicts at evaluation.
    """

    owns = frozenset({"classifier_head", "architecture", "head_rows"})
    requires = frozenset({"head"})

    def __init__(self, scale: float = 1.0, learn_scale: bool = True, imprint: bool = True,
                 drop_last_relu: bool = True, freeze_old: bool = True):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"cosine_head scale={scale!r}: the initial scale eta, a finite number > 0")
        for name, value in (("learn_scale", learn_scale), ("imprint", imprint), ("drop_last_relu", drop_last_relu),
                            ("freeze_old", freeze_old)):
            if not isinstance(value, bool):
                raise ConfigError(f"cosine_head {name}={value!r}: use true or false")
        self.scale, self.learn_scale = float(scale), learn_scale
        self.imprint, self.drop_last_relu, self.freeze_old = imprint, drop_last_relu, freeze_old
        self.classes: list[int] = []  # classes of the experiences trained so far, in order of arrival
        self.dropped_relu: str | None = None  # the path of the ReLU module replaced by nn.Identity, if any

    @hookimpl
    def setup(self, strategy) -> None:
        head_rows(strategy, "cosine_head")  # it starts from the head's weight rows

    # ------------------------------------------------------------------------------ the head
    @hookimpl
    def adapt_model(self, strategy, model: nn.Module, experience) -> nn.Module:
        head = strategy.head
        if isinstance(head, CosineLinear):
            self._grow(strategy, head, experience)
            return model
        check_first(strategy, model, "cosine_head", "replaces the head of")
        if self.drop_last_relu:
            self.dropped_relu = final_relu(strategy, first_sample(experience.dataset))
            if self.dropped_relu is not None:
                replace_module(strategy.model, self.dropped_relu, nn.Identity())
        strategy.set_head(CosineLinear(head.weight, self.scale, self.learn_scale))
        return strategy.model

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
        head.frozen = torch.cat([head.frozen, head.frozen.new_zeros(seen - old)])

    # ------------------------------------------------------------------------------ imprinting
    @hookimpl
    def before_training_exp(self, strategy) -> None:
        exp = strategy.experience
        new = [c for c in exp.classes if c not in self.classes]
        if not self.classes or not (self.freeze_old or (self.imprint and new)):
            return
        head = strategy.head
        if not isinstance(head, CosineLinear):
            raise ConfigError(f"cosine_head: the classifier head at {strategy.head_path!r} is no longer its cosine "
                              "head; another plugin replaced it, and a strategy takes one plugin per head")
        if self.freeze_old:
            old = torch.tensor([c for c in self.classes if c < head.out_features], dtype=torch.long,
                               device=head.weight.device)
            head.freeze(old)
            strategy.forget_momentum(head.weight, rows=old)  # momentum would carry them on
        if not (self.imprint and new):
            return
        data = as_batch(exp.dataset, strategy.device)
        part = data.select(torch.isin(data.y, torch.tensor(new, device=data.y.device)))
        classes, means = class_means(strategy.embed(part), part.y)
        self.imprint_rows(head, classes, means, self.classes)
        # stale momentum of the rows' earlier (untrained) life would turn them at once
        strategy.forget_momentum(head.weight, rows=classes[classes < head.out_features].to(head.weight.device))

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
        return {"classes": list(self.classes), "dropped_relu": self.dropped_relu}

    def load_state_dict(self, state: dict) -> None:
        self.classes, self.dropped_relu = list(state["classes"]), state.get("dropped_relu")
