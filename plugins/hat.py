"""HAT: hard attention to the task, per-task unit masks that block the gradients to earlier tasks' units."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from streamcl import Plugin, hookimpl
from streamcl.errors import ConfigError
from streamcl.masks import (MaskedSequential, annealed_scale, attention_regulariser, condition_gradients_,
                            cumulative_masks, find_units, gradient_factors)
from streamcl.parts import model_as, replace_module
from streamcl.plugins.multi_head import experience_tasks


class HATNet(nn.Module):
    """The user's feature extractor (``extractor``: the model with its head replaced by ``nn.Identity``) with a
    :class:`~streamcl.masks.MaskedSequential` at ``units`` (one set of unit embeddings per task), then ``head``.
    Called with the batch's task labels, which route each row to its task's masks for that one call."""

    def __init__(self, extractor: nn.Module, head: nn.Module, units: str):
        super().__init__()
        self.extractor, self.head, self.units = extractor, head, units

    def masked(self) -> MaskedSequential:
        module = self.extractor.get_submodule(self.units) if self.units else self.extractor
        if not isinstance(module, MaskedSequential):
            raise ConfigError("hat: the feature extractor's masked layers were replaced; list hat after plugins that "
                              "change the model")
        return module

    def layers(self) -> list[nn.Module]:
        """The masked Linear layers, then the head: the layers whose gradients HAT conditions (eq. 2)."""
        return [*self.masked().linear, self.head]

    def forward(self, x: Tensor, task_labels: Tensor | None = None) -> Tensor:
        masked = self.masked()
        masked.route = task_labels
        try:
            return self.head(self.extractor(x))
        finally:
            masked.route = None


class HAT(Plugin):
    """HAT (Serra, Suris, Miron & Karatzoglou 2018, "Overcoming Catastrophic Forgetting with Hard Attention to the
    Task", ICML, Sec. 2).

    Every unit ``i`` of every Linear layer ``l`` of the feature extractor is multiplied by the attention
    ``a^t_{l,i} = sigmoid(s e^t_{l,i})`` of the sample's task ``t`` (eq. 1), ``e^t_l`` one learned embedding per
    layer per task, drawn from N(0, 1) (the paper's; ``strategy.generator``) when a task label first arrives
    (``adapt_model``). Each row of a minibatch is masked by its own task label's embeddings, so mixed-task
    minibatches (replay) work; a task label never trained takes the most recent task's. The masks live in
    :class:`~streamcl.masks.MaskedSequential` (shared with DER), placed where the extractor allows it: an
    ``nn.Sequential`` of Linear layers and ReLU, LeakyReLU, Dropout, Flatten, Identity holding all of its
    parameters and giving its features (:func:`~streamcl.masks.find_units`); other extractors (convolutions,
    norms, attention) are refused when the Strategy is built, naming what they hold.

    Training (Sec. 2.3-2.5): ``s`` anneals over the ``B`` batches of every epoch, ``s = 1/s_max + (s_max - 1/s_max)
    (b - 1)/(B - 1)`` (eq. 3), and is ``s_max`` in evaluation. The embeddings' gradient is the compensated one of
    eq. 6, ``s_max [cosh(s e) + 1] / (s [cosh(e) + 1])`` times the plain one (:func:`~streamcl.masks.hat_mask`),
    and the embeddings are clamped to ``|e| <= 6`` after each step (the authors' ``thres_emb``). The loss gains
    ``c R`` (``loss/hat``), eq. 5, ``R = sum_l sum_i a^t_{l,i} (1 - a^{<t}_{l,i}) / sum_l sum_i (1 -
    a^{<t}_{l,i})`` over the masked layers, at the current ``s`` (the mean of the experience's tasks' when it
    brings several). After each experience its tasks' masks at ``s_max`` are kept; the cumulative mask of an
    experience is the elementwise maximum of the other tasks' (eq. 4: the tasks trained before, less the ones it
    trains again). Before the step (``before_update``, after every other plugin's edits) every gradient is
    conditioned (eq. 2): ``W_l[i, j]`` times ``1 - min(a^{<t}_l[i], a^{<t}_{l-1}[j])``, the bias times ``1 -
    a^{<t}_l[i]``, the first layer's inputs unmasked. The paper's heads are one per task; here the model's one
    head is conditioned as a last layer whose output units are the classes of the other trained tasks (1) and the
    rest (0): with TaskMask (one task's classes per task, SFM-5-TIL) this is the paper's multi-head case (a new
    task's rows train freely, old tasks' rows keep their weights from their units and their bias); with a head
    shared by every task (PFM-5-TL) the columns from earlier tasks' units and the bias are fixed after the first
    task. The embeddings of tasks not trained by the experience get no update (their gradient is dropped), so
    replayed rows of old tasks cannot move their masks. So the weights between units that earlier tasks use
    (mask 1) are fixed; a unit earlier tasks half use is half protected, as in the paper.

    Momentum: the paper trains with plain SGD; with momentum, an old unit's momentum would keep moving its frozen
    weights after a task switch, so at the start of each experience every parameter's optimizer state is zeroed
    (``strategy.forget_momentum``), and since conditioned gradients are exactly 0 where the mask is 1, the fixed
    weights stay bit-identical (weight decay would still shrink them: the protocols use none). ``clipgrad``
    (the authors' code: 10000; default off, the paper has none) clips the gradients' norm after conditioning.

    Task-incremental prediction is not HAT's: the runner adds TaskMask on a task-incremental stream (prediction
    among the task's classes). On a class-incremental stream every sample carries task 0: one task, so HAT is
    plain training with masks, annealing and the regulariser (nothing is protected).

    Defaults: ``s_max = 400`` and ``c = 0.75`` (the paper's). It owns ``architecture`` (it wraps the extractor) and
    requires a linear classifier head. ``parameters_per_task`` gives the embeddings each task adds (one per unit of
    each masked layer), ``units_per_task`` the units each task's mask keeps (``a >= 0.5``) per layer.
    """

    owns = frozenset({"architecture"})
    requires = frozenset({"head"})

    def __init__(self, s_max: float = 400.0, c: float = 0.75, clipgrad: float | None = None):
        if isinstance(s_max, bool) or not isinstance(s_max, (int, float)) or not 1 <= s_max <= 1e4:
            raise ConfigError(f"hat s_max={s_max!r}: the masks' final scale, a number from 1 to 10000 "
                              "(sigmoid(s_max e) must tend to 0 or 1)")
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ConfigError(f"hat c={c!r}: the regulariser's weight, a finite number >= 0")
        if clipgrad is not None and (isinstance(clipgrad, bool) or not isinstance(clipgrad, (int, float))
                                     or not math.isfinite(clipgrad) or clipgrad <= 0):
            raise ConfigError(f"hat clipgrad={clipgrad!r}: the gradients' largest norm, a finite number > 0 "
                              "(or none: no clipping)")
        self.s_max, self.c = float(s_max), float(c)
        self.clipgrad = None if clipgrad is None else float(clipgrad)
        self.task_masks: dict[int, list[Tensor]] = {}  # each trained task's masks at s_max
        self.cumulative: list[Tensor] | None = None  # a^{<t} of the experience training now
        self.head_rows: Tensor | None = None  # the head's rows (classes) other trained tasks use
        self.current: list[int] = []  # the task labels of the experience training now
        self._units: str | None = None
        self._factors: tuple | None = None  # gradient_factors for (cumulative, head shape), cached

    # ------------------------------------------------------------------------------ refusals
    @hookimpl
    def setup(self, strategy) -> None:
        self._units = find_units(strategy.extractor(), type(strategy.model).__name__, "hat",
                                 "HAT needs fully connected layers; for this model use another method (multi_head "
                                 "with ewc, or lwf)")
        head = strategy.head
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor) or weight.shape != (head.out_features, head.in_features):
            raise ConfigError(f"hat conditions the head's weight gradients by the units it reads: it needs a head with "
                              f"a weight of shape (out_features, in_features), and {type(head).__name__} has none")

    # ------------------------------------------------------------------------------ the masks
    @staticmethod
    def _net(strategy) -> HATNet:
        return model_as(strategy, HATNet, "hat", "HAT's masked network")

    @hookimpl
    def adapt_model(self, strategy, model: nn.Module, experience) -> nn.Module:
        if not isinstance(model, HATNet):
            extractor = strategy.extractor(model)
            seq = extractor.get_submodule(self._units) if self._units else extractor
            task = experience_tasks(experience)[0][0]
            masked = MaskedSequential(seq, self._embeddings(strategy, seq), self.s_max, task)
            if self._units:
                replace_module(extractor, self._units, masked)
            else:
                extractor = masked
            head = strategy.head if model is strategy.model else model.get_submodule(strategy.head_path)
            model = HATNet(extractor, head, self._units)
        masked = model.masked()
        for task, _ in experience_tasks(experience):
            if task not in masked.tasks:
                masked.add_task(task, self._embeddings(strategy, masked.seq))
        return model

    @staticmethod
    def _embeddings(strategy, seq: nn.Sequential) -> list[Tensor]:
        like = next(seq.parameters())
        return [torch.randn(m.out_features, generator=strategy.generator, dtype=like.dtype).to(like.device)
                for m in seq if isinstance(m, nn.Linear)]

    @hookimpl
    def before_training_exp(self, strategy) -> None:
        net = self._net(strategy)
        for p in net.parameters():  # the paper's plain SGD: no momentum carried into a new task
            strategy.forget_momentum(p)
        self.current = [task for task, _ in experience_tasks(strategy.experience)]
        others = [m for task, m in self.task_masks.items() if task not in self.current]
        like = net.masked().final_masks(0)
        self.cumulative = cumulative_masks(others, like) if others else None
        rows = torch.zeros(net.head.out_features, dtype=like[0].dtype, device=like[0].device)
        classes = sorted({c for e in strategy.trained for task, cs in experience_tasks(e) if task not in self.current
                          for c in cs if c < len(rows)})
        rows[classes] = 1.0
        self.head_rows = rows
        self._factors = None

    @hookimpl
    def before_training_iteration(self, strategy) -> None:
        n = math.ceil(len(strategy.train_dataset) / strategy.batch_size)  # eq. 3 over the B batches of an epoch
        self._net(strategy).masked().s = annealed_scale(strategy.iteration, n, self.s_max)

    @hookimpl
    def loss_terms(self, strategy) -> dict[str, Tensor] | None:
        if self.c == 0:
            return None
        masked = self._net(strategy).masked()
        masks = [masked.masks(masked.index_of(task)) for task in self._tasks(masked)]
        cumulative = self.cumulative or [torch.zeros_like(m) for m in masks[0]]
        value = sum(attention_regulariser(m, cumulative) for m in masks) / len(masks)
        return {"hat": self.c * value}

    def _tasks(self, masked: MaskedSequential) -> list[int]:
        return [t for t in self.current if t in masked.tasks] or [masked.tasks[-1]]

    @hookimpl
    def before_update(self, strategy) -> None:
        net = self._net(strategy)
        masked = net.masked()
        training = {masked.index_of(t) for t in self._tasks(masked)}
        for k, embeddings in enumerate(masked.embeddings):
            if k not in training:  # other tasks' masks stay as they were learned
                for e in embeddings:
                    e.grad = None
        if self.cumulative is not None:
            layers = net.layers()
            key = (tuple(net.head.weight.shape), net.head.weight.device)
            if self._factors is None or self._factors[0] != key:
                rows = self.head_rows.to(net.head.weight.device)
                rows = torch.cat([rows, rows.new_zeros(max(0, net.head.out_features - len(rows)))])
                cumulative = [a.to(net.head.weight.device) for a in self.cumulative]
                self._factors = (key, gradient_factors(cumulative, rows[: net.head.out_features]))
            condition_gradients_(layers, self._factors[1])
        if self.clipgrad is not None:
            torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], self.clipgrad)

    @hookimpl
    def after_update(self, strategy) -> None:
        self._net(strategy).masked().clamp_()

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        masked = self._net(strategy).masked()
        for task in self._tasks(masked):
            self.task_masks[task] = [m.cpu() for m in masked.final_masks(masked.index_of(task))]
            for layer, m in enumerate(self.task_masks[task]):
                strategy.log(f"hat/task{task}_units{layer}", float((m >= 0.5).sum()))
        self.cumulative, self.head_rows, self._factors = None, None, None

    # ------------------------------------------------------------------------------ reporting
    @staticmethod
    def parameters_per_task(strategy) -> dict[int, int]:
        """The embeddings each task adds (one per unit of each masked layer); the weights are shared."""
        masked = HAT._net(strategy).masked()
        return {t: sum(e.numel() for e in es) for t, es in zip(masked.tasks, masked.embeddings)}

    def units_per_task(self) -> dict[int, list[int]]:
        """The units each trained task's mask keeps (``a >= 0.5``), per masked layer."""
        return {t: [int((m >= 0.5).sum()) for m in ms] for t, ms in self.task_masks.items()}

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"task_masks": {t: [m.clone() for m in ms] for t, ms in self.task_masks.items()},
                "cumulative": None if self.cumulative is None else [a.clone() for a in self.cumulative],
                "head_rows": None if self.head_rows is None else self.head_rows.clone(),
                "current": list(self.current)}

    def load_state_dict(self, state: dict) -> None:
        self.task_masks = {int(t): [m.clone() for m in ms] for t, ms in state["task_masks"].items()}
        self.cumulative = None if state["cumulative"] is None else [a.clone() for a in state["cumulative"]]
        self.head_rows = None if state["head_rows"] is None else state["head_rows"].clone()
        self.current = list(state["current"])
        self._factors = None
