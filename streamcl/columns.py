"""Columns joined by lateral adaptors: the pieces Progress & Compress and Progressive Networks share.

A *column* is a copy of the user's model, which must be a chain of fully connected layers: its modules in calling
order (:func:`streamcl.models.nets.module_chain`) are ``nn.Linear`` and parameter-free layers (:data:`PASSIVE`), then
the classifier head, and its forward is that chain (:func:`check_model`, :func:`check_forward`). A *lateral adaptor*
(:class:`Lateral`) carries another column's input to a linear layer into the same layer of this column: the
non-linear adapter of Rusu et al. 2016 ("Progressive Neural Networks", Sec. 2, eq. 2), which Progress & Compress
(Schwarz et al. 2018, eq. 1) reuses. Nothing here is specific to one of the two methods; ``name`` (the plugin's name)
only labels the error messages.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from streamcl.errors import ConfigError
from streamcl.models.heads import IncrementalLinear
from streamcl.models.nets import module_chain

# modules a column may hold besides its linear layers: parameter-free ones
PASSIVE = (nn.Flatten, nn.ReLU, nn.Dropout, nn.Identity)


def uniform_(tensor: Tensor, fan_in: int, generator: torch.Generator) -> None:
    """``nn.Linear``'s default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from ``generator``."""
    bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
    with torch.no_grad():
        sample = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) * 2 * bound - bound
        tensor.copy_(sample.to(tensor.device))


def reinitialise(module: nn.Module, generator: torch.Generator) -> None:
    """Every linear layer of ``module`` (``nn.Linear``, :class:`IncrementalLinear`) drawn afresh, as ``nn.Linear``
    initialises (:func:`uniform_`), from ``generator``: a column of random weights."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, IncrementalLinear)):
            uniform_(m.weight, m.in_features, generator)
            if m.bias is not None:
                uniform_(m.bias, m.in_features, generator)


class Lateral(nn.Module):
    """A lateral adaptor from activations ``h`` (``in_features`` wide) to a layer of ``out_features`` units, with a
    hidden layer ``V`` of ``width`` units and no bias on ``U``:

    * ``scale_input=False`` (Progress & Compress, eq. 1): ``alpha * U relu(V h + c)``, ``alpha`` a learned vector
      (one entry per output unit, initialised to ``alpha``);
    * ``scale_input=True`` (Progressive Networks, eq. 2): ``U relu(V (alpha h) + c)``, ``alpha`` one learned scalar
      multiplying the adaptor's input ("a learned scalar ... to adjust for the different scales of the different
      inputs", Sec. 2); ``bias=False`` leaves ``c`` out, as eq. 2 writes it.

    ``V`` (weights, then its bias) and then ``U`` are drawn from ``generator`` as ``nn.Linear`` initialises."""

    scale_input = False  # class default: adaptors pickled before the option existed scale their output

    def __init__(self, in_features: int, width: int, out_features: int, alpha: float, generator: torch.Generator,
                 *, scale_input: bool = False, bias: bool = True):
        super().__init__()
        self.alpha_init, self.scale_input = alpha, bool(scale_input)
        self.V = nn.Linear(in_features, width, bias=bias)
        self.U = nn.Parameter(torch.empty(out_features, width))
        self.alpha = nn.Parameter(torch.full((1,) if scale_input else (out_features,), float(alpha)))
        reinitialise(self.V, generator)
        uniform_(self.U, width, generator)

    def forward(self, h: Tensor) -> Tensor:
        if self.scale_input:
            return F.linear(F.relu(self.V(self.alpha * h)), self.U)
        return self.alpha * F.linear(F.relu(self.V(h)), self.U)


class HeadLateral(Lateral):
    """The lateral into a head that grows (:class:`IncrementalLinear`): new classes get zero rows of ``U`` (no
    lateral input until trained) and, where ``alpha`` has one entry per output unit, ``alpha`` at its initial
    value."""

    @torch.no_grad()
    def grow_to(self, n: int) -> bool:
        old = self.U.shape[0]
        if n <= old:
            return False
        grad = self.U.requires_grad
        self.U = nn.Parameter(torch.cat([self.U, self.U.new_zeros(n - old, self.U.shape[1])]), requires_grad=grad)
        if not self.scale_input:
            self.alpha = nn.Parameter(torch.cat([self.alpha, self.alpha.new_full((n - old,), self.alpha_init)]),
                                      requires_grad=grad)
        return True


def check_model(model: nn.Module, head_path: str | None, name: str) -> list[str]:
    """The paths of ``model``'s chain of modules (its children, ``nn.Sequential`` opened), the classifier head at
    ``head_path`` last; refuses, naming what is missing, a model whose layers plugin ``name`` cannot wire."""
    kind = type(model).__name__
    chain = module_chain(model)
    paths = [p for p, _ in chain]
    if head_path not in paths:
        raise ConfigError(f"{name} rebuilds the forward pass from the model's chain of modules (its "
                          f"children, nn.Sequential opened: {', '.join(paths[:12])}), and {kind}'s classifier head "
                          f"({head_path!r}) is not one of them")
    at = paths.index(head_path)
    if at != len(paths) - 1:
        raise ConfigError(f"{name}: {kind} has modules after its classifier head {head_path!r} "
                          f"({', '.join(paths[at + 1:])}); the head must come last, its output the logits")
    bad = [(p, m) for p, m in chain[:at] if not isinstance(m, (nn.Linear, *PASSIVE))]
    if bad:
        raise ConfigError(f"{name} wires lateral adaptors between fully connected layers only: the "
                          f"modules before the head may be Linear, ReLU, Flatten, Dropout and Identity, and {kind} "
                          f"holds {type(bad[0][1]).__name__} at {bad[0][0]!r} (use an MLP: model.name = \"mlp\")")
    weight = getattr(chain[at][1], "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ConfigError(f"{name}: {kind}'s classifier head {head_path!r} "
                          f"({type(chain[at][1]).__name__}) has no weight matrix to join a lateral adaptor to")
    if not any(isinstance(m, nn.Linear) for _, m in chain[:at]):
        raise ConfigError(f"{name} needs at least one hidden Linear layer before {kind}'s classifier "
                          "head: the lateral adaptors read hidden activations")
    return paths


@torch.no_grad()
def check_forward(model: nn.Module, paths: list[str], name: str) -> None:
    """Refuse ``model`` if its forward is not its chain ``paths`` applied in turn (on a fixed random input): plugin
    ``name`` rebuilds the forward from the chain."""
    modules = [model.get_submodule(p) for p in paths]
    first = next(m for m in modules if isinstance(m, nn.Linear))
    x = torch.randn(2, first.in_features, generator=torch.Generator().manual_seed(0)).to(first.weight)
    was_training = model.training
    model.eval()
    try:
        out = model(x)
        h = x
        for m in modules:
            h = m(h)
        same = isinstance(out, Tensor) and out.shape == h.shape and torch.allclose(out, h, rtol=1e-5, atol=1e-6)
    except (RuntimeError, ValueError, TypeError, IndexError):
        same = False
    finally:
        model.train(was_training)
    if not same:
        raise ConfigError(f"{name}: {type(model).__name__}'s forward is not its modules "
                          f"({', '.join(paths)}) applied in turn (checked on a random input), and {name} rebuilds "
                          "the forward from them to add the lateral adaptors")
