"""Knowledge distillation from a frozen copy of the model on the logits of the classes seen before."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from streamcl import Plugin, hookimpl
from streamcl.errors import ConfigError
from streamcl.parts import frozen

KINDS = ("kl", "bce")


class Distill(Plugin):
    """Distillation of the old classes' logits from the model as it was before the current experience.

    At ``before_training_exp`` of every experience after the first, the teacher is a frozen copy of
    ``strategy.model`` (eval mode, no gradients). On every training minibatch (replayed samples
    included, unless ``replayed=False``), with student logits ``z`` (``output.raw``) and teacher logits
    ``z'`` (``strategy.forward(batch, model=teacher, adapt=False).raw``), both the model's own (before
    ``adapt_logits``: a task mask does not hide the old heads), restricted to the old classes (those of
    the experiences trained before this one):

    * ``kind="kl"`` (LwF; Li & Hoiem 2017, "Learning without Forgetting", eq. 2-3):
      ``T^2 * KL(softmax(z'/T) || softmax(z/T))``, averaged over the batch. The paper's loss is the
      cross-entropy ``-sum_j y'_j log y_j`` of eq. 2; the KL differs from it by the teacher's entropy,
      a constant, so the gradient is the same and the logged term is 0 when the student matches.
      The ``T^2`` factor (Hinton et al. 2015; not in the LwF paper, where the term is this one / T^2)
      keeps the gradient's scale independent of ``T``.
      Defaults from the paper: ``T = 2``, ``lambda_o = 1`` (``weight``). Under task labels, with old tasks of
      different classes, the softmax is taken per old task (each old task's head has its own, as in the paper)
      and the terms are summed; without task labels one softmax over every old class.
    * ``kind="bce"`` (iCaRL; Rebuffi et al. 2017, "iCaRL: Incremental Classifier and Representation
      Learning", Alg. 3): ``-sum_{y old} [q_y log g_y + (1 - q_y) log(1 - g_y)]`` with
      ``q_y = sigmoid(z'_y / T)`` and ``g_y = sigmoid(z_y / T)``, summed over the old classes as in
      the paper and averaged over the batch; ``T = 1`` by default (the paper uses no temperature).

    ``temperature=None`` takes the default of the kind. The term is ``weight`` times the above,
    logged as ``loss/distill`` (``loss/lwf`` for :class:`LwFDistill`). ``replayed=True`` (default)
    distils every sample of the minibatch, as iCaRL does over new data and exemplars (Alg. 3);
    ``replayed=False`` only the experience's own samples, as LwF does (eq. 2 is over the new data).
    It owns the role ``logit_distillation``: two distillers of the old logits (say ``Distill`` and
    ``LwFDistill``) in one strategy are refused; tune ``weight`` instead. Any model works: the teacher
    runs through the engine's forward (task labels passed where the model takes them).
    """

    term = "distill"
    # one teacher's logits distilled once: a second distiller of the same logits is refused at construction
    owns = frozenset({"logit_distillation"})

    def __init__(self, kind: str = "kl", weight: float = 1.0, temperature: float | None = None,
                 replayed: bool = True):
        if kind not in KINDS:
            raise ConfigError(f"distillation kind={kind!r}: use one of {', '.join(KINDS)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"distillation weight={weight!r}: it must be a finite number >= 0")
        if temperature is None:
            temperature = 2.0 if kind == "kl" else 1.0
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not math.isfinite(temperature) or temperature <= 0):
            raise ConfigError(f"distillation temperature={temperature!r}: it must be a finite number > 0")
        if not isinstance(replayed, bool):
            raise ConfigError(f"distillation replayed={replayed!r}: use true (distil replayed samples too) or false")
        self.kind, self.weight, self.temperature, self.replayed = kind, float(weight), float(temperature), replayed
        self.teacher: torch.nn.Module | None = None
        self.old_classes: list[int] = []  # classes of the experiences trained so far, in order of arrival
        self.task_classes: dict[int, list[int]] = {}  # task label -> its classes, for experiences that have one
        self._old: Tensor | None = None  # the same, as an index tensor on the logits' device

    # ------------------------------------------------------------------------------ teacher
    @hookimpl
    def before_training_exp(self, strategy) -> None:
        if not self.old_classes:
            return
        self._set_teacher(frozen(strategy.model))  # the plain module (never the DDP wrapper), head already grown

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        self.old_classes += [c for c in strategy.experience.classes if c not in self.old_classes]
        if strategy.experience.task is not None:
            group = self.task_classes.setdefault(int(strategy.experience.task), [])
            group += [c for c in strategy.experience.classes if c not in group]

    # ------------------------------------------------------------------------------ loss
    @hookimpl
    def loss_terms(self, strategy, batch, output) -> dict[str, Tensor] | None:
        if self.teacher is None or self.weight == 0:
            return None
        logits = output.logits if output.raw is None else output.raw  # the model's own, as the teacher's
        if not self.replayed:  # the experience's own samples come first, replayed ones after them
            batch, logits = batch.select(slice(0, strategy.n_current)), logits[: strategy.n_current]
        if self._old is None or self._old.device != logits.device:
            self._old = torch.tensor(self.old_classes, dtype=torch.long, device=logits.device)
        with torch.no_grad():
            target = strategy.forward(batch, model=self.teacher, adapt=False).raw
        groups = self.kl_groups()
        if groups:  # LwF under task labels: one softmax per old task's classes (eq. 2 per old task's head)
            return {self.term: self.weight * sum(self.distillation(logits[:, g], target[:, g])
                                                 for g in (torch.tensor(g, device=logits.device) for g in groups))}
        return {self.term: self.weight * self.distillation(logits[:, self._old], target[:, self._old])}

    def kl_groups(self) -> list[list[int]]:
        """``kind="kl"`` after two or more tasks with different classes: each old task's classes (the softmax of
        each old task's head); else none (one softmax over every old class)."""
        groups = {tuple(sorted(g)) for g in self.task_classes.values()} if self.kind == "kl" else set()
        return sorted(list(g) for g in groups) if len(groups) > 1 else []

    def distillation(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The unweighted term on old-class logits ``student`` (with gradient) and ``teacher``, shape (N, C)."""
        T = self.temperature
        if self.kind == "kl":
            log_p = F.log_softmax(student / T, dim=1)
            log_q = F.log_softmax(teacher / T, dim=1)
            return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * T * T
        q = torch.sigmoid(teacher / T)
        bce = F.binary_cross_entropy_with_logits(student / T, q, reduction="none")
        return bce.sum(1).mean()

    def _set_teacher(self, teacher: torch.nn.Module | None) -> None:
        self.teacher, self._old = teacher, None

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"old_classes": list(self.old_classes), "teacher": self.teacher,
                "task_classes": {k: list(v) for k, v in self.task_classes.items()},
                "teacher_state": None if self.teacher is None else self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.old_classes = list(state["old_classes"])
        self.task_classes = {int(k): list(v) for k, v in state.get("task_classes", {}).items()}
        self._set_teacher(frozen(state["teacher"], state["teacher_state"]))


class LwFDistill(Distill):
    """Learning without Forgetting's distillation (Li & Hoiem 2017, eq. 2-3): :class:`Distill` with
    ``kind="kl"`` and ``T = 2``, its term logged as ``loss/lwf``. ``weight = 0.25`` is the paper's
    ``lambda_o = 1``: its term has no ``T^2`` factor and ours has, so ``weight = lambda_o / T^2``. As in
    the paper, the term is on the current experience's samples (``X_n``, all LwF has); beside a replay
    memory, ``replayed=True`` also distils the replayed samples.
    """

    term = "lwf"

    def __init__(self, kind: str = "kl", weight: float = 0.25, temperature: float | None = 2.0,
                 replayed: bool = False):
        super().__init__(kind, weight, temperature, replayed)
