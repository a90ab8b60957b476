"""Progress & Compress: an active column beside a knowledge base, distilled into it under online EWC."""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from streamcl import Plugin, columns, hookimpl
from streamcl.batch import Batch
from streamcl.columns import PASSIVE, HeadLateral, Lateral, reinitialise  # noqa: F401 (PASSIVE: re-exported)
from streamcl.errors import ConfigError
from streamcl.parts import grown_linear, model_as, replace_module
from streamcl.plugins.ewc import EWC
from streamcl.scenarios import as_batch

class ActiveHead(nn.Module):
    """The active column's head with its lateral adaptor: ``head(a) + lateral(h)`` for the column's features
    ``a`` and the knowledge base's ``h`` (eq. 1 at the output layer). The engine takes it for the classifier
    head while progressing, so the features it reads (its input) are the column's."""

    def __init__(self, head: nn.Module, lateral: Lateral):
        super().__init__()
        self.head, self.lateral = head, lateral

    @property
    def in_features(self) -> int:
        return int(self.head.in_features)

    @property
    def out_features(self) -> int:
        return int(self.head.out_features)

    def forward(self, a: Tensor, h: Tensor) -> Tensor:
        return self.head(a) + self.lateral(h)


def check_model(model: nn.Module, head_path: str | None) -> list[str]:
    """The model's chain of module paths, the head last (:func:`streamcl.columns.check_model`)."""
    return columns.check_model(model, head_path, "progress_compress")


def check_forward(model: nn.Module, paths: list[str]) -> None:
    """Refuse a model whose forward is not its chain (:func:`streamcl.columns.check_forward`)."""
    columns.check_forward(model, paths, "progress_compress")


