"""BiC's bias correction: a two-parameter linear layer on the newest classes' logits, fitted on a held-out set."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from streamcl import Batch, Plugin, hookimpl
from streamcl.errors import ConfigError
from streamcl.parts import frozen
from streamcl.scenarios import as_batch
from streamcl.plugin import warn


WEIGHTINGS = ("relative", "paper")


class BiasCorrection(Plugin):
    """Bias correction (BiC; Wu et al. 2019, "Large Scale Incremental Learning", CVPR, eq. 5-6).

    **Held-out set.** At ``before_training_exp`` of every experience that brings classes not seen
    before (``new``) while the replay memory (``strategy.memory``: the ``.memory`` of the plugin that owns
    ``memory``, e.g. :class:`~streamcl.plugins.replay.Replay`) holds exemplars of earlier classes (``old``), a
    class-balanced validation set is drawn with ``strategy.generator``: ``k`` samples of every old class
    from its exemplars and ``k`` of every new class from the experience, with
    ``k = max(1, round(ratio * m))`` and ``m`` the fewest exemplars an old class has (the paper splits the
    exemplars 9:1, ``ratio = 0.1``, and takes as many of each new class). These samples are kept out of
    training: the ``held_out`` contribution marks every row of the minibatch (the experience's own rows
    and the rows joined by ``replay_batch``) equal, bit for bit, to a held-out sample, and the engine drops
    them (a minibatch whose own rows are all held out keeps them: it cannot be empty). The held-out set
    is part of the plugin's state, so a run resumed inside the experience drops the same rows.

    **Stage 2.** At ``after_training_exp``, with the model frozen (``strategy.infer``: eval mode, no
    gradient, chunked), the logits ``o`` of the held-out set (the model's own, ``adapt=False``, then each
    earlier experience's pair applied to its classes) give the newest pair by minimising eq. 6, the
    cross-entropy over the classes seen so far of

        q_k = o_k                 for the old classes,
        q_k = alpha * o_k + beta  for the new classes of this experience      (eq. 5).

    The loss is convex in ``(alpha, beta)`` (a log-sum-exp of affine functions), so it is minimised
    to convergence by Newton's method with a backtracking line search from ``(1, 0)``, in double
    precision: deterministic, with no learning rate or epoch count (the paper trains the layer with
    SGD on the validation set).

    **Prediction.** ``adapt_logits`` applies every experience's pair to that experience's new
    classes (earlier experiences keep their fitted pairs; the first experience has none), on every
    forward pass, training included, so that what the model learns after a pair was fitted is learnt
    through it (applied in evaluation only, SFM-5 seed 0 measured 0.803 against 0.810).
    ``set_correction(active=False)`` (``strategy.uncorrected()``) makes ``adapt_logits`` pass logits
    through until ``set_correction(active=True)``.

    Measured on SFM-5 (Replay 500 + LwFDistill(weight=1) + this, ``bic:distill="lwf"``, seeds 0-2): 0.806, against
    0.783 with the pairs switched off; old / new accuracy after the last experience 0.779 / 0.914
    (0.741 / 0.952 switched off). ``ratio = 0.2`` measured the same as 0.1 (seed 0: 0.808, 0.810).

    **Stage 1's loss** (``distill=True``; eq. 1-3): at ``before_training_exp`` of an experience that brings
    new classes after earlier ones, the teacher is a frozen copy of the model with the pairs fitted so far
    (the previous model and its bias layers). On every training minibatch, new samples and exemplars alike,
    with ``s`` and ``t`` the student's and the teacher's logits of the ``n`` old classes, each with the pairs
    applied (the student's old classes go through the same pairs; the newest pair is fitted after stage 1):

        L_d = KL(softmax(t / T) || softmax(s / T)), averaged over the minibatch          (eq. 1; T = 2)
        L   = lambda * L_d + (1 - lambda) * L_c,     lambda = n / (n + m)              (eq. 3)

    with ``m`` the experience's new classes and ``L_c`` the task loss (the engine's cross-entropy on the
    corrected logits, or the ``task_loss`` chain's result before this plugin). ``weighting="relative"``
    (default) trains on ``L / (1 - lambda) = L_c + lambda / (1 - lambda) * L_d``: the paper's weighting
    and minimiser, with the step of ``L_c`` kept at the optimizer's learning rate (the paper's loss scales
    it by ``1 - lambda``, 0.2 at SFM-5's last experience: with the protocol's two epochs of SGD at 0.01 that
    measured 0.782 on seeds 0-2, against 0.814). ``weighting="paper"`` trains on ``L`` itself (``task_loss``
    scales ``L_c`` by ``1 - lambda``). The weighted ``L_d`` is the term ``bic_distill``. The paper's ``L_d`` is the
    cross-entropy ``-sum_k pi'_k log pi_k``; the KL differs from it by the teacher's entropy, a constant
    (same gradient, 0 when the student matches). No ``T^2`` factor, as in the paper and the authors' code.
    An experience with no new class (domain-incremental) has no ``lambda``: it trains on ``L_c`` alone. With
    ``distill=True`` the plugin owns ``logit_distillation`` (another distiller beside it is refused).

    With ``distill=False`` (the default of the plugin; the ``bic`` recipe sets it) the distillation is another
    plugin's: ``bic:distill="lwf"`` lists :class:`~streamcl.plugins.distill.LwFDistill` (weight 1, on the
    experience's own samples, uncorrected logits, unweighted cross-entropy), the form before issue 18. SFM-5,
    seeds 0-2, one thread per run: ``bic`` 0.814 (0.821, 0.808, 0.812), ``distill="lwf"`` 0.804.
    It needs a plugin that owns ``memory`` and keeps its
    exemplars as inputs (a list without one is refused when the Strategy is built); beside a memory of
    something else (latent replay's activations) it warns and fits nothing. A memory owner that replays
    through its own loss term rather than ``replay_batch`` (dark replay) still trains on the held-out
    exemplars. The model is used only through the engine's forward, so any model works.
    """

    needs = frozenset({"memory"})

    def __init__(self, ratio: float = 0.1, distill: bool = False, temperature: float = 2.0,
                 weighting: str = "relative"):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ConfigError(f"bias_correction ratio={ratio!r}: the share of each old class's exemplars held out "
                              "for the correction, a number in (0, 1) (the paper: 0.1)")
        if not isinstance(distill, bool):
            raise ConfigError(f"bias_correction distill={distill!r}: use true (BiC's stage-1 loss, eq. 1-3) or false")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not math.isfinite(temperature) or temperature <= 0):
            raise ConfigError(f"bias_correction temperature={temperature!r}: it must be a finite number > 0 "
                              "(the paper: 2)")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"bias_correction weighting={weighting!r}: use \"relative\" (L_c + lambda / (1 - lambda) "
                              "L_d) or \"paper\" ((1 - lambda) L_c + lambda L_d)")
        self.ratio, self.distill, self.temperature = float(ratio), distill, float(temperature)
        self.weighting = weighting
        if distill:  # one teacher's logits distilled once
            self.owns = frozenset({"logit_distillation"})
        # the previous model (with self.pairs) while an experience trains, its classes, and eq. 3's lambda = n / (n + m)
        self.teacher: torch.nn.Module | None = None
        self.old: list[int] = []
        self.lam, self._old = 0.0, None
        self.pairs: list[dict] = []  # {"experience", "classes", "alpha", "beta"} of every fitted experience
        self.held: Batch | None = None  # this experience's held-out set, while it trains
        self.held_classes: tuple[list[int], list[int]] | None = None  # (old, new) classes of the held-out set
        self._off = False  # switched off by set_correction(active=False)
        self._keys: Tensor | None = None  # row keys of the held-out set (a cache)
        self._affine: tuple | None = None  # (key, scale, shift) per-column vectors of the pairs (a cache)
        self._warned = False
        self._warned_no_new = False

    # ------------------------------------------------------------------------------ the held-out set
    @hookimpl
    def setup(self, strategy) -> None:
        strategy.require_memory(self, "holds out a share of the exemplars of a replay memory")

    @hookimpl
    def before_training_exp(self, strategy) -> None:
        self._set_held(None, None)
        exp = strategy.experience
        seen = {c for e in strategy.trained for c in e.classes}
        new = sorted(set(exp.classes) - seen)
        self._set_teacher(None, [], 0.0)
        if self.distill and new and seen:
            self._set_teacher(frozen(strategy.model), sorted(seen), len(seen) / (len(seen) + len(new)))
        if seen and not new and not self._warned_no_new:
            self._warned_no_new = True  # once per plugin
            warn(f"bias_correction: experience {exp.index} brings no class not seen before (a domain-incremental "
                 "stream?): there is no new class to correct a bias towards, and no bias layer is fitted")
        memory = strategy.memory
        if not new or memory is None or len(memory) == 0:
            return
        exemplars = memory.batch()
        data = as_batch(exp.dataset, strategy.device)
        if tuple(exemplars.x.shape[1:]) != tuple(data.x.shape[1:]):
            if not self._warned:
                warn(f"bias_correction: the memory of {strategy.owner('memory')!r} holds samples of shape "
                     f"{tuple(exemplars.x.shape[1:])}, not inputs of shape {tuple(data.x.shape[1:])}; "
                     "no correction is fitted")
                self._warned = True
            return
        labels = exemplars.y.cpu()
        old = sorted(c for c in set(labels.tolist()) if c in seen)
        if not old:
            return
        fewest = min(int((labels == c).sum()) for c in old)
        k = max(1, round(self.ratio * fewest))
        parts = [exemplars.select(pick(labels, old, k, strategy.generator).to(exemplars.y.device)),
                 data.select(pick(data.y.cpu(), new, k, strategy.generator).to(data.y.device))]
        self._set_held(parts[0].cat(parts[1]), (old, new))

    @hookimpl
    def held_out(self, batch: Batch) -> Tensor | None:
        """The rows of the minibatch (replay joined) equal to a held-out sample."""
        return None if self.held is None else self._is_held(batch.x)

    def _is_held(self, x: Tensor) -> Tensor:
        if self._keys is None or self._keys.device != x.device:
            self._keys = row_keys(self.held.x.to(x.device))
        return is_held(x, self.held.x.to(x.device), self._keys)

    def _set_held(self, held: Batch | None, classes) -> None:
        self.held, self.held_classes, self._keys = held, classes, None

    # ------------------------------------------------------------------------------ stage 1 (eq. 1-3)
    @hookimpl
    def loss_terms(self, strategy, batch, output) -> dict[str, Tensor] | None:
        if self.teacher is None:
            return None
        raw = output.logits if output.raw is None else output.raw
        with torch.no_grad():
            target = strategy.forward(batch, model=self.teacher, adapt=False).raw
        old = self._old_index(raw.device)
        student, teacher = correct(raw, self.pairs)[:, old], correct(target, self.pairs)[:, old]
        scale = self.lam if self.weighting == "paper" else self.lam / (1 - self.lam)
        return {"bic_distill": scale * distillation(student, teacher, self.temperature)}

    @hookimpl
    def task_loss(self, strategy, loss, output, batch) -> Tensor | None:
        if self.teacher is None or self.weighting != "paper":
            return loss
        if loss is None:
            loss = strategy.criterion(output.logits, batch.y)
        return (1 - self.lam) * loss

    def _old_index(self, device) -> Tensor:
        if self._old is None or self._old.device != device:
            self._old = torch.tensor(self.old, dtype=torch.long, device=device)
        return self._old

    def _set_teacher(self, teacher, old: list[int], lam: float) -> None:
        self.teacher, self.old, self.lam, self._old = teacher, list(old), float(lam), None

    # ------------------------------------------------------------------------------ stage 2
    @hookimpl
    def after_training_exp(self, strategy) -> None:
        self._set_teacher(None, [], 0.0)
        if self.held is None:
            return
        old, new = self.held_classes
        z = strategy.infer(self.held, adapt=False).raw  # the frozen model's own logits
        width = z.shape[1]
        z = correct(z, self.pairs)
        old, new = [c for c in old if c < width], [c for c in new if c < width]
        alpha, beta = fit_pair(z, self.held.y, old, new)
        if strategy.logs_values:  # eq. 6 on the held-out set before (alpha=1, beta=0) and after the fit
            loss = pair_loss(z, self.held.y, old, new)
            strategy.log("loss/bic_before", float(loss(torch.tensor([1.0, 0.0], dtype=torch.float64))))
            strategy.log("loss/bic", float(loss(torch.tensor([alpha, beta], dtype=torch.float64))))
            strategy.log("bic/alpha", alpha)
            strategy.log("bic/beta", beta)
        self.pairs.append({"experience": strategy.experience.index, "classes": list(new),
                           "alpha": alpha, "beta": beta})
        self._affine = None
        self._set_held(None, None)

    # ------------------------------------------------------------------------------ prediction
    @hookimpl
    def adapt_logits(self, logits: Tensor) -> Tensor | None:
        if self._off or not self.pairs:
            return None
        key = (len(self.pairs), logits.shape[1], logits.device, logits.dtype)
        if self._affine is None or self._affine[0] != key:
            self._affine = (key, *affine(self.pairs, logits.shape[1], logits.device, logits.dtype))
        _, scale, shift = self._affine
        return logits * scale + shift

    @hookimpl
    def set_correction(self, active: bool) -> None:
        """Off: ``adapt_logits`` passes the logits through (no pair is applied); on: the pairs again."""
        self._off = not active

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"pairs": [dict(p, classes=list(p["classes"])) for p in self.pairs],
                "held": None if self.held is None else Batch(*(v.clone() for v in self.held)),
                "held_classes": None if self.held_classes is None else tuple(list(c) for c in self.held_classes),
                "teacher": self.teacher, "teacher_state": None if self.teacher is None else self.teacher.state_dict(),
                "old": list(self.old), "lambda": self.lam}

    def load_state_dict(self, state: dict) -> None:
        self.pairs = [dict(p, classes=list(p["classes"])) for p in state["pairs"]]
        held = state["held"]
        classes = state["held_classes"]
        self._set_held(None if held is None else Batch(*(v.clone() for v in held)),
                       None if classes is None else tuple(list(c) for c in classes))
        self._affine = None
        self._set_teacher(frozen(state.get("teacher"), state.get("teacher_state")), state.get("old", []),
                          state.get("lambda", 0.0))


# ---------------------------------------------------------------------------------- pieces
def pick(labels: Tensor, classes: list[int], k: int, generator: torch.Generator) -> Tensor:
    """``k`` indices of each class of ``classes`` (ascending) drawn without replacement (all of a class with
    fewer), in class order; ``labels`` on the CPU."""
    out = []
    for c in classes:
        members = torch.nonzero(labels == c).flatten()
        out.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


_HASH: dict[tuple, tuple[Tensor, Tensor]] = {}
KEY_WORDS = 64


def _words(x: Tensor) -> Tensor:
    """Each row of ``x`` as its bits: 32-bit words (bytes if the row's size is not a multiple of 4)."""
    flat = x.reshape(len(x), -1).contiguous()
    if flat.dtype.itemsize == 4:
        return flat.view(torch.int32)
    raw = flat.view(torch.uint8)
    return raw.view(torch.int32) if raw.shape[1] % 4 == 0 else raw


def row_keys(x: Tensor) -> Tensor:
    """A 64-bit key of each row: ``sum_j w_j * r_j`` over up to ``KEY_WORDS`` evenly spaced words of the row's
    bits (:func:`_words`), in wrapping integer arithmetic, with fixed pseudo-random odd ``r``. Exact, so equal
    rows always get equal keys whatever the batch; two different rows may share a key, which :func:`is_held`
    then tells apart."""
    words = _words(x)
    n = words.shape[1]
    key = (n, words.device)
    if key not in _HASH:
        g = torch.Generator().manual_seed(n)
        cols = torch.linspace(0, max(n - 1, 0), min(n, KEY_WORDS)).round().long().unique()
        r = torch.randint(-2**62, 2**62, (len(cols),), generator=g, dtype=torch.long) | 1
        _HASH[key] = (cols.to(words.device), r.to(words.device))
    cols, r = _HASH[key]
    return (words[:, cols].long() * r).sum(1)


def is_held(x: Tensor, held: Tensor, held_keys: Tensor) -> Tensor:
    """Which rows of ``x`` are equal, bit for bit, to a row of ``held`` (whose keys are ``held_keys``)."""
    out = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    if len(held) == 0 or len(x) == 0:
        return out
    keys = row_keys(x)
    candidates = torch.nonzero(torch.isin(keys, held_keys)).flatten()
    if len(candidates) == 0:
        return out
    row, col = torch.nonzero(keys[candidates][:, None] == held_keys[None, :], as_tuple=True)
    same = (_words(x[candidates[row]]) == _words(held[col])).all(1)
    out[candidates[row[same]]] = True
    return out


def affine(pairs: list[dict], width: int, device, dtype) -> tuple[Tensor, Tensor]:
    """Per-column ``scale`` and ``shift``: ``alpha, beta`` of the pair whose classes hold the column, else 1, 0."""
    scale = torch.ones(width, dtype=torch.float64)
    shift = torch.zeros(width, dtype=torch.float64)
    for p in pairs:
        cols = [c for c in p["classes"] if c < width]
        scale[cols], shift[cols] = p["alpha"], p["beta"]
    return scale.to(device=device, dtype=dtype), shift.to(device=device, dtype=dtype)


def correct(logits: Tensor, pairs: list[dict]) -> Tensor:
    """Eq. 5 for every pair: ``alpha * o_k + beta`` on the pair's classes, other logits as they are."""
    if not pairs:
        return logits
    scale, shift = affine(pairs, logits.shape[1], logits.device, logits.dtype)
    return logits * scale + shift


def distillation(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """Eq. 1 up to the teacher's entropy: ``KL(softmax(teacher / T) || softmax(student / T))`` averaged over the
    rows (no ``T^2`` factor, as the paper)."""
    log_p, log_q = F.log_softmax(student / T, dim=1), F.log_softmax(teacher / T, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


def pair_loss(logits: Tensor, y: Tensor, old: list[int], new: list[int]):
    """Eq. 6 as a function of ``theta = (alpha, beta)``: the mean cross-entropy over the classes ``old + new`` of
    the logits with ``alpha * o + beta`` on the ``new`` columns (float64, on the CPU)."""
    seen = sorted(set(old) | set(new))
    z = logits.detach().double()[:, seen].cpu()
    target = torch.searchsorted(torch.tensor(seen), y.detach().cpu())
    mask = torch.tensor([float(c in set(new)) for c in seen], dtype=torch.float64)

    def loss(theta: Tensor) -> Tensor:
        q = z * (1 + mask * (theta[0] - 1)) + mask * theta[1]
        return F.cross_entropy(q, target)
    return loss


def fit_pair(logits: Tensor, y: Tensor, old: list[int], new: list[int], iterations: int = 100) -> tuple[float, float]:
    """The ``(alpha, beta)`` minimising eq. 6: the mean cross-entropy over the classes ``old + new`` of the logits
    with ``alpha * o + beta`` on the ``new`` columns (``y`` in ``old + new``). Newton's method with backtracking
    from ``(1, 0)``; the loss is convex in ``(alpha, beta)``."""
    loss = pair_loss(logits, y, old, new)
    theta = torch.tensor([1.0, 0.0], dtype=torch.float64)
    grad_fn, hess_fn = torch.func.grad(loss), torch.func.hessian(loss)
    for _ in range(iterations):
        g = grad_fn(theta)
        if g.norm() < 1e-10:
            break
        h = hess_fn(theta) + 1e-9 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(h, g)
        if not bool(torch.isfinite(step).all()) or float(g @ step) <= 0:
            step = g  # not a descent direction: a gradient step
        f0, t = loss(theta), 1.0
        while t > 1e-12 and loss(theta - t * step) > f0 - 1e-4 * t * float(g @ step):
            t /= 2
        if t <= 1e-12:
            break
        theta = theta - t * step
    alpha, beta = (float(v) for v in theta)
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        return 1.0, 0.0
    return alpha, beta
