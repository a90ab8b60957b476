"""An ensemble of independent models, one per experience: the task's member predicts; without a task label, every
member's log-softmax over its own classes, pooled."""
from __future__ import annotations

import copy
import inspect
from typing import Sequence

import torch
from torch import Tensor, nn

from streamcl import ConfigError, DataError, Plugin, hookimpl
from streamcl.models.heads import grow_heads
from streamcl.parts import check_first, grown_linear, replace_module
from streamcl.plugins.cosine_head import first_sample


def _takes_task(module: nn.Module) -> bool:
    return "task_labels" in inspect.signature(module.forward).parameters


class MemberHeads(nn.Module):
    """The ensemble's output: member ``k``'s head ``heads[k]`` on its slice of the features (the members' features
    side by side, ``widths[k]`` columns each), its scores ``z_k`` restricted to its classes ``C_k`` and turned into
    log-probabilities over them, ``s_k(c) = log softmax_{c' in C_k}(z_k)[c]``. The output has ``out_features``
    columns, one per class of the stream; a column no member owns is 0 (finite for plugins that store or distil
    the model's output; :class:`Ensemble` masks it in prediction).

    * A row whose task label is member ``k``'s task (the latest such member) is member ``k``'s alone: ``s_k`` on
      ``C_k`` (task-incremental prediction by the task's model).
    * Any other row (a class-incremental stream: no member has a task label) pools the members,
      ``out[c] = log sum_{k: c in C_k} exp(s_k(c))``: the concatenated log-softmax of each member when the members'
      classes are disjoint, the log of the summed probabilities (an ensemble's average, up to ``log`` of the number
      of members) for a class several members hold. In training (``self.training``) a class several members hold
      takes the latest member's ``s_k(c)``, so the member in training learns from its own loss alone.

    A ``heads[k]`` that is ``nn.Identity`` stands for a model without a classifier head (the member is the whole
    model, its outputs its scores).
    """

    def __init__(self, head: nn.Module, width: int, out_features: int):
        super().__init__()
        self.heads = nn.ModuleList([head])
        self.widths: list[int] = [int(width)]
        self.out_features = int(out_features)
        self.tasks: list[int | None] = []  # the task label of each member's experience (None: none given)
        self.member_classes: list[list[int]] = []  # C_k, as the buffers classes_k hold them

    @property
    def in_features(self) -> int:
        return sum(self.widths)

    @property
    def members(self) -> int:
        return len(self.tasks)

    def classes(self, k: int) -> Tensor:
        return getattr(self, f"classes_{k}")

    def set_classes(self, k: int, task: int | None, classes: Sequence[int], device) -> None:
        """Member ``k`` holds ``classes`` of task ``task`` (the experience it is trained on)."""
        classes = sorted(int(c) for c in classes)
        self.register_buffer(f"classes_{k}", torch.tensor(classes, dtype=torch.long, device=device))
        self.tasks = [*self.tasks[:k], None if task is None else int(task)]
        self.member_classes = [*self.member_classes[:k], classes]
        self.grow_to(max(classes, default=-1) + 1)

    def grow_to(self, n: int) -> bool:
        if n <= self.out_features:
            return False
        self.out_features = int(n)
        return True

    def member_index(self, t: Tensor) -> Tensor:
        """For each task label of ``t``: the latest member of that task, or -1 (pool every member)."""
        index = torch.full_like(t, -1)
        for k, task in enumerate(self.tasks):
            if task is not None:
                index = torch.where(t == task, k, index)
        return index

    def allowed(self, t: Tensor) -> Tensor:
        """``(len(t), out_features)``: the columns a row's prediction is among (its member's classes, or every
        member's)."""
        table = torch.zeros(self.members + 1, self.out_features, dtype=torch.bool, device=t.device)
        for k in range(self.members):
            table[k, self.classes(k).to(t.device)] = True
        table[-1] = table[:-1].any(0)
        index = self.member_index(t)
        return table[torch.where(index >= 0, index, self.members)]

    def scores(self, f: Tensor) -> list[Tensor]:
        """``s_k``: each member's log-probabilities over its own classes, ``(N, |C_k|)``."""
        out = []
        for k, (head, part) in enumerate(zip(self.heads, f.split(self.widths, -1))):
            z, classes = head(part), self.classes(k)
            if z.shape[-1] <= max(self.member_classes[k]):
                raise DataError(f"ensemble member {k} gives {z.shape[-1]} outputs, but its experience holds class "
                                f"{max(self.member_classes[k])}; give the model an output per class")
            out.append(z.index_select(-1, classes).log_softmax(-1))
        return out

    def forward(self, f: Tensor, task_labels: Tensor | None = None) -> Tensor:
        out = f.new_zeros(*f.shape[:-1], self.out_features)
        if not self.members:
            return out
        s = self.scores(f)
        owned: set[int] = set()
        for k in range(self.members):  # pooled: every member on its own classes
            classes, held = self.classes(k), [c in owned for c in self.member_classes[k]]
            if self.training or not any(held):
                out = out.index_copy(-1, classes, s[k])
            else:
                held = torch.tensor(held, device=f.device)
                pooled = torch.where(held, torch.logaddexp(out.index_select(-1, classes), s[k]), s[k])
                out = out.index_copy(-1, classes, pooled)
            owned.update(self.member_classes[k])
        if task_labels is None or all(task is None for task in self.tasks):
            return out
        index = self.member_index(task_labels.to(f.device).reshape(-1))
        for k in range(self.members):  # a row of a member's task: that member alone
            if self.tasks[k] is not None:
                alone = f.new_zeros(out.shape).index_copy(-1, self.classes(k), s[k])
                out = torch.where((index == k).reshape(-1, *([1] * (out.dim() - 1))), alone, out)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, members={self.members}"