class ProgressCompressNet(nn.Module):
    """The knowledge base ``kb`` (the strategy's model), an active column ``ac`` of the same architecture and
    lateral adaptors ``laterals``: one into each of the column's linear layers after the first (and its head),
    from the knowledge base's input to the same layer (eq. 1 of the paper). ``chain`` are the paths of the
    model's modules in calling order, the head (``head_path``) last (see :func:`check_model`).

    ``forward`` runs the active column with its laterals while ``progress`` is true, the knowledge base
    alone otherwise; ``kb`` never reads the active column. ``head`` is what the engine takes for the
    classifier head: the column's :class:`ActiveHead` while progressing, the knowledge base's head otherwise.
    """

    def __init__(self, kb: nn.Module, chain: list[str], generator: torch.Generator, alpha: float,
                 width: int | None):
        super().__init__()
        self.kb, self.alpha, self.width = kb, alpha, width
        self.chain, self.head_path = list(chain), chain[-1]
        self.linear = [p for p in chain[:-1] if isinstance(kb.get_submodule(p), nn.Linear)]
        self.progress = True
        self.new_column(generator)

    def new_column(self, generator: torch.Generator) -> None:
        """A fresh active column (the knowledge base's architecture, re-initialised) and fresh laterals."""
        device = next(self.kb.parameters()).device
        ac = copy.deepcopy(self.kb)
        for p in ac.parameters():
            p.requires_grad_(True)
        reinitialise(ac, generator)
        laterals = []
        for path in [*self.linear[1:], self.head_path]:
            target = self.kb.get_submodule(path)
            n_in = target.in_features
            width = self.width or n_in
            kind = HeadLateral if path == self.head_path else Lateral
            laterals.append(kind(n_in, width, target.weight.shape[0], self.alpha, generator))
        self.ac, self.laterals = ac.to(device), nn.ModuleList(laterals).to(device)
        self._link()

    def _link(self) -> None:
        """The active head (kept out of the registered modules: its parts are the column's)."""
        self.__dict__["active_head"] = ActiveHead(self.ac.get_submodule(self.head_path), self.laterals[-1])

    @torch.no_grad()
    def match_head(self) -> None:
        """Widen the column's head and its lateral to the knowledge base's head (which the engine widened)."""
        n, head = self.kb.get_submodule(self.head_path).out_features, self.ac.get_submodule(self.head_path)
        if type(head) is nn.Linear and head.out_features < n:
            replace_module(self.ac, self.head_path, grown_linear(head, n))
        self.laterals[-1].grow_to(n)
        self._link()

    @property
    def head(self) -> nn.Module:
        return self.active_head if self.progress else self.kb.get_submodule(self.head_path)

    def __setattr__(self, name: str, value) -> None:
        if name == "head":  # the engine widening a fixed nn.Linear head: it belongs to the knowledge base
            replace_module(self.kb, self.head_path, value)
        else:
            super().__setattr__(name, value)

    def column_parameters(self) -> list[nn.Parameter]:
        return [*self.ac.parameters(), *self.laterals.parameters()]

    def forward(self, x: Tensor) -> Tensor:
        if not self.progress:
            return self.kb(x)
        inputs, h = [], x  # the knowledge base's input to each linear layer, then to its head
        for path in self.chain[:-1]:
            if path in self.linear:
                inputs.append(h)
            h = self.kb.get_submodule(path)(h)
        a, j = x, 0
        for path in self.chain[:-1]:
            m = self.ac.get_submodule(path)
            if path in self.linear:
                a = m(a) if j == 0 else m(a) + self.laterals[j - 1](inputs[j])
                j += 1
            else:
                a = m(a)
        return self.active_head(a, h)


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
    * Compress (``after_training_exp``): the KB alone is trained, by the engine's private training loop
      (``strategy.fit``: an optimizer of the strategy's kind and settings, ``strategy.epochs`` epochs of
      minibatches of ``strategy.batch_size`` in an order drawn from ``strategy.generator``, logged as
      ``loss/compress``) on the experience's data, to minimise eq. 2,

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
    The model must be a chain of fully connected layers: its modules in calling order (its children with every
    ``nn.Sequential`` opened, :func:`streamcl.models.nets.module_chain`) are Linear and parameter-free layers
    (ReLU, Flatten, Dropout, Identity), then the classifier head the engine found, and its forward is that
    chain (checked on a random input): streamcl's MLP or a plain ``nn.Sequential``. Others (convolutions,
    attention) are refused when the Strategy is built, with a :class:`ConfigError` naming the first module
    that does not fit. While progressing the engine's classifier head is the column's head with its lateral
    (:class:`ActiveHead`, so the features are the column's), after compressing the KB's. It owns the role
    ``architecture``.

    Defaults, measured (seeds 0-2, with a 1000-sample Fisher; no weight from the paper carries over, the Fisher's
    scale depending on the model and data): ``lambda_ = 100`` gives SFM-5-TIL 0.958 and PFM-5 0.767;
    ``lambda_ = 1000`` gives SFM-5-TIL 0.984 (300: 0.973) but PFM-5 0.730 (seed 0: the KB grows too stiff to
    take in five permutations). ``gamma = 1`` (0.8 with lambda_ 1000, seed 0: TIL 0.984, PFM 0.744);
    ``alpha = 0.1`` (1.0: TIL 0.966 against 0.968, seed 0); ``reset = True`` (False, lambda_ 1000, seed 0:
    0.983 against 0.985); ``fisher_samples = None``: the whole experience, as EWC defines the Fisher (1000
    samples give the same accuracy: SFM-5-TIL lambda_ 1000, 0.984 both).
    """

    # it replaces the model, as hypernetwork and latent_replay restructure it, and with it the head's rows
    owns = frozenset({"architecture", "head_rows"})
    requires = frozenset({"head"})

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
        self.chain: list[str] = []  # the model's modules in calling order, the head last (found at setup)

    @hookimpl
    def setup(self, strategy) -> None:
        self.chain = check_model(strategy.model, strategy.head_path)
        check_forward(strategy.model, self.chain)

    # ------------------------------------------------------------------------------ progress
    @hookimpl
    def adapt_model(self, strategy, model: nn.Module) -> nn.Module:
        if not isinstance(model, ProgressCompressNet):
            model = ProgressCompressNet(model, self.chain, strategy.generator, self.alpha, self.adaptor_width)
        elif self.reset and self.experiences:
            model.new_column(strategy.generator)
        else:
            model.match_head()
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
        model = model_as(strategy, ProgressCompressNet, "progress_compress", "the knowledge base with its active column")
        data = as_batch(strategy.experience.dataset, strategy.device)
        teacher = strategy.infer(data).logits  # the AC's (adapted) predictions, in evaluation mode
        self._phase(model, progress=False)
        strategy.model_changed()  # the engine's head is now the KB's
        self._compress(strategy, model, data, teacher)
        if self.ewc.lambda_ > 0:
            self.ewc.consolidate(strategy, model=model.kb)
        self.experiences += 1

    def _compress(self, strategy, model: ProgressCompressNet, data: Batch, teacher: Tensor) -> None:
        """Eq. 2 on ``data`` by ``strategy.fit``; each row's index travels as its label into the minibatches (so
        its teacher logits can be found) and the true labels are put back before the forward pass."""
        labels, steps = data.y, math.ceil(len(data) / strategy.batch_size)
        rows = Batch(data.x, torch.arange(len(data), device=labels.device), data.t)
        sums: dict[str, Tensor] = {}
        done = 0

        def loss(part: Batch) -> Tensor:
            nonlocal done
            idx = part.y
            kl = kl_on_finite(teacher[idx], strategy.forward(Batch(part.x, labels[idx], part.t), net=model).logits)
            ewc = self.ewc.penalty(model.kb) if self.ewc.anchors and self.ewc.lambda_ > 0 else kl.new_zeros(())
            total = kl + ewc
            if done % steps == 0:  # a new epoch: ``last`` keeps the last one's means
                sums.clear()
            for k, v in (("kl", kl), ("ewc", ewc), ("total", total)):
                sums[k] = sums.get(k, 0) + v.detach()
            done += 1
            return total

        model.train()
        strategy.fit(rows, loss, list(model.kb.parameters()), epochs=strategy.epochs, name="compress")
        self.last = {k: float(v) / steps for k, v in sums.items()}

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"ewc": self.ewc.state_dict(), "last": dict(self.last), "experiences": self.experiences}

    def load_state_dict(self, state: dict) -> None:
        self.ewc.load_state_dict(state["ewc"])
        self.last, self.experiences = dict(state["last"]), state["experiences"]
