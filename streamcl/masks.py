"""Unit masks on fully connected layers, after HAT (Serra et al. 2018, "Overcoming Catastrophic Forgetting with
Hard Attention to the Task", ICML, eq. 1-3 and Sec. 2.5-2.6), as DER uses them (Yan et al. 2021, eq. 5-6).

Each unit ``j`` of a Linear layer is multiplied by ``m_j = sigmoid(s e_j)``, ``e`` a learned embedding and ``s`` a
scale annealed from ``1/s_max`` to ``s_max`` within an epoch (:func:`annealed_scale`). The masks are applied where
the model allows it without knowing its forward: an ``nn.Sequential`` of Linear layers and parameter-free modules
that commute with a non-negative scale (``f(m z) = m f(z)`` for ``m >= 0``: ReLU, LeakyReLU, Dropout, Flatten,
Identity), holding every parameter of the feature extractor and giving its output (:func:`find_units`).

HAT's pieces beside the masks: one set of embeddings per task routed by each row's task label
(:class:`MaskedSequential`), the cumulative mask of the tasks before (eq. 4, :func:`cumulative_masks`), the
conditioned gradients (eq. 2, :func:`gradient_factors`, :func:`condition_gradients_`) and the attention-mask
regulariser (eq. 5, :func:`attention_regulariser`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from streamcl import distributed as dist
from streamcl.errors import ConfigError

EMBEDDING_LIMIT = 6.0  # HAT's bound on the mask embeddings (``thres_emb``), so a closed unit can still reopen
UNIT_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.ReLU, nn.LeakyReLU)  # parameter-free, f(m z) = m f(z)
UNIT_NAMES = "Linear, ReLU, LeakyReLU, Dropout, Flatten and Identity"


def hat_mask(e: Tensor, s: float, s_max: float) -> Tensor:
    """``sigmoid(s e)`` (HAT eq. 1, DER eq. 5) whose gradient with respect to ``e`` is HAT's compensated one,
    ``s_max sigmoid'(e)`` times the gradient with respect to the mask (HAT eq. 2-3: the gradient of ``sigmoid(s e)``
    rescaled by ``s_max [cosh(s e) + 1] / (s [cosh(e) + 1])``), which does not vanish as ``s`` grows."""
    soft = torch.sigmoid(e)
    return torch.sigmoid(s * e).detach() + s_max * (soft - soft.detach())


def annealed_scale(b: int, n: int, s_max: float) -> float:
    """HAT eq. 3 / DER eq. 6: ``s = 1/s_max + (s_max - 1/s_max) (b - 1) / (B - 1)`` at batch ``b`` (here 0-based) of
    ``B = n`` batches; ``s_max`` when an epoch has one batch."""
    if n <= 1:
        return float(s_max)
    b = min(max(b, 0), n - 1)
    return 1 / s_max + (s_max - 1 / s_max) * b / (n - 1)


class MaskedSequential(nn.Module):
    """``seq`` (an ``nn.Sequential`` of Linear layers and :data:`UNIT_MODULES`) with every Linear layer's outputs
    multiplied by its mask ``hat_mask(e, s, s_max)``; ``s`` is used while training, ``s_max`` in evaluation.
    The masks act on pre-activations: for the modules allowed, ``f(m z) = m f(z)``, the same as masking the units.

    One set of embeddings per task (HAT's ``e^t_l``, one vector per Linear layer; DER uses one set, its first):
    ``embeddings[k]`` belongs to task label ``tasks[k]`` (:meth:`add_task`). ``route``, set by the caller for one
    forward, holds each row's task label: a row is masked by its task's embeddings, a label with none by the most
    recent task's; ``None`` is task 0 for every row. With one task, or one task in the minibatch, the masks are one
    vector per layer broadcast over the rows; with several, each row takes its task's (the embeddings of tasks
    absent from the minibatch stay out of the graph, except for a single row, as under ``torch.func.vmap``, and in a
    distributed run, where every task's are used so that every trainable parameter is in the graph)."""

    def __init__(self, seq: nn.Sequential, embeddings: Sequence[Tensor], s_max: float, task: int = 0):
        super().__init__()
        self.seq = seq
        self.embeddings = nn.ModuleList([nn.ParameterList([nn.Parameter(e) for e in embeddings])])
        self.tasks = [int(task)]
        self.s = self.s_max = float(s_max)
        self.route: Tensor | None = None

    @property
    def mask_logits(self) -> nn.ParameterList:
        """The first task's embeddings (DER's only set)."""
        return self.embeddings[0]

    @property
    def linear(self) -> list[nn.Linear]:
        return [m for m in self.seq if isinstance(m, nn.Linear)]

    def add_task(self, task: int, embeddings: Sequence[Tensor]) -> int:
        """Embeddings for task label ``task`` (one per Linear layer); returns their index in :attr:`embeddings`."""
        if int(task) in self.tasks:
            raise ValueError(f"task {task} already has embeddings")
        self.embeddings.append(nn.ParameterList([nn.Parameter(e) for e in embeddings]))
        self.tasks.append(int(task))
        return len(self.tasks) - 1

    def index_of(self, task: int) -> int:
        """The index of task label ``task``'s embeddings (the most recent task's when it has none)."""
        return self.tasks.index(task) if task in self.tasks else len(self.tasks) - 1

    def task_index(self, t: Tensor) -> Tensor:
        """For each task label of ``t``: the index of its embeddings, or of the most recent task's when it has none."""
        ids = torch.tensor(self.tasks, dtype=t.dtype, device=t.device)
        match = t[:, None] == ids[None, :]
        own = (match.long() * torch.arange(len(ids), device=t.device)).sum(1)
        return torch.where(match.any(1), own, len(ids) - 1)

    def masks(self, k: int = 0) -> list[Tensor]:
        """Task index ``k``'s masks, one per Linear layer, at ``s`` while training and ``s_max`` in evaluation."""
        s = self.s if self.training else self.s_max
        return [hat_mask(e, s, self.s_max) for e in self.embeddings[k]]

    @torch.no_grad()
    def final_masks(self, k: int = 0) -> list[Tensor]:
        """Task index ``k``'s masks at ``s_max`` (HAT's ``a^t`` once task ``t`` is learned), without gradient."""
        return [torch.sigmoid(self.s_max * e.detach()) for e in self.embeddings[k]]

    def row_masks(self, n: int, every: bool = False) -> list[Tensor]:
        """The masks of ``n`` rows routed by :attr:`route`: one vector per layer when they share a task, else
        ``(n, units)`` per layer. ``every``: use every task's embeddings (each in the graph)."""
        if len(self.tasks) == 1:
            return self.masks(0)
        t = self.route
        if t is None:
            return self.masks(self.index_of(0))
        index = self.task_index(t.reshape(-1))
        every = every or n == 1
        present = list(range(len(self.tasks))) if every else torch.unique(index).tolist()
        if len(present) == 1 and not every:
            return self.masks(present[0])
        per = [self.masks(k) for k in present]
        if not every:
            where = torch.full((len(self.tasks),), -1, dtype=torch.long, device=index.device)
            where[torch.tensor(present, device=index.device)] = torch.arange(len(present), device=index.device)
            index = where[index]
        return [torch.stack([p[j] for p in per])[index] for j in range(len(per[0]))]

    def forward(self, x: Tensor) -> Tensor:
        masks, j = self.row_masks(x.shape[0], every=dist.active()), 0
        for module in self.seq:
            x = module(x)
            if isinstance(module, nn.Linear):
                m = masks[j]
                if m.dim() == 2 and x.dim() > 2:  # per-row masks on (rows, ..., units)
                    m = m.reshape(m.shape[0], *([1] * (x.dim() - 2)), m.shape[1])
                x = x * m
                j += 1
        return x

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the embeddings within HAT's bound, ``|e| <= 6``."""
        for embeddings in self.embeddings:
            for e in embeddings:
                e.clamp_(-EMBEDDING_LIMIT, EMBEDDING_LIMIT)


def cumulative_masks(masks: Sequence[Sequence[Tensor]], like: Sequence[Tensor]) -> list[Tensor]:
    """HAT eq. 4: ``a^{<t}_l = max(a^{<t-1}_l, a^{t-1}_l)``, the elementwise maximum over ``masks`` (each task's
    masks at ``s_max``, one per layer); zeros shaped as ``like`` when there are none (no task before)."""
    out = [torch.zeros_like(t) for t in like]
    for task in masks:
        out = [torch.maximum(a, m.to(a)) for a, m in zip(out, task)]
    return out


def gradient_factors(cumulative: Sequence[Tensor], head_rows: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
    """HAT eq. 2's factors, ``(weight, bias)`` per layer: ``1 - min(a^{<t}_l[i], a^{<t}_{l-1}[j])`` for the weight
    ``W_l[i, j]`` (the first layer: ``1 - a^{<t}_1[i]``, its inputs are not masked) and ``1 - a^{<t}_l[i]`` for
    the bias. With ``head_rows`` (the head's output units that earlier tasks used, 1 or 0) a last pair for a head
    reading the last layer's units: ``1 - min(head_rows[i], a^{<t}_L[j])`` and ``1 - head_rows[i]``."""
    out, previous = [], None
    for a in [*cumulative, *([] if head_rows is None else [head_rows])]:
        weight = a[:, None] if previous is None else torch.minimum(a[:, None], previous[None, :])
        out.append((1 - weight, 1 - a))
        previous = a
    return out


@torch.no_grad()
def condition_gradients_(layers: Sequence[nn.Module], factors: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Multiply each layer's weight and bias gradients by its :func:`gradient_factors` (in place; a layer without
    a gradient is left alone)."""
    for layer, (weight, bias) in zip(layers, factors):
        if layer.weight.grad is not None:
            layer.weight.grad.mul_(weight.to(layer.weight.grad))
        if getattr(layer, "bias", None) is not None and layer.bias.grad is not None:
            layer.bias.grad.mul_(bias.to(layer.bias.grad))


def attention_regulariser(masks: Sequence[Tensor], cumulative: Sequence[Tensor]) -> Tensor:
    """HAT eq. 5 without its weight ``c``: ``sum_l sum_i a^t_{l,i} (1 - a^{<t}_{l,i}) / sum_l sum_i (1 -
    a^{<t}_{l,i})``, over every masked layer; 0 when every unit is taken."""
    num = sum(((m * (1 - a.to(m))).sum() for m, a in zip(masks, cumulative)))
    den = sum(((1 - a).sum() for a in cumulative))
    return num / torch.as_tensor(den).clamp_min(torch.finfo(masks[0].dtype).tiny)


def _own_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _state_ids(module: nn.Module) -> set[int]:
    return {id(t) for t in (*module.parameters(), *module.buffers())}


def find_units(extractor: nn.Module, model_name: str, who: str, remedy: str) -> str:
    """The path inside ``extractor`` (``""``: the extractor itself) of the ``nn.Sequential`` whose Linear units can
    be masked: its children are Linear layers and :data:`UNIT_MODULES`, at least one Linear, it holds every parameter
    and buffer of ``extractor``, and its output is the extractor's (checked on two random inputs of the first Linear's
    width, drawn from a private generator). Otherwise a ConfigError, from ``who`` (the plugin), naming what
    ``model_name``'s extractor holds, and ending with ``remedy`` (how to do without masks)."""
    everything = _state_ids(extractor)
    fit = [(path, m) for path, m in extractor.named_modules() if isinstance(m, nn.Sequential)
           and all(isinstance(c, (nn.Linear, *UNIT_MODULES)) for c in m) and any(isinstance(c, nn.Linear) for c in m)
           and _state_ids(m) == everything]
    if not fit:
        foreign = list(dict.fromkeys(  # layers of other kinds, and tensors held by containers themselves
            name for m in extractor.modules() if _own_state(m) and not isinstance(m, nn.Linear)
            for name in ([type(m).__name__] if not list(m.children()) else
                         [f"{type(m).__name__}.{n}" for n, _ in (*m.named_parameters(recurse=False),
                                                                 *m.named_buffers(recurse=False))])))
        if foreign:
            why = f"holds {', '.join(foreign)}"
        else:
            odd = list(dict.fromkeys(type(m).__name__ for m in extractor.modules() if not _own_state(m)
                                     and not isinstance(m, (nn.Sequential, *UNIT_MODULES)) and not list(m.children())))
            why = (f"has Linear layers that are not one nn.Sequential of {UNIT_NAMES} layers"
                   + (f" (it holds {', '.join(odd)})" if odd else ""))
        raise ConfigError(f"{who} masks the units of fully connected layers; {model_name}'s extractor {why}: {remedy}")
    path, seq = fit[0]
    first = next(m for m in seq if isinstance(m, nn.Linear))
    last = [m for m in seq if isinstance(m, nn.Linear)][-1]
    box: list[Tensor] = []
    handle = seq.register_forward_hook(lambda _m, _args, out: box.append(out))
    was_training = extractor.training
    try:
        extractor.eval()
        x = torch.randn(2, first.in_features, generator=torch.Generator().manual_seed(0), dtype=first.weight.dtype)
        with torch.no_grad():
            out = extractor(x.to(first.weight.device))
        ok = bool(box) and isinstance(out, Tensor) and out.shape == (2, last.out_features) and torch.equal(out, box[-1])
        reason = "" if ok else "its output differs"
    except Exception as err:  # noqa: BLE001 - any failure of the probe means the check could not be made
        reason = f"a forward pass on inputs of {first.in_features} features failed: {type(err).__name__}: {err}"
    finally:
        handle.remove()
        extractor.train(was_training)
    if reason:
        where = f"the nn.Sequential at {path!r}" if path else "the nn.Sequential"
        raise ConfigError(f"{who} masks the units of fully connected layers, but {model_name}'s features are not "
                          f"the output of {where} of its Linear layers ({reason}): {remedy}")
    return path