class EnsembleNet(nn.Module):
    """Independent members: ``bodies[k]`` (inputs to features) and ``head.heads[k]`` make member ``k``, a copy of
    the user's model; the forward runs every member and :class:`MemberHeads` combines them. Members before
    ``trainable`` are frozen (no gradients) and always in evaluation mode (their normalisation statistics and
    dropout fixed)."""

    def __init__(self, body: nn.Module, head: nn.Module, width: int, out_features: int):
        super().__init__()
        self.bodies = nn.ModuleList([body])
        self.head = MemberHeads(head, width, out_features)
        self.trainable = 0  # the index of the member in training (earlier ones are frozen)
        self.takes_task = [_takes_task(body)]  # whether each body's forward takes the task labels

    def add_member(self, body: nn.Module, head: nn.Module) -> None:
        """Member ``len(bodies)``: ``body`` and ``head``, with member 0's feature width."""
        self.bodies.append(body)
        self.head.heads.append(head)
        self.head.widths.append(self.head.widths[0])
        self.takes_task.append(_takes_task(body))

    def forward(self, x: Tensor, task_labels: Tensor | None = None) -> Tensor:
        feats = [body(x, task_labels=task_labels) if takes else body(x)
                 for body, takes in zip(self.bodies, self.takes_task)]
        f = feats[0] if len(feats) == 1 else torch.cat(feats, -1)
        if isinstance(self.head, MemberHeads):
            return self.head(f, task_labels)
        return self.head(f)  # a feature extractor (the head replaced by nn.Identity)

    def member(self, k: int) -> list[nn.Module]:
        return [self.bodies[k], self.head.heads[k]]

    def member_parameters(self, k: int) -> int:
        return sum(p.numel() for m in self.member(k) for p in m.parameters())

    def train(self, mode: bool = True) -> EnsembleNet:
        super().train(mode)
        if isinstance(self.head, MemberHeads):
            for k in range(min(self.trainable, len(self.bodies))):
                for m in self.member(k):
                    m.train(False)
        return self


