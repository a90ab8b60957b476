"""Learning to Prompt (L2P): a pool of prompts with learnable keys, chosen per input, on a frozen pre-trained ViT."""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from streamcl import ConfigError, Plugin, hookimpl
from streamcl.parts import check_first
from streamcl.plugins.current_classes import current_classes_loss

INIT = (-1.0, 1.0)  # prompts and keys: uniform in [-1, 1] (the authors' "uniform" initializer)


# ----------------------------------------------------------------------------- shared with DualPrompt
def find_vit(model: nn.Module, who: str) -> tuple[str, nn.Module]:
    """The dotted path and module of the first timm ``VisionTransformer`` among ``model.modules()`` (``""``: the
    model itself); a ConfigError naming what is missing otherwise."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is an optional dependency
        raise ConfigError(f"{who} prompts a timm VisionTransformer, and timm is not installed "
                          "(pip install streamcl[pretrained])") from None
    found = next(((n, m) for n, m in model.named_modules() if isinstance(m, VisionTransformer)), None)
    if found is None:
        raise ConfigError(f"{who} needs a timm VisionTransformer (timm.models.vision_transformer) in the model, and "
                          f"{type(model).__name__} holds none; give it a ViT backbone, e.g. "
                          "timm.create_model('vit_tiny_patch16_224')")
    if found[1].cls_token is None:
        raise ConfigError(f"{who} queries with the ViT's [CLS] feature, and the VisionTransformer at "
                          f"{found[0] or 'the model'!r} has no class token (class_token=False)")
    return found


def takes_task(model: nn.Module) -> bool:
    return "task_labels" in inspect.signature(model.forward).parameters


def uniform(shape, strategy, like: Tensor) -> nn.Parameter:
    """A parameter of ``shape`` drawn uniformly in ``INIT`` from the run's generator, on ``like``'s device."""
    low, high = INIT
    value = torch.rand(shape, generator=strategy.generator, dtype=like.dtype) * (high - low) + low
    return nn.Parameter(value.to(like.device))


@torch.no_grad()
def frozen_query(model: nn.Module, vit: nn.Module, x: Tensor, kwargs: dict) -> Tensor:
    """``q(x)``: the [CLS] token of ``vit``'s final norm in a pass of ``model`` on ``x`` without gradients, in
    evaluation mode (no dropout), with no prompt in place (a prompted module prompts only while its owner sets it
    up for the one prompted call). The modules' modes are restored after."""
    box: list[Tensor] = []
    handle = vit.norm.register_forward_hook(lambda _m, _a, out: box.append(out[:, 0]))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        model(x, **kwargs)
    finally:
        handle.remove()
        for m, mode in modes:
            m.training = mode
    if not box:
        raise ConfigError(f"the model's forward never ran the VisionTransformer's final norm ({type(vit.norm).__name__})"
                          ", so its [CLS] feature cannot be read")
    return box[-1].detach()


def eval_query(net: nn.Module, x: Tensor) -> Tensor:
    """The query of inputs ``x`` as at test time (task label 0 where the wrapped model takes one), for a prompted
    net (``L2PNet``, ``DualPromptNet``) that holds the user's ``model`` and finds its ``vit()``."""
    kwargs = {"task_labels": torch.zeros(len(x), dtype=torch.long, device=x.device)} if net.inner_takes_task else {}
    return frozen_query(net.model, net.vit(), x, kwargs)


def freeze_all_but(model: nn.Module, keep: set[int]) -> None:
    """``requires_grad`` off for every parameter of ``model`` whose id is not in ``keep`` (and on for those)."""
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def cosine_pull(query: Tensor, keys: Tensor) -> Tensor:
    """``sum_k (1 - cos(q_i, keys[i, k]))`` averaged over the rows ``i``: the surrogate (matching) loss.
    ``query`` is ``(B, D)``, ``keys`` ``(B, K, D)``."""
    cos = (F.normalize(query, dim=-1)[:, None, :] * F.normalize(keys, dim=-1)).sum(-1)
    return (1 - cos).sum(1).mean()


# ----------------------------------------------------------------------------- L2P's modules
class PromptInsert(nn.Module):
    """In the place of a ViT's ``norm_pre``: the prompt pool (``prompts``: ``M x L_p x D``) and its keys (``M x D``).

    While ``chosen`` (``B x N`` pool indices, set by :class:`L2PNet` for one call) is set, the chosen prompts of each
    row are put, in the order of ``chosen``, right after the ``prefix_tokens`` (the class token) of the embedded
    sequence, before the patch tokens: the sequence grows by ``N * L_p`` tokens, which carry no position embedding.
    The ViT's own ``norm_pre`` (``nn.Identity`` for most ViTs) then runs on the whole sequence.
    """

    def __init__(self, norm_pre: nn.Module, prompts: nn.Parameter, keys: nn.Parameter, prefix_tokens: int):
        super().__init__()
        self.norm_pre, self.prompts, self.keys = norm_pre, prompts, keys
        self.prefix_tokens = int(prefix_tokens)
        self.chosen: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.chosen is not None:
            b, n = self.chosen.shape
            p = self.prompts[self.chosen].reshape(b, n * self.prompts.shape[1], self.prompts.shape[2])
            x = torch.cat([x[:, :self.prefix_tokens], p.to(x.dtype), x[:, self.prefix_tokens:]], 1)
        return self.norm_pre(x)

    def extra_repr(self) -> str:
        m, length, d = self.prompts.shape
        return f"pool={m}, length={length}, dim={d}, prefix_tokens={self.prefix_tokens}"


