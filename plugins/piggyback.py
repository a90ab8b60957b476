"""Piggyback: one learned binary mask per task over a fixed network's weights."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from streamcl import ConfigError, Plugin, hookimpl
from streamcl.task_weights import TaskWeightsNet, hold_rows, maskable, straight_through, task_label


class PiggybackNet(TaskWeightsNet):
    """The model with, for each slot ``k`` that has them, real-valued mask scores ``scores[k][i]`` over weight
    ``names[i]``: slot ``k`` runs with ``W_i * (scores[k][i] > threshold)`` (a straight-through gradient to the
    scores). A slot without scores (``dense[k]``, the task that trains the backbone) runs with the weights as they
    are."""

    def __init__(self, model: nn.Module, head_path: str | None, names: list[str], threshold: float):
        super().__init__(model, head_path)
        self.names, self.threshold = list(names), float(threshold)
        self.scores = nn.ModuleList()  # per slot: a ParameterList, empty for a dense slot

    def params(self) -> list[nn.Parameter]:
        found = dict(self.model.named_parameters())
        return [found[n] for n in self.names]

    def add_slot(self, tasks: list[int], dense: bool, init: float) -> int:
        slot = self.new_slot(tasks)
        scores = nn.ParameterList()
        if not dense:
            for p in self.params():
                scores.append(nn.Parameter(torch.full(p.shape, float(init), dtype=p.dtype, device=p.device)))
        self.scores.append(scores)
        return slot

    def masks(self, slot: int) -> list[Tensor] | None:
        """Slot ``slot``'s binary masks (straight-through to its scores), or ``None`` for a dense slot."""
        scores = self.scores[slot]
        if not len(scores):
            return None
        return [straight_through(s > self.threshold, s) for s in scores]

    def weights_of(self, slot: int) -> dict[str, Tensor]:
        masks = self.masks(slot)
        params = self.params()
        if masks is None:
            return dict(zip(self.names, params))
        return {n: p * m for n, p, m in zip(self.names, params, masks)}


class Piggyback(Plugin):
    """Piggyback (Mallya, Davis & Lazebnik 2018, "Piggyback: Adapting a Single Network to Multiple Tasks by Learning
    to Mask Weights", ECCV, Sec. 3): the weights of a fixed network are shared by every task, and each task learns
    which of them to use.

    For task ``k`` and each weight matrix ``W`` of the model's Linear and Conv layers, real-valued scores ``m_r``
    (initialised to ``init``, 1e-2 in the paper) give the binary mask ``m = 1[m_r > threshold]`` (threshold 5e-3)
    and the task runs with ``W * m`` (eq. 1-2); ``dL/dm_r`` is taken equal to ``dL/dm`` (the straight-through
    estimator, eq. 3-4). Only the scores train; ``W`` stays as it is.

    The backbone: with ``train_first`` (default) the first task trains the network itself, densely, and it is fixed
    after it (the paper starts from an ImageNet-trained network; here the first task stands in for it); without it,
    the model given is taken as pre-trained and every task, the first too, learns a mask. Biases and every other
    parameter are fixed with the backbone (batch-norm statistics too). As the paper gives every task its own
    classifier, the rows of the head (weight and bias) of classes no earlier task had train densely with the task
    that brings them (masked as well).
    Scores learn at ``mask_lr`` (the paper trains them with Adam at 1e-4; the protocol's SGD needs a rate scaled to
    the size of ``dL/dm_r = dL/dW * W``).

    A sample's task label picks its mask (a label never trained: the newest). A class-incremental stream (every sample
    task 0) makes each experience a mask, evaluated with the newest. Stored per task: one bit per masked weight
    (``bits_per_task``), beside the dense head rows of its new classes. It owns ``architecture`` (it wraps the
    model) and ``head_rows`` (the head's weights are masked).
    """

    owns = frozenset({"architecture", "head_rows"})

    def __init__(self, threshold: float = 5e-3, init: float = 1e-2, mask_lr: float = 10.0, train_first: bool = True):
        for name, value in (("threshold", threshold), ("init", init), ("mask_lr", mask_lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"piggyback {name}={value!r}: a finite number")
        if mask_lr <= 0:
            raise ConfigError(f"piggyback mask_lr={mask_lr!r}: the scores' learning rate, above 0")
        if not isinstance(train_first, bool):
            raise ConfigError(f"piggyback train_first={train_first!r}: true (the first task trains the backbone) "
                              "or false (the model given is the backbone)")
        self.threshold, self.init, self.mask_lr, self.train_first = float(threshold), float(init), float(mask_lr), \
            train_first
        self.bits: list[int] = []  # the mask bits each task stores

    @hookimpl
    def setup(self, strategy) -> None:
        maskable(strategy.model, "piggyback")

    @hookimpl
    def adapt_model(self, strategy, model: nn.Module, experience) -> nn.Module:
        model, _ = PiggybackNet.around(strategy, model, "piggyback", self.threshold)
        task = task_label(experience, "piggyback")
        dense = self.train_first and model.n_slots == 0
        model.norm_fixed = not dense
        slot = model.add_slot([task], dense, self.init)
        head = model.get_classifier()
        head_params = {id(p) for p in (head.parameters() if head is not None else ())}
        for p in model.model.parameters():  # the backbone trains with a dense first task only; new head rows always
            p.requires_grad_(dense or id(p) in head_params)
        for k, scores in enumerate(model.scores):
            for s in scores:
                s.requires_grad_(k == slot)
        if slot:  # held head rows get zero gradients: no momentum of the earlier task may move them
            for p in model.model.parameters():
                strategy.forget_momentum(p)
        return model

    @hookimpl
    def param_groups(self, strategy, model: nn.Module) -> list[dict] | None:
        if not isinstance(model, PiggybackNet) or not model.n_slots or not len(model.scores[-1]):
            return None
        return [{"params": list(model.scores[-1]), "lr": self.mask_lr, "weight_decay": 0.0}]

    @hookimpl
    def after_backward(self, strategy) -> None:
        model = strategy.model
        if isinstance(model, PiggybackNet) and len(model.scores[-1]):  # the head: only new classes' rows train
            head = model.get_classifier()
            new = set(strategy.experience.classes) - {c for e in strategy.trained for c in e.classes}
            hold_rows(head, [c for c in range(getattr(head, "out_features", 0)) if c not in new])

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        model = strategy.model
        if isinstance(model, PiggybackNet):
            self.bits.append(sum(s.numel() for s in model.scores[-1]))
            strategy.log("piggyback/bits", self.bits[-1])

    @staticmethod
    def kept_share(strategy, slot: int) -> float:
        """The share of the weights slot ``slot``'s mask keeps (1 for a dense slot)."""
        masks = strategy.model.masks(slot)
        if masks is None:
            return 1.0
        return float(sum(m.detach().sum() for m in masks) / sum(m.numel() for m in masks))

    def state_dict(self) -> dict:
        return {"bits": list(self.bits)}

    def load_state_dict(self, state: dict) -> None:
        self.bits = list(state["bits"])
