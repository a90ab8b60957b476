"""Per-task weights over one network: the network called, for each task's rows, with that task's weights.

Techniques that keep one set of weights per task over a shared architecture (PackNet's packed weights, Piggyback's and
SupSup's masks, a hypernetwork's generated weights) run the user's module under ``torch.func.functional_call`` with
the task's tensors in place of some of its parameters: no knowledge of its forward is needed. :func:`maskable` finds
the weight matrices such techniques mask; :func:`call_per_task` runs a minibatch whose rows belong to several tasks.
"""
from __future__ import annotations

import inspect
from abc import ABCMeta, abstractmethod
from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from streamcl.errors import ConfigError
from streamcl.parts import capture_input, check_first

# layers whose ``weight`` is a matrix (or a kernel) over its inputs: what weight masks act on
MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def maskable(model: nn.Module, who: str) -> list[str]:
    """The names of the ``weight`` parameters of ``model``'s Linear and Conv layers (in ``named_parameters`` order);
    a ConfigError from ``who`` when it has none."""
    layers = {id(m.weight) for m in model.modules() if isinstance(m, MASKABLE) and isinstance(m.weight, nn.Parameter)}
    names = [n for n, p in model.named_parameters() if id(p) in layers]
    if not names:
        kinds = sorted({type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(recurse=False))})
        raise ConfigError(f"{who} masks the weights of Linear and Conv layers, and {type(model).__name__} has none "
                          f"(its parameters are in {', '.join(kinds) or 'no module'})")
    return names


