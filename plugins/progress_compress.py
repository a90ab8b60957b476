"""Progress & Compress: an active column beside a knowledge base, distilled into it under online EWC."""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from streamcl import Plugin, hookimpl
from streamcl.batch import Batch
from streamcl.errors import ConfigError, TrainingError
from streamcl.models.heads import IncrementalLinear
from streamcl.plugins.ewc import EWC
from streamcl.scenarios import as_batch

# modules a backbone may hold: parameter-free ones, and the linear layers the laterals join
PASSIVE = (nn.Flatten, nn.ReLU, nn.Dropout, nn.Identity)


def _uniform_(tensor: Tensor, fan_in: int, generator: torch.Generator) -> None:
    """``nn.Linear``'s default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from ``generator``."""
    bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
    with torch.no_grad():
        sample = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) * 2 * bound - bound
        tensor.copy_(sample.to(tensor.device))


def _reinitialise(module: nn.Module, generator: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, IncrementalLinear)):
            _uniform_(m.weight, m.in_features, generator)
            if m.bias is not None:
                _uniform_(m.bias, m.in_features, generator)


class Lateral(nn.Module):
    """A lateral adaptor, the term ``alpha * U relu(V h + c)`` of P&C's eq. 1 (the non-linear adapters of
    Rusu et al. 2016, Sec. 2), with ``h`` the knowledge base's activation, ``alpha`` a learned vector (one
    entry per output unit, initialised to a constant) and no bias on ``U``."""

    def __init__(self, in_features: int, width: int, out_features: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.alpha_init = alpha
        self.V = nn.Linear(in_features, width)
        self.U = nn.Parameter(torch.empty(out_features, width))
        self.alpha = nn.Parameter(torch.full((out_features,), float(alpha)))
        _reinitialise(self.V, generator)
        _uniform_(self.U, width, generator)

    def forward(self, h: Tensor) -> Tensor:
        return self.alpha * F.linear(F.relu(self.V(h)), self.U)


class HeadLateral(Lateral):
    """The lateral into a head that grows (:class:`IncrementalLinear`): new classes get zero rows of ``U``
    (no lateral input until trained) and ``alpha`` at its initial value."""

    @torch.no_grad()
    def grow_to(self, n: int) -> bool:
        old = self.U.shape[0]
        if n <= old:
            return False
        self.U = nn.Parameter(torch.cat([self.U, self.U.new_zeros(n - old, self.U.shape[1])]))
        self.alpha = nn.Parameter(torch.cat([self.alpha, self.alpha.new_full((n - old,), self.alpha_init)]))
        return True


def check_model(model: nn.Module) -> list[int]:
    """The indices of the ``nn.Linear`` layers of ``model.backbone``; refuses a model P&C cannot wire."""
    backbone, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if not isinstance(backbone, nn.Sequential) or not isinstance(head, (nn.Linear, IncrementalLinear)):
        raise ConfigError(f"progress_compress needs a streamcl.models.Classifier whose backbone is an nn.Sequential "
                          f"and whose head is linear (the MLP); got {type(model).__name__}")
    bad = [type(m).__name__ for m in backbone if not isinstance(m, (nn.Linear, *PASSIVE))]
    if bad:
        raise ConfigError(f"progress_compress wires lateral adaptors between fully connected layers only: the "
                          f"backbone may hold Linear, ReLU, Flatten, Dropout and Identity, not {bad[0]} "
                          f"(use the MLP: model.name = \"mlp\")")
    linear = [i for i, m in enumerate(backbone) if isinstance(m, nn.Linear)]
    if not linear:
        raise ConfigError("progress_compress needs at least one hidden Linear layer in the backbone: the "
                          "laterals read the knowledge base's hidden activations")
    return linear


class ProgressCompressNet(nn.Module):
    """The knowledge base ``kb`` (the strategy's model), an active column ``ac`` of the same architecture and
    lateral adaptors ``laterals``: one into each of the column's linear layers after the first (and its head),
    from the knowledge base's input to the same layer (eq. 1 of the paper).

    ``forward`` runs the active column with its laterals while ``progress`` is true, the knowledge base
    alone otherwise; ``kb`` never reads the active column.
    """

    def __init__(self, kb: nn.Module, generator: torch.Generator, alpha: float, width: int | None):
        super().__init__()
        self.linear = check_model(kb)
        self.kb, self.alpha, self.width = kb, alpha, width
        self.feature_dim = getattr(kb, "feature_dim", None)
        self.progress = True
        self.new_column(generator)

    def new_column(self, generator: torch.Generator) -> None:
        """A fresh active column (the knowledge base's architecture, re-initialised) and fresh laterals."""
        device = next(self.kb.parameters()).device
        ac = copy.deepcopy(self.kb)
        for p in ac.parameters():
            p.requires_grad_(True)
        _reinitialise(ac, generator)
        laterals = []
        backbone = self.kb.backbone
        targets = [backbone[i] for i in self.linear[1:]] + [self.kb.head]
        for target in targets:
            n_in = target.in_features
            width = self.width or n_in
            kind = HeadLateral if isinstance(target, IncrementalLinear) else Lateral
            laterals.append(kind(n_in, width, target.weight.shape[0], self.alpha, generator))
        self.ac, self.laterals = ac.to(device), nn.ModuleList(laterals).to(device)

    def column_parameters(self) -> list[nn.Parameter]:
        return [*self.ac.parameters(), *self.laterals.parameters()]

    def forward(self, x: Tensor, return_features: bool = False):
        if not self.progress:
            return self.kb(x, return_features=return_features)
        inputs, h = [], x  # the knowledge base's input to each linear layer, then to its head
        for m in self.kb.backbone:
            if isinstance(m, nn.Linear):
                inputs.append(h)
            h = m(h)
        inputs.append(h)
        a, j = x, 0
        for m in self.ac.backbone:
            if isinstance(m, nn.Linear):
                a = m(a) if j == 0 else m(a) + self.laterals[j - 1](inputs[j])
                j += 1
            else:
                a = m(a)
        logits = self.ac.head(a) + self.laterals[-1](inputs[-1])
        return (logits, a) if return_features else logits


def kl_on_finite(teacher: Tensor, student: Tensor) -> Tensor:
    """``mean_n KL(softmax(teacher_n) || softmax(student_n))`` over the entries where ``teacher`` is finite
    (a task mask sets the others to -inf in both); 0 where both agree."""
    keep = torch.isfinite(teacher)
    log_p = F.log_softmax(teacher.masked_fill(~keep, float("-inf")), dim=1)
    log_q = F.log_softmax(student.masked_fill(~keep, float("-inf")), dim=1)
    log_p, log_q = torch.where(keep, log_p, 0.0), torch.where(keep, log_q, 0.0)
    return (log_p.exp() * keep * (log_p - log_q)).sum(1).mean()


class ProgressCompress(Plugin):
    """Progress & Compress (Schwarz et al. 2018, "Progress & Compress: A scalable framework for continual
    learning", Sec. 2-4).

    The strategy's model becomes the knowledge base (KB). At the first experience ``adapt_model`` wraps it in
    a :class:`ProgressCompressNet` with an active column (AC): a copy of the KB's architecture, re-initialised,
    joined to the KB by lateral adaptors (eq. 1, as in Progressive Nets, Rusu et al. 2016)

        h_i = relu(W_i h_{i-1} + alpha_i * U_i relu(V_i h^KB_{i-1} + c_i) + b_i)

    into every linear layer of the AC after the first, its head included.

    * Progress: the engine trains the AC and the adaptors on the experience (the task loss, and any other
      plugin's terms); the KB is frozen (``requires_grad`` off, so neither the optimizer nor DDP touch it).
    * Compress (``after_training_exp``): the KB alone is trained, by a loop of the plugin's own (an optimizer
      of the strategy's kind and settings, ``strategy.epochs`` epochs of minibatches of ``strategy.batch_size``
      in an order drawn from ``strategy.generator``) on the experience's data, to minimise eq. 2,

          KL(pi_AC(.|x) || pi_KB(.|x)) + lambda_/2 * ||theta_KB - theta*_KB||^2_{gamma F*}

      with the AC's predictions taken once at the end of progress (temperature 1), both sides after every
      ``adapt_logits`` and over the entries the AC leaves finite (under a task mask, the experience's
      task's classes). The penalty is online EWC (eq. 7-8) on the KB: after compressing, the KB's empirical
      Fisher ``F_k`` on the experience joins ``F* <- gamma F* + F_k``, anchored at the KB's parameters
      (:class:`streamcl.plugins.ewc.EWC` with ``online=True``; capped at the SGD stability limit).
      The last compress phase's losses are kept in ``last`` (``kl``, ``ewc``, ``total``: mean of the last epoch).

    Evaluation after compress uses the KB, which holds every experience. ``reset=True`` gives each experience a
    fresh AC and fresh adaptors (as in Progressive Nets); ``reset=False`` keeps training the same ones.

    Arguments: ``lambda_`` (EWC weight), ``gamma`` (online-EWC decay, in [0, 1]), ``alpha`` (the adaptors'
    initial scale), ``adaptor_width`` (width of ``V``; ``None``: the KB layer's own width), ``reset``,
    ``fisher_samples`` (the Fisher's samples, drawn from the experience; ``None``: all of them).
    The model must be a :class:`streamcl.models.Classifier` with an ``nn.Sequential`` backbone of Linear and
    ReLU layers (the MLP); others are refused with a :class:`ConfigError`. It owns the role ``architecture``.

    Defaults, measured (seeds 0-2, with a 1000-sample Fisher; no weight from the paper carries over, the Fisher's
    scale depending on the model and data): ``lambda_ = 100`` gives SFM-5-TIL 0.958 and PFM-5 0.767;
    ``lambda_ = 1000`` gives SFM-5-TIL 0.984 (300: 0.973) but PFM-5 0.730 (seed 0: the KB grows too stiff to
    take in five permutations). ``gamma = 1`` (0.8 with lambda_ 1000, seed 0: TIL 0.984, PFM 0.744);
    ``alpha = 0.1`` (1.0: TIL 0.966 against 0.968, seed 0); ``reset = True`` (False, lambda_ 1000, seed 0:
    0.983 against 0.985); ``fisher_samples = None``: the whole experience, as EWC defines the Fisher (1000
    samples give the same accuracy: SFM-5-TIL lambda_ 1000, 0.984 both).
    """

    owns = frozenset({"architecture"})  # it replaces the model, as hypernetwork and latent_replay restructure it

    def __init__(self, lambda_: float = 100.0, gamma: float = 1.0, alpha: float = 0.1,
                 adaptor_width: int | None = None, reset: bool = True, fisher_samples: int | None = None):
        if (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
                or alpha < 0):
            raise ConfigError(f"progress_compress alpha={alpha!r}: the adaptors' initial scale, a finite number >= 0")
        if adaptor_width is not None and (isinstance(adaptor_width, bool) or not isinstance(adaptor_width, int)
                                          or adaptor_width <= 0):
            raise ConfigError(f"progress_compress adaptor_width={adaptor_width!r}: a positive integer, or none for "
                              "the width of the layer the adaptor reads")
        if not isinstance(reset, bool):
            raise ConfigError(f"progress_compress reset={reset!r}: use true (a fresh active column per "
                              "experience) or false")
        try:
            self.ewc = EWC(lambda_, online=True, gamma=gamma, fisher_samples=fisher_samples)
        except ConfigError as err:
            raise ConfigError(str(err).replace("ewc ", "progress_compress ", 1)) from None
        self.ewc.anchors.name = "progress_compress (online EWC of the knowledge base)"
        self.alpha, self.adaptor_width, self.reset = float(alpha), adaptor_width, reset
        self.last: dict[str, float] = {}
        self.experiences = 0

    # ------------------------------------------------------------------------------ progress
    @hookimpl
    def adapt_model(self, strategy, model: nn.Module) -> nn.Module:
        if not isinstance(model, ProgressCompressNet):
            model = ProgressCompressNet(model, strategy.generator, self.alpha, self.adaptor_width)
        elif self.reset and self.experiences:
            model.new_column(strategy.generator)
        self._phase(model, progress=True)
        return model

    @staticmethod
    def _phase(model: ProgressCompressNet, progress: bool) -> None:
        model.progress = progress
        for p in model.kb.parameters():
            p.requires_grad_(not progress)
        for p in model.column_parameters():
            p.requires_grad_(progress)

    # ------------------------------------------------------------------------------ compress
    @hookimpl
    def after_training_exp(self, strategy) -> None:
        model = strategy.model
        if not isinstance(model, ProgressCompressNet):  # another plugin replaced the model after ours
            raise ConfigError("progress_compress: strategy.model is no longer the knowledge base with its active "
                              "column; list progress_compress after plugins that replace the model")
        data = as_batch(strategy.experience.dataset, strategy.device)
        teacher = self._predict(strategy, model, data)
        self._phase(model, progress=False)
        self._compress(strategy, model, data, teacher)
        if self.ewc.lambda_ > 0:
            self.ewc.consolidate(strategy, model=model.kb)
        self.experiences += 1

    @torch.no_grad()
    def _predict(self, strategy, model: ProgressCompressNet, data: Batch) -> Tensor:
        """The AC's (adapted) logits on every sample of ``data``, in evaluation mode."""
        was_training, step = model.training, strategy.eval_batch_size
        model.eval()
        try:
            return torch.cat([strategy.forward(data.select(slice(i, i + step)), net=model).logits
                              for i in range(0, len(data), step)])
        finally:
            model.train(was_training)

    def _compress(self, strategy, model: ProgressCompressNet, data: Batch, teacher: Tensor) -> None:
        params = list(model.kb.parameters())
        optimizer = self._optimizer(strategy, params)
        n, size = len(data), strategy.batch_size
        model.train()
        for _ in range(strategy.epochs):
            order = torch.randperm(n, generator=strategy.generator).to(data.y.device)
            sums, steps = {"kl": 0.0, "ewc": 0.0, "total": 0.0}, 0
            for i in range(0, n, size):
                idx = order[i:i + size]
                batch = data.select(idx)
                optimizer.zero_grad(set_to_none=True)
                kl = kl_on_finite(teacher[idx], strategy.forward(batch, net=model).logits)
                ewc = self.ewc.penalty(model.kb) if self.ewc.anchors and self.ewc.lambda_ > 0 else kl.new_zeros(())
                loss = kl + ewc
                if strategy.check_finite and not math.isfinite(loss.item()):
                    raise TrainingError(f"progress_compress: non-finite compress loss (kl {kl.item()}, ewc "
                                        f"{ewc.item()}) in experience {strategy.experience.index}; lower the "
                                        "learning rate or lambda_")
                loss.backward()
                optimizer.step()
                for k, v in (("kl", kl), ("ewc", ewc), ("total", loss)):
                    sums[k] += v.item()
                steps += 1
            self.last = {k: v / max(steps, 1) for k, v in sums.items()}

    @staticmethod
    def _optimizer(strategy, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """An optimizer of the strategy's kind with its settings (those of its first own group)."""
        opt = strategy.optimizer
        group = next((g for g in opt.param_groups if not g.get("from_plugin")), None) or opt.defaults
        return type(opt)(params, **{k: group[k] for k in opt.defaults if k in group})

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"ewc": self.ewc.state_dict(), "last": dict(self.last), "experiences": self.experiences}

    def load_state_dict(self, state: dict) -> None:
        self.ewc.load_state_dict(state["ewc"])
        self.last, self.experiences = dict(state["last"]), state["experiences"]
