"""Brain-inspired replay: a generator of hidden representations above a frozen lower network, conditional on the
class, replayed with the previous model's soft targets."""
from __future__ import annotations

from time import perf_counter

import torch
from torch import Tensor, nn

from streamcl import Batch, distributed as dist, hookimpl
from streamcl.models.generators import mlp_vae
from streamcl.parts import frozen
from streamcl.plugins.generative_replay import GenerativeReplay, generator_state, load_generator_state
from streamcl.plugins.latent_replay import PROBE, LatentReplay
from streamcl.scenarios import as_batch


class BrainInspiredReplay(LatentReplay):
    """Brain-inspired replay (van de Ven, Siegelmann & Tolias 2020, "Brain-inspired replay for continual learning
    with artificial neural networks", Nature Communications 11: 4069), three of its parts, each its own switch:

    * **internal replay** (the paper's "internal replay"): the model is cut at ``layer`` as
      :class:`LatentReplay` cuts it (same rule, same freezing: ``lower_lr=0`` fixes the layers below the cut after
      the first experience); the generator, an MLP VAE with a Gaussian likelihood (``hidden``, ``latent``), learns
      the cut's outputs, and its samples go through the layers above the cut only;
    * **conditional replay** (``conditional``): the VAE's prior is a mixture with one learned mode per class; a
      replayed sample is drawn for an old class chosen uniformly;
    * **distillation** (``distill``): a replayed sample is scored by ``T^2`` times the cross-entropy between the
      frozen previous model's softened outputs over the old classes and the model's over every class seen
      (``temperature`` 2, the paper's); without it, by the cross-entropy with the previous model's ``argmax``.

    Every minibatch of ``n`` new samples adds ``m = n * old classes / the experience's classes`` replayed samples
    (the paper's weighting of replay by the number of tasks seen; :class:`GenerativeReplay`'s ``ratio``), as a term
    ``loss/bir`` weighted ``m / n``. The generator learns, after each classifier step, the new samples' hidden
    representations and the replayed ones (it replays to itself) with its own Adam (``lr``); its terms are logged
    as ``loss/vae_recon`` and ``loss/vae_kl``. Not built: the generator merged into the classifier ("replay-through-
    feedback") and context gating (docs/methods.md). It owns ``architecture`` (it cuts and freezes the model) and
    ``generator``; it stores no sample.
    """

    owns = frozenset({"architecture", "generator"})

    def __init__(self, layer: int | str | None = None, lower_lr: float = 0.0, conditional: bool = True,
                 distill: bool = True, temperature: float = 2.0, hidden: list[int] | None = None, latent: int = 16,
                 lr: float = 1e-3, ratio: str | float = "classes"):
        super().__init__(memory=1, layer=layer, lower_lr=lower_lr)
        self.budget = None
        checker = GenerativeReplay(latent=latent, ratio=ratio, temperature=temperature, lr=lr, hidden=hidden)
        self.conditional, self.distill = bool(conditional), bool(distill)
        self.temperature, self.latent, self.lr, self.ratio = float(temperature), int(latent), float(lr), ratio
        self.hidden = list(checker.hidden or [400, 400])  # the paper's VAE: 2 x 400 units, 100 latents
        self.generator: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.old_generator: nn.Module | None = None
        self.solver: nn.Module | None = None
        self.old_classes: list[int] = []
        self.per_sample = 0.0
        self.n_classes = 0
        self.generator_seconds: list[float] = []
        self._clock = 0.0
        self._caught: list[Tensor] = []  # the cut's output in this step's training forward
        self._replayed: Batch | None = None  # this step's generated latents, for the generator
        self._handle = None

    # ------------------------------------------------------------------------------ per experience
    @hookimpl
    def before_training_exp(self, strategy) -> None:
        exp = strategy.experience
        head = getattr(strategy, "_head", None)
        self.n_classes = max(self.n_classes, int(getattr(head, "out_features", 0) or 0), max(exp.classes) + 1)
        earlier = [e for e in strategy.trained if e is not exp]
        self.old_classes = sorted({c for e in earlier for c in e.classes})
        self.solver = self.old_generator = None
        self.per_sample = 0.0
        if earlier and self.generator is not None:
            self.solver, self.old_generator = frozen(strategy.model), frozen(self.generator)
            self.per_sample = GenerativeReplay.per_sample_for(self.ratio, self.old_classes, exp, len(earlier))

    @hookimpl
    def before_forward(self, strategy) -> None:
        """Catch the cut's output in the training forward pass (the generator learns it)."""
        super().before_forward(strategy)
        self._caught = []
        self._handle = strategy.model.get_submodule(self.cut).register_forward_hook(
            lambda _m, _a, out: self._caught.append(out.detach()))

    @hookimpl
    def after_forward(self, strategy) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ------------------------------------------------------------------------------ replay
    @hookimpl
    def loss_terms(self, strategy) -> dict | None:
        n = GenerativeReplay._global(strategy, strategy.n_current)
        m = int(round(n * self.per_sample))
        if self.solver is None or not m:
            return None
        g = strategy.generator
        old = torch.tensor(self.old_classes)
        y = old[torch.randint(len(old), (m,), generator=g)].to(strategy.device) if self.conditional else None
        z = self.old_generator.sample(m, y, generator=g).to(strategy.device)
        with torch.no_grad():
            teacher = self.upper_logits(strategy, z, model=self.solver)[:, self.old_classes]
        labels = old.to(strategy.device)[teacher.argmax(1)]
        mine = dist.shard(torch.arange(m, device=z.device))  # every rank drew the same: each keeps its share
        z, labels, teacher = z[mine], labels[mine], teacher[mine]
        self._replayed = Batch(z, labels, torch.zeros_like(labels))
        logits = self.upper_logits(strategy, z)
        if self.distill:
            seen = sorted({*self.old_classes, *strategy.experience.classes})
            loss = GenerativeReplay.soft_cross_entropy(logits, teacher, self.old_classes, seen, self.temperature)
        else:
            loss = strategy.criterion(logits, labels)
        return {"bir": loss * m / n}

    # ------------------------------------------------------------------------------ the generator learns
    @hookimpl
    def after_training_iteration(self, strategy) -> None:
        start = perf_counter()
        latents = self._caught[-1][:strategy.n_current] if self._caught else None
        labels = strategy.unaugmented.y[:strategy.n_current]
        if latents is not None:
            parts = [Batch(latents, labels, torch.zeros_like(labels))]
            if self._replayed is not None:
                parts.append(self._replayed)
            if strategy.world > 1:
                parts = [Batch(dist.all_gather(b.x), dist.all_gather(b.y), dist.all_gather(b.t)) for b in parts]
            batch = parts[0] if len(parts) == 1 else parts[0].cat(parts[1])
            self._build(strategy, batch.x.shape[1:])
            self.generator.train()
            self.optimizer.zero_grad(set_to_none=True)
            terms = self.generator.loss(batch.x, batch.y if self.conditional else None, generator=strategy.generator)
            sum(terms.values()).backward()
            self.optimizer.step()
            for name, value in terms.items():
                strategy.log(f"loss/{name}", float(value.detach()))
        self._replayed, self._caught = None, []
        self._clock += perf_counter() - start

    def _build(self, strategy, shape) -> None:
        if self.generator is not None:
            return
        kwargs = {"n_classes": self.n_classes} if self.conditional else {}
        seed = int(torch.randint(2**62, (1,), generator=strategy.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.generator = mlp_vae(tuple(shape), hidden=self.hidden, latent=self.latent, likelihood="gaussian",
                                     **kwargs).to(strategy.device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.lr)

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        if self.mode is None:  # how to replay latents, and which parameters lie below the cut
            self._decide(strategy, as_batch(strategy.experience.dataset, strategy.device).select(slice(0, PROBE)))
        self.experiences += 1
        self.generator_seconds.append(self._clock)
        strategy.log("bir/generator_seconds", self._clock)
        self._clock = 0.0

    # ------------------------------------------------------------------------------ reporting and state
    def memory_floats(self) -> int:
        """The generator's parameters: what this replay stores instead of samples."""
        return 0 if self.generator is None else sum(p.numel() for p in self.generator.parameters())

    def state_dict(self) -> dict:
        return {**super().state_dict(), **generator_state(self), "n_classes": self.n_classes}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        load_generator_state(self, state)
        self.n_classes = int(state["n_classes"])