class PromptMean(nn.Module):
    """In the place of a ViT's ``attn_pool``: the mean of the prompt tokens' outputs (L2P's "prompt" classifier input,
    Sec. 4.3), the ``length`` tokens from ``offset`` of what timm hands its pool (the prefix tokens are cut off before
    it unless ``pool_include_prefix``). Outside a prompted call (``active`` false: the query pass, whose output is
    thrown away) it is the mean over all tokens."""

    def __init__(self, offset: int, length: int):
        super().__init__()
        self.offset, self.length = int(offset), int(length)
        self.active = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return x.mean(1)
        return x[:, self.offset:self.offset + self.length].mean(1)

    def extra_repr(self) -> str:
        return f"offset={self.offset}, length={self.length}"


class L2PNet(nn.Module):
    """The user's ``model`` run twice per call: first without prompts and without gradients, for the query ``q(x)``
    (the [CLS] feature of the ViT at ``vit_path``), then with the ``top_k`` prompts whose keys are nearest to
    ``q(x)`` by cosine similarity (L2P, Sec. 4.2). In training mode with gradients on, ``(q(x), chosen)`` is kept as
    ``match`` for the surrogate loss; :class:`L2P` takes it (:meth:`take_match`). ``get_classifier()`` is the user's
    head (``head_path`` inside ``model``)."""

    def __init__(self, model: nn.Module, vit_path: str, head_path: str, top_k: int):
        super().__init__()
        self.model, self.vit_path, self.head_path, self.top_k = model, vit_path, head_path, int(top_k)
        self.inner_takes_task = takes_task(model)
        self.match: tuple[Tensor, Tensor] | None = None

    def vit(self) -> nn.Module:
        return self.model.get_submodule(self.vit_path) if self.vit_path else self.model

    def get_classifier(self) -> nn.Module:
        return self.model.get_submodule(self.head_path)

    def select(self, query: Tensor) -> Tensor:
        """``B x N``: the pool indices of the ``top_k`` keys of highest cosine similarity to each query row, best first."""
        keys = self.vit().norm_pre.keys.detach()
        sim = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T
        return sim.topk(self.top_k, dim=1).indices

    def take_match(self) -> tuple[Tensor, Tensor] | None:
        match, self.match = self.match, None
        return match

    def forward(self, x: Tensor, task_labels: Tensor | None = None) -> Tensor:
        kwargs = {"task_labels": task_labels} if self.inner_takes_task else {}
        vit = self.vit()
        insert, pool = vit.norm_pre, vit.attn_pool if isinstance(vit.attn_pool, PromptMean) else None
        query = frozen_query(self.model, vit, x, kwargs)
        chosen = self.select(query)
        if self.training and torch.is_grad_enabled():
            self.match = (query, chosen)
        insert.chosen = chosen
        if pool is not None:
            pool.active = True
        try:
            return self.model(x, **kwargs)
        finally:
            insert.chosen = None
            if pool is not None:
                pool.active = False

    def extra_repr(self) -> str:
        return f"vit_path={self.vit_path!r}, head_path={self.head_path!r}, top_k={self.top_k}"


