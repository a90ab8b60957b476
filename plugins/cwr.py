"""CWR and CWR*: consolidated classifier rows, trained as temporary rows one experience at a time."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from streamcl import Plugin, hookimpl
from streamcl.errors import ConfigError
from streamcl.plugins.wa import head_rows
from streamcl.scenarios.data import targets_of


def _factor(value, who: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ConfigError(f"{who} lower_lr={value!r}: a learning-rate factor >= 0 for every layer but the head from "
                          "the second experience on (0 freezes them, as the papers do), or None to leave them to the "
                          "optimizer")
    return float(value)


def consolidate(cw: Tensor | None, tw: Tensor, past: int, cur: int) -> Tensor:
    """CWR*'s consolidation of one class (Maltoni & Lomonaco 2019, Alg. 2, lines 11-14): ``tw`` is the class's trained
    row with the experience's mean already subtracted; ``cw`` its consolidated row (``None``: never consolidated);
    ``past`` and ``cur`` its samples before and in the experience.

        w_past = sqrt(past / cur),    cw <- (cw * w_past + tw) / (w_past + 1)
    """
    if cw is None or past == 0:
        return tw.clone()
    w = math.sqrt(past / cur)
    return (cw * w + tw) / (w + 1)


class CWRStar(Plugin):
    """CWR* (Maltoni & Lomonaco 2019, "Continuous learning in single-incremental-task scenarios", Neural Networks
    116, Sec. 4.2, Alg. 2), on the rows of the engine's classifier head (``strategy.head``: any model with a linear
    head; a row is a class's weight vector and its bias).

    The head holds two sets of rows: consolidated ``cw`` (what the model predicts with) and temporary ``tw`` (what
    an experience trains). With ``B`` the classes trained in the experience (those with samples in its training
    data, or in the replay memory of a plugin that owns ``memory``, as the authors' AR1* code counts its replayed
    latents), ``cur_j`` the samples of class ``j`` in it and ``past_j`` those of earlier experiences:

    * before the experience (Alg. 2, line 7): ``tw[j] = cw[j]`` for ``j`` in ``B`` if ``j`` was consolidated, else 0;
      every other row is 0 (the head's momentum is forgotten);
    * the experience trains ``tw`` with the rest of the model (line 8-10; see ``lower_lr`` for the layers below);
    * after it (lines 11-14), the mean-shift ``tw[j] - avg(tw)``, ``avg`` the mean of every weight of the rows of ``B``
      (one number, as the authors' code and Avalanche compute it; the biases get the mean of their own), then for each
      ``j`` in ``B``::

          w_past_j = sqrt(past_j / cur_j)
          cw[j]   = (cw[j] * w_past_j + (tw[j] - avg(tw))) / (w_past_j + 1)      (a new class: cw[j] = tw[j] - avg)
          past_j += cur_j

    * evaluation uses ``cw`` (line 15): after each experience every row of the head is set to ``cw`` (0 for a class
      never consolidated, as ``cw`` starts at 0). An evaluation in the middle of an experience (``eval_every``) sees
      the ``cw`` a consolidation would give at that point, and training resumes on ``tw``.

    ``w_past = sqrt(past / cur)`` is the paper's and its code's; a count-weighted mean,
    ``(cw * past + (tw - avg) * cur) / (past + cur)``, is ``w_past = past / cur``, which the code leaves commented out.
    On a class-incremental stream without a memory no class comes back, so there ``cw[j] = tw[j] - avg``.

    **Lower layers** (``lower_lr``, ``lower_from``): in the paper ``Theta`` (every layer below the head) learns on the
    first experience and is kept fixed afterwards. ``lower_lr=0`` (default) does that from experience ``lower_from``
    on (default 1: after the first): those parameters stop taking gradients (before DDP wraps the model), sit in an
    optimizer group of learning rate 0 (so a resumed run keeps them too) and their modules train in evaluation mode
    (fixed normalisation statistics, no dropout). ``0 < lower_lr`` slows them down to ``lower_lr`` times the
    optimizer's learning rate instead, and ``lower_lr=None`` leaves every layer but the head to the optimizer, so
    that another plugin may set their pace (the ``ar1`` recipe gives them to
    :class:`~streamcl.plugins.latent_replay.LatentReplay` and :class:`~streamcl.plugins.si.SI`). ``lower_from=0``
    keeps them at their initial values from the start (a pre-trained extractor, or the paper's "Theta random").

    SFM-5 (from scratch, seeds 0-2): 0.449 with the paper's schedule (Avalanche's CWR*, which hard-codes it, 0.437):
    the first experience's two classes are learnt by the features and the head together, their rows stay short and
    lose to the rows learnt later on the frozen features. Fixed from the start (``lower_from=0``, random ReLU
    features): 0.583. Left to the optimizer: 0.398, slowed to 0.1: 0.327 (seed 0). ``docs/methods.md`` has the rest.

    **Roles.** It owns ``head_rows`` (it decides the head's rows between steps, as WA, COIL and the plugins that replace
    or generate the head do) and, while it sets the pace of the lower layers (``lower_lr`` not ``None``),
    ``architecture`` (as LatentReplay, which freezes the layers below its cut); with ``lower_lr=None`` it runs beside
    LatentReplay. Requires a head with a weight of one row per class (refused when the Strategy is built).
    """

    requires = frozenset({"head"})
    label = "cwr_star"

    def __init__(self, lower_lr: float | None = 0.0, lower_from: int = 1):
        self.lower_lr = _factor(lower_lr, type(self).__name__)
        if isinstance(lower_from, bool) or not isinstance(lower_from, int) or lower_from < 0:
            raise ConfigError(f"{type(self).__name__} lower_from={lower_from!r}: the number of experiences the layers "
                              "below the head learn freely before lower_lr applies (1: after the first, as the papers; "
                              "0: from the start)")
        self.lower_from = lower_from
        self.owns = frozenset({"head_rows"} if self.lower_lr is None else {"head_rows", "architecture"})
        self.weights: dict[int, Tensor] = {}  # cw: class -> consolidated weight row
        self.biases: dict[int, Tensor] = {}  # class -> consolidated bias (0-dim), for a head with a bias
        self.past: dict[int, int] = {}  # class -> samples in the experiences consolidated so far
        self.cur: dict[int, int] = {}  # class -> samples in the experience in training (B and cur_j)
        self.in_experience = False  # between before_training_exp and after_training_exp (tw in the head)
        self._stash: tuple[Tensor, Tensor | None] | None = None  # tw while an evaluation inside training runs

    # ------------------------------------------------------------------------------ the head
    @hookimpl
    def setup(self, strategy) -> None:
        head_rows(strategy, self.label)  # refuse a head without weight rows before any step

    def _rows(self, strategy) -> tuple[nn.Parameter, nn.Parameter | None]:
        weight = head_rows(strategy, self.label)
        bias = getattr(strategy.head, "bias", None)
        ok = isinstance(bias, nn.Parameter) and bias.shape == weight.shape[:1]
        return weight, bias if ok else None

    def _write_cw(self, strategy) -> None:
        """Every row of the head to ``cw`` (0 for classes never consolidated)."""
        weight, bias = self._rows(strategy)
        with torch.no_grad():
            weight.zero_()
            for c, row in self.weights.items():
                if c < len(weight):
                    weight[c] = row.to(weight)
            if bias is not None:
                bias.zero_()
                for c, b in self.biases.items():
                    if c < len(bias):
                        bias[c] = b.to(bias)

    def reset(self, strategy) -> None:
        """Alg. 2, line 7: ``tw[j] = cw[j]`` for the experience's classes, 0 elsewhere."""
        weight, bias = self._rows(strategy)
        with torch.no_grad():
            weight.zero_()
            if bias is not None:
                bias.zero_()
            for c in self.cur:
                if c in self.weights and c < len(weight):
                    weight[c] = self.weights[c].to(weight)
                    if bias is not None and c in self.biases:
                        bias[c] = self.biases[c].to(bias)

    def update(self, strategy) -> None:
        """Alg. 2, lines 11-14: mean-shift and consolidate the experience's rows."""
        weight, bias = self._rows(strategy)
        classes = sorted(c for c in self.cur if c < len(weight))
        if not classes:
            return
        rows = torch.tensor(classes, device=weight.device)
        tw = weight.detach()[rows]
        tw = tw - tw.mean()
        tb = None
        if bias is not None:
            tb = bias.detach()[rows]
            tb = tb - tb.mean()
        for i, c in enumerate(classes):
            past, cur = self.past.get(c, 0), self.cur[c]
            self.weights[c] = consolidate(self.weights.get(c), tw[i], past, cur)
            if tb is not None:
                self.biases[c] = consolidate(self.biases.get(c), tb[i], past, cur)
            self.past[c] = past + cur

    # ------------------------------------------------------------------------------ the experience
    def _counts(self, strategy) -> dict[int, int]:
        """``cur_j``: the samples of each class in the experience's training data and in a replay memory beside it
        (a memory that comes in through ``train_data``, as Cumulative's, is in the training data already)."""
        y = targets_of(strategy.train_dataset).reshape(-1).cpu()
        memory = strategy.memory
        joined = memory is not None and len(strategy.train_dataset) > len(strategy.experience)
        if memory is not None and not joined and hasattr(memory, "labels"):
            y = torch.cat([y, memory.labels.reshape(-1).cpu()])
        counts = torch.bincount(y[y >= 0]) if len(y) else torch.zeros(0, dtype=torch.long)
        return {c: int(n) for c, n in enumerate(counts.tolist()) if n > 0}

    @hookimpl
    def before_training_exp(self, strategy) -> None:
        self.cur = self._counts(strategy)
        self.reset(strategy)
        weight, bias = self._rows(strategy)
        strategy.forget_momentum(weight)
        if bias is not None:
            strategy.forget_momentum(bias)
        self.in_experience = True

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        self.update(strategy)
        self._write_cw(strategy)
        self.cur, self.in_experience = {}, False

    # ------------------------------------------------------------------------------ evaluation inside training
    @hookimpl
    def before_eval(self, strategy) -> None:
        """Inside an experience (``eval_every``): evaluate the rows the consolidation would give if the experience
        ended now; ``tw`` is put back after the evaluation."""
        if self.in_experience and self._stash is None:
            weight, bias = self._rows(strategy)
            self._stash = (weight.detach().clone(), None if bias is None else bias.detach().clone())
            kept = dict(self.weights), dict(self.biases), dict(self.past)
            self.update(strategy)
            self._write_cw(strategy)
            self.weights, self.biases, self.past = kept

    @hookimpl
    def after_eval(self, strategy) -> None:
        if self._stash is not None:
            weight, bias = self._rows(strategy)
            with torch.no_grad():
                weight.copy_(self._stash[0])
                if bias is not None and self._stash[1] is not None:
                    bias.copy_(self._stash[1])
            self._stash = None

    # ------------------------------------------------------------------------------ the layers below the head
    def _lower(self, strategy, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        head = {id(p) for p in strategy.head.parameters()}
        return [(n, p) for n, p in model.named_parameters() if id(p) not in head]

    def _after_first(self, strategy) -> bool:
        return self.lower_lr is not None and len(strategy.trained) >= self.lower_from

    @hookimpl
    def adapt_model(self, strategy, model: nn.Module) -> nn.Module:
        if self._after_first(strategy) and self.lower_lr == 0:
            for _, p in self._lower(strategy, model):
                p.requires_grad_(False)
        return model

    @hookimpl
    def param_groups(self, strategy, model: nn.Module) -> list[dict] | None:
        if not self._after_first(strategy):
            return None
        params = [p for n, p in self._lower(strategy, model) if strategy.param_groups.trains(n)]
        if not params:
            return None
        return [{"params": params, "lr": self.lower_lr * strategy.optimizer.defaults["lr"]}]

    @hookimpl
    def before_forward(self, strategy) -> None:
        if self._after_first(strategy) and self.lower_lr == 0:  # fixed: normalisation statistics and dropout too
            model, head_path = strategy.model, strategy.head_path
            for name, m in model.named_modules():
                if name and name != head_path and not name.startswith(head_path + ".") \
                        and not head_path.startswith(name + "."):
                    m.training = False

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"weights": {c: w.clone() for c, w in self.weights.items()},
                "biases": {c: b.clone() for c, b in self.biases.items()},
                "past": dict(self.past), "cur": dict(self.cur), "in_experience": self.in_experience}

    def load_state_dict(self, state: dict) -> None:
        self.weights = {int(c): w.clone() for c, w in state["weights"].items()}
        self.biases = {int(c): b.clone() for c, b in state["biases"].items()}
        self.past = {int(c): int(n) for c, n in state["past"].items()}
        self.cur = {int(c): int(n) for c, n in state["cur"].items()}
        self.in_experience, self._stash = bool(state["in_experience"]), None


class CWR(CWRStar):
    """CWR, "copy weights with re-init" (Lomonaco & Maltoni 2017, "CORe50: a New Dataset and Benchmark for
    Continuous Object Recognition", CoRL, Sec. 5), on the rows of the engine's classifier head.

    Before each experience every temporary row ``tw`` is re-initialised (``init="random"``, the paper's re-init: each
    weight and bias drawn from ``U(-1/sqrt(features), 1/sqrt(features))``, ``nn.Linear``'s own initialisation, from
    the run's generator; ``init="zero"`` is CWR+'s zero init, Maltoni & Lomonaco 2019, Sec. 4.1); the experience
    trains them; after it the rows of its classes are copied, ``cw[j] = tw[j]``: no mean-shift and no weighting by
    counts (a class that comes back replaces its consolidated row). Evaluation uses ``cw``, 0 for classes never
    trained. The layers below the head, the roles and the model requirements are CWR*'s (:class:`CWRStar`):
    ``lower_lr=0`` (default) keeps them fixed from the second experience on, as the paper does. SFM-5 (seeds 0-2):
    0.363, 0.542 with ``lower_from=0``.
    """

    label = "cwr"

    def __init__(self, lower_lr: float | None = 0.0, lower_from: int = 1, init: str = "random"):
        super().__init__(lower_lr, lower_from)
        if init not in ("random", "zero"):
            raise ConfigError(f"cwr init={init!r}: use \"random\" (the paper's re-init of the temporary rows) or "
                              "\"zero\" (CWR+'s zero init)")
        self.init = init

    def reset(self, strategy) -> None:
        weight, bias = self._rows(strategy)
        with torch.no_grad():
            if self.init == "zero":
                weight.zero_()
                if bias is not None:
                    bias.zero_()
                return
            bound = 1 / math.sqrt(weight.shape[1]) if weight.shape[1] else 0.0
            g = strategy.generator
            draw = lambda shape: (torch.rand(shape, generator=g, device=g.device) * 2 - 1) * bound  # noqa: E731
            weight.copy_(draw(weight.shape).to(weight))
            if bias is not None:
                bias.copy_(draw(bias.shape).to(bias))

    def update(self, strategy) -> None:
        weight, bias = self._rows(strategy)
        for c in sorted(c for c in self.cur if c < len(weight)):
            self.weights[c] = weight.detach()[c].clone()
            if bias is not None:
                self.biases[c] = bias.detach()[c].clone()
            self.past[c] = self.past.get(c, 0) + self.cur[c]