class Ensemble(Plugin):
    """One independent model per experience: the ensemble baseline of task-incremental learning ("independent"
    in Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning", Sec. 5: one predictor per task;
    "Separate Networks" in van de Ven, Tuytelaars & Tolias 2022, "Three types of incremental learning", Nature
    Machine Intelligence: one network per context; De Lange et al. 2021, "A continual learning survey", TPAMI,
    parameter isolation taken to one model per task). Nothing is shared, so nothing is forgotten; the price is
    a whole model per experience.

    Member ``k`` is a copy of the user's model as it was before any training (the same initial weights, and the
    same layers frozen as the user froze them; copying rather than re-drawing keeps any initialisation or
    pre-training the user gave the model, and is a draw from the same distribution for a model built from
    scratch), trained on experience ``k`` alone and frozen after it: at ``adapt_model`` of experience ``k`` the
    members before it stop taking gradients and train in evaluation mode, and member ``k`` is added (its
    parameters join the optimizer group of member 0's of the same name; ``strategy.model_changed`` by the engine).
    Member 0 is the user's model itself, split at its classifier head: the members' features side by side are the
    ensemble's features (the input of :class:`MemberHeads`, ``strategy.head``); a model without a head (or whose
    head's output is not the model's) is a member whole.

    With ``z_k(x)`` member ``k``'s scores and ``C_k`` its experience's classes, ``s_k(c | x) = log softmax_{C_k}
    z_k(x)`` (each member's log-softmax over its own classes). Trained member ``k`` minimises
    ``-s_k(y | x)`` on its experience's samples (cross-entropy over its own classes).

    * Task-incremental (the experience has a task label; SFM-5-TIL): a sample of task ``t`` is predicted by the
      member trained on task ``t``: ``argmax_{c in C_k} s_k(c | x)``.
    * Class-incremental (no task label; SFM-5): every member's log-softmax over its own classes, concatenated;
      the prediction is ``argmax_c s_{k(c)}(c | x)``, the class its member is most sure of (a class held by
      several members: ``log sum_k exp s_k(c | x)``, the members' probabilities pooled).

    ``adapt_logits`` masks to ``-inf`` every column outside the row's member's classes (task-incremental) or held
    by no member (class-incremental); the model's own output keeps 0 there. ``parameters_per_experience`` holds
    the model's parameter count after each experience (a member's is the user's model's).

    Measured (seeds 0-2): SFM-5-TIL 0.990, no forgetting, 269,322 parameters per task; SFM-5 0.388 (Naive 0.199):
    each member is sure of one of its two classes for any input, so other experiences' samples go to the most
    confident member (docs/methods.md, with the combinations tried).

    It owns the roles ``task_head`` (it makes the task-incremental prediction itself), ``classifier_head``,
    ``head_rows`` and ``architecture`` (it rebuilds the model around its head), so plugins that replace or rescale
    the head or restructure the model are refused beside it. It requires no head.
    """

    owns = frozenset({"task_head", "classifier_head", "head_rows", "architecture"})

    def __init__(self):
        self.initial: dict[str, dict[str, Tensor]] | None = None  # member 0 before training: "body", "head"
        self.trains: dict[str, list[str]] = {}  # "body", "head": the parameters that took gradients at the start
        self.parameters_per_experience: list[int] = []

    # ------------------------------------------------------------------------------ members
    @hookimpl
    def adapt_model(self, strategy, model: nn.Module, experience) -> nn.Module:
        if not isinstance(model, EnsembleNet):
            check_first(strategy, model, "ensemble", "builds its members from")
            model = self._wrap(strategy, experience)
        else:
            self._add_member(strategy, model)
        heads = model.head
        k = len(model.bodies) - 1
        heads.set_classes(k, experience.task, experience.classes, next(model.parameters()).device)
        head = heads.heads[k]
        if not isinstance(head, nn.Identity):
            if callable(getattr(head, "grow_to", None)):
                grow_heads(head, heads.out_features)
            elif type(head) is nn.Linear and head.out_features < heads.out_features:
                heads.heads[k] = grown_linear(head, heads.out_features)
        self._freeze(model)
        return model

    def _wrap(self, strategy, experience) -> EnsembleNet:
        """Member 0: the user's model, split at its head when the head gives the model's output."""
        model = strategy.model
        sample = first_sample(experience.dataset)
        out = strategy.infer(sample, adapt=False)
        path = strategy.head_path
        try:
            head = strategy.head
        except ConfigError:
            head = None
        split = False
        if head is not None and out.features is not None:
            with torch.no_grad():
                was = head.training
                head.eval()
                split = torch.equal(head(out.features), out.raw)
                head.train(was)
        if split:
            width = strategy.feature_dim
            if path == "":
                body = nn.Identity()
            else:
                replace_module(model, path, nn.Identity())
                body = model
        else:
            body, head, width = model, nn.Identity(), out.raw.shape[-1]
        n_out = max(int(getattr(head, "out_features", width)), *(c + 1 for c in experience.classes))
        net = EnsembleNet(body, head, width, n_out)
        self.initial = {name: {k: v.detach().clone() for k, v in m.state_dict().items()}
                        for name, m in (("body", body), ("head", head))}
        self.trains = {name: [n for n, p in m.named_parameters() if p.requires_grad]
                       for name, m in (("body", body), ("head", head))}
        return net

    def _add_member(self, strategy, net: EnsembleNet) -> None:
        """Member ``k``: a copy of member 0 with member 0's initial weights, taking gradients as member 0 did."""
        if self.initial is None:
            raise ConfigError("ensemble: its state lacks the initial model (a checkpoint of another run?)")
        parts = []
        for name, module in zip(("body", "head"), net.member(0)):
            new = copy.deepcopy(module)
            new.load_state_dict(self._fit_initial(new, self.initial[name]))
            for n, p in new.named_parameters():
                p.requires_grad_(n in self.trains[name])
                p.grad = None
            parts.append(new.train(net.training))
        net.add_member(*parts)

    @staticmethod
    def _fit_initial(module: nn.Module, initial: dict[str, Tensor]) -> dict[str, Tensor]:
        """``initial`` fitted to ``module``'s entries: a grown head's rows beyond the initial ones keep their values."""
        now = module.state_dict()
        out = {}
        for k, v in now.items():
            old = initial.get(k)
            if old is None or old.shape == v.shape:
                out[k] = v if old is None else old
            else:
                fresh = v.detach().clone()
                fresh[tuple(slice(0, min(a, b)) for a, b in zip(old.shape, v.shape))] = \
                    old[tuple(slice(0, min(a, b)) for a, b in zip(old.shape, v.shape))]
                out[k] = fresh
        return out

    @staticmethod
    def _freeze(net: EnsembleNet) -> None:
        """Every member but the newest: no gradients, evaluation mode."""
        net.trainable = len(net.bodies) - 1
        for k in range(net.trainable):
            for m in net.member(k):
                for p in m.parameters():
                    p.requires_grad_(False)
                    p.grad = None
        net.train(net.training)

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        model = strategy.model
        if isinstance(model, EnsembleNet):
            self.parameters_per_experience.append(sum(p.numel() for p in model.parameters()))
            strategy.log("ensemble/parameters", self.parameters_per_experience[-1])

    # ------------------------------------------------------------------------------ prediction
    @hookimpl
    def adapt_logits(self, strategy, logits: Tensor, batch) -> Tensor | None:
        model = strategy.model
        if not isinstance(model, EnsembleNet) or not isinstance(model.head, MemberHeads) or not model.head.members:
            return None
        allowed = model.head.allowed(batch.t.to(logits.device).reshape(-1))[:, : logits.shape[1]]
        if allowed.shape[1] < logits.shape[1]:
            allowed = torch.cat([allowed, allowed.new_zeros(len(allowed), logits.shape[1] - allowed.shape[1])], 1)
        return logits.masked_fill(~allowed.reshape(logits.shape), float("-inf"))

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"initial": None if self.initial is None else
                {name: {k: v.clone() for k, v in part.items()} for name, part in self.initial.items()},
                "trains": {k: list(v) for k, v in self.trains.items()},
                "parameters_per_experience": list(self.parameters_per_experience)}

    def load_state_dict(self, state: dict) -> None:
        initial = state["initial"]
        self.initial = None if initial is None else {name: {k: v.clone() for k, v in part.items()}
                                                     for name, part in initial.items()}
        self.trains = {k: list(v) for k, v in state["trains"].items()}
        self.parameters_per_experience = list(state["parameters_per_experience"])