# ----------------------------------------------------------------------------- the plugin
class L2P(Plugin):
    """Learning to Prompt (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022).

    A frozen pre-trained ViT ``f`` is instructed by a pool of ``pool_size`` (M) prompts ``P_j`` (``length`` L_p tokens
    of the embedding width D each), each with a learnable key ``k_j`` (D). The query ``q(x)`` is the [CLS] feature of
    the frozen ViT without prompts (a pass without gradients; ``timm``'s final norm at the class token). The
    ``top_k`` (N) prompts whose keys are nearest to the query, ``gamma(q, k) = 1 - cos(q, k)`` (Sec. 4.2), are put
    after the class token of the embedded patches, so the sequence grows by ``N * L_p`` tokens. With
    ``head="prompt"`` (the paper's and the authors' choice) the classifier reads the mean of the prompt tokens'
    outputs (Sec. 4.3, timm's ``attn_pool`` slot holds :class:`PromptMean`); ``head="token"`` keeps the ViT's own
    pooling (the [CLS] token). The objective (eq. 5) is

        L = CE(g(f_avg(x_p)), y) + lambda * sum_{j in K_x} (1 - cos(q(x), k_j)),

    the second term averaged over the minibatch and logged as ``loss/l2p``; it pulls the chosen keys to the queries
    that chose them. Only the prompts, the keys and the classifier head train (every other parameter of the model has
    ``requires_grad`` off), and, as the authors do (``train_mask``), the task loss masks the logits of classes outside
    the experience (and the minibatch's labels, so replayed samples keep theirs) to -inf.

    Defaults: M=10, L_p=5, N=5 (the paper's Split CIFAR-100 setting and the authors' PyTorch configuration), lambda
    0.1 (the authors' ``pull_constraint_coeff``; their JAX configuration uses L_p=10, N=4, lambda=1); prompts and keys
    drawn uniformly in [-1, 1] from the run's generator. Not implemented: the optional batch-wise frequency penalty of
    Sec. 4.2 and the authors' ``batchwise_prompt`` (the most frequent prompts of a test batch used for all of it);
    each sample uses its own top-N.

    The ViT is the first timm ``VisionTransformer`` among the model's modules (the model itself or a wrapper around
    it); its ``norm_pre`` becomes :class:`PromptInsert` (which holds the pool and the keys, so the optimizer,
    checkpoints, DDP and copies see them) and the model is wrapped in :class:`L2PNet` at the first experience. A
    model without one, or a ViT without a class token, is refused when the Strategy is built. Owns ``architecture``
    (it wraps the model) and ``criterion`` (it gives the masked task loss).
    """

    owns = frozenset({"architecture", "criterion"})
    requires = frozenset({"head"})
    HEADS = ("prompt", "token")

    def __init__(self, pool_size: int = 10, length: int = 5, top_k: int = 5, lambda_: float = 0.1,
                 head: str = "prompt", train_mask: bool = True):
        for name, value in (("pool_size", pool_size), ("length", length), ("top_k", top_k)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"L2P {name}={value!r}: must be a positive integer")
        if top_k > pool_size:
            raise ConfigError(f"L2P top_k={top_k} > pool_size={pool_size}: it chooses top_k prompts from the pool")
        if not isinstance(lambda_, (int, float)) or isinstance(lambda_, bool) or not lambda_ >= 0:
            raise ConfigError(f"L2P lambda_={lambda_!r}: must be a number >= 0")
        if head not in self.HEADS:
            raise ConfigError(f"L2P head={head!r}: use one of {', '.join(self.HEADS)}")
        self.pool_size, self.length, self.top_k, self.lambda_ = pool_size, length, top_k, float(lambda_)
        self.head, self.train_mask = head, bool(train_mask)

    @hookimpl
    def setup(self, strategy) -> None:
        if isinstance(strategy.model, L2PNet):
            return
        _, vit = find_vit(strategy.model, "l2p")
        if self.head == "prompt" and vit.attn_pool is not None:
            raise ConfigError(f"l2p head='prompt' pools the prompt tokens in the ViT's attn_pool slot, which holds "
                              f"{type(vit.attn_pool).__name__}; use head='token'")

    @hookimpl
    def adapt_model(self, strategy, model: nn.Module) -> nn.Module:
        if isinstance(model, L2PNet):
            net = model
        else:
            check_first(strategy, model, "l2p", "wraps")
            vit_path, vit = find_vit(model, "l2p")
            like = vit.cls_token
            width = like.shape[-1]
            prompts = uniform((self.pool_size, self.length, width), strategy, like)
            keys = uniform((self.pool_size, width), strategy, like)
            vit.norm_pre = PromptInsert(vit.norm_pre, prompts, keys, vit.num_prefix_tokens)
            if self.head == "prompt":
                offset = vit.num_prefix_tokens if vit.pool_include_prefix else 0
                vit.attn_pool = PromptMean(offset, self.top_k * self.length)
            net = L2PNet(model, vit_path, strategy.head_path, self.top_k)
        insert = net.vit().norm_pre
        freeze_all_but(net, {id(p) for p in (*net.get_classifier().parameters(), insert.prompts, insert.keys)})
        return net

    @hookimpl
    def loss_terms(self, strategy) -> dict[str, Tensor] | None:
        net = strategy.model
        match = net.take_match() if isinstance(net, L2PNet) else None
        if match is None or self.lambda_ == 0:
            return None
        query, chosen = match
        keys = net.vit().norm_pre.keys
        return {"l2p": self.lambda_ * cosine_pull(query, keys[chosen])}

    @hookimpl
    def task_loss(self, strategy, output, batch) -> Tensor | None:
        return current_classes_loss(strategy, output.logits, batch.y) if self.train_mask else None

    @staticmethod
    def chosen(strategy, x: Tensor) -> Tensor:
        """``B x N``: the pool indices the model chooses for the inputs ``x`` (best first)."""
        net = strategy.model
        if not isinstance(net, L2PNet):
            raise ConfigError("l2p: the model is not prompted yet (it is wrapped at the first experience)")
        return net.select(eval_query(net, x))
