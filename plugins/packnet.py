"""PackNet: after each task, prune the task's free weights by magnitude, retrain the rest briefly and freeze them."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from streamcl import ConfigError, Plugin, hookimpl
from streamcl.parts import model_as
from streamcl.scenarios import as_batch
from streamcl.task_weights import TaskWeightsNet, earlier_classes, hold_rows, maskable, task_label


class PackNetNet(TaskWeightsNet):
    """The model with an owner per weight of its Linear and Conv layers (``names``): buffer ``owner_i`` holds, for
    each entry of weight ``names[i]``, 0 (free) or ``k + 1`` (packed for slot ``k``). Slot ``k`` runs with the
    weights packed for slots ``0 .. k``, the others 0; while slot ``open`` is being trained (not yet packed) it also
    runs with the free weights it is training."""

    def __init__(self, model: nn.Module, head_path: str | None, names: list[str]):
        super().__init__(model, head_path)
        self.names = list(names)
        params = dict(model.named_parameters())
        for i, name in enumerate(self.names):
            self.register_buffer(f"owner_{i}", torch.zeros(params[name].shape, dtype=torch.int32,
                                                           device=params[name].device))
        self.register_buffer("open", torch.full((), -1, dtype=torch.long))  # the slot in training, -1: none

    def owner(self, i: int) -> Tensor:
        return getattr(self, f"owner_{i}")

    def params(self) -> list[nn.Parameter]:
        found = dict(self.model.named_parameters())
        return [found[n] for n in self.names]

    def uses(self, i: int, slot: int) -> Tensor:
        """Which entries of weight ``i`` slot ``slot`` runs with."""
        owner = self.owner(i)
        used = (owner >= 1) & (owner <= slot + 1)
        return used | (owner == 0) if slot == int(self.open) else used

    def weights_of(self, slot: int) -> dict[str, Tensor]:
        return {n: p * self.uses(i, slot).to(p.dtype) for i, (n, p) in enumerate(zip(self.names, self.params()))}

    @torch.no_grad()
    def fit_shapes(self) -> None:
        """Owners for weights the engine grew (a head widened for new classes): the new entries are free."""
        for i, p in enumerate(self.params()):
            old = self.owner(i)
            if old.shape != p.shape:
                new = torch.zeros(p.shape, dtype=old.dtype, device=p.device)
                new[tuple(slice(0, s) for s in old.shape)] = old
                setattr(self, f"owner_{i}", new)


def prune_free(weight: Tensor, owner: Tensor, fraction: float) -> Tensor:
    """The entries of ``weight`` to keep: of its free entries (``owner == 0``), all but the ``round(fraction * n)``
    smallest in magnitude (ties broken by position, the earlier pruned first)."""
    free = (owner == 0).flatten()
    n_free = int(free.sum())
    n_prune = min(n_free, int(round(fraction * n_free)))
    keep = free.clone()
    if n_prune:
        size = weight.detach().abs().flatten().masked_fill(~free, float("inf"))
        order = torch.sort(size, stable=True).indices
        keep[order[:n_prune]] = False
    return keep.reshape(owner.shape)


class PackNet(Plugin):
    """PackNet (Mallya & Lazebnik 2018, "PackNet: Adding Multiple Tasks to a Single Network by Iterative Pruning",
    CVPR, Sec. 3): one network holds every task, each task in the weights it was given.

    The weights of the model's Linear and Conv layers get an owner each (:class:`PackNetNet`). Task ``k`` (the
    ``k``-th task trained: its slot) trains the free weights, the packed ones of tasks ``< k`` held fixed (their
    gradients zeroed, their values restored after every step so that neither momentum nor weight decay moves them).
    After the task (``after_training_exp``), in each layer the fraction ``prune`` of the free weights smallest in
    magnitude is set to 0 and stays free; the rest become task ``k``'s; the kept weights are retrained for
    ``retrain_epochs`` (the engine's private loop ``strategy.fit`` with the task loss, logged ``loss/packnet``)
    with the pruned ones at 0. At test time a sample of task ``t`` runs with the weights of tasks ``<= t`` only
    (Sec. 3: later tasks' weights are masked to 0). Biases and every other parameter are trained with the first
    task and fixed after it (as the paper; batch-norm statistics too); a classifier head's bias entries of classes
    no earlier task had train with the task that brings them.

    A sample's task label picks its task; a label never trained runs with every task's weights (the newest slot).
    A class-incremental stream (every sample task 0) makes each experience a slot, evaluated with all of them:
    earlier experiences' weights fixed, the newest pruned. It works beside other plugins (replay, distillation,
    task masks): their loss terms and batches go through the same step. Task-incremental prediction is the task
    mask's (added by the runner in the task scenario).

    Arguments: ``prune`` (the fraction of free weights released per task, in [0, 1); the paper's 0.75, which leaves
    later tasks more weights than 0.5, Avalanche's default), ``retrain_epochs`` (after pruning; the paper retrains
    for about half the training epochs; 2 here, as many as training: docs/methods.md has both measured).
    It owns ``architecture`` (it wraps the model) and ``head_rows`` (the head's weights are packed).
    """

    owns = frozenset({"architecture", "head_rows"})

    def __init__(self, prune: float = 0.75, retrain_epochs: int = 2):
        if isinstance(prune, bool) or not isinstance(prune, (int, float)) or not 0 <= prune < 1:
            raise ConfigError(f"packnet prune={prune!r}: the fraction of free weights released per task, in [0, 1)")
        if isinstance(retrain_epochs, bool) or not isinstance(retrain_epochs, int) or retrain_epochs < 0:
            raise ConfigError(f"packnet retrain_epochs={retrain_epochs!r}: a whole number of epochs, >= 0")
        self.prune, self.retrain_epochs = float(prune), retrain_epochs
        self.kept: list[int] = []  # the weights each task was given
        self._fixed: list[Tensor] | None = None  # the packed and pruned weights' values, restored after each step

    @hookimpl
    def setup(self, strategy) -> None:
        maskable(strategy.model, "packnet")

    # ------------------------------------------------------------------------------ a new task
    @hookimpl
    def adapt_model(self, strategy, model: nn.Module, experience) -> nn.Module:
        model, _ = PackNetNet.around(strategy, model, "packnet")
        model.fit_shapes()
        tasks = [task_label(experience, "packnet")]
        first = model.n_slots == 0
        model.norm_fixed = not first  # normalisation statistics fixed with the biases after the first task
        model.open.fill_(model.new_slot(tasks))
        masked = {id(p) for p in model.params()}
        head = model.get_classifier()
        for p in model.model.parameters():
            if id(p) not in masked:  # biases and the rest: trained with the first task only (the head's bias below)
                p.requires_grad_(first or (head is not None and p is getattr(head, "bias", None)))
        self._fixed = None
        if not first:
            for p in model.model.parameters():
                strategy.forget_momentum(p)
        return model

    @staticmethod
    def _net(strategy) -> PackNetNet:
        return model_as(strategy, PackNetNet, "packnet", "the packed network")

    # ------------------------------------------------------------------------------ fixed weights stay fixed
    @hookimpl
    def after_backward(self, strategy) -> None:
        net = self._net(strategy)
        for i, p in enumerate(net.params()):
            if p.grad is not None:
                p.grad.mul_((net.owner(i) == 0).to(p.grad.dtype))
        hold_rows(net.get_classifier(), earlier_classes(strategy))  # the head's bias entries of earlier tasks

    @hookimpl
    def before_update(self, strategy) -> None:
        if self._fixed is None:  # the values to hold (also right after a resume: they never change)
            self._fixed = [p.detach().clone() for p in self._net(strategy).params()]

    @hookimpl
    def after_update(self, strategy) -> None:
        net = self._net(strategy)
        with torch.no_grad():
            for i, (p, fixed) in enumerate(zip(net.params(), self._fixed)):
                p.copy_(torch.where(net.owner(i) == 0, p, fixed))

    # ------------------------------------------------------------------------------ prune, retrain, freeze
    @hookimpl
    def after_training_exp(self, strategy) -> None:
        net = self._net(strategy)
        slot = int(net.open)
        with torch.no_grad():
            for i, p in enumerate(net.params()):
                keep = prune_free(p, net.owner(i), self.prune)
                p.mul_(((net.owner(i) != 0) | keep).to(p.dtype))  # pruned weights are 0
                net.owner(i).masked_fill_(keep, slot + 1)
        net.open.fill_(-1)
        self.kept.append(sum(int((net.owner(i) == slot + 1).sum()) for i in range(len(net.names))))
        strategy.log("packnet/weights", self.kept[-1])
        if self.retrain_epochs:
            self._retrain(strategy, net, slot)
        self._fixed = None

    def _retrain(self, strategy, net: PackNetNet, slot: int) -> None:
        """The task's kept weights alone, on its data, with the task loss (other weights and pruned ones held)."""
        params = net.params()
        fixed = [p.detach().clone() for p in params]
        own = [(net.owner(i) == slot + 1).to(p.dtype) for i, p in enumerate(params)]
        hooks = [p.register_hook(lambda g, m=m: g * m) for p, m in zip(params, own)]
        data = as_batch(strategy.experience.dataset, strategy.device)
        was = net.training
        net.train()
        try:
            strategy.fit(data, lambda part: strategy.task_loss(strategy.forward(part, net=net), part), params,
                         epochs=self.retrain_epochs, name="packnet")
        finally:
            for h in hooks:
                h.remove()
            net.train(was)
        with torch.no_grad():
            for p, f, m in zip(params, fixed, own):
                p.copy_(torch.where(m.bool(), p, f))

    # ------------------------------------------------------------------------------ reporting and state
    @staticmethod
    def weights_per_task(strategy) -> list[int]:
        """The number of weights packed for each slot (task), in training order."""
        net = strategy.model
        if not isinstance(net, PackNetNet):
            return []
        return [sum(int((net.owner(i) == k + 1).sum()) for i in range(len(net.names))) for k in range(net.n_slots)]

    def state_dict(self) -> dict:
        return {"kept": list(self.kept)}

    def load_state_dict(self, state: dict) -> None:
        self.kept = list(state["kept"])
