"""The training loop: ``Strategy.train(experience)`` and ``Strategy.eval(stream)``, emitting hooks."""
from __future__ import annotations

import copy
import inspect
import math
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from time import perf_counter
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from streamcl import distributed as dist
from streamcl import schedule
from streamcl.batch import Batch, Output, to_device
from streamcl.checks import check_experience, check_model_fits, check_repeatable, non_finite_error, step_position
from streamcl.checkpoint import Position, settings_of, remove_leftovers
from streamcl.errors import ConfigError, DataError, PluginError, Stopped, StreamclError, TrainingError
from streamcl.hookspecs import CONTRIBUTIONS, EVENTS, TRANSFORMS
from streamcl.metrics import EvalCounts, Metrics
from streamcl.models.heads import grow_heads
from streamcl.optim import ParamGroups
from streamcl.parts import capture_input, find_head, grown_linear, is_linear, replace_module
from streamcl.plugin import call_chain, check_roles, contributions, make_manager, plugin_name
from streamcl.scenarios import Experience, TensorData, join
from streamcl.scenarios.data import seeded


PRECISIONS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
STOP = threading.Event()  # set (by streamcl run's Ctrl-C handler, or anyone) to stop training at the next step


class Strategy:
    """Trains one model on a stream, one experience at a time; methods are ``plugins``.

    Plugins run in list order, then the engine's own (metrics, then ``loggers``). ``seed``
    fixes the data order (``self.generator``); plugins draw from the same generator. ``model`` is any
    ``nn.Module``; its classifier head is found (see :mod:`streamcl.parts`) or named by ``head``, a
    dotted path such as ``"classifier.6"``. ``eval_every`` evaluates ``eval_stream`` after every that
    many epochs, logged as its own curves (never in the accuracy matrix). ``augment`` (a random transform
    of one input, e.g. torchvision's ``RandomCrop``, or of a whole batch: :mod:`streamcl.augment`) is
    applied to every training input, replayed ones included, with randomness from ``seed``; memories
    store the inputs before it (``unaugmented``).

    The loop's options, honoured by :meth:`fit` too: ``schedule`` (:mod:`streamcl.schedule`, restarted at every
    experience), ``clip_grad_norm`` (the gradients' total 2-norm clipped to it), ``precision`` (``"bf16"`` or
    ``"fp16"``: forward and losses under autocast, fp16 with a gradient scaler), ``channels_last`` (images and
    convolutions in NHWC), ``compile`` (``torch.compile`` the training forward; a string names the backend).
    Datasets other than :class:`TensorData` are read by a DataLoader with ``num_workers``, ``pin_memory`` and
    ``persistent_workers``; each sample is read with the global generators seeded from its position in the
    stream, so the batches are the same for any number of workers and in a resumed run.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, criterion=None,
                 plugins: Sequence[object] = (), epochs: int = 1, batch_size: int = 128,
                 eval_batch_size: int | None = None, device=None, loggers: Sequence[object] = (),
                 seed: int | None = None, checkpoint_dir: str | Path | None = None,
                 checkpoint_every: int | None = None, check_finite: bool = True, ddp: dict | None = None,
                 head: str | None = None, eval_every: int | None = None, eval_stream=None,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 schedule: Callable[[int, int], float] | None = None, clip_grad_norm: float | None = None,
                 precision: str | None = None, channels_last: bool = False, compile: bool | str = False,
                 num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False):
        from streamcl.loggers import resolve_loggers
        from streamcl.loggers.events import Events
        from streamcl.registry import resolve_plugins

        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        first = next(model.parameters(), None)
        self.device = dist.init(device or (first.device if first is not None else "cpu"))
        self.world, self.ddp_options = dist.world_size(), dict(ddp or {})
        self.model, self.optimizer = model.to(self.device), optimizer
        self.param_groups = ParamGroups(optimizer, self.model)  # only the optimizer's parameters train
        self._net = self.model  # what the training forward calls: the model, or the model in DDP
        self.criterion = criterion if criterion is not None else F.cross_entropy
        self.plugins = resolve_plugins(plugins)
        self.loggers = resolve_loggers(loggers) if dist.is_main() else []  # only rank 0 logs
        self.metrics = Metrics()
        for name, value in (("epochs", epochs), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("checkpoint_every", checkpoint_every), ("eval_every", eval_every)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.epochs, self.batch_size = epochs, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed, self.seed_given = (seed if seed is not None else torch.initial_seed() % 2**63), seed is not None
        self.generator = torch.Generator().manual_seed(self.seed)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        remove_leftovers(self.checkpoint_dir)  # temporary files of a save killed mid-write
        self.checkpoint_every, self.check_finite = checkpoint_every, check_finite
        self.checkpoint_meta: dict = {}  # saved with every checkpoint (the runner keeps its config here)
        if eval_every and eval_stream is None:
            raise ConfigError("eval_every needs an eval_stream: the experiences to evaluate periodically")
        self.eval_every, self.eval_stream = eval_every, eval_stream
        if augment is not None and not callable(augment):
            raise ConfigError(f"augment must be a function of one input tensor, got {type(augment).__name__}")
        self.augment = augment
        self._set_loop_options(schedule, clip_grad_norm, precision, channels_last, compile)
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ConfigError(f"num_workers must be a whole number >= 0, got {num_workers!r}")
        self.loader_options = {"num_workers": num_workers, "pin_memory": bool(pin_memory),
                               "persistent_workers": bool(persistent_workers) and num_workers > 0}
        self._loader: tuple | None = None  # (dataset, DataLoader, its batch list) kept while persistent_workers
        check_roles(self.plugins)
        self.pm = make_manager(self.plugins, [self.metrics, Events(), *self.loggers])
        hooks = self.pm.hook
        self._hook = {n: getattr(hooks, n) if getattr(hooks, n).get_hookimpls() else None
                      for n in EVENTS + CONTRIBUTIONS + TRANSFORMS}
        self.trained: list[Experience] = []
        self._classes_cache: tuple[int, int, set[int]] = (0, 0, set())  # see _trained_classes
        self.global_step, self.train_seconds, self.eval_seconds = 0, 0.0, 0.0
        self.fit_epochs: dict[str, int] = {}  # epochs run by each private training loop (fit), by its name
        self.correcting = True  # false inside ``uncorrected()``
        self.experience: Experience | None = None
        self.train_dataset: Dataset | None = None
        self.order: torch.Tensor | None = None
        self.epoch = self.iteration = self.n_current = 0
        self._joined_data = False
        self._resume_at: Position | None = None
        self.is_training = False
        self.batch: Batch | None = None
        self.unaugmented: Batch | None = None  # the training batch before ``augment`` (what memories store)
        self.output: Output | None = None
        self.loss: torch.Tensor | None = None
        self.loss_terms: dict[str, torch.Tensor] = {}
        self.eval_results: list[EvalCounts] = []
        self.recording = False  # inside an eval whose results enter the accuracy matrix
        self._head_override = head
        self.head_path: str | None = find_head(self.model, head)
        self._head_checked = False
        self._inspect_model()
        if self._batchnorm and batch_size == 1:
            raise ConfigError(f"{type(model).__name__} has BatchNorm layers, which cannot train on one sample at a "
                              "time: use a batch_size of 2 or more")
        self._check_requires()
        self.settings = settings_of(self)  # what a checkpoint loaded into this strategy must agree on
        self._emit("setup")

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
            check_repeatable(self, exp)
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
        self.steps_per_epoch = self._n_batches(len(self.train_dataset), self.batch_size, self._batchnorm)
        for self.epoch in range(at.epoch if at else 0, self.epochs):
            start = at.iteration if at and self.epoch == at.epoch else 0
            if not start:
                n = len(self.train_dataset)
                self.order = torch.arange(n) if exp.ordered else torch.randperm(n, generator=self.generator)
                self._emit("before_training_epoch")
            batches = self.batches(self.train_dataset, self.batch_size, self.order, start,
                                   seed=(len(self.trained), self.epoch), drop_single=self._batchnorm)
            for self.iteration, batch in enumerate(batches, start):
                self._training_step(batch)
            self._emit("after_training_epoch")
            if self.eval_every and (self.epoch + 1) % self.eval_every == 0:
                self.eval(self.eval_stream)
        self._drop_loader()
        self._settle_loss_check()
        if self.schedule is not None:
            schedule.restore(self.optimizer)
        self.trained.append(exp)
        self._emit("after_training_exp")
        if self.checkpoint_dir is not None:
            self.save_checkpoint()

    def _training_step(self, batch: Batch) -> None:
        self.batch = batch
        if self.schedule is not None:
            step = self.epoch * self.steps_per_epoch + self.iteration
            schedule.apply(self.optimizer, self.schedule(step, self.epochs * self.steps_per_epoch))
        self._emit("before_training_iteration")
        self.n_current = len(self.batch)  # samples of the experience; replayed ones follow them
        if self._hook["replay_batch"]:
            extra = self._contributions("replay_batch", batch=self.batch)
            if self.world > 1:  # every rank drew the same samples: keep this rank's share
                extra = [b.select(dist.shard(torch.arange(len(b), device=b.y.device))) for b in extra if len(b)]
            self.batch = self.batch.cat(*extra)
        if self._hook["held_out"]:
            self._hold_out()
        if len(self.batch) == 1 and self._batchnorm:
            raise DataError(f"{self.experience!r} gives a training batch of one sample, on which the model's "
                            "BatchNorm layers cannot train; give the experience more samples")
        self.unaugmented = self.batch
        if self.augment is not None:
            self.batch = Batch(self._augmented(self.batch.x), self.batch.y, self.batch.t)
        if self.channels_last and self.batch.x.ndim == 4:
            self.batch = Batch(self.batch.x.contiguous(memory_format=torch.channels_last), self.batch.y, self.batch.t)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            self._emit("before_forward")
            self.output = self.forward(self.batch)
            self._emit("after_forward")
            self.loss = self.task_loss(self.output, self.batch)
            self.loss_terms = {"task": self.loss}
            if self._hook["loss_terms"]:
                self._add_loss_terms()
        if self.check_finite:
            self._check_loss()
        self._emit("before_backward")
        self.backward(self.loss, self.optimizer)
        self._emit("after_backward")
        self._emit("before_update")
        self.step(self.optimizer)
        self._emit("after_update")
        self._emit("after_training_iteration")
        self.global_step += 1
        if self.checkpoint_every and self.global_step % self.checkpoint_every == 0 and self.checkpoint_dir:
            self.save_checkpoint(position=True)
        if STOP.is_set():
            self._stop()

    def _stop(self) -> None:
        """End training at this step boundary (a stop was asked for): a checkpoint of this point, then Stopped."""
        STOP.clear()
        where = step_position(self)
        if self.checkpoint_dir is None:
            raise Stopped(f"stopped after {where}; no checkpoint_dir was set, so nothing was saved")
        path = self.save_checkpoint(position=True)
        raise Stopped(f"stopped after {where}; checkpoint written to {path}", path)

    def _set_loop_options(self, schedule_, clip_grad_norm, precision, channels_last, compile_) -> None:
        if schedule_ is not None and not callable(schedule_):
            raise ConfigError(f"schedule must map (step, total steps) to a factor, e.g. streamcl.schedule.Cosine(); "
                              f"got {schedule_!r}")
        if clip_grad_norm is not None and (isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float))
                                           or not 0 < clip_grad_norm < math.inf):
            raise ConfigError(f"clip_grad_norm must be a positive number, got {clip_grad_norm!r}")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}: use one of {', '.join(map(repr, PRECISIONS))}")
        self.schedule, self.clip_grad_norm, self.precision = schedule_, clip_grad_norm, precision
        self.channels_last, self.compile = bool(channels_last), compile_
        self.steps_per_epoch = 0
        self._lagged = self.device.type == "cuda" and self.world == 1  # see _check_loss
        self._pending_check: tuple | None = None
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def autocast(self):
        """The forward's mixed-precision context (``precision``); a no-op context at full precision."""
        if self.precision is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward()``, scaled under fp16; the gradients are unscaled after it, so hooks see the real ones."""
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` after clipping the gradients to ``clip_grad_norm`` (under fp16, through the
        scaler, which skips a step whose gradients overflowed)."""
        if self.clip_grad_norm is not None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def _training_net(self):
        net = dist.wrap(self.model, self.device, **self.ddp_options)
        if self.compile:
            net = torch.compile(net, **({"backend": self.compile} if isinstance(self.compile, str) else {}))
        return net

    def _augmented(self, x: torch.Tensor) -> torch.Tensor:
        """``augment`` on the inputs (whole batch if it is ``batched``, else each one), seeded from the step."""
        try:
            with seeded(hash((self.seed, -1, self.global_step)) % 2**63):
                out = self.augment(x) if getattr(self.augment, "batched", False) else \
                    torch.stack([torch.as_tensor(self.augment(v)) for v in x])
        except StreamclError:
            raise
        except Exception as err:
            raise ConfigError(f"augment={self.augment!r} failed on inputs of shape {tuple(x.shape[1:])}: "
                              f"{type(err).__name__}: {err}") from None
        if out.shape[0] != x.shape[0]:
            raise ConfigError(f"augment={self.augment!r} turned {x.shape[0]} inputs into {out.shape[0]}")
        return out

    def task_loss(self, output: Output, batch: Batch) -> torch.Tensor:
        """The ``task_loss`` chain's result, else ``criterion`` on the (adapted) logits and the labels."""
        loss = None
        if self._hook["task_loss"]:
            loss = call_chain(self.pm, "task_loss", None, strategy=self, output=output, batch=batch)
        return self.criterion(output.logits, batch.y) if loss is None else loss

    def _hold_out(self) -> None:
        masks = [m for m in self._contributions("held_out", batch=self.batch) if m is not None]
        if not masks:
            return
        held = torch.stack([m.to(torch.bool) for m in masks]).any(0)
        if bool(held[:self.n_current].all()):  # the experience's own rows are never all dropped
            held[:self.n_current] = False
        if bool(held.any()):
            keep = ~held
            self.n_current = int(keep[:self.n_current].sum())
            self.batch = self.batch.select(keep)

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
    def eval(self, stream: Experience | Iterable[Experience], record: bool = True) -> dict:
        """Accuracy on each experience of ``stream``, and the metrics of the run so far.

        The results enter the accuracy matrix (row: the experiences trained so far; column: each test
        experience's index) unless ``record`` is false or training is in progress (a periodic evaluation);
        those are kept apart as ``periodic`` curves.
        """
        start, was_training = perf_counter(), self.model.training
        exps = [stream] if isinstance(stream, Experience) else list(stream)
        saved = self.experience, self.batch, self.output
        self.model.eval()
        self.eval_results = []
        self.recording = bool(record) and not self.is_training
        try:
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
        finally:
            self.recording = False
            self.model.train(was_training)
            if self.is_training:
                self.experience, self.batch, self.output = saved
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
    def forward(self, batch: Batch, net=None, *, model: nn.Module | None = None, adapt: bool = True) -> Output:
        """The model on ``batch.x`` (and task labels, if it takes them), then every ``adapt_logits``.

        ``features`` are the head's input. ``model`` runs another module of the same architecture (a
        frozen teacher); ``net`` replaces the call itself (a callable taking the model's arguments, e.g.
        the model under ``torch.func.functional_call``); ``adapt=False`` skips ``adapt_logits``.
        """
        model = self.model if model is None else model
        own = model is self.model
        if net is None:
            net = self._net if own and self.is_training else model
        kwargs = {"task_labels": batch.t} if (self._takes_task if own else _takes_task(model)) else {}
        head = self._head if own else self._head_in(model)
        if head is None:
            raw, features = net(batch.x, **kwargs), None
        else:
            with capture_input(head) as box:
                raw = net(batch.x, **kwargs)
            features = box[0] if box else None
        logits = raw
        if adapt and self._hook["adapt_logits"]:
            logits = call_chain(self.pm, "adapt_logits", raw, strategy=self, features=features, batch=batch)
        return Output(logits, features, raw)

    def infer(self, data, *, model: nn.Module | None = None, adapt: bool = True,
              batch_size: int | None = None) -> Output:
        """``forward`` over all of ``data`` (a Batch, TensorData or Dataset) in chunks, in evaluation mode and
        without gradients: the one chunked inference pass plugins share (features of a memory, a teacher's
        logits). The model's mode is restored after."""
        model = self.model if model is None else model
        was_training, model_training = self.is_training, model.training
        parts: list[Output] = []
        model.eval()
        self.is_training = False
        try:
            with torch.no_grad():
                if isinstance(data, Batch):
                    size = batch_size or self.eval_batch_size
                    chunks = (data.select(slice(i, i + size)) for i in range(0, len(data), size))
                else:
                    chunks = self.batches(self._on_device(data), batch_size or self.eval_batch_size, local=True)
                parts = [self.forward(b.to(self.device), model=model, adapt=adapt) for b in chunks]
        finally:
            self.is_training = was_training
            model.train(model_training)
        if not parts:
            return Output(torch.empty(0, device=self.device), None, None)
        feats = None if parts[0].features is None else torch.cat([p.features for p in parts])
        return Output(torch.cat([p.logits for p in parts]), feats, torch.cat([p.raw for p in parts]))

    def predict(self, x: torch.Tensor, task_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The method's prediction for inputs ``x``: logits after every ``adapt_logits`` (bias correction,
        nearest-mean, task mask), in evaluation mode. ``argmax(1)`` gives the class. The way to use a
        trained model: the bare model lacks what the plugins add."""
        x = torch.as_tensor(x).to(self.device)
        t = torch.zeros(len(x), dtype=torch.long, device=self.device) if task_labels is None else \
            torch.as_tensor(task_labels, dtype=torch.long, device=self.device)
        return self.infer(Batch(x, torch.zeros_like(t), t)).logits

    def embed(self, data, *, model: nn.Module | None = None) -> torch.Tensor:
        """The features (the head's input) of all of ``data``, chunked, in evaluation mode, no gradient."""
        self.require_head("features")
        out = self.infer(data, model=model, adapt=False)
        if out.features is None:
            raise ConfigError(f"the head at {self.head_path!r} was not called by the model's forward, so it gives "
                              "no features; name the classifier layer with Strategy(head=...)")
        return out.features

    # ------------------------------------------------------------------------------- the model's parts
    @property
    def head(self) -> nn.Module:
        """The model's classifier head (a linear layer whose input are the features)."""
        self.require_head("the classifier head")
        return self._head

    @property
    def feature_dim(self) -> int:
        """The width of the features: the head's ``in_features``."""
        return int(self.head.in_features)

    def require_head(self, what: str, plugin: object = None) -> None:
        """Raise a ConfigError naming ``what`` (and ``plugin``) when the model has no classifier head."""
        if self._head is not None and is_linear(self._head):
            return
        who = f"{plugin!r} needs {what}" if plugin is not None else f"{what} is needed"
        found = "" if self.head_path is None else f" (the module at {self.head_path!r} is not linear)"
        raise ConfigError(f"{who}, but no linear classifier head was found in {type(self.model).__name__}{found}: "
                          "streamcl looks for timm's get_classifier(), an attribute head, fc, classifier or heads, "
                          "and the last linear layer of an nn.Sequential; name it with Strategy(..., head='path.to.layer')")

    def set_head(self, module: nn.Module) -> None:
        """Put ``module`` in the head's place (a cosine head, a wider head); the optimizer follows."""
        self.require_head("the classifier head")
        module = module.to(self.device)
        if self.head_path == "":
            self.model = module
        else:
            replace_module(self.model, self.head_path, module)
        self.model_changed()

    def extractor(self, model: nn.Module | None = None) -> nn.Module:
        """A copy of ``model`` (default: the strategy's) whose head is ``nn.Identity``: it maps inputs to features."""
        self.require_head("the feature extractor")
        copy_ = copy.deepcopy(self.model if model is None else model)
        if self.head_path == "":
            raise ConfigError("the model is its own head (a single linear layer): it has no feature extractor")
        replace_module(copy_, self.head_path, nn.Identity())
        return copy_

    def model_changed(self) -> None:
        """Call after changing ``strategy.model`` (new, removed or replaced parameters): the head is found
        again, the optimizer follows (every ``param_groups`` contribution applied), DDP re-wraps."""
        groups = [g for gs in self._contributions("param_groups", model=self.model) for g in gs]
        self.param_groups.sync(self.optimizer, self.model, groups)
        self._inspect_model()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._net = self._training_net()

    @torch.no_grad()
    def forget_momentum(self, param: nn.Parameter, rows=None) -> None:
        """Zero the optimizer's running state (momentum, Adam's moments) of ``param``, or of its ``rows``:
        for weights a plugin has just set (imprinted or transported head rows)."""
        for value in self.optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                if rows is None:
                    value.zero_()
                else:
                    value[rows] = 0

    @property
    def seen_classes(self) -> list[int]:
        """The classes of every experience trained so far and of the one training now, sorted."""
        now = self.experience.classes if self.is_training and self.experience is not None else ()
        return sorted(self._trained_classes() | {int(c) for c in now})

    def _trained_classes(self) -> set[int]:
        """The classes of the experiences trained, updated as experiences are appended (constant cost on long
        streams); recounted when ``trained`` is replaced (a checkpoint loaded)."""
        key, n = id(self.trained), len(self.trained)
        cached_key, counted, classes = self._classes_cache
        if cached_key != key or counted > n:
            counted, classes = 0, set()
        for e in self.trained[counted:]:
            classes.update(int(c) for c in e.classes)
        self._classes_cache = (key, n, classes)
        return classes

    @property
    def memory(self):
        """The replay memory (``.memory`` of the plugin that owns the role ``memory``), or ``None``."""
        owner = self.owner("memory")
        return getattr(owner, "memory", None)

    def require_memory(self, plugin: object, why: str) -> None:
        """Raise a ConfigError (``plugin`` and ``why`` it needs one) unless a plugin keeps a replay memory."""
        owner = self.owner("memory")
        if owner is None or not hasattr(owner, "memory"):
            found = "no plugin owns the 'memory' role" if owner is None else \
                f"{owner!r} owns 'memory' but keeps no replay memory (.memory)"
            raise ConfigError(f"{plugin!r} {why}, and {found}; list a replay plugin with it, e.g. "
                              f"plugins=[Replay(memory=500), ..., {plugin!r}]")

    def log(self, name: str, value: float, *, step: int | None = None, axis: str = "step") -> None:
        """Send a scalar to the run's event stream, which every logger writes (``loss/compress``, ``wa/factor``):
        at ``step`` along ``axis`` (default: the current training step); one value per name and step."""
        hook = self._hook["log_value"]
        if hook is not None:
            hook(strategy=self, name=name, value=float(value), step=self.global_step if step is None else int(step),
                 axis=axis)

    @property
    def logs_values(self) -> bool:
        """Whether a logger takes scalars (work done only to log them is skipped otherwise)."""
        return self._hook["log_value"] is not None

    @property
    def logs_images(self) -> bool:
        """Whether a logger takes images (a plugin draws them only then)."""
        return self._hook["log_image"] is not None

    def log_image(self, name: str, image: torch.Tensor, *, step: int | None = None, axis: str = "step") -> None:
        """Send an image (``C x H x W`` in [0, 1]) to every logger that takes images, as :meth:`log` a scalar."""
        if self.logs_images:
            self._hook["log_image"](strategy=self, name=name, image=image.detach().float().cpu(),
                                    step=self.global_step if step is None else int(step), axis=axis)

    @property
    def corrects(self) -> bool:
        """Whether a plugin corrects the model's bias (implements ``set_correction``)."""
        return self._hook["set_correction"] is not None

    @contextmanager
    def uncorrected(self) -> Iterator[None]:
        """Within the context, every bias correction is switched off (``set_correction(active=False)``) and
        ``strategy.correcting`` is false (loggers label what they write then)."""
        hook = self._hook["set_correction"]
        if hook is not None:
            hook(strategy=self, active=False)
        self.correcting = False
        try:
            yield
        finally:
            self.correcting = True
            if hook is not None:
                hook(strategy=self, active=True)

    def fit(self, data: Batch, loss: Callable[[Batch], torch.Tensor], params: Iterable[nn.Parameter], *,
            epochs: int, name: str, batch_size: int | None = None, scheduled: bool = True, **options) -> list[float]:
        """A private training loop (GDumb's retraining, DER's classifier stage, P&C's compression).

        Trains ``params`` for ``epochs`` on shuffled minibatches of ``data`` (order from ``self.generator``),
        minimising ``loss(minibatch)``, with a fresh optimizer of the strategy's kind: each parameter keeps
        the settings (learning rate...) of its group in the strategy's optimizer, ``options`` override them.
        The loop's ``schedule`` (restarted over this loop's steps; ``scheduled=False`` for a loop that sets its
        own rates), ``clip_grad_norm`` and ``precision`` apply. Logs ``loss/<name>`` (each epoch's mean, along the
        axis ``"<name> epoch"``, counted over every call with this name) and returns those means. ``strategy.is_training`` is true while it runs.
        """
        params = list(params)
        optimizer = type(self.optimizer)(self._groups_for(params, options))
        size, means, was_training = batch_size or self.batch_size, [], self.is_training
        step, steps = 0, epochs * self._n_batches(len(data), size, False)
        self.is_training = True  # plugins' forward transforms see a training pass, also when fit runs in eval
        with torch.enable_grad(), _restore(self, "is_training", was_training):
            for _ in range(epochs):
                order = torch.randperm(len(data), generator=self.generator).to(data.y.device)
                total = torch.zeros((), device=self.device)
                for i in range(0, len(order), size):
                    part = data.select(order[i:i + size])
                    if len(part) == 1 < len(order) and self._batchnorm:
                        continue  # as in training: BatchNorm cannot train on one sample
                    if scheduled and self.schedule is not None:
                        schedule.apply(optimizer, self.schedule(step, steps))
                    step += 1
                    optimizer.zero_grad(set_to_none=True)
                    with self.autocast():
                        value = loss(part)
                    self.backward(value, optimizer)
                    self.step(optimizer)
                    total += value.detach().float() * len(part)
                means.append(float(total) / max(1, len(data)))
                if self.check_finite and not math.isfinite(means[-1]):
                    raise TrainingError(f"non-finite loss in {name!r} (a private training loop); lower its "
                                        "learning rate")
                done = self.fit_epochs[name] = self.fit_epochs.get(name, 0) + 1
                self.log(f"loss/{name}", means[-1], step=done - 1, axis=f"{name} epoch")
        return means

    def _groups_for(self, params: list[nn.Parameter], options: dict) -> list[dict]:
        """One group per group of the strategy's optimizer that holds some of ``params`` (others: the first's);
        parameters of the model that the user's optimizer leaves out are left out here too."""
        group_of = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        out = {id(p) for n, p in self.model.named_parameters() if not self.param_groups.trains(n)}
        chosen: dict[int, list] = {}
        for p in params:
            if id(p) not in out:
                chosen.setdefault(group_of.get(id(p), 0), []).append(p)
        if not chosen:
            raise ConfigError("none of the parameters a private training loop trains is in the optimizer you "
                              "built; add them to it")
        base = self.optimizer.param_groups or [self.optimizer.defaults]
        own = [{**{k: v for k, v in g.items() if k not in ("params", "from_plugin", "base_lr")},
                **({"lr": g["base_lr"]} if "base_lr" in g else {})} for g in base]  # unscheduled rates
        return [{**own[i], **options, "params": ps} for i, ps in chosen.items()]

    def batches(self, data: Dataset, batch_size: int, order: torch.Tensor | None = None, start: int = 0,
                local: bool = False, seed: tuple = (), drop_single: bool = False) -> Iterator[Batch]:
        """Minibatches of ``data`` taken in ``order`` (dataset order if ``None``), from batch ``start`` on.

        Index slices of tensors when ``data`` is :class:`TensorData`, else a DataLoader whose items are
        read with every global generator seeded from ``(self.seed, seed, batch index)``: random
        transforms inside a dataset repeat exactly, also in a resumed run. Under torchrun each batch of
        ``batch_size`` (the global batch) is split across ranks, unless ``local``. ``drop_single`` leaves
        out a last batch of one sample (BatchNorm cannot train on one).
        """
        first, n = start * batch_size, len(data)
        if drop_single and n > 1 and n % batch_size == 1:
            n -= 1
        world = 1 if local else self.world
        if isinstance(data, TensorData):
            order = to_device(order, self.device) if order is not None else None
            for i in range(first, n, batch_size):
                idx = order[i:i + batch_size] if order is not None else slice(i, i + batch_size)
                if world > 1:
                    idx = dist.shard(idx if order is not None else torch.arange(n, device=self.device)[idx])
                yield Batch(data.x[idx], data.y[idx], data.t[idx])
        else:
            order = order if order is not None else torch.arange(n)
            sampler = [[(int(j), (*seed, k)) for j in (dist.shard(order[i:i + batch_size]) if world > 1
                                                        else order[i:i + batch_size]).tolist()]
                       for k, i in enumerate(range(first, n, batch_size), start)]
            for batch in self._loader_for(data, sampler, keep=bool(seed)):
                yield batch.to(self.device, non_blocking=self.loader_options["pin_memory"])

    def _loader_for(self, data: Dataset, batches: list, keep: bool) -> DataLoader:
        """A DataLoader reading ``batches`` (lists of (index, key)) of ``data``, each sample under a generator
        state seeded from (seed, key, index); with ``persistent_workers`` one loader (``keep``) serves every
        epoch of the experience."""
        if keep and self._loader is not None and self._loader[0] is data:
            self._loader[2][:] = batches
            return self._loader[1]
        plan = list(batches)
        loader = DataLoader(SeededSamples(data, self.seed), batch_sampler=plan, collate_fn=Batch.collate,
                            generator=torch.Generator(), **self.loader_options)  # draws nothing from torch's generator
        if keep and self.loader_options["persistent_workers"]:
            self._loader = (data, loader, plan)
        return loader

    def _drop_loader(self) -> None:
        self._loader = None  # the workers of a persistent loader end with it

    @staticmethod
    def _n_batches(n: int, batch_size: int, drop_single: bool) -> int:
        if drop_single and n > 1 and n % batch_size == 1:
            n -= 1
        return -(-n // batch_size)

    def _on_device(self, data: Dataset) -> Dataset:
        return data.to(self.device) if isinstance(data, TensorData) else data

    def _emit(self, event: str) -> None:
        hook = self._hook[event]
        if hook is not None:
            hook(strategy=self)

    def _contributions(self, name: str, **kwargs) -> list:
        return [] if self._hook[name] is None else contributions(self.pm, name, strategy=self, **kwargs)

    def _adapt_model(self, exp: Experience) -> None:
        seen = max(max(exp.classes, default=-1), max(self._trained_classes(), default=-1)) + 1
        grow_heads(self.model, seen)
        head = self._head
        if type(head) is nn.Linear and head.out_features < seen:  # a user's fixed head: widened, rows kept
            if self.head_path == "":
                self.model = grown_linear(head, seen)
            else:
                replace_module(self.model, self.head_path, grown_linear(head, seen))
            self._inspect_model()
        if self._hook["adapt_model"]:
            self.model = call_chain(self.pm, "adapt_model", self.model, strategy=self, experience=exp).to(self.device)
        self.model_changed()

    def _check_loss(self) -> None:
        """Raise on a non-finite loss. On one GPU the check runs one step behind, without stalling the device:
        each step's flags are copied to the host asynchronously and read at the next step (or before a
        checkpoint, or at the experience's end); elsewhere the loss is read at once."""
        if not self._lagged:
            finite = math.isfinite(self.loss.item())
            if self.world > 1:  # one rank's bad loss stops every rank, together
                flag = torch.tensor([float(finite)], device=self.device)
                finite = dist.all_reduce(flag, "min").item() == 1.0
            if not finite:
                raise non_finite_error(self)
            return
        self._settle_loss_check()
        names = list(self.loss_terms)
        flags = torch.stack([torch.isfinite(v.detach()).all() for v in self.loss_terms.values()])
        cuda = flags.device.type == "cuda"
        host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=cuda).copy_(flags, non_blocking=cuda)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        self._pending_check = (host, event, names, step_position(self))

    def _settle_loss_check(self) -> None:
        """Read the lagged non-finite check of the last step, if one is pending; raise if it failed."""
        pending, self._pending_check = self._pending_check, None
        if pending is None:
            return
        host, event, names, where = pending
        if event is not None:
            event.synchronize()
        if not bool(host.all()):
            raise non_finite_error(self, [n for n, ok in zip(names, host.tolist()) if not ok], where, updated=True)

    def _inspect_model(self) -> None:
        """Find the head again (when the model was replaced or its head moved) and the forward's arguments."""
        self._takes_task = _takes_task(self.model)
        self._batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        path = self.head_path
        if path is None or self._head_in(self.model) is None or not is_linear(self._head_in(self.model)):
            override = self._head_override if self._head_in(self.model, self._head_override) is not None else None
            path = find_head(self.model, override)
        self.head_path = path
        self._head = self._head_in(self.model)

    def _head_in(self, model: nn.Module, path: str | None | type(...) = ...) -> nn.Module | None:
        path = self.head_path if path is ... else path
        if path is None:
            return None
        try:
            return model.get_submodule(path)
        except AttributeError:
            return None

    def _check_requires(self) -> None:
        for plugin in self.plugins:
            for need in sorted(getattr(plugin, "requires", ())):
                if need != "head":
                    raise PluginError(f"{plugin!r} requires {need!r}, which is not a part streamcl knows "
                                      "(known: 'head')")
                self.require_head("the model's classifier head and its features", plugin)

    # ------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: str | Path | None = None, position: bool = False) -> Path:
        """Write everything needed to resume (atomically) to ``path``, default ``checkpoint_dir/last.pt``.

        With ``position`` the checkpoint is taken inside the current experience, after this step.
        """
        from streamcl.checkpoint import save
        self._settle_loss_check()  # never write weights a non-finite step has updated
        path = Path(path) if path else self.checkpoint_path
        return save(self, path, position) if dist.is_main() else path  # every rank holds the same state

    def load_checkpoint(self, path: str | Path | None = None, check_meta=None) -> dict:
        """Restore a checkpoint into this strategy; returns its ``checkpoint_meta``. The strategy must be built
        as the one that wrote it (model, optimizer, plugins, settings), else a CheckpointError names what
        differs; nothing of the checkpoint's is mixed with this strategy's. ``check_meta(meta)`` may refuse it first."""
        from streamcl.checkpoint import load
        meta = load(self, Path(path) if path else self.checkpoint_path, check_meta)
        self._net = self._training_net()
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


class SeededSamples(Dataset):
    """``data[i]`` for items ``(i, key)``, read with torch's, Python's and numpy's global generators seeded from
    ``(seed, key, i)``: a random transform inside ``data`` draws the same in any worker process and on resume."""

    def __init__(self, data: Dataset, seed: int):
        self.data, self.seed = data, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        i, key = item
        with seeded(hash((self.seed, key, i)) % 2**63):
            return self.data[i]


def _takes_task(model: nn.Module) -> bool:
    return "task_labels" in inspect.signature(model.forward).parameters


@contextmanager
def _restore(obj, name: str, value) -> Iterator[None]:
    try:
        yield
    finally:
        setattr(obj, name, value)
