"""Dark experience replay: DER and DER++ (Buzzega et al. 2020)."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from streamcl import ConfigError, Plugin, distributed as dist, hookimpl
from streamcl.memory import Memory, random_pick, reservoir


class DarkReplay(Plugin):
    """Dark experience replay (Buzzega et al. 2020, "Dark Experience for General Continual Learning:
    a Strong, Simple Baseline", NeurIPS; DER: eq. 6, DER++: the objective that extends it).

    A memory of ``memory`` samples is filled by reservoir sampling after every minibatch with the
    inputs, labels, task labels and the logits ``z`` the model produced for them in that step (the
    "dark knowledge"): the network's own output ``output.raw``, before any ``adapt_logits``, as the
    paper stores ``h_theta(x)`` (eq. 4-6). Each step adds, on top of the task loss:

    * ``der_mse`` = ``alpha`` * MSE(h(x'), z') on one memory minibatch (x', z') (DER, eq. 6), ``h`` the
      raw output again: a task mask's ``-inf`` (task-incremental streams) never enters the term;
    * with ``plus`` (DER++), ``der_ce`` = ``beta`` * CE(f(x''), y'') on a second minibatch drawn
      independently from the memory, ``f`` the logits after ``adapt_logits`` (a task mask applies,
      with each stored sample's own task label), like the task loss.

    Memory minibatches hold ``batch_size`` samples (default: the strategy's batch size, as in the
    paper's MNIST settings), drawn without replacement as in the authors' code; both go through
    the model in one forward pass (``strategy.forward`` on the plain module, so any model works). If
    the output head grew since a sample was stored, its logits are compared with the first columns of
    the current output only.

    Defaults alpha = 1.0 and beta = 0.5 are the paper's values with a 500-sample buffer on both of
    its MNIST-family benchmarks, Seq-MNIST and P-MNIST (DER alone: alpha = 1.0 on both), as listed
    in the official code's ``utils/best_args.py`` (github.com/aimagelab/mammoth). On SFM-5 DER++
    with 500 samples reaches a final accuracy of 0.805 (mean of seeds 0-2; Avalanche: 0.790).

    Not to be confused with DER, the dynamically expandable representation (Yan et al. 2021, "DER:
    Dynamically Expandable Representation for Class Incremental Learning"), which grows the
    backbone: this plugin is a replay memory and never changes the model.
    """

    owns = frozenset({"memory"})

    def __init__(self, memory: int = 500, alpha: float = 1.0, beta: float = 0.5, plus: bool = True,
                 batch_size: int | None = None):
        if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
            raise ConfigError(f"dark replay memory={memory!r}: it must be a positive whole number of samples")
        for name, value in (("alpha", alpha), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"dark replay {name}={value!r}: it must be a finite number >= 0")
        if not isinstance(plus, bool):
            raise ConfigError(f"dark replay plus={plus!r}: use true (DER++) or false (DER)")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size <= 0):
            raise ConfigError(f"dark replay batch_size={batch_size!r}: it must be a positive whole number")
        self.capacity, self.alpha, self.beta, self.plus = memory, float(alpha), float(beta), plus
        self.batch_size = batch_size
        self.memory: Memory | None = None
        self.seen = 0  # samples offered to reservoir sampling so far

    # ------------------------------------------------------------------------------ loss
    @hookimpl
    def loss_terms(self, strategy) -> dict[str, Tensor] | None:
        if self.memory is None or len(self.memory) == 0:
            return None
        n = min(self.batch_size or strategy.batch_size, len(self.memory))
        slots = random_pick(len(self.memory), n, strategy.generator)
        if self.plus:
            slots = torch.cat([slots, random_pick(len(self.memory), n, strategy.generator)])
        slots = slots.to(self.memory.y.device)
        # the plain module, not the DDP wrapper (docs/distributed.md)
        out = strategy.forward(self.memory.batch(slots), net=strategy.model)
        terms = {"der_mse": self.alpha * self.mse(out.raw[:n], self.memory.extras["logits"][slots[:n]],
                                                  self.memory.extras["width"][slots[:n]])}
        if self.plus:
            terms["der_ce"] = self.beta * F.cross_entropy(out.logits[n:], self.memory.y[slots[n:]])
        return terms

    @staticmethod
    def mse(logits: Tensor, stored: Tensor, width: Tensor) -> Tensor:
        """Mean squared error between ``logits`` and the ``stored`` ones over the first ``width[i]``
        columns of each row i (the head's width when the row was stored); F.mse_loss when all agree."""
        w = min(logits.shape[1], stored.shape[1])
        diff = (logits[:, :w] - stored[:, :w]).pow(2)
        valid = torch.arange(w, device=diff.device)[None, :] < width[:, None]
        return (diff * valid).sum() / valid.sum().clamp_min(1)

    # ------------------------------------------------------------------------------ memory update
    @hookimpl
    def after_training_iteration(self, strategy) -> None:
        n = strategy.n_current
        current = strategy.unaugmented.select(slice(0, n))  # stored clean, augmented when replayed
        logits = strategy.output.raw[:n].detach()  # the network's own output, before adapt_logits
        # every rank offers the same samples (each holds its share of the minibatch)
        x, y, t, z = (dist.all_gather(v) for v in (*current, logits))
        if self.memory is None:
            self.memory = Memory(self.capacity)
        slots, items = reservoir(self.seen, len(y), self.capacity, strategy.generator)
        self.seen += len(y)
        if len(slots) == 0:
            return
        items = items.to(y.device)
        z = self._fit_width(z)
        width = torch.full((len(items),), logits.shape[1], dtype=torch.long, device=y.device)
        self.memory.write(slots, x[items], y[items], t[items], logits=z[items], width=width)

    def _fit_width(self, z: Tensor) -> Tensor:
        """Pad ``z`` to the stored logits' width, or widen the storage (zeros) if the head grew."""
        stored = self.memory.extras.get("logits")
        if stored is None or stored.shape[1] == z.shape[1]:
            return z
        if stored.shape[1] < z.shape[1]:
            self.memory.extras["logits"] = F.pad(stored, (0, z.shape[1] - stored.shape[1]))
            return z
        return F.pad(z, (0, stored.shape[1] - z.shape[1]))

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"memory": None if self.memory is None else self.memory.state_dict(), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.memory = state["seen"], None
        if state["memory"] is not None:
            self.memory = Memory(self.capacity)
            self.memory.load_state_dict(state["memory"])
