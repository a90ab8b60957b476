"""Deep generative replay: a generator trained alongside the classifier replays old data, labelled by the frozen
solver."""
from __future__ import annotations

import math
from time import perf_counter

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from streamcl import Batch, ConfigError, Plugin, distributed as dist, hookimpl
from streamcl.models.generators import conv_vae, mlp_vae
from streamcl.plugins.cosine_head import first_sample
from streamcl.parts import frozen

GENERATORS = {"mlp": mlp_vae, "conv": conv_vae}
RATIOS = ("classes", "experiences")


class GenerativeReplay(Plugin):
    """Deep generative replay (Shin et al. 2017, "Continual Learning with Deep Generative Replay", NeurIPS, Sec. 3).

    A generator (a VAE of :mod:`streamcl.models.generators` by default, any module with ``loss`` and ``sample``)
    learns the stream beside the classifier (the *solver*). Before each experience after the first, frozen copies of
    both are taken (``before_training_exp``). Every minibatch of ``n`` new samples is joined by ``m`` generated
    samples (the old generator's; a class-conditional one is asked for the old classes in equal shares) labelled by
    the frozen solver: ``argmax`` of its logits over the classes seen before (Sec. 3.2, eq. 1-2, hard labels). The
    new samples' share of the loss is the paper's ratio ``r``: ``m = n (1 - r) / r`` with ``ratio = "classes"``:
    ``(1 - r) / r`` = old classes / the experience's classes (``r = 1/(experiences seen)`` with equal experiences;
    an experience of recurring classes, as in a domain-incremental stream, uses the number of earlier experiences),
    ``"experiences"``: the number of earlier experiences, or a number: a fixed multiple; at most ``max_replay``.
    With ``soft`` the replayed samples are not labelled: a term ``loss/dgr_soft`` adds ``(m / n)`` times the
    cross-entropy between the frozen solver's softened outputs over the old classes (temperature ``temperature``)
    and the classifier's softened outputs over every class seen, times ``T^2`` (the solver's outputs as targets).

    The generator learns every minibatch's new inputs and the samples it generated for it (it replays to itself;
    a class-conditional generator learns its samples under the classes they were drawn for, not the solver's
    labels, so that its classes do not drift with the solver's errors), one step of its own Adam (``lr``) per step of the classifier, after the classifier's; its terms are logged as
    ``loss/<name>`` (``vae_recon``, ``vae_kl``); its training time per experience is ``generator_seconds`` (logged
    ``dgr/generator_seconds``). No sample is stored: the memory cost is the generator's parameters
    (``memory_floats``; ``equivalent_samples``: as many inputs of the data's size).

    Arguments: ``generator`` (``"mlp"``: 784-400-400 and back, ``"conv"`` or a module), ``conditional`` (``True``: a
    class-conditional VAE prior; ``"label"``: a conditional VAE, the label fed to its encoder and decoder), ``latent`` (8: measured, docs/methods.md; van de Ven et al.'s VAE has 100),
    ``ratio``, ``max_replay``, ``soft``, ``temperature``, ``lr`` (Adam's, 1e-3), ``hidden`` (the MLP VAE's widths;
    SFM-5 seed 0: [256, 256] 0.672, [200] 0.686, against 0.700). It owns the role ``generator``.
    """

    owns = frozenset({"generator"})

    def __init__(self, generator: str | nn.Module = "mlp", conditional: bool | str = False, latent: int = 8,
                 ratio: str | float = "classes", max_replay: int | None = None, soft: bool = False,
                 temperature: float = 2.0, lr: float = 1e-3, hidden: list[int] | None = None):
        if not isinstance(generator, nn.Module) and generator not in GENERATORS:
            raise ConfigError(f"generative_replay generator={generator!r}: one of {', '.join(GENERATORS)}, or a module "
                              "with loss(x, y) and sample(n, y, generator)")
        if isinstance(generator, nn.Module) and not (callable(getattr(generator, "loss", None))
                                                     and callable(getattr(generator, "sample", None))):
            raise ConfigError(f"generative_replay: {type(generator).__name__} has no loss(x, y) and sample(n, y, "
                              "generator) methods, which a generator needs")
        if conditional not in (False, True, "label"):
            raise ConfigError(f"generative_replay conditional={conditional!r}: false, true (a learned prior mode per "
                              "class) or 'label' (the label fed to the VAE's encoder and decoder)")
        if not (ratio in RATIOS or (isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
                                    and 0 <= ratio < math.inf)):
            raise ConfigError(f"generative_replay ratio={ratio!r}: 'classes', 'experiences' or a number >= 0 "
                              "(replayed samples per new sample)")
        if max_replay is not None and (isinstance(max_replay, bool) or not isinstance(max_replay, int)
                                       or max_replay < 0):
            raise ConfigError(f"generative_replay max_replay={max_replay!r}: a whole number >= 0, or none")
        for name, value in (("latent", latent), *(("hidden", h) for h in (hidden or ()))):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"generative_replay {name}={value!r}: a positive whole number")
        if hidden is not None and (not isinstance(hidden, (list, tuple)) or not hidden):
            raise ConfigError(f"generative_replay hidden={hidden!r}: the MLP VAE's hidden widths, a non-empty list")
        self.hidden = None if hidden is None else [int(h) for h in hidden]
        for name, value in (("temperature", temperature), ("lr", lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"generative_replay {name}={value!r}: a finite number above 0")
        self.kind = generator if isinstance(generator, str) else None
        self.generator: nn.Module | None = None if isinstance(generator, str) else generator
        self.conditional, self.latent, self.ratio, self.max_replay = conditional, latent, ratio, max_replay
        self.soft, self.temperature, self.lr = bool(soft), float(temperature), float(lr)
        self.optimizer: torch.optim.Optimizer | None = None
        self.old_generator: nn.Module | None = None
        self.solver: nn.Module | None = None
        self.old_classes: list[int] = []
        self.per_sample = 0.0  # replayed samples per new sample in this experience
        self.data_shape: tuple = ()
        self._own_rows: Batch | None = None  # this step's generated samples, all ranks', for the generator
        self.generator_seconds: list[float] = []  # per experience: the seconds of the generator's training steps
        self._clock = 0.0

    # ------------------------------------------------------------------------------ set-up per experience
    def _build(self, strategy, experience) -> None:
        """The default generator, sized from the first experience (its draws seeded from the run's generator)."""
        self.data_shape = tuple(first_sample(experience.dataset).x.shape[1:])
        if self.generator is None:
            shape = (1, 28, 28) if self.kind == "conv" and self.data_shape == (784,) else self.data_shape
            head = getattr(strategy, "_head", None)
            n_classes = max(int(getattr(head, "out_features", 0) or 0), max(experience.classes) + 1)
            kwargs = {"n_classes": n_classes} if self.conditional else {}
            if self.conditional == "label":
                kwargs["condition"] = "label"
            if self.hidden is not None and self.kind == "mlp":
                kwargs["hidden"] = self.hidden
            seed = int(torch.randint(2**62, (1,), generator=strategy.generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.generator = GENERATORS[self.kind](shape, latent=self.latent, **kwargs)
        self.generator.to(strategy.device)
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.lr)

    @hookimpl
    def before_training_exp(self, strategy) -> None:
        exp = strategy.experience
        self._build(strategy, exp)
        earlier = [e for e in strategy.trained if e is not exp]
        self.old_classes = sorted({c for e in earlier for c in e.classes})
        if not earlier:
            self.solver = self.old_generator = None
            self.per_sample = 0.0
            return
        self.solver, self.old_generator = frozen(strategy.model), frozen(self.generator)
        self.per_sample = self.per_sample_for(self.ratio, self.old_classes, exp, len(earlier))

    @staticmethod
    def per_sample_for(ratio: str | float, old_classes: list[int], experience, earlier: int) -> float:
        """Replayed samples per new one (``ratio``: see the class), given the classes and the number of the
        experiences trained before ``experience``."""
        if not isinstance(ratio, str):
            return float(ratio)
        old = len(set(old_classes) - set(experience.classes))
        return old / max(1, len(experience.classes)) if ratio == "classes" and old else float(earlier)

    def replay_count(self, n: int) -> int:
        """How many generated samples join a minibatch of ``n`` new ones."""
        m = int(round(n * self.per_sample))
        return m if self.max_replay is None else min(m, self.max_replay)

    # ------------------------------------------------------------------------------ replay
    def generate(self, strategy, m: int) -> tuple[Tensor, Tensor, Tensor]:
        """``m`` samples of the old generator, the frozen solver's labels for them and its logits (old classes).
        The samples with the classes they were drawn for (a class-conditional generator; else the solver's labels)
        are kept for the generator's own step."""
        drawn = None
        if getattr(self.old_generator, "conditional", False):
            old = torch.tensor(self.old_classes)
            drawn = old[torch.randint(len(old), (m,), generator=strategy.generator)].to(strategy.device)
        x = self.old_generator.sample(m, drawn, generator=strategy.generator).to(strategy.device)
        x = x.reshape(m, *self.data_shape)
        t = torch.zeros(m, dtype=torch.long, device=strategy.device)
        with torch.no_grad():
            logits = strategy.forward(Batch(x, torch.zeros_like(t), t), model=self.solver).logits
        old = torch.tensor(self.old_classes, device=logits.device)
        logits = logits.index_select(1, old)
        y = old[logits.argmax(1)]
        self._own_rows = Batch(x, y if drawn is None else drawn, t)  # the same on every rank
        return x, y, logits

    @staticmethod
    def _global(strategy, n: int) -> int:
        """``n`` summed over the ranks (the whole minibatch's size in a distributed run)."""
        if strategy.world == 1:
            return n
        total = torch.tensor([n], device=strategy.device)
        dist.all_reduce(total)
        return int(total.item())

    @hookimpl
    def replay_batch(self, strategy, batch: Batch) -> Batch | None:
        if self.solver is None or self.soft:
            return None
        m = self.replay_count(self._global(strategy, len(batch)))  # every rank draws the same; the engine shards
        if not m:
            return None
        x, y, _ = self.generate(strategy, m)
        return Batch(x, y, torch.zeros_like(y))

    def replayed_outside(self, strategy) -> tuple[Batch, Tensor, float] | None:
        """Generated rows to score outside the minibatch (``soft``, negative replay): this rank's share of ``m``
        generated samples (labelled by the frozen solver), the solver's logits over the old classes for them, and
        ``m / n``; ``None`` when nothing is replayed. The generator learns these rows in this step."""
        n = self._global(strategy, strategy.n_current)
        m = self.replay_count(n)
        if self.solver is None or not m:
            return None
        x, y, teacher = self.generate(strategy, m)  # the same on every rank: each keeps its share
        mine = dist.shard(torch.arange(m, device=x.device))
        return Batch(x[mine], y[mine], torch.zeros_like(y[mine])), teacher[mine], m / n

    @staticmethod
    def soft_cross_entropy(logits: Tensor, teacher: Tensor, old_classes: list[int], classes: list[int],
                           temperature: float) -> Tensor:
        """``T^2`` times the cross-entropy between the teacher's softened outputs over ``old_classes`` (its columns)
        and the softened ``logits`` over ``classes`` (restricted to the old ones), mean over the rows."""
        cols = torch.tensor(sorted(classes), device=logits.device)
        where = torch.searchsorted(cols, torch.tensor(old_classes, device=logits.device))
        T = temperature
        log_q = F.log_softmax(logits.index_select(1, cols) / T, 1).index_select(1, where)
        return -(F.softmax(teacher / T, 1) * log_q).sum(1).mean() * T * T

    @hookimpl
    def loss_terms(self, strategy) -> dict[str, Tensor] | None:
        rows = self.replayed_outside(strategy) if self.soft else None
        if rows is None:
            return None
        batch, teacher, weight = rows
        seen = {*self.old_classes, *strategy.experience.classes}  # old among every class seen
        logits = strategy.forward(batch).logits
        return {"dgr_soft": self.soft_cross_entropy(logits, teacher, self.old_classes, sorted(seen),
                                                    self.temperature) * weight}

    # ------------------------------------------------------------------------------ the generator learns
    @hookimpl
    def after_training_iteration(self, strategy) -> None:
        start = perf_counter()
        self._step(strategy)
        self._clock += perf_counter() - start

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        self.generator_seconds.append(self._clock)
        strategy.log("dgr/generator_seconds", self._clock)
        self._clock = 0.0
        if strategy.logs_images:
            for c, grid in self.sample_grids(strategy).items():
                strategy.log_image(f"samples/class{c}", grid)

    def sample_grids(self, strategy, per_class: int = 16) -> dict[int, Tensor]:
        """A grid of ``per_class`` samples of the generator for every class seen (a class-conditional generator is
        asked for each class; otherwise the classifier labels 8 draws per sample shown), when the inputs are images
        (``C x H x W``, or a square number of values); drawn from their own seeded generator (the run's draws do
        not change)."""
        from torchvision.utils import make_grid

        shape = self.data_shape
        side = math.isqrt(shape[0]) if len(shape) == 1 else 0
        if not (len(shape) == 3 or side * side == (shape[0] if shape else 0)) or self.generator is None:
            return {}
        image = shape if len(shape) == 3 else (1, side, side)
        seen = sorted({c for e in strategy.trained for c in e.classes})
        draws = torch.Generator().manual_seed((strategy.seed + len(strategy.trained)) % 2**63)
        self.generator.eval()
        if getattr(self.generator, "conditional", False):
            y = torch.tensor(seen).repeat_interleave(per_class).to(strategy.device)
            x = self.generator.sample(len(y), y, generator=draws).to(strategy.device)
        else:
            x = self.generator.sample(8 * per_class * len(seen), None, generator=draws).to(strategy.device)
            zeros = torch.zeros(len(x), dtype=torch.long, device=x.device)
            y = strategy.infer(Batch(x.reshape(len(x), *shape), zeros, zeros)).logits.argmax(1)
        x = x.reshape(len(x), *image).float().cpu()
        y = y.cpu()
        return {c: make_grid(x[y == c][:per_class], nrow=8, normalize=True, pad_value=1.0)
                for c in seen if (y == c).any()}

    def _step(self, strategy) -> None:
        """One Adam step of the generator on the minibatch's new inputs and its own generated ones (labelled with
        the classes they were drawn for, when conditional): it replays to itself."""
        new = strategy.unaugmented.select(slice(0, strategy.n_current))
        if strategy.world > 1:  # every rank takes the same step on the whole minibatch, in the one-process order
            new = Batch(dist.all_gather(new.x), dist.all_gather(new.y), dist.all_gather(new.t))
        batch = new if self._own_rows is None else new.cat(self._own_rows)
        self._own_rows = None
        self.generator.train()
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.generator.loss(batch.x, batch.y if getattr(self.generator, "conditional", False) else None,
                                    generator=strategy.generator)
        sum(terms.values()).backward()
        self.optimizer.step()
        for name, value in terms.items():
            strategy.log(f"loss/{name}", float(value.detach()))

    # ------------------------------------------------------------------------------ reporting and state
    def memory_floats(self) -> int:
        """The generator's parameters: what this replay stores instead of samples."""
        return 0 if self.generator is None else sum(p.numel() for p in self.generator.parameters())

    def equivalent_samples(self, sample_size: int) -> float:
        """The generator's parameters as a number of stored inputs of ``sample_size`` values."""
        return self.memory_floats() / sample_size

    def state_dict(self) -> dict:
        return {**generator_state(self), "data_shape": self.data_shape}

    def load_state_dict(self, state: dict) -> None:
        load_generator_state(self, state)
        self.data_shape = tuple(state["data_shape"])


def generator_state(plugin) -> dict:
    """A generative-replay plugin's state: its generator (module and weights) with its Adam, the frozen generator
    and solver, the old classes, the ratio and the generator's seconds (``memory_floats`` counts the generator)."""
    state = {}
    for key in ("generator", "old_generator", "solver"):
        module = getattr(plugin, key)
        state[key], state[f"{key}_state"] = module, None if module is None else module.state_dict()
    return {**state, "optimizer": None if plugin.optimizer is None else plugin.optimizer.state_dict(),
            "old_classes": list(plugin.old_classes), "per_sample": plugin.per_sample,
            "generator_seconds": list(plugin.generator_seconds), "clock": plugin._clock}


def load_generator_state(plugin, state: dict) -> None:
    """Restore what :func:`generator_state` saved (the generator's Adam rebuilt at ``plugin.lr``)."""
    plugin.generator = state["generator"]
    if plugin.generator is not None:
        plugin.generator.load_state_dict(state["generator_state"])
        plugin.optimizer = torch.optim.Adam(plugin.generator.parameters(), lr=plugin.lr)
        plugin.optimizer.load_state_dict(state["optimizer"])
    plugin.old_generator = frozen(state["old_generator"], state["old_generator_state"])
    plugin.solver = frozen(state["solver"], state["solver_state"])
    plugin.old_classes, plugin.per_sample = list(state["old_classes"]), float(state["per_sample"])
    plugin.generator_seconds, plugin._clock = list(state["generator_seconds"]), float(state["clock"])