def call_per_task(module: nn.Module, x: Tensor, tasks: Tensor, weights_of: Callable[[int], Mapping[str, Tensor]],
                  head_path: str | None = None, **kwargs) -> Tensor:
    """``module(x)`` where row ``i`` runs with ``weights_of(tasks[i])`` in place of the parameters they name
    (``functional_call``; parameters they do not name are the module's own). ``kwargs`` are passed to the module,
    their tensors cut to each task's rows.

    One call when every row has the same task. Otherwise one call per task present; then, when ``head_path`` names the
    module's classifier head (the engine reads the features at its input), the head runs once more on every row's
    features (with the weights of the last task called; its output is thrown away), so that a hook on the head that
    keeps its latest input, as the engine's does, sees the whole minibatch's features.
    """
    present = torch.unique(tasks).tolist()
    if len(present) == 1:
        return functional_call(module, dict(weights_of(present[0])), (x,), kwargs)
    head = None if head_path is None else module.get_submodule(head_path)
    out = features = weights = None
    for task in present:
        where = torch.nonzero(tasks == task).squeeze(1)
        weights = dict(weights_of(task))
        part = {k: v[where] if isinstance(v, Tensor) and v.shape[:1] == tasks.shape else v for k, v in kwargs.items()}
        if head is None:
            z = functional_call(module, weights, (x[where],), part)
        else:
            with capture_input(head) as box:
                z = functional_call(module, weights, (x[where],), part)
            if box:
                f = box[0]
                features = f.new_zeros(x.shape[0], *f.shape[1:]) if features is None else features
                features = features.index_put((where,), f)
        out = z.new_zeros(x.shape[0], *z.shape[1:]) if out is None else out
        out = out.index_put((where,), z)
    if features is not None:
        prefix = f"{head_path}." if head_path else ""
        functional_call(head, {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, (features,))
    return out


class TaskWeightsNet(nn.Module, metaclass=ABCMeta):
    """The user's ``model`` run with per-task weights: each row's task label picks a *slot* (the table
    ``slot_of``, a buffer: ``slot_of[t]`` is task ``t``'s slot, -1 for none), and the rows of slot ``s`` run with
    ``weights_of(s)`` (a subclass's; names relative to ``model``). A task label with no slot (never trained, or out
    of the table) takes the newest slot; ``route`` (when not ``None``) overrides every row's slot for the calls it is
    set for. ``get_classifier()`` is the model's head (at ``head_path`` in ``model``, ``None``: no head), so the
    engine finds it there and reads the features at its input. With ``norm_fixed`` set, the model's batch-norm
    layers stay in evaluation mode (running statistics no longer updated: earlier tasks' normalisation kept)."""

    def __init__(self, model: nn.Module, head_path: str | None):
        super().__init__()
        self.model, self.head_path = model, head_path
        self.takes_task = "task_labels" in inspect.signature(model.forward).parameters
        self.register_buffer("slot_of", torch.full((0,), -1, dtype=torch.long))
        self.register_buffer("slots", torch.zeros((), dtype=torch.long))  # how many slots exist
        self.route: Tensor | None = None
        self.norm_fixed = False

    @classmethod
    def around(cls, strategy, model: nn.Module, who: str, *args) -> tuple[TaskWeightsNet, bool]:
        """In ``adapt_model``: ``model`` if it is already a ``cls``, else ``model`` (refused unless it is
        ``strategy.model``) wrapped as ``cls(model, head_path, maskable(model, who), *args)``; and whether it was
        wrapped now."""
        if isinstance(model, cls):
            return model, False
        check_first(strategy, model, who, "wraps")
        return cls(model, strategy.head_path, maskable(model, who), *args), True

    def train(self, mode: bool = True) -> TaskWeightsNet:
        super().train(mode)
        if self.norm_fixed:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(False)
        return self

    @property
    def n_slots(self) -> int:
        return int(self.slots)

    def get_classifier(self) -> nn.Module | None:
        return None if self.head_path is None else self.model.get_submodule(self.head_path)

    def new_slot(self, tasks: list[int]) -> int:
        """A new slot, the newest, for task labels ``tasks`` (each ``>= 0``)."""
        slot = self.n_slots
        size = max([len(self.slot_of) - 1, *tasks]) + 1
        table = torch.full((size,), -1, dtype=torch.long, device=self.slot_of.device)
        table[: len(self.slot_of)] = self.slot_of
        table[torch.tensor(tasks, dtype=torch.long, device=table.device)] = slot
        self.slot_of, self.slots = table, self.slots + 1
        return slot

    def slot_rows(self, t: Tensor | None, n: int, device) -> Tensor:
        """Each row's slot: ``route`` if set, else its task label's slot, else the newest."""
        if self.route is not None:
            return self.route.to(device).reshape(-1).expand(n) if self.route.numel() == 1 else self.route.to(device)
        newest = self.n_slots - 1
        if t is None or not len(self.slot_of):
            return torch.full((n,), newest, dtype=torch.long, device=device)
        t = t.to(device).reshape(-1)
        inside = (t >= 0) & (t < len(self.slot_of))
        slot = self.slot_of.to(device)[t.clamp(0, len(self.slot_of) - 1)]
        return torch.where(inside & (slot >= 0), slot, newest)

    @abstractmethod
    def weights_of(self, slot: int) -> dict[str, Tensor]:
        """Slot ``slot``'s tensors by parameter name in ``model`` (each technique defines its own)."""

    def forward(self, x: Tensor, task_labels: Tensor | None = None) -> Tensor:
        if self.n_slots == 0:
            raise RuntimeError(f"{type(self).__name__} has no slot yet: its plugin adds one per task")
        kwargs = {"task_labels": task_labels} if self.takes_task else {}
        slots = self.slot_rows(task_labels, x.shape[0], x.device)
        if x.shape[0] == 1:  # no data-dependent branch: safe under torch.func.vmap (per-sample gradients)
            table = [self.weights_of(s) for s in range(self.n_slots)]
            weights = {k: torch.stack([w[k] for w in table]).index_select(0, slots[:1])[0] for k in table[0]}
            return functional_call(self.model, weights, (x,), kwargs)
        return call_per_task(self.model, x, slots, self.weights_of, self.head_path, **kwargs)


def task_label(experience, who: str) -> int:
    """The experience's task label (0 when it has none), refused when negative."""
    task = 0 if experience.task is None else int(experience.task)
    if task < 0:
        raise ConfigError(f"{who}: task label {task} in {experience!r}; task labels must be >= 0")
    return task


def straight_through(binary: Tensor, scores: Tensor) -> Tensor:
    """``binary`` (a 0/1 mask computed from ``scores``) in the forward pass, with the gradient passed to ``scores``
    unchanged (the straight-through estimator: d mask / d scores taken as 1)."""
    return binary.to(scores.dtype) + scores - scores.detach()


def earlier_classes(strategy) -> list[int]:
    """The classes of experiences trained before the current one that the current one does not bring."""
    now = set(strategy.experience.classes) if strategy.experience is not None else set()
    return sorted({c for e in strategy.trained if e is not strategy.experience for c in e.classes} - now)


@torch.no_grad()
def hold_rows(head: nn.Module | None, classes: list[int]) -> None:
    """Zero the gradients of the head's weight rows and bias entries of ``classes`` (weights another task owns)."""
    for name in ("weight", "bias"):
        p = getattr(head, name, None)
        if isinstance(p, Tensor) and p.grad is not None:
            rows = [c for c in classes if c < p.shape[0]]
            if rows:
                p.grad[rows] = 0
