"""Unit masks on fully connected layers, after HAT (Serra et al. 2018, "Overcoming Catastrophic Forgetting with
Hard Attention to the Task", ICML, eq. 1-3 and Sec. 2.5-2.6), as DER uses them (Yan et al. 2021, eq. 5-6).

Each unit ``j`` of a Linear layer is multiplied by ``m_j = sigmoid(s e_j)``, ``e`` a learned embedding and ``s`` a
scale annealed from ``1/s_max`` to ``s_max`` within an epoch (:func:`annealed_scale`). The masks are applied where
the model allows it without knowing its forward: an ``nn.Sequential`` of Linear layers and parameter-free modules
that commute with a non-negative scale (``f(m z) = m f(z)`` for ``m >= 0``: ReLU, LeakyReLU, Dropout, Flatten,
Identity), holding every parameter of the feature extractor and giving its output (:func:`find_units`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from streamcl.errors import ConfigError

EMBEDDING_LIMIT = 6.0  # HAT's bound on the mask embeddings (``thres_emb``), so a closed unit can still reopen
UNIT_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.ReLU, nn.LeakyReLU)  # parameter-free, f(m z) = m f(z)
UNIT_NAMES = "Linear, ReLU, LeakyReLU, Dropout, Flatten and Identity"


def hat_mask(e: Tensor, s: float, s_max: float) -> Tensor:
    """``sigmoid(s e)`` (HAT eq. 1, DER eq. 5) whose gradient with respect to ``e`` is HAT's compensated one,
    ``s_max sigmoid'(e)`` times the gradient with respect to the mask (HAT eq. 2-3: the gradient of ``sigmoid(s e)``
    rescaled by ``s_max [cosh(s e) + 1] / (s [cosh(e) + 1])``), which does not vanish as ``s`` grows."""
    soft = torch.sigmoid(e)
    return torch.sigmoid(s * e).detach() + s_max * (soft - soft.detach())


def annealed_scale(b: int, n: int, s_max: float) -> float:
    """HAT eq. 3 / DER eq. 6: ``s = 1/s_max + (s_max - 1/s_max) (b - 1) / (B - 1)`` at batch ``b`` (here 0-based) of
    ``B = n`` batches; ``s_max`` when an epoch has one batch."""
    if n <= 1:
        return float(s_max)
    b = min(max(b, 0), n - 1)
    return 1 / s_max + (s_max - 1 / s_max) * b / (n - 1)


class MaskedSequential(nn.Module):
    """``seq`` (an ``nn.Sequential`` of Linear layers and :data:`UNIT_MODULES`) with every Linear layer's outputs
    multiplied by its mask ``hat_mask(e, s, s_max)``; ``s`` is used while training, ``s_max`` in evaluation.
    The masks act on pre-activations: for the modules allowed, ``f(m z) = m f(z)``, the same as masking the units."""

    def __init__(self, seq: nn.Sequential, embeddings: Sequence[Tensor], s_max: float):
        super().__init__()
        self.seq = seq
        self.mask_logits = nn.ParameterList([nn.Parameter(e) for e in embeddings])
        self.s = self.s_max = float(s_max)

    @property
    def linear(self) -> list[nn.Linear]:
        return [m for m in self.seq if isinstance(m, nn.Linear)]

    def masks(self) -> list[Tensor]:
        s = self.s if self.training else self.s_max
        return [hat_mask(e, s, self.s_max) for e in self.mask_logits]

    def forward(self, x: Tensor) -> Tensor:
        masks, j = self.masks(), 0
        for module in self.seq:
            x = module(x)
            if isinstance(module, nn.Linear):
                x = x * masks[j]
                j += 1
        return x

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the embeddings within HAT's bound, ``|e| <= 6``."""
        for e in self.mask_logits:
            e.clamp_(-EMBEDDING_LIMIT, EMBEDDING_LIMIT)


def _own_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _state_ids(module: nn.Module) -> set[int]:
    return {id(t) for t in (*module.parameters(), *module.buffers())}


def find_units(extractor: nn.Module, model_name: str, who: str, remedy: str) -> str:
    """The path inside ``extractor`` (``""``: the extractor itself) of the ``nn.Sequential`` whose Linear units can
    be masked: its children are Linear layers and :data:`UNIT_MODULES`, at least one Linear, it holds every parameter
    and buffer of ``extractor``, and its output is the extractor's (checked on two random inputs of the first Linear's
    width, drawn from a private generator). Otherwise a ConfigError, from ``who`` (the plugin), naming what
    ``model_name``'s extractor holds, and ending with ``remedy`` (how to do without masks)."""
    everything = _state_ids(extractor)
    fit = [(path, m) for path, m in extractor.named_modules() if isinstance(m, nn.Sequential)
           and all(isinstance(c, (nn.Linear, *UNIT_MODULES)) for c in m) and any(isinstance(c, nn.Linear) for c in m)
           and _state_ids(m) == everything]
    if not fit:
        foreign = list(dict.fromkeys(  # layers of other kinds, and tensors held by containers themselves
            name for m in extractor.modules() if _own_state(m) and not isinstance(m, nn.Linear)
            for name in ([type(m).__name__] if not list(m.children()) else
                         [f"{type(m).__name__}.{n}" for n, _ in (*m.named_parameters(recurse=False),
                                                                 *m.named_buffers(recurse=False))])))
        if foreign:
            why = f"holds {', '.join(foreign)}"
        else:
            odd = list(dict.fromkeys(type(m).__name__ for m in extractor.modules() if not _own_state(m)
                                     and not isinstance(m, (nn.Sequential, *UNIT_MODULES)) and not list(m.children())))
            why = (f"has Linear layers that are not one nn.Sequential of {UNIT_NAMES} layers"
                   + (f" (it holds {', '.join(odd)})" if odd else ""))
        raise ConfigError(f"{who} masks the units of fully connected layers; {model_name}'s extractor {why}: {remedy}")
    path, seq = fit[0]
    first = next(m for m in seq if isinstance(m, nn.Linear))
    last = [m for m in seq if isinstance(m, nn.Linear)][-1]
    box: list[Tensor] = []
    handle = seq.register_forward_hook(lambda _m, _args, out: box.append(out))
    was_training = extractor.training
    try:
        extractor.eval()
        x = torch.randn(2, first.in_features, generator=torch.Generator().manual_seed(0), dtype=first.weight.dtype)
        with torch.no_grad():
            out = extractor(x.to(first.weight.device))
        ok = bool(box) and isinstance(out, Tensor) and out.shape == (2, last.out_features) and torch.equal(out, box[-1])
        reason = "" if ok else "its output differs"
    except Exception as err:  # noqa: BLE001 - any failure of the probe means the check could not be made
        reason = f"a forward pass on inputs of {first.in_features} features failed: {type(err).__name__}: {err}"
    finally:
        handle.remove()
        extractor.train(was_training)
    if reason:
        where = f"the nn.Sequential at {path!r}" if path else "the nn.Sequential"
        raise ConfigError(f"{who} masks the units of fully connected layers, but {model_name}'s features are not "
                          f"the output of {where} of its Linear layers ({reason}): {remedy}")
    return path
