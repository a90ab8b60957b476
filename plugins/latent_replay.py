"""Latent replay: a memory of activations at an inner layer of any model, replayed into the layers above it."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from streamcl import Batch, Plugin, hookimpl
from streamcl.errors import ConfigError
from streamcl.memory import Budget, Codec, Memory, balanced, check_room, random_pick
from streamcl.models.nets import module_chain
from streamcl.scenarios import as_batch

PROBE = 8  # samples of the first experience on which the way to replay latents is found and checked
FAILS = (RuntimeError, ValueError, TypeError, IndexError)  # a replay path that does not fit the model


class LatentReplay(Plugin):
    """Latent replay (Pellegrini et al. 2020, "Latent Replay for Real-Time Continual Learning", Sec. III, Alg. 1).

    The model is cut at one of its modules, ``layer``: the memory stores that module's outputs ``z``
    (latents, caught by a forward hook while the engine runs the model), not the inputs. From the second
    experience on, each training step adds

        L_latent = CE(upper(z_mem), y_mem)

    over ``batch_size`` latents drawn uniformly from memory (default: the strategy's batch size), logged as
    ``loss/latent_replay``; ``upper`` is the part of the network after the cut, up to the model's logits, then
    every ``adapt_logits`` with the latents' task labels, as on the minibatch (under a task mask a latent is
    scored within its own task). This equals the paper's minibatch of new patterns concatenated with
    replayed latents at the latent layer, up to weighting, for layers that treat samples independently
    (no batch normalisation after the cut): with ``n`` new and ``m`` replayed samples the paper's loss is
    the joint mean ``(n L_new + m L_latent) / (n + m)``, here it is ``L_new + L_latent``; with ``m = n``
    (default) that is twice the joint mean, the same gradient direction at twice the step (on SFM-5 the sum
    did better than the exact joint mean: 0.759 vs 0.748).

    **Where to cut.** ``layer`` is the dotted path of a module (``"layer3"`` of a torchvision ResNet,
    ``"blocks.0"`` of a timm ViT, ``"backbone.2"`` of streamcl's MLP), or an int ``k`` (as in configs
    written for streamcl's models): the ``k``-th module of the model's chain, so that the latents are
    ``chain[:k](x)``. The chain is the model's children in order with every ``nn.Sequential`` opened
    (:func:`streamcl.models.nets.module_chain`; MLP 784-256-256: ``backbone.0`` Flatten, ``backbone.1``
    Linear, ``backbone.2`` ReLU, ``backbone.3`` Linear, ``backbone.4`` ReLU, ``head``), so ``k`` indexes the
    backbone of a :class:`~streamcl.models.Classifier` as before. ``layer=None`` applies one rule to every
    model: take the chain's modules before the one holding the classifier head, find the last of them that
    holds a weight matrix (a parameter of two or more dimensions), and cut just before it. For an
    ``nn.Sequential``-like chain that is just before its last Linear: the MLP 784-256-256-10 is cut at
    ``backbone.2``, after the first hidden layer's ReLU (256-float latents; the second hidden layer and the
    head learn at full pace); ResNet-18 at ``layer4.0`` (``layer4.1``, the pooling and ``fc`` learn); a timm
    ViT at ``norm_pre`` (the last transformer block, the final norm and the head learn).

    **Replaying latents.** On the first experience's first samples the plugin checks (eval mode) that the
    replayed logits equal the model's own, and picks the first of these that does:

    * ``"chain"``: the modules after the cut in the chain, applied in turn (exact and as fast as a plain
      forward of the upper layers: an ``nn.Sequential``, streamcl's MLP);
    * ``"hook"``: the model's own forward with a forward hook that replaces the cut module's output by the
      latents (ResNet's flatten, ViT's token pooling happen in ``forward`` between modules). The layers
      before the cut then run on a stub input of zeros, of one row when the model allows it (their result
      is thrown away). Measured with ResNet-18 on 1x28x28, 128 latents at ``layer4.0``, one CPU thread
      (forward and backward): 0.18-0.24 s a replay, of which the one-row stub pass is 0.03 s and the upper
      layers alone 0.14 s; a stub of 128 rows would make it 0.37 s, a step on 128 inputs costs 1.0 s.
      The modules below the cut run in evaluation mode during the stub pass, so their normalisation
      statistics never see the zeros.

    A model where neither gives its logits (a connection that skips over the cut) is refused, naming it.

    **Freezing.** The layers below the cut are what keeps the stored latents valid. They are found once,
    on that first check, as every trainable parameter the replayed logits do not depend on (autograd on
    one replay): the parameters of the modules before the cut, and any the model uses before it outside a
    module (a ViT's class token and position embedding), whatever the module structure; a rule by module
    names (the modules that ran before the cut) would miss the latter. With ``lower_lr=0`` (default, the
    paper's freezing of every layer below the latent replay layer) they stop learning after the first
    experience: ``requires_grad`` is turned off in ``adapt_model`` (before the engine wraps the model in
    DDP, so DDP never waits for their gradients, and backward skips them), and they sit in an optimizer
    group with learning rate 0, so they stay fixed on every path, a resumed run included. The modules that
    ran before the cut also train in evaluation mode from then on (frozen batch-norm statistics, no
    dropout), as the stored latents were made in evaluation mode. With ``0 < lower_lr`` they keep learning
    at ``lower_lr`` times the optimizer's learning rate (the paper's "slow-down" of the layers below); the
    stored latents then go stale, as the paper notes, since they are never recomputed (on SFM-5, from
    scratch, factors 0.1 and 0.01 gave a final accuracy of 0.26 and 0.45 against 0.76 frozen).

    The memory holds ``memory`` latents in total (or as many as fit in ``memory_bytes``, at 4 bytes a
    float plus 16 for the two labels: 1040 bytes for the MLP's 256-float latents against 3152 for a
    784-pixel input) with their labels and task labels. After each experience it is split evenly over
    the classes seen (stored classes keep their earliest picks), new classes get a random pick of the
    experience's samples, and their latents come from the engine's inference pass (eval mode).

    Defaults: ``memory=500`` (the protocol's Replay-500 budget; the paper used 1500 latents on CORe50),
    ``batch_size`` the strategy's, frozen lower layers. SFM-5, seeds 0-2: 0.759 (500 latents), 0.771
    (2000), 0.768 (``memory_bytes`` of 500 inputs = 1515 latents); Replay-500 on inputs: 0.784.
    """

    # "architecture": it cuts and freezes the model's own layers, which a plugin that replaces the model
    # (HyperNetwork) takes away
    owns = frozenset({"memory", "architecture"})

    def __init__(self, memory: int | None = 500, layer: int | str | None = None, batch_size: int | None = None,
                 memory_bytes: int | None = None, lower_lr: float = 0.0):
        if layer is not None and not (isinstance(layer, str) and layer) and (
                isinstance(layer, bool) or not isinstance(layer, int) or layer < 1):
            raise ConfigError(f"latent replay layer={layer!r}: give the dotted path of a module of the model "
                              "(\"layer3\", \"blocks.0\", \"backbone.2\"), an index >= 1 into its chain of modules "
                              "(the latents are the output of its layer-th module), or None for the default")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size <= 0):
            raise ConfigError(f"latent replay batch_size={batch_size!r}: it must be a positive whole number")
        if isinstance(lower_lr, bool) or not isinstance(lower_lr, (int, float)) or not 0 <= lower_lr < float("inf"):
            raise ConfigError(f"lower_lr={lower_lr!r}: a learning-rate factor >= 0 for the layers below "
                              "the latent layer (0 freezes them)")
        if memory_bytes is not None:
            if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0:
                raise ConfigError(f"memory budget memory_bytes={memory_bytes!r}: it must be a positive number of bytes")
            self.budget = None
        elif memory is None:
            raise ConfigError("latent replay needs a budget: memory= (a number of latents) or memory_bytes=")
        else:
            self.budget = Budget(total=memory)
        self.layer, self.batch_size, self.memory_bytes, self.lower_lr = layer, batch_size, memory_bytes, float(lower_lr)
        self.memory: Memory | None = None
        self.classes: list[int] = []  # in order of arrival
        self.experiences = 0
        self.cut: str | None = None  # the path of the module whose output is stored (found at setup)
        self.chain: list[str] = []  # the model's chain of modules (paths)
        # found on the first experience (see the class docstring)
        self.mode: str | None = None  # "chain" or "hook"
        self.lower_names: list[str] = []  # parameters below the cut
        self.lower_modules: list[str] = []  # modules that run before the cut's output
        self.stub: tuple[tuple[int, ...], torch.dtype] | None = None  # one input's shape and dtype
        self.stub_rows = 1  # rows of the stub input in "hook" mode (0: one per latent)

    @property
    def capacity(self) -> int | None:
        """How many latents the memory holds at most (known once the first latents arrive)."""
        return None if self.memory is None else self.memory.capacity

    # ------------------------------------------------------------------------------ the cut
    @hookimpl
    def setup(self, strategy) -> None:
        self.cut = self.find_cut(strategy.model, strategy.head_path)

    def find_cut(self, model: nn.Module, head_path: str | None) -> str:
        """The path of the module ``model`` is cut at (``layer``, or the default rule), checked; ``head_path`` is
        where the engine found the classifier head (``strategy.head_path``)."""
        chain = module_chain(model)
        paths = [p for p, _ in chain]
        self.chain = paths
        name = type(model).__name__
        at_head = None if head_path is None else next(
            (i for i, p in enumerate(paths) if head_path == p or (p and head_path.startswith(p + "."))), None)
        if isinstance(self.layer, str):
            try:
                model.get_submodule(self.layer)
            except AttributeError:
                names = [n for n, _ in model.named_modules() if n][:16]
                raise ConfigError(f"latent replay layer={self.layer!r}: {name} has no module there; its modules "
                                  f"include {', '.join(names)}") from None
            if head_path is not None and (self.layer == head_path or head_path.startswith(self.layer + ".")
                                          or self.layer.startswith(head_path + ".")):
                raise ConfigError(f"latent replay layer={self.layer!r} holds or is {name}'s classifier head (at "
                                  f"{head_path!r}): cut at a module before the head, so that layers learn on "
                                  "the stored latents")
            return self.layer
        if at_head is None:
            what = f"layer={self.layer}: an index counts" if isinstance(self.layer, int) else \
                "needs a classifier head to place the default cut before, and none was found in"
            raise ConfigError(f"latent replay {what} {name}'s chain of modules up to its classifier head "
                              f"({', '.join(paths[:16])}; head: {head_path!r}); give the cut as a module path, "
                              "layer='path.to.module'")
        before = chain[:at_head]
        if isinstance(self.layer, int):
            if self.layer > len(before):
                raise ConfigError(f"latent replay layer={self.layer} is out of range: {name} has {len(before)} "
                                  f"modules before its classifier head ({', '.join(paths[:at_head])}), so layer goes "
                                  f"from 1 to {len(before)}")
            return paths[self.layer - 1]
        weighty = [i for i, (_, m) in enumerate(before) if any(p.dim() >= 2 for p in m.parameters())]
        if not weighty or weighty[-1] == 0:
            raise ConfigError(f"latent replay: {name} has no layer with a weight matrix before its classifier head "
                              f"after its first module ({', '.join(paths[:at_head])}), so there is nothing to cut "
                              "before; give layer=")
        return paths[weighty[-1] - 1]

    # ------------------------------------------------------------------------------ the upper part
    def upper_logits(self, strategy, z: Tensor, t: Tensor | None = None, model: nn.Module | None = None) -> Tensor:
        """The model's raw logits for latents ``z`` (outputs of the cut module; ``t`` their task labels); ``model``:
        another module of the same architecture (a frozen copy)."""
        own = model is None or model is strategy.model
        model = strategy.model if model is None else model
        if self.mode == "chain":
            for path in self.chain[self.chain.index(self.cut) + 1:]:
                z = model.get_submodule(path)(z)
            return z
        rows = self.stub_rows or len(z)
        shape, dtype = self.stub
        x = torch.zeros((rows, *shape), dtype=dtype, device=z.device)
        t = torch.zeros(rows, dtype=torch.long, device=z.device) if t is None else t[:rows]
        lower = [model.get_submodule(n) for n in self.lower_modules]
        modes = [m.training for m in lower]
        handle = model.get_submodule(self.cut).register_forward_hook(lambda _module, _args, _output: z)
        try:
            for m in lower:
                m.training = False
            if own:
                return strategy.forward(Batch(x, t, t), net=model, adapt=False).raw
            return strategy.forward(Batch(x, t, t), model=model, adapt=False).raw
        finally:
            handle.remove()
            for m, mode in zip(lower, modes):
                m.training = mode

    def _decide(self, strategy, probe: Batch) -> Tensor:
        """On ``probe``: the modules that run before the cut, how latents are replayed (checked against the
        model's logits, in eval mode) and the parameters below the cut. Returns the probe's latents."""
        model, name = strategy.model, type(strategy.model).__name__
        path_of = {m: n for n, m in model.named_modules()}
        finished, outputs = [], []
        handles = [m.register_forward_hook(lambda module, _args, _output: finished.append(path_of[module]))
                   for m in path_of]
        handles.append(model.get_submodule(self.cut).register_forward_hook(
            lambda _module, _args, output: outputs.append(output)))
        try:
            raw = strategy.infer(probe, adapt=False, batch_size=len(probe)).raw
        finally:
            for h in handles:
                h.remove()
        if len(outputs) != 1 or not isinstance(outputs[0], Tensor):
            what = f"ran {len(outputs)} times in one forward pass" if len(outputs) != 1 else "gives no tensor"
            raise ConfigError(f"latent replay: {name}'s module {self.cut!r} {what}; cut at a module that runs once "
                              "and outputs a tensor")
        z = outputs[0]
        at = finished.index(self.cut)
        later = set(finished[at + 1:])
        self.lower_modules = list(dict.fromkeys(n for n in finished[:at + 1] if n not in later))
        self.stub = (tuple(probe.x.shape[1:]), probe.x.dtype)
        was_training = model.training
        model.eval()
        try:
            tries = ([("chain", 1)] if self.cut in self.chain else []) + [("hook", 1), ("hook", 0)]
            for self.mode, self.stub_rows in tries:
                try:
                    with torch.no_grad():
                        out = self.upper_logits(strategy, z, probe.t)
                except FAILS:
                    continue
                scale = 1 + float(raw.abs().max()) if raw.numel() else 1.0
                if out.shape == raw.shape and torch.allclose(out, raw, rtol=1e-4, atol=1e-5 * scale):
                    break
            else:
                self.mode = None
                raise ConfigError(f"latent replay cannot replay latents taken at {self.cut!r} of {name}: neither the "
                                  f"modules after it in order nor {name}'s forward with that module's output replaced "
                                  "give the model's logits (does a connection skip over the cut?); choose another "
                                  "layer=")
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            with torch.enable_grad():
                out = self.upper_logits(strategy, z.detach(), probe.t)
                grads = torch.autograd.grad(out.sum(), [p for _, p in params], allow_unused=True) \
                    if params and out.requires_grad else [None] * len(params)
            self.lower_names = [n for (n, _), g in zip(params, grads) if g is None]
        finally:
            model.train(was_training)
        return z

    def _lower_params(self, model: nn.Module) -> list[nn.Parameter]:
        names = set(self.lower_names)
        return [p for n, p in model.named_parameters() if n in names]

    # ------------------------------------------------------------------------------ freezing
    @hookimpl
    def adapt_model(self, strategy, model: nn.Module) -> nn.Module:
        if self.experiences and self.lower_lr == 0:
            for p in self._lower_params(model):
                p.requires_grad_(False)
        return model

    @hookimpl
    def param_groups(self, strategy, model: nn.Module) -> list[dict] | None:
        params = self._lower_params(model)
        if not self.experiences or not params:
            return None
        return [{"params": params, "lr": self.lower_lr * strategy.optimizer.defaults["lr"]}]

    @hookimpl
    def before_forward(self, strategy) -> None:
        if self.experiences and self.lower_lr == 0:  # frozen: normalisation statistics too
            for n in self.lower_modules:
                strategy.model.get_submodule(n).training = False

    @hookimpl
    def before_training_exp(self, strategy) -> None:
        """Refuse, before training, a memory of fewer latents than the stream has classes."""
        exp = strategy.experience
        if self.budget is None:  # memory_bytes: the size of one sample's latent tells how many fit
            x, y, *rest = exp.dataset[0]
            one = Batch(torch.as_tensor(x)[None], torch.as_tensor(y).reshape(1), torch.zeros(1, dtype=torch.long))
            self._create(self._latents(strategy, one.to(strategy.device)))
        check_room(self.budget.total, exp.n_classes, repr(self))

    # ------------------------------------------------------------------------------ replay
    @hookimpl
    def loss_terms(self, strategy, batch: Batch, output) -> dict | None:
        if self.memory is None or len(self.memory) == 0:
            return None
        _, mem = self.memory.sample(self.batch_size or strategy.batch_size, strategy.generator)
        return {"latent_replay": strategy.criterion(self.replay_logits(strategy, mem), mem.y)}

    def replay_logits(self, strategy, mem: Batch) -> Tensor:
        """:meth:`upper_logits` of the stored latents ``mem.x``, then every ``adapt_logits`` (as the training loss
        sees the logits of the minibatch: under a task mask each latent is scored within its own task)."""
        raw = self.upper_logits(strategy, mem.x, mem.t)
        return strategy.forward(Batch(raw, mem.y, mem.t), net=_Given(raw)).logits

    # ------------------------------------------------------------------------------ memory update
    @hookimpl
    def after_training_exp(self, strategy) -> None:
        exp = strategy.experience
        new = as_batch(exp.dataset, strategy.device)
        y = new.y
        first = self._decide(strategy, new.select(slice(0, PROBE))) if self.mode is None else None
        if self.memory is None:
            self._create(first[:1] if first is not None else self._latents(strategy, new.select(slice(0, 1))))
        present = set(y.unique().tolist())  # a class of the experience without samples takes no quota
        self.classes += [c for c in exp.classes if c in present and c not in self.classes]
        self.experiences += 1
        quotas = self.budget.quotas(self.classes)
        self.memory.keep(balanced(self.memory.labels, {c: q for c, q in quotas.items() if c not in present}))
        picks = []
        for c in self.classes:
            if c in present:
                members = torch.nonzero(y == c).flatten()
                picks.append(members[random_pick(len(members), quotas[c], strategy.generator).to(members.device)])
        chosen = new.select(torch.cat(picks))
        self.memory.append(self._latents(strategy, chosen), chosen.y, chosen.t)

    def _create(self, z: Tensor) -> None:
        """The memory, once the first latent tells its size (for ``memory_bytes``)."""
        if self.budget is None:
            per_latent = Codec().bytes_per_sample(tuple(z.shape[1:]), z.dtype)
            if self.memory_bytes < per_latent:
                raise ConfigError(f"memory_bytes={self.memory_bytes} holds no latent of {per_latent} bytes")
            self.budget = Budget(total=self.memory_bytes // per_latent)
        self.memory = Memory(self.budget.total)

    @torch.no_grad()
    def _latents(self, strategy, data: Batch) -> Tensor:
        """The cut module's outputs on ``data``, caught by a forward hook in the engine's inference pass."""
        outputs: list[Tensor] = []
        handle = strategy.model.get_submodule(self.cut).register_forward_hook(
            lambda _module, _args, output: outputs.append(output.detach()))
        try:
            strategy.infer(data, adapt=False)
        finally:
            handle.remove()
        return torch.cat(outputs)

    def state_dict(self) -> dict:
        return {"memory": None if self.memory is None else self.memory.state_dict(),
                "capacity": self.capacity, "budget": self.budget, "classes": list(self.classes),
                "experiences": self.experiences, "cut": self.cut, "mode": self.mode,
                "lower_names": list(self.lower_names), "lower_modules": list(self.lower_modules),
                "stub": None if self.stub is None else (list(self.stub[0]), str(self.stub[1]).removeprefix("torch.")),
                "stub_rows": self.stub_rows}

    def load_state_dict(self, state: dict) -> None:
        self.budget, self.classes, self.experiences = state["budget"], list(state["classes"]), state["experiences"]
        self.memory = None
        if state["memory"] is not None:
            self.memory = Memory(state["capacity"])
            self.memory.load_state_dict(state["memory"])
        if state["cut"] != self.cut:
            raise ConfigError(f"latent replay: the checkpoint cuts the model at {state['cut']!r}, this run at "
                              f"{self.cut!r}")
        self.mode, self.stub_rows = state["mode"], state["stub_rows"]
        self.lower_names, self.lower_modules = list(state["lower_names"]), list(state["lower_modules"])
        self.stub = None if state["stub"] is None else (tuple(state["stub"][0]), getattr(torch, state["stub"][1]))


class _Given:
    """A stand-in for the model's call that answers logits already computed (``strategy.forward`` then only adapts)."""

    def __init__(self, logits: Tensor):
        self.logits = logits

    def __call__(self, x: Tensor, **kwargs) -> Tensor:
        return self.logits
