"""The training loop: ``Strategy.train(experience)`` and ``Strategy.eval(stream)``, emitting hooks."""
from __future__ import annotations

import inspect
import math
from pathlib import Path
from time import perf_counter
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from streamcl import distributed as dist
from streamcl.batch import Batch, Output
from streamcl.checks import check_experience, check_model_fits, non_finite_error
from streamcl.checkpoint import Position
from streamcl.errors import PluginError
from streamcl.hookspecs import CONTRIBUTIONS, EVENTS, TRANSFORMS
from streamcl.metrics import EvalCounts, Metrics
from streamcl.models.heads import grow_heads
from streamcl.optim import sync_optimizer
from streamcl.plugin import call_chain, check_roles, make_manager, plugin_name
from streamcl.scenarios import Experience, TensorData, join


class Strategy:
    """Trains one model on a stream, one experience at a time; methods are ``plugins``.

    Plugins run in list order, then the engine's own (metrics, then ``loggers``). ``seed``
    fixes the data order (``self.generator``); plugins draw from the same generator.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, criterion=None,
                 plugins: Sequence[object] = (), epochs: int = 1, batch_size: int = 128,
                 eval_batch_size: int | None = None, device=None, loggers: Sequence[object] = (),
                 seed: int | None = None, checkpoint_dir: str | Path | None = None,
                 checkpoint_every: int | None = None, check_finite: bool = True, ddp: dict | None = None):
        from streamcl.loggers import resolve_loggers
        from streamcl.registry import resolve_plugins

        self.device = dist.init(device or next(model.parameters()).device)
        self.world, self.ddp_options = dist.world_size(), dict(ddp or {})
        self.model, self.optimizer = model.to(self.device), optimizer
        self._net = self.model  # what the training forward calls: the model, or the model in DDP
        self.criterion = criterion if criterion is not None else F.cross_entropy
        self.plugins = resolve_plugins(plugins)
        self.loggers = resolve_loggers(loggers) if dist.is_main() else []  # only rank 0 logs
        self.metrics = Metrics()
        for name, value in (("epochs", epochs), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("checkpoint_every", checkpoint_every)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.epochs, self.batch_size = epochs, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed if seed is not None else torch.initial_seed() % 2**63
        self.generator = torch.Generator().manual_seed(self.seed)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every, self.check_finite = checkpoint_every, check_finite
        self.checkpoint_meta: dict = {}  # saved with every checkpoint (the runner keeps its config here)
        check_roles(self.plugins)
        self.pm = make_manager(self.plugins, [self.metrics, *self.loggers])
        hooks = self.pm.hook
        self._hook = {n: getattr(hooks, n) if getattr(hooks, n).get_hookimpls() else None
                      for n in EVENTS + CONTRIBUTIONS + TRANSFORMS}
        self.trained: list[Experience] = []
        self.global_step, self.train_seconds, self.eval_seconds = 0, 0.0, 0.0
        self.experience: Experience | None = None
        self.train_dataset: Dataset | None = None
        self.order: torch.Tensor | None = None
        self.epoch = self.iteration = self.n_current = 0
        self._joined_data = False
        self._resume_at: Position | None = None
        self.is_training = False
        self.batch: Batch | None = None
        self.output: Output | None = None
        self.loss: torch.Tensor | None = None
        self.loss_terms: dict[str, torch.Tensor] = {}
        self.eval_results: list[EvalCounts] = []
        self._inspect_model()

    # ------------------------------------------------------------------------------- training
    def train(self, experiences: Experience | Iterable[Experience]) -> None:
        """Train on one experience, or on each of several in turn."""
        exps = [experiences] if isinstance(experiences, Experience) else list(experiences)
        self.is_training = True
        self._emit("before_training")
        for exp in exps:
            start = perf_counter()
            self._train_experience(exp)
            self.train_seconds += perf_counter() - start
        self._emit("after_training")
        self.is_training = False

    def _train_experience(self, exp: Experience) -> None:
        self.experience = exp
        at, self._resume_at = self._resume_at, None  # a checkpoint taken inside this experience
        if at is None:
            check_experience(exp)
            self._adapt_model(exp)
            extra = self._contributions("train_data", experience=exp)
            self.train_dataset, self._joined_data = self._on_device(join([exp.dataset, *extra])), bool(extra)
            check_model_fits(self, self.train_dataset, exp)
            self.model.train()
            self._emit("before_training_exp")
        else:
            at.check(exp)
            self.model.train()
            self.train_dataset = self.train_dataset if self._joined_data else self._on_device(exp.dataset)
        for self.epoch in range(at.epoch if at else 0, self.epochs):
            start = at.iteration if at and self.epoch == at.epoch else 0
            if not start:
                self.order = torch.randperm(len(self.train_dataset), generator=self.generator)
                self._emit("before_training_epoch")
            batches = self.batches(self.train_dataset, self.batch_size, self.order, start)
            for self.iteration, batch in enumerate(batches, start):
                self._training_step(batch)
            self._emit("after_training_epoch")
        self.trained.append(exp)
        self._emit("after_training_exp")
        if self.checkpoint_dir is not None:
            self.save_checkpoint()

    def _training_step(self, batch: Batch) -> None:
        self.batch = batch
        self._emit("before_training_iteration")
        self.n_current = len(self.batch)  # samples of the experience; replayed ones follow them
        if self._hook["replay_batch"]:
            extra = self._contributions("replay_batch", batch=self.batch)
            if self.world > 1:  # every rank drew the same samples: keep this rank's share
                extra = [b.select(dist.shard(torch.arange(len(b), device=b.y.device))) for b in extra if len(b)]
            self.batch = self.batch.cat(*extra)
        self.optimizer.zero_grad(set_to_none=True)
        self._emit("before_forward")
        self.output = self.forward(self.batch)
        self._emit("after_forward")
        self.loss = self.task_loss(self.output, self.batch)
        self.loss_terms = {"task": self.loss}
        if self._hook["loss_terms"]:
            self._add_loss_terms()
        if self.check_finite and not self._loss_is_finite():
            raise non_finite_error(self)
        self._emit("before_backward")
        self.loss.backward()
        self._emit("after_backward")
        self._emit("before_update")
        self.optimizer.step()
        self._emit("after_update")
        self._emit("after_training_iteration")
        self.global_step += 1
        if self.checkpoint_every and self.global_step % self.checkpoint_every == 0 and self.checkpoint_dir:
            self.save_checkpoint(position=True)

    def task_loss(self, output: Output, batch: Batch) -> torch.Tensor:
        """The criterion on the (adapted) logits and the labels."""
        return self.criterion(output.logits, batch.y)

    def _add_loss_terms(self) -> None:
        owner: dict[str, int] = {}
        for i, terms in enumerate(self._contributions("loss_terms", batch=self.batch, output=self.output)):
            for name, value in terms.items():
                if name in self.loss_terms:
                    raise PluginError(f"two loss terms are named '{name}' (contribution {owner.get(name, 'task')} "
                                      f"and {i}); give each plugin's term its own name")
                owner[name] = i
                self.loss_terms[name] = value
                self.loss = self.loss + value

    # ------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def eval(self, stream: Experience | Iterable[Experience]) -> dict:
        """Accuracy on each experience of ``stream``, and the metrics of the run so far."""
        start, was_training = perf_counter(), self.model.training
        exps = [stream] if isinstance(stream, Experience) else list(stream)
        self.model.eval()
        self.eval_results = []
        self._emit("before_eval")
        for exp in exps:
            self.experience = exp
            check_experience(exp)
            check_model_fits(self, self._on_device(exp.dataset), None)
            self._emit("before_eval_exp")
            self.eval_results.append(self._eval_experience(exp))
            self._emit("after_eval_exp")
        self.eval_seconds += perf_counter() - start
        self._emit("after_eval")
        self.model.train(was_training)
        return {"accuracy": [c.accuracy for c in self.eval_results], **self.metrics.summary()}

    def _eval_experience(self, exp: Experience) -> EvalCounts:
        n = exp.n_classes
        correct = torch.zeros(n, dtype=torch.long, device=self.device)
        total = torch.zeros(n, dtype=torch.long, device=self.device)
        for batch in self.batches(self._on_device(exp.dataset), self.eval_batch_size):
            self.batch = batch
            self._emit("before_eval_forward")
            self.output = self.forward(self.batch)
            self._emit("after_eval_forward")
            y, logits = self.batch.y, self.output.logits
            hit = logits.argmax(1) == y if logits.shape[1] else torch.zeros_like(y, dtype=torch.bool)
            total += torch.bincount(y, minlength=n)[:n]
            correct += torch.bincount(y[hit], minlength=n)[:n]
        if self.world > 1:  # each rank saw its share of every batch
            dist.all_reduce(correct), dist.all_reduce(total)
        return EvalCounts(exp.index, correct.cpu(), total.cpu())

    # ------------------------------------------------------------------------------- pieces
    def forward(self, batch: Batch, net=None) -> Output:
        """The model on ``batch.x`` (and task labels, if it takes them), then every ``adapt_logits``.

        ``net`` replaces the model for this call (a callable taking the model's arguments, e.g. the
        model under ``torch.func.functional_call``).
        """
        kwargs = {"task_labels": batch.t} if self._takes_task else {}
        net = net if net is not None else self._net if self.is_training else self.model
        if self._returns_features:
            raw, features = net(batch.x, return_features=True, **kwargs)
        else:
            raw, features = net(batch.x, **kwargs), None
        logits = raw
        if self._hook["adapt_logits"]:
            logits = call_chain(self.pm, "adapt_logits", raw, strategy=self, features=features, batch=batch)
        return Output(logits, features, raw)

    def batches(self, data: Dataset, batch_size: int, order: torch.Tensor | None = None,
                start: int = 0) -> Iterator[Batch]:
        """Minibatches of ``data`` taken in ``order`` (dataset order if ``None``), from batch ``start`` on.

        Index slices of tensors when ``data`` is :class:`TensorData`, else a DataLoader. Under
        torchrun each batch of ``batch_size`` (the global batch) is split across ranks.
        """
        first, n = start * batch_size, len(data)
        if isinstance(data, TensorData):
            order = order.to(self.device) if order is not None else None
            for i in range(first, n, batch_size):
                idx = order[i:i + batch_size] if order is not None else slice(i, i + batch_size)
                if self.world > 1:
                    idx = dist.shard(idx if order is not None else torch.arange(n, device=self.device)[idx])
                yield Batch(data.x[idx], data.y[idx], data.t[idx])
        else:
            order = order if order is not None else torch.arange(n)
            sampler = [dist.shard(order[i:i + batch_size]).tolist() for i in range(first, n, batch_size)]
            for sample in DataLoader(data, batch_sampler=sampler):
                yield Batch.from_sample(sample).to(self.device)

    def _on_device(self, data: Dataset) -> Dataset:
        return data.to(self.device) if isinstance(data, TensorData) else data

    def _emit(self, event: str) -> None:
        hook = self._hook[event]
        if hook is not None:
            hook(strategy=self)

    def _contributions(self, name: str, **kwargs) -> list:
        hook = self._hook[name]
        return [] if hook is None else hook(strategy=self, **kwargs)

    def _adapt_model(self, exp: Experience) -> None:
        seen = max(max(exp.classes, default=-1), *(max(e.classes, default=-1) for e in self.trained), -1) + 1
        grow_heads(self.model, seen)
        if self._hook["adapt_model"]:
            self.model = call_chain(self.pm, "adapt_model", self.model, strategy=self, experience=exp).to(self.device)
        groups = [g for gs in self._contributions("param_groups", model=self.model) for g in gs]
        sync_optimizer(self.optimizer, self.model, groups)
        self._inspect_model()
        self._net = dist.wrap(self.model, self.device, **self.ddp_options)

    def _loss_is_finite(self) -> bool:
        finite = math.isfinite(self.loss.item())
        if self.world > 1:  # one rank's bad loss stops every rank, together
            flag = torch.tensor([float(finite)], device=self.device)
            finite = dist.all_reduce(flag, "min").item() == 1.0
        return finite

    def _inspect_model(self) -> None:
        params = inspect.signature(self.model.forward).parameters
        self._returns_features = "return_features" in params
        self._takes_task = "task_labels" in params

    # ------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: str | Path | None = None, position: bool = False) -> Path:
        """Write everything needed to resume (atomically) to ``path``, default ``checkpoint_dir/last.pt``.

        With ``position`` the checkpoint is taken inside the current experience, after this step.
        """
        from streamcl.checkpoint import save
        path = Path(path) if path else self.checkpoint_path
        return save(self, path, position) if dist.is_main() else path  # every rank holds the same state

    def load_checkpoint(self, path: str | Path | None = None) -> dict:
        """Restore a checkpoint into this strategy (built as the one that wrote it); returns its ``checkpoint_meta``."""
        from streamcl.checkpoint import load
        meta = load(self, Path(path) if path else self.checkpoint_path)
        self._net = dist.wrap(self.model, self.device, **self.ddp_options)
        return meta

    @property
    def checkpoint_path(self) -> Path:
        if self.checkpoint_dir is None:
            raise ValueError("no checkpoint_dir was given to this Strategy, so give a path")
        return self.checkpoint_dir / "last.pt"

    def close(self) -> dict:
        """Finish the run: loggers write their last records (results.json, hparams); returns the metrics."""
        for logger in self.loggers:
            close = getattr(logger, "close", None)
            if callable(close):
                close(self)
        return self.metrics.summary()

    def owner(self, role: str):
        """The plugin that owns ``role`` (for example "memory"), or ``None``."""
        return next((p for p in self.plugins if role in getattr(p, "owns", ())), None)

    @property
    def plugin_names(self) -> list[str]:
        return [plugin_name(p) for p in self.plugins]
