"""SupSup: a supermask per task over fixed random weights; without task labels, the task inferred by the gradient of
the output's entropy with respect to the masks' mixing coefficients."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from streamcl import ConfigError, Plugin, hookimpl
from streamcl.task_weights import TaskWeightsNet, maskable, straight_through, task_label


def top_fraction(scores: Tensor, density: float) -> Tensor:
    """The 0/1 mask of the ``round(density * n)`` entries of ``scores`` largest in magnitude (edge-popup's top-k;
    among entries tied at the cut, the earlier kept)."""
    n, k = scores.numel(), int(round(density * scores.numel()))
    size = scores.detach().abs().flatten()
    if k in (0, n):
        return torch.full_like(scores, k == n, dtype=torch.bool)
    cut = size.kthvalue(n - k + 1).values  # the k-th largest
    keep = size > cut
    short = k - int(keep.sum())
    if short:  # the entries equal to the cut, in order, fill the rest
        tied = torch.nonzero(size == cut).squeeze(1)[:short]
        keep[tied] = True
    return keep.reshape(scores.shape)


class SupSupNet(TaskWeightsNet):
    """The model with fixed weights ``W_i`` (``names``) and, per slot ``k``, scores ``scores[k][i]``: slot ``k`` runs
    with ``W_i * top(scores[k][i])`` (straight-through to the scores). ``classes`` (slot x class, the buffer
    ``table``) holds each slot's classes. With ``infer`` set, an evaluation forward chooses each row's slot itself
    (:meth:`infer_slots`); ``last_slots`` keeps the slots the latest forward used."""

    def __init__(self, model: nn.Module, head_path: str | None, names: list[str], density: float, infer: str):
        super().__init__(model, head_path)
        self.names, self.density, self.infer = list(names), float(density), infer
        self.scores = nn.ModuleList()
        self.register_buffer("table", torch.zeros(0, 0, dtype=torch.uint8))  # uint8: gloo broadcasts no bool
        self.infer_tasks = False  # set by the plugin: the stream gives no task labels (GN)
        self.last_slots: Tensor | None = None

    def params(self) -> list[nn.Parameter]:
        found = dict(self.model.named_parameters())
        return [found[n] for n in self.names]

    def add_slot(self, tasks: list[int], classes: list[int], generator: torch.Generator) -> int:
        """A slot for ``tasks`` scoring ``classes``, its scores drawn as ``nn.Linear`` draws weights,
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the paper's Kaiming-uniform initialisation)."""
        slot = self.new_slot(tasks)
        scores = nn.ParameterList()
        for p in self.params():
            bound = 1 / math.sqrt(max(1, p[0].numel()))
            s = (torch.rand(p.shape, generator=generator, dtype=p.dtype) * 2 - 1) * bound
            scores.append(nn.Parameter(s.to(p.device)))
        self.scores.append(scores)
        n = max(self.table.shape[1], max(classes, default=-1) + 1)
        table = torch.zeros(slot + 1, n, dtype=torch.uint8, device=self.table.device)
        table[: self.table.shape[0], : self.table.shape[1]] = self.table
        table[slot, classes] = 1
        self.table = table
        return slot

    @property
    def classes(self) -> Tensor:
        """``(slots, classes)``, boolean: the classes of each slot."""
        return self.table.bool()

    def masks(self, slot: int) -> list[Tensor]:
        return [straight_through(top_fraction(s, self.density), s.abs()) for s in self.scores[slot]]

    def weights_of(self, slot: int) -> dict[str, Tensor]:
        return {n: p * m for n, p, m in zip(self.names, self.params(), self.masks(slot))}

    @torch.no_grad()
    def infer_slots(self, x: Tensor, kwargs: dict) -> Tensor:
        """One-shot task inference (SupSup, Sec. 3.3, eq. 4): the network runs with the superposition
        ``W * sum_k alpha_k M_k`` at ``alpha_k = 1/K``; the slot inferred is ``argmin_k dH/d alpha_k``, ``H`` the
        entropy of the softmax over every slot's classes. ``infer = "sample"``: each row's own entropy (forward-mode
        derivatives, one pass per slot); ``"batch"``: the minibatch's mean entropy, one slot for all its rows."""
        k = self.n_slots
        if self.infer == "each":
            h = []
            for s in range(k):
                own = self.classes[s].nonzero().squeeze(1)
                logp = functional_call(self.model, self.weights_of(s), (x,), kwargs)[:, own].log_softmax(1)
                h.append(-(logp.exp() * logp).sum(1))
            return torch.stack(h, 1).argmin(1)
        masks = [[m.detach() for m in self.masks(s)] for s in range(k)]
        params = [p.detach() for p in self.params()]
        seen = self.classes.any(0).nonzero().squeeze(1)

        def entropy(alpha: Tensor) -> Tensor:
            weights = {n: p * sum(a * m[i] for a, m in zip(alpha, masks))
                       for i, (n, p) in enumerate(zip(self.names, params))}
            logp = functional_call(self.model, weights, (x,), kwargs)[:, seen].log_softmax(1)
            h = -(logp.exp() * logp).sum(1)
            return h if self.infer == "sample" else h.mean()[None]

        alpha = torch.full((k,), 1.0 / k, dtype=params[0].dtype, device=x.device)
        with sdpa_kernel(SDPBackend.MATH):  # attention's fused kernels have no forward-mode derivative
            grads = torch.stack([jvp(entropy, (alpha,), (torch.eye(k, dtype=alpha.dtype, device=x.device)[j],))[1]
                                 for j in range(k)], 1)
        return grads.argmin(1).expand(x.shape[0]) if self.infer == "batch" else grads.argmin(1)

    def forward(self, x: Tensor, task_labels: Tensor | None = None) -> Tensor:
        if self.infer_tasks and not self.training and self.n_slots > 1 and self.route is None and x.shape[0]:
            kwargs = {"task_labels": task_labels} if self.takes_task else {}
            self.route = self.infer_slots(x, kwargs)
            try:
                return self.forward(x, task_labels)
            finally:
                self.route = None
        self.last_slots = self.slot_rows(task_labels, x.shape[0], x.device)
        return super().forward(x, task_labels)


