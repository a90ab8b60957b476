"""Task-conditioned hypernetwork (von Oswald et al. 2020): generated target weights, output regulariser."""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from streamcl import Batch, ConfigError, Plugin, hookimpl
from streamcl.parts import replace_module
from streamcl.penalty import stability_limit
from streamcl.task_weights import call_per_task
from streamcl.plugin import warn

POWER_ITERATIONS = 20


def _uniform(shape, bound: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class GeneratedLinear(nn.Linear):
    """The target's classifier head: an ``nn.Linear`` whose weights the hypernetwork generates (it holds none),
    so the engine, which widens a user's plain ``nn.Linear`` head as classes arrive, leaves it alone."""


class HyperNetModel(nn.Module):
    """A chunked hypernetwork ``f_h(e, Theta_h)`` and the target network it parameterises.

    ``target`` (any module whose parameters are all generated, e.g. an :class:`~streamcl.models.MLP`)
    is kept without parameters; its ``n_weights`` weights are generated in ``n_chunks`` chunks of
    ``chunk_size``: chunk ``c`` is ``MLP([e, c_c])`` (ReLU hidden layers ``hidden``, linear output),
    ``e`` a task embedding and ``c_c`` a learned chunk embedding; the chunks are concatenated, cut
    to ``n_weights`` and reshaped into the target's parameters (paper Sec. 3, Fig. 1b).

    ``forward(x, task_labels)`` runs the target with the weights generated for each sample's task
    (grouped by task); a task label with no embedding uses the highest one that has.

    ``head`` is the target's classifier head (at ``head_path`` in ``target``, as the engine found it), so the
    engine reads the features, the head's input, as on the target itself. A batch that mixes task labels runs
    the target once per task (:func:`streamcl.task_weights.call_per_task`, which shows the engine every row's
    features).
    """

    def __init__(self, target: nn.Module, task_dim: int, chunk_dim: int, chunk_size: int,
                 hidden: Sequence[int], generator: torch.Generator, hidden_lr: float = 1.0,
                 head_path: str | None = None):
        super().__init__()
        named = list(target.named_parameters())
        if not named:
            raise ConfigError(f"HyperNetwork: {type(target).__name__} has no parameters to generate")
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.n_weights = sum(self.sizes)
        with torch.no_grad():  # the size of the target's own initial weights, which the generated ones start at
            rms = math.sqrt(sum(float(p.double().square().sum()) for _, p in named) / self.n_weights)
        self.target = copy.deepcopy(target)
        self.head_path = head_path or None  # a target that is its own head has no features to show
        if self.head_path is not None:
            old = self.target.get_submodule(self.head_path)
            if type(old) is nn.Linear:
                replace_module(self.target, self.head_path,
                               GeneratedLinear(old.in_features, old.out_features, bias=old.bias is not None))
        for name in self.names:  # parameter-free (each one None, as a missing bias): functional_call supplies them
            module, _, leaf = name.rpartition(".")
            self.target.get_submodule(module)._parameters[leaf] = None
        self.task_dim, self.chunk_dim, self.chunk_size = task_dim, chunk_dim, chunk_size
        self.n_chunks = math.ceil(self.n_weights / chunk_size)
        self.chunk_embeddings = nn.Parameter(torch.randn(self.n_chunks, chunk_dim, generator=generator))
        self.task_embeddings = nn.ParameterList()
        widths = [task_dim + chunk_dim, *hidden, chunk_size]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        # hidden layers: nn.Linear's default initialisation of the weights used, gain * stored, so that SGD
        # on the stored ones moves the used ones at hidden_lr = gain^2 times the learning rate
        self.gain = math.sqrt(hidden_lr)
        for fan_in, fan_out in zip(widths[:-2], widths[1:-1]):
            bound = 1 / math.sqrt(fan_in) / self.gain
            self.weights.append(nn.Parameter(_uniform((fan_out, fan_in), bound, generator)))
            self.biases.append(nn.Parameter(_uniform((fan_out,), bound, generator)))
        # output layer: zero bias and a uniform weight scaled so that, for the prior's mean embedding (0),
        # the generated weights have the root-mean-square size of the target's own initial weights
        with torch.no_grad():
            h = self._hidden(torch.zeros(1, task_dim))
            bound = math.sqrt(3) * rms / max(float(h.square().sum(-1).mean().sqrt()), 1e-12)
        self.weights.append(nn.Parameter(_uniform((chunk_size, widths[-2]), bound, generator)))
        self.biases.append(nn.Parameter(torch.zeros(chunk_size)))

    def extra_repr(self) -> str:
        return (f"tasks={self.n_tasks}, target weights={self.n_weights} (generated), chunks={self.n_chunks} x "
                f"{self.chunk_size}, task_dim={self.task_dim}, chunk_dim={self.chunk_dim}")

    # ------------------------------------------------------------------------------ embeddings
    @property
    def n_tasks(self) -> int:
        return len(self.task_embeddings)

    def grow(self, n_tasks: int, generator: torch.Generator) -> None:
        """Task embeddings for tasks ``0 .. n_tasks - 1``, new ones drawn from N(0, 1)."""
        device = self.chunk_embeddings.device
        while self.n_tasks < n_tasks:
            self.task_embeddings.append(nn.Parameter(torch.randn(self.task_dim, generator=generator).to(device)))

    # ------------------------------------------------------------------------------ hypernetwork
    def _hidden(self, emb: Tensor) -> Tensor:
        k = emb.shape[0]
        h = torch.cat([emb[:, None].expand(k, self.n_chunks, self.task_dim),
                       self.chunk_embeddings[None].expand(k, -1, -1)], -1)
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = F.relu(F.linear(h, self.gain * w, self.gain * b))
        return h

    def generate(self, emb: Tensor) -> Tensor:
        """``f_h(e)`` for each row of ``emb`` (k, task_dim): the flat target weights, (k, n_weights)."""
        out = F.linear(self._hidden(emb), self.weights[-1], self.biases[-1])
        return out.reshape(emb.shape[0], -1)[:, : self.n_weights]

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """The target's parameters, by name, from one row of :meth:`generate`."""
        return {n: w.view(s) for n, w, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def task_weights(self, task: int) -> dict[str, Tensor]:
        """The target's parameters generated for task ``task``."""
        return self.unflatten(self.generate(self.task_embeddings[min(task, self.n_tasks - 1)][None])[0])

    # ------------------------------------------------------------------------------ target
    @property
    def head(self) -> nn.Module | None:
        """The target's classifier head (parameter-free: its weights are generated), or ``None``."""
        return None if self.head_path is None else self.target.get_submodule(self.head_path)

    def __setattr__(self, name: str, value) -> None:
        if name == "head":
            raise ConfigError("HyperNetwork generates the classifier head's weights: the head of a HyperNetModel "
                              "cannot be replaced (a plugin that replaces or widens the head cannot run with it)")
        super().__setattr__(name, value)

    def _run(self, x: Tensor, weights: dict[str, Tensor]) -> Tensor:
        return functional_call(self.target, weights, (x,))

    def forward(self, x: Tensor, task_labels: Tensor | None = None) -> Tensor:
        if self.n_tasks == 0:
            raise RuntimeError("HyperNetModel has no task embedding yet: the HyperNetwork plugin adds them")
        last = self.n_tasks - 1
        if task_labels is None:
            return self._run(x, self.task_weights(last))
        if x.shape[0] == 1:  # no data-dependent branch: safe under torch.func.vmap (per-sample gradients)
            table = torch.stack(list(self.task_embeddings))
            emb = table[task_labels.reshape(1).clamp(0, last)]
            return self._run(x, self.unflatten(self.generate(emb)[0]))
        return call_per_task(self.target, x, task_labels.clamp(0, last), self.task_weights, self.head_path)


def regulariser_curvature(model: HyperNetModel, tasks: list[int], limits: dict[int, float],
                          iterations: int = POWER_ITERATIONS) -> float:
    """The largest eigenvalue of ``D G``: ``G = 2/(T-1) sum_t J_t^T J_t`` the Gauss-Newton curvature of the
    regulariser (the exact Hessian where it is 0, at the stored targets), ``J_t`` the Jacobian of
    ``f_h(e_t)`` in the trainable hypernetwork parameters, ``D`` their ``1 / limit`` (``lr / (1 + momentum)``
    under SGD, see :func:`streamcl.penalty.stability_limit`; parameters with no limit are left out).

    ``beta`` times it at most 1 keeps heavy-ball SGD on the regulariser within half its stability
    limit. Power iteration on the symmetric ``D^1/2 G D^1/2`` from a fixed start (no randomness).
    """
    named = [(n, p) for n, p in model.named_parameters()
             if p.requires_grad and id(p) in limits and not n.startswith("task_embeddings.")]
    if not named or not tasks:
        return 0.0
    params = [p for _, p in named]
    root = [1 / math.sqrt(limits[id(p)]) for p in params]  # D^1/2
    with torch.enable_grad():
        emb = torch.stack([model.task_embeddings[t] for t in tasks]).detach()
        out = model.generate(emb)
        w = torch.zeros_like(out, requires_grad=True)
        jt = torch.autograd.grad(out, params, w, create_graph=True)  # J^T w, linear in w
        v = [r * torch.ones_like(p) for r, p in zip(root, params)]
        value = 0.0
        for _ in range(iterations):
            norm = torch.sqrt(sum(x.square().sum() for x in v))
            if float(norm) == 0:
                return 0.0
            v = [x / norm for x in v]
            jv = torch.autograd.grad(jt, w, [r * x for r, x in zip(root, v)], retain_graph=True)[0]  # J D^1/2 v
            g = torch.autograd.grad(out, params, jv, retain_graph=True)
            mv = [2 / len(tasks) * r * x for r, x in zip(root, g)]
            value = float(sum((a * b).sum() for a, b in zip(mv, v)))
            v = mv
    return value


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"HyperNetwork {name}={value!r}: it must be a whole number >= 1")
    return value


class HyperNetwork(Plugin):
    """Task-conditioned hypernetwork (von Oswald et al. 2020, "Continual learning with hypernetworks", ICLR).

    At the first experience ``adapt_model`` replaces the model (e.g. the MLP 784-256-256-10, 269,322
    weights) by a :class:`HyperNetModel`: the same architecture without parameters, whose weights
    ``Theta = f_h(e, Theta_h)`` a chunked hypernetwork generates from a task embedding ``e`` (Sec. 3,
    Fig. 1b: chunk embeddings ``c_i``, one MLP ``[e, c_i] -> chunk i``). There is one embedding per task
    label, added as new labels arrive (N(0, 1)); each sample runs with its task's weights (``batch.t``).
    Only the current task's embedding learns; earlier ones are frozen (Sec. 2.1). The loss term
    ``hnet`` (logged ``loss/hnet``) is the output regulariser of eq. 2,

        beta / (T-1) * sum_{t<T} || f_h(e_t, Theta_h) - f_h(e_t, Theta_h*) ||^2,

    with ``f_h(e_t, Theta_h*)`` stored at ``before_training_exp`` (``Theta_h*``: the hypernetwork before
    the current task) for every task of an earlier experience. Eq. 2's look-ahead ``Delta Theta_h`` is
    left out: the term is taken at the current ``Theta_h``.

    Task-incremental: the task label is given at training and test time (SFM-5-TIL). A label trained
    again later gets a warning: its embedding learns again and nothing keeps its earlier weights. A
    task label never trained is run with the highest-numbered embedding.

    Class-incremental (an experience without a task label whose samples all carry one, as in
    SFM-5: task label 0 throughout): each experience is a task of its own, numbered by its index, and
    the task is inferred at test time by predictive entropy (HNET+ENT, Sec. 4.1 and Table 1, CL3). In
    training each sample runs with the embedding of the latest experience holding its class (its own,
    unless it is replayed) and its logits are masked to that experience's classes (the paper's one head
    per task); in evaluation every such task's weights run, each on its own classes, and the task whose
    softmax has the lowest entropy gives the prediction.
    (Task label 0 trained again at every experience made a plain reparameterised model fine-tuned on
    all classes: the loss of about 12 at the start of an experience, with the generated weights stepping
    at ``|h|^2 + 1``, about 20, times the learning rate (``h`` a chunk's last hidden layer), drove SGD to
    a non-finite loss at experience 2 of SFM-5.)

    Defaults. From the paper's split-MNIST classifier hypernetwork (its code's defaults): embeddings
    of 96 (``task_dim``, ``chunk_dim``), hidden layers ``[10, 10]`` (ReLU). Measured otherwise, on
    SFM-5-TIL with the protocol's SGD (lr 0.01, momentum 0.9, 2 epochs; the paper trains with Adam):

    * ``hidden_lr=0.01``: the hidden layers learn at 0.01 times the learning rate (their weights are
      used as ``sqrt(hidden_lr)`` times the stored ones, so this holds under any SGD stepping the
      model, GDumb's retraining included; under Adam the ratio is ``sqrt(hidden_lr)``). Shared by every
      output of a chunk, they take a curvature of the regulariser some 600 times the output layer's
      (12,000 against 21 per unit beta, 42,000-output chunks), which caps beta at 0.011-0.016 under
      SGD (see below) and leaves the output layer nearly unprotected: with ``hidden_lr=1``, 42,000
      chunks and the paper's ``beta=0.01``, 0.975 (seeds 0-2: 0.986, 0.989, 0.950; task 2 of seed 2
      falls from 0.96 to 0.77); ``beta=1`` is capped to the same (0.953 on seed 2).
    * ``beta=1`` (paper: 0.01 with Adam): with ``hidden_lr=0.01``, beta 0.01 gives 0.846 on seed 2
      (the first task falls to 0.50), beta 1 gives 0.986 and beta 3 (capped to about 1.2) 0.987.
    * ``chunk_size=8000`` (paper: 42,000 for its 400-400 MLP): 34 chunks, so the hypernetwork has 93,304
      parameters plus 96 per task, 0.35 times the target's 269,322; 42,000 would make it 464,712
      (1.7 times) for 0.988 against 0.987 (seeds 0-2, within the seeds' spread; 20,000: 0.988).

    The generated weights start at the root-mean-square size of the target's own initial weights
    (the output layer is scaled so at initialisation), as the target's initialisation would.

    No divergence: at each ``before_training_exp`` the largest curvature of the regulariser
    (Gauss-Newton, exact at the stored targets) in the SGD-scaled parameters is estimated by power
    iteration, and beta is capped so that it stays within half the stability limit ``(1 + momentum) /
    lr`` (as :class:`streamcl.penalty.Anchors` caps its coefficients), with a warning. It owns the
    role ``architecture``: a plugin that cuts or rebuilds the model's own layers (latent replay,
    progress & compress) cannot run on the generated network.
    """

    owns = frozenset({"architecture", "head_rows"})

    def __init__(self, beta: float = 1.0, task_dim: int = 96, chunk_dim: int = 96, chunk_size: int = 8000,
                 hidden: Sequence[int] = (10, 10), hidden_lr: float = 0.01):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ConfigError(f"HyperNetwork beta={beta!r}: it must be a finite number >= 0")
        for name, value in (("task_dim", task_dim), ("chunk_dim", chunk_dim), ("chunk_size", chunk_size)):
            _positive_int(name, value)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise ConfigError(f"HyperNetwork hidden={hidden!r}: give a list of layer widths (each >= 1), or []")
        for width in hidden:
            _positive_int("hidden", width)
        if (isinstance(hidden_lr, bool) or not isinstance(hidden_lr, (int, float)) or not math.isfinite(hidden_lr)
                or not 0 < hidden_lr <= 1):
            raise ConfigError(f"HyperNetwork hidden_lr={hidden_lr!r}: it must be a number in (0, 1], the hidden "
                              "layers' learning rate as a fraction of the rest's (1 = the same)")
        self.beta, self.task_dim, self.chunk_dim, self.chunk_size = float(beta), task_dim, chunk_dim, chunk_size
        self.hidden, self.hidden_lr = tuple(hidden), float(hidden_lr)
        self.beta_used = self.beta  # beta, capped at half the SGD stability limit of the current experience
        self.trained: list[int] = []  # task labels of the experiences trained so far
        self.current: list[int] = []  # the current experience's
        self.inferred: dict[int, list[int]] = {}  # task -> classes, for tasks without a label: inferred at test
        self.targets: dict[int, Tensor] = {}  # f_h(e_t, Theta_h*) of every earlier task, flat
        self._stack: Tensor | None = None

    # ------------------------------------------------------------------------------ model
    @staticmethod
    def experience_tasks(exp) -> list[int]:
        """``exp``'s task label, else its samples' ones; if they all carry one (or none), the task ``exp.index``."""
        if exp.task is not None:
            return [int(exp.task)]
        t = getattr(exp.dataset, "t", None)
        tasks = sorted(set(t.tolist())) if isinstance(t, Tensor) and t.numel() else []
        return tasks if len(tasks) > 1 else [exp.index]

    @hookimpl
    def adapt_model(self, strategy, model: nn.Module, experience) -> nn.Module:
        if not isinstance(model, HyperNetModel):
            growing = [n for n, m in model.named_modules() if callable(getattr(m, "grow_to", None))]
            if growing:
                raise ConfigError(f"HyperNetwork generates a fixed set of weights, but {type(model).__name__}."
                                  f"{growing[0] or 'self'} grows with the classes: give a model with a fixed head "
                                  "(model.growing = false)")
            model = HyperNetModel(model, self.task_dim, self.chunk_dim, self.chunk_size, self.hidden,
                                  strategy.generator, self.hidden_lr, head_path=strategy.head_path)
        tasks = self.experience_tasks(experience)
        if min(tasks) < 0:
            raise ConfigError(f"HyperNetwork: task label {min(tasks)} in {experience!r}; task labels must be >= 0")
        model.grow(max(tasks) + 1, strategy.generator)
        for t, emb in enumerate(model.task_embeddings):  # only the current task's embedding learns (paper Sec. 2.1)
            emb.requires_grad_(t in tasks)
        return model

    # ------------------------------------------------------------------------------ targets
    @hookimpl
    def before_training_exp(self, strategy) -> None:
        model, exp = strategy.model, strategy.experience
        self.current = self.experience_tasks(exp)
        if exp.task is None and self.current == [exp.index]:  # the latest task, for the classes it holds
            self.inferred.pop(exp.index, None)
            self.inferred[exp.index] = sorted(exp.classes)
        again = [t for t in self.current if t in self.trained]
        if again:
            warn(f"HyperNetwork: task label {again[0]} was trained in an earlier experience, so its "
                 "embedding learns again and nothing keeps its earlier weights; give each experience "
                 "its own task label", RuntimeWarning)
        earlier = sorted(t for t in self.trained if t not in self.current)
        with torch.no_grad():  # computed as the regulariser computes them, so it is exactly 0 right now
            out = model.generate(torch.stack([model.task_embeddings[t] for t in earlier])) if earlier else None
            self.targets = {t: out[i].clone() for i, t in enumerate(earlier)}
        self._stack = None
        self.beta_used = self.beta
        if self.targets and self.beta > 0:
            curvature = regulariser_curvature(model, sorted(self.targets), stability_limit(strategy.optimizer))
            if self.beta * curvature > 1:
                self.beta_used = 1 / curvature
                warn(f"HyperNetwork: beta={self.beta:g} was capped at {self.beta_used:.3g} for experience "
                     f"{strategy.experience.index}, half the SGD stability limit of the regulariser "
                     "((1 + momentum) / lr over its largest curvature), so the run cannot diverge; a "
                     "smaller beta or hidden_lr avoids it", RuntimeWarning)

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        self.trained += [t for t in self.current if t not in self.trained]

    # ------------------------------------------------------------------------------ inferred tasks (HNET+ENT)
    def _tables(self, n_classes: int, device) -> tuple[Tensor, Tensor]:
        """``task_of[c]``, the latest inferred task holding class ``c`` (-1: none), and ``allowed[k, c]``."""
        task_of = torch.full((n_classes,), -1, dtype=torch.long)
        allowed = torch.zeros(1 + max(self.inferred), n_classes, dtype=torch.bool)
        for task, classes in self.inferred.items():  # in training order
            classes = [c for c in classes if c < n_classes]
            task_of[classes], allowed[task, classes] = task, True
        return task_of.to(device), allowed.to(device)

    @hookimpl
    def before_forward(self, strategy) -> None:
        if len(self.current) == 1 and self.current[0] in self.inferred:  # each row: its class's task's embedding
            batch = strategy.batch
            task_of, _ = self._tables(strategy.experience.n_classes, batch.y.device)
            t = task_of[batch.y.clamp(0, len(task_of) - 1)]
            strategy.batch = Batch(batch.x, batch.y, torch.where(t >= 0, t, self.current[0]))

    @hookimpl
    def adapt_logits(self, strategy, logits: Tensor, batch) -> Tensor | None:
        """Training (train mode): each row's logits masked to the classes of its class's task. Otherwise
        (evaluation): every inferred task's logits on its own classes, the row's task the one of the lowest
        predictive entropy."""
        if not self.inferred:
            return None
        task_of, allowed = self._tables(logits.shape[1], logits.device)
        if strategy.is_training and strategy.model.training:
            task = task_of[batch.y.clamp(0, logits.shape[1] - 1)]
            return logits.masked_fill(~(allowed[task.clamp(min=0)] | (task < 0)[:, None]), float("-inf"))
        tasks = sorted(self.inferred)
        outs = torch.stack([strategy.model(batch.x, torch.full_like(batch.t, t)) for t in tasks])
        outs = outs.masked_fill(~allowed[tasks][:, None], float("-inf"))
        best = torch.special.entr(outs.softmax(-1)).sum(-1).argmin(0)
        return outs[best, torch.arange(len(batch), device=logits.device)]

    @hookimpl
    def loss_terms(self, strategy, batch, output) -> dict[str, Tensor] | None:
        if not self.targets or self.beta_used == 0:
            return None
        return {"hnet": self.beta_used * self.regulariser(strategy.model)}

    def regulariser(self, model: HyperNetModel) -> Tensor:
        """Eq. 2's sum: ``1/(T-1) sum_{t<T} ||f_h(e_t, Theta_h) - f_h(e_t, Theta_h*)||^2`` over the stored targets."""
        tasks = sorted(self.targets)
        if self._stack is None or self._stack.device != model.chunk_embeddings.device:
            self._stack = torch.stack([self.targets[t] for t in tasks]).to(model.chunk_embeddings.device)
        emb = torch.stack([model.task_embeddings[t] for t in tasks])
        return (model.generate(emb) - self._stack).square().sum() / len(tasks)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"trained": list(self.trained), "current": list(self.current), "beta_used": self.beta_used,
                "targets": {t: v.clone() for t, v in self.targets.items()},
                "inferred": {t: list(c) for t, c in self.inferred.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.trained, self.current = list(state["trained"]), list(state["current"])
        self.beta_used = state["beta_used"]
        self.inferred = {t: list(c) for t, c in state.get("inferred", {}).items()}
        self.targets = {t: v.clone() for t, v in state["targets"].items()}
        self._stack = None
