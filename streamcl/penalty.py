"""Parameter importance and importance-weighted anchoring, shared by the parameter regularisers.

* :func:`sample_gradients`: the mean over a dataset of a per-sample gradient, squared (a Fisher
  diagonal) or absolute (MAS), computed with ``torch.func`` in chunks whose per-sample gradients fit
  in :data:`BUDGET` bytes;
* :class:`Anchors`: ``sum_k sum_i c_ki (theta_i - a_ki)^2`` over anchor points ``k``, with each
  parameter's total coefficient capped so that plain or momentum SGD stays stable on it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from streamcl import distributed as dist
from streamcl.batch import Batch
from streamcl.models.heads import IncrementalLinear
from streamcl.plugin import warn

CHUNK = 512
BUDGET = 1 << 30  # bytes of per-sample gradients torch.func may hold at once (ResNet-18: 24 samples a pass)


def rows_within(params: list[Tensor], budget: int | None = None) -> int:
    """How many samples' gradients of ``params`` fit in ``budget`` bytes (default :data:`BUDGET`), at least one."""
    size = sum(p.numel() * p.element_size() for p in params)
    return max(1, (BUDGET if budget is None else budget) // max(1, size))


def trainable(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s parameters that take gradients, by name, detached."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def sample_gradients(strategy, data, score: Callable[[Tensor, Batch], Tensor], reduce: str = "square",
                     chunk: int = CHUNK) -> dict[str, Tensor]:
    """``mean_n f(d score(x_n) / d theta)`` over the samples of ``data``, for every trainable parameter.

    ``score(logits, batch)`` is a scalar for a batch of one sample (``logits`` after every
    ``adapt_logits``, as in training); ``f`` is the square (``reduce="square"``) or the absolute
    value (``"abs"``). The model is in evaluation mode meanwhile. Under torchrun each rank takes
    its share of ``data`` and the sums are all-reduced.

    A linear layer applied once to the rows of a chunk has per-sample gradients ``g_n a_n^T``
    (output gradient times input), so their sum of ``f`` is ``f(G)^T f(A)``: one batched backward
    instead of one per sample. Layers where that does not hold (checked on the first samples
    against ``torch.func``'s per-sample gradients) and other parameters take ``torch.func``'s way,
    :func:`rows_within` samples at a time, so that their per-sample gradients stay within
    :data:`BUDGET` (1 GiB) whatever the model's size.
    """
    if reduce not in ("square", "abs"):
        raise ValueError(f"reduce={reduce!r}: use 'square' or 'abs'")
    f = torch.square if reduce == "square" else torch.abs
    model, was_training = strategy.model, strategy.model.training
    names = list(trainable(model))
    total = {n: torch.zeros_like(p) for n, p in trainable(model).items()}
    count = torch.zeros((), device=strategy.device)
    fast: set[str] | None = None  # layers whose per-sample gradients are outer products
    model.eval()
    try:
        for batch in strategy.batches(data, chunk):
            layers = _linear_io(strategy, batch, score)
            if fast is None:
                fast = _outer_products_hold(strategy, batch, score, layers)
            for name in fast:
                a, g = layers[name]
                total[_join(name, "weight")] += f(g).T @ f(a)
                if _join(name, "bias") in total:
                    total[_join(name, "bias")] += f(g).sum(0)
            slow = [n for n in names if n.rpartition(".")[0] not in fast]
            rows = rows_within([total[n] for n in slow])
            for i in range(0, len(batch) if slow else 0, rows):
                for n, g in _per_sample(strategy, batch.select(slice(i, i + rows)), score, slow).items():
                    total[n] += f(g).sum(0)
            count += len(batch)
    finally:
        model.train(was_training)
    if strategy.world > 1:
        for t in (*total.values(), count):
            dist.all_reduce(t)
    return {n: t / count.clamp(min=1) for n, t in total.items()}


def _join(module: str, param: str) -> str:
    return f"{module}.{param}" if module else param


def _per_sample(strategy, batch: Batch, score, names: list[str]) -> dict[str, Tensor]:
    """Per-sample gradients of ``score`` for the parameters ``names``, by ``torch.func``."""
    model = strategy.model
    params, buffers = trainable(model), dict(model.named_buffers())
    wanted = {n: params.pop(n) for n in names}

    def one(p: dict, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        sample = Batch(x[None], y[None], t[None])
        net = lambda *args, **kwargs: functional_call(model, ({**params, **p}, buffers), args, kwargs)  # noqa: E731
        return score(strategy.forward(sample, net=net).logits, sample)

    return vmap(grad(one), in_dims=(None, 0, 0, 0))(wanted, batch.x, batch.y, batch.t)


def _linear_io(strategy, batch: Batch, score) -> dict[str, tuple[Tensor, Tensor]]:
    """For each linear layer called once on the chunk's rows: its inputs and its output gradients."""
    model, io, calls, handles = strategy.model, {}, {}, []

    def hook(name):
        def forward_hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            a = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: io.__setitem__(name, (a, g.detach())))
        return forward_hook

    for name, m in model.named_modules():
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
        if isinstance(m, (nn.Linear, IncrementalLinear)) and isinstance(weight, nn.Parameter) and \
                weight.requires_grad and (bias is None or isinstance(bias, nn.Parameter) and bias.requires_grad):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        with torch.enable_grad():
            logits = strategy.forward(batch, net=model).logits
            each = vmap(lambda z, x, y, t: score(z[None], Batch(x[None], y[None], t[None])))(
                logits, batch.x, batch.y, batch.t)
            params = list(trainable_params(model))
            torch.autograd.grad(each.sum(), params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    n = len(batch)
    return {k: (a, g) for k, (a, g) in io.items()
            if calls[k] == 1 and a.dim() == 2 and a.shape[0] == n and g.shape[0] == n}


def _outer_products_hold(strategy, batch: Batch, score, layers: dict) -> set[str]:
    """The layers whose weight gradient for each of the first samples is ``g_n a_n^T``."""
    if not layers:
        return set()
    first = batch.select(slice(0, 2))
    exact = _per_sample(strategy, first, score, [_join(k, "weight") for k in layers])
    good = set()
    for k, (a, g) in layers.items():
        outer = g[: len(first), :, None] * a[: len(first), None, :]
        e = exact[_join(k, "weight")]
        if torch.allclose(outer, e, rtol=1e-4, atol=1e-6 * (1 + float(e.abs().max()))):
            good.add(k)
    return good


def trainable_params(model: nn.Module):
    return (p for p in model.parameters() if p.requires_grad)


def stability_limit(optimizer: torch.optim.Optimizer | None) -> dict[int, float]:
    """The largest curvature each parameter (by ``id``) may get from a quadratic penalty.

    Heavy-ball SGD with step ``lr`` and momentum ``mu`` diverges on a quadratic of curvature ``h``
    once ``lr * h >= 2 (1 + mu)``; the limit is half that, leaving room for the task loss. Other
    optimizers (Adam's steps are bounded by its ``lr``) set no limit.
    """
    limits: dict[int, float] = {}
    for group in getattr(optimizer, "param_groups", []):
        if isinstance(optimizer, torch.optim.SGD) and group["lr"] > 0:
            for p in group["params"]:
                limits[id(p)] = (1 + group.get("momentum", 0.0)) / group["lr"]
    return limits


class Anchors:
    """An importance-weighted quadratic pull towards earlier parameter values.

    ``penalty(model)`` is ``sum_k sum_i c_ki (theta_i - a_ki)^2`` over the points added with
    :meth:`add` (``c`` the weight times the importance, ``a`` the anchor values). The points are kept folded:
    that sum is one quadratic, ``A (theta - m)^2 + C`` with ``A = sum_k c_k``, ``m = sum_k c_k a_k / A`` and
    ``C = sum_k c_k (a_k - m)^2`` (updated as a weighted variance is, for rounding), so the penalty and its
    gradient are the same whatever the number of points, at one term's cost and memory. A parameter that grew
    since (a head with more classes) is compared on its leading rows (a point covers the rows it had); one that is
    gone, or that was reshaped otherwise (units pruned by DER: a new parameter under the old name), is skipped, and a
    point of another shape replaces what was held for it.
    """

    def __init__(self, name: str):
        self.name = name  # the regulariser's, for messages
        self.sums: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # parameter name -> (A, m, C)

    def __bool__(self) -> bool:
        return bool(self.sums)

    @property
    def points(self) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
        """The folded point ``[(A, m)]`` by parameter name (``[]`` before the first :meth:`add`)."""
        if not self.sums:
            return []
        return [({n: a for n, (a, _, _) in self.sums.items()}, {n: m for n, (_, m, _) in self.sums.items()})]

    def add(self, coefficients: dict[str, Tensor], anchors: dict[str, Tensor], *, decay: float | None = None,
            model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Add a point (``decay`` given: ``decay`` times the coefficients held plus the new ones, all at ``anchors``:
        online EWC's running Fisher).

        With ``model`` and an SGD ``optimizer``, each parameter's total coefficient is capped at
        half its stability limit (see :func:`stability_limit`); a warning says how many were.
        """
        if decay is not None:
            held, self.sums = self.sums, {}
        for n, c in coefficients.items():
            c, a = c.detach().clone(), anchors[n].detach().clone()
            if decay is not None:
                if n in held and held[n][0].shape == c.shape:
                    c += decay * held[n][0]
                self.sums[n] = (c, a, torch.zeros_like(c))
            else:
                self.sums[n] = _fold(self.sums.get(n), c, a)
        if model is not None:
            self._cap(model, optimizer)

    def reset(self, weight: float, importance: dict[str, Tensor], model: nn.Module,
              optimizer: torch.optim.Optimizer | None) -> None:
        """One point: ``weight * importance`` anchored at ``model``'s current parameters (those named in it)."""
        params = trainable(model)
        self.sums = {}
        if weight > 0:
            coefficients = {n: weight * v for n, v in importance.items() if n in params}
            self.add(coefficients, {n: params[n] for n in coefficients}, model=model, optimizer=optimizer)

    def _cap(self, model: nn.Module, optimizer) -> None:
        limits, capped, total = stability_limit(optimizer), 0, 0
        for n, p in model.named_parameters():
            if id(p) not in limits or n not in self.sums or self.sums[n][0].shape != p.shape:
                continue
            a, m, c = self.sums[n]
            scale = (0.5 * limits[id(p)] / (2 * a).clamp(min=1e-30)).clamp(max=1.0)  # curvature of A (theta - m)^2
            capped, total = capped + int((scale < 1).sum()), total + scale.numel()
            self.sums[n] = (a * scale, m, c * scale)
        if capped:
            warn(f"{self.name}: the penalty on {capped} of {total} parameters was capped at half the SGD "
                 "stability limit (1 + momentum) / lr, so the run cannot diverge; a smaller weight avoids it",
                 RuntimeWarning)

    def penalty(self, model: nn.Module) -> Tensor:
        """The penalty on ``model``'s current parameters (differentiable); 0 with no point."""
        params = dict(model.named_parameters())
        out = torch.zeros((), device=next(model.parameters()).device)
        for n, (a, m, c) in self.sums.items():
            p = params.get(n)
            if p is None or not p.requires_grad:
                continue
            if p.shape != a.shape:
                if not (p.dim() and p.shape[1:] == a.shape[1:] and p.shape[0] >= a.shape[0]):
                    continue
                p = p[: a.shape[0]]
            out = out + (a * (p - m).square()).sum() + c.sum()
        return out

    def state_dict(self) -> dict:
        return {"sums": {n: tuple(t.clone() for t in v) for n, v in self.sums.items()}}

    def load_state_dict(self, state) -> None:
        """The state of :meth:`state_dict`, or a list of points ``(coefficients, anchors)`` (checkpoints written
        before the points were folded), folded in order."""
        self.sums = {}
        if isinstance(state, dict):
            self.sums = {n: tuple(t.clone() for t in v) for n, v in state["sums"].items()}
            return
        for coefficients, anchors in state:
            self.add(coefficients, anchors)


def _fold(held: tuple[Tensor, Tensor, Tensor] | None, c: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, m, C)`` of the points in ``held`` and the point ``(c, a)``; rows beyond a point's count with ``c = 0``."""
    if held is None or held[0].shape[1:] != c.shape[1:] or held[0].dim() != c.dim():
        return c, a, torch.zeros_like(c)
    if c.dim() and held[0].shape[0] != c.shape[0]:
        rows = max(held[0].shape[0], c.shape[0])
        held = tuple(_padded(t, rows) for t in held)
        c, a = _padded(c, rows), _padded(a, rows)
    total, m, const = held
    new_total = total + c
    share = torch.where(new_total > 0, c / new_total.clamp(min=torch.finfo(c.dtype).tiny), torch.zeros_like(c))
    new_m = m + share * (a - m)
    return new_total, new_m, const + total * (m - new_m).square() + c * (a - new_m).square()


def _padded(t: Tensor, rows: int) -> Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])