class SupSup(Plugin):
    """Supermasks in Superposition (Wortsman et al. 2020, "Supermasks in Superposition", NeurIPS, Sec. 3).

    The weights of the model's Linear and Conv layers are redrawn once as signed Kaiming constants,
    ``W = sqrt(2 / fan_in) * sign(u)`` (Ramanujan et al. 2020, edge-popup), and never trained; biases are set to 0
    and every other parameter is fixed, batch-norm statistics included (the paper's networks have no bias and
    no affine normalisation). Each task ``k`` learns a supermask
    ``M_k``: scores ``S_k`` per weight, the mask keeping the fraction ``density`` of each layer's weights with the
    largest ``|S_k|`` (edge-popup's top-k, 50% there), trained by the straight-through estimator; the task runs with
    ``W * M_k``. Only the scores train, at ``scores_lr`` (the protocol's SGD; edge-popup's scores start at
    ``1/sqrt(fan_in)`` and need a rate scaled to ``dL/dS = dL/dW * W``).

    * GG (task label given, e.g. SFM-5-TIL): a sample's task label picks its mask; prediction among its task's
      classes.
    * GN (no task labels, e.g. SFM-5): each experience is a task (a training row runs with the mask of the newest
      task holding its class, so replayed rows keep theirs); at evaluation the task is inferred by the one-shot
      rule of eq. 4: with the superposition ``W * sum_k alpha_k M_k`` at ``alpha_k = 1/K``, the task is
      ``argmin_k dH/d alpha_k``, ``H`` the entropy of the output over every task's classes. ``infer = "sample"``
      infers each sample's task on its own (a class-incremental prediction with no assumption on the test batch);
      ``"batch"`` infers one task per evaluation minibatch from its mean entropy, the paper's setting, which holds
      only when a minibatch comes from one task. The prediction is among the inferred task's classes.
      ``inference_accuracy`` (and the log ``supsup/task_inference``) holds how often the task was inferred right in
      each evaluation.

    Stored per task: one mask bit per weight (``bits_per_task``). It owns ``architecture`` (it wraps the model),
    ``head_rows`` (the head's weights are masked) and ``task_head`` (it chooses, or infers, each sample's task and
    masks the logits to that task's classes).
    """

    owns = frozenset({"architecture", "head_rows", "task_head"})

    def __init__(self, density: float = 0.5, scores_lr: float = 10.0, infer: str = "sample"):
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"supsup density={density!r}: the share of each layer's weights a mask keeps, in (0, 1]")
        if isinstance(scores_lr, bool) or not isinstance(scores_lr, (int, float)) or not 0 < scores_lr < math.inf:
            raise ConfigError(f"supsup scores_lr={scores_lr!r}: the scores' learning rate, a finite number above 0")
        if infer not in ("sample", "batch", "each"):
            raise ConfigError(f"supsup infer={infer!r}: 'sample' (each sample's task inferred on its own) or 'batch' "
                              "(one task per evaluation minibatch, the paper's setting)")
        self.density, self.scores_lr, self.infer = float(density), float(scores_lr), infer
        self.slot_experience: list[int] = []  # the training experience of each slot
        self.inference_accuracy: list[float] = []
        self._hits = [0, 0]

    @hookimpl
    def setup(self, strategy) -> None:
        maskable(strategy.model, "supsup")

    @hookimpl
    def adapt_model(self, strategy, model: nn.Module, experience) -> nn.Module:
        model, new = SupSupNet.around(strategy, model, "supsup", self.density, self.infer)
        if new:
            self._fix_weights(model, strategy.generator)
            model.norm_fixed = True
        task = task_label(experience, "supsup")
        model.infer_tasks = experience.task is None
        slot = model.add_slot([task], sorted(int(c) for c in experience.classes), strategy.generator)
        for k, scores in enumerate(model.scores):
            for s in scores:
                s.requires_grad_(k == slot)
        self.slot_experience.append(int(experience.index))
        return model

    @staticmethod
    @torch.no_grad()
    def _fix_weights(model: SupSupNet, generator: torch.Generator) -> None:
        masked = {id(p) for p in model.params()}
        for p in model.model.parameters():
            if id(p) in masked:
                sign = torch.rand(p.shape, generator=generator) < 0.5
                fan_in = max(1, p[0].numel())
                p.copy_(torch.where(sign, -1.0, 1.0).to(p) * math.sqrt(2.0 / fan_in))
            elif p.dim() == 1 and any(p is getattr(m, "bias", None) for m in model.model.modules()):
                p.zero_()
            p.requires_grad_(False)

    @hookimpl
    def param_groups(self, strategy, model: nn.Module) -> list[dict] | None:
        if not isinstance(model, SupSupNet) or not model.n_slots:
            return None
        return [{"params": list(model.scores[-1]), "lr": self.scores_lr, "weight_decay": 0.0}]

    # ------------------------------------------------------------------------------ GN training: rows by their class
    @hookimpl
    def before_forward(self, strategy) -> None:
        """Without task labels, a training row is routed to the newest task holding its class (replayed rows of
        earlier experiences to theirs), so that its class is among its mask's outputs."""
        model = strategy.model
        if isinstance(model, SupSupNet) and model.infer_tasks and model.n_slots:
            y = strategy.batch.y.to(model.classes.device)
            n = model.classes.shape[1]
            table = model.classes * torch.arange(1, model.n_slots + 1, device=y.device)[:, None]
            owner = table.max(0).values - 1  # the newest slot holding each class, -1: none
            slot = owner[y.clamp(0, n - 1)]
            model.route = torch.where((y < n) & (slot >= 0), slot, model.n_slots - 1)

    @hookimpl
    def after_forward(self, strategy) -> None:
        if isinstance(strategy.model, SupSupNet):
            strategy.model.route = None

    # ------------------------------------------------------------------------------ prediction
    @hookimpl
    def adapt_logits(self, strategy, logits: Tensor, batch) -> Tensor | None:
        model = strategy.model
        if not isinstance(model, SupSupNet) or model.last_slots is None or len(model.last_slots) != len(logits):
            return None
        table = model.classes.to(logits.device)
        allowed = table[model.last_slots.to(logits.device)][:, : logits.shape[1]]
        if allowed.shape[1] < logits.shape[1]:
            allowed = torch.cat([allowed, allowed.new_zeros(len(allowed), logits.shape[1] - allowed.shape[1])], 1)
        if model.infer_tasks and model.training and strategy.is_training:  # a training row of an earlier task run
            y = batch.y.to(logits.device).reshape(-1, 1)                  # by another plugin's forward (a memory
            allowed = allowed.scatter(1, y.clamp(0, logits.shape[1] - 1), True)  # sample): its class is scored too
        return logits.masked_fill(~allowed, float("-inf"))

    @hookimpl
    def after_eval_forward(self, strategy) -> None:
        model = strategy.model
        if not isinstance(model, SupSupNet) or not model.infer_tasks or model.last_slots is None:
            return
        exp = strategy.experience.index
        if exp in self.slot_experience:
            truth = len(self.slot_experience) - 1 - self.slot_experience[::-1].index(exp)
            self._hits[0] += int((model.last_slots == truth).sum())
            self._hits[1] += len(model.last_slots)

    @hookimpl
    def before_eval(self, strategy) -> None:
        self._hits = [0, 0]

    @hookimpl
    def after_eval(self, strategy) -> None:
        if self._hits[1]:
            self.inference_accuracy.append(self._hits[0] / self._hits[1])
            strategy.log("supsup/task_inference", self.inference_accuracy[-1])

    @staticmethod
    def bits_per_task(strategy) -> int:
        """One bit per masked weight."""
        model = strategy.model
        return sum(p.numel() for p in model.params()) if isinstance(model, SupSupNet) else 0

    def state_dict(self) -> dict:
        return {"slot_experience": list(self.slot_experience), "inference_accuracy": list(self.inference_accuracy)}

    def load_state_dict(self, state: dict) -> None:
        self.slot_experience = list(state["slot_experience"])
        self.inference_accuracy = list(state["inference_accuracy"])
