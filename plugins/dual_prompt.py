"""DualPrompt: a shared G-prompt and one E-prompt per experience, by prefix-tuning a frozen pre-trained ViT."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from streamcl import ConfigError, Plugin, hookimpl
from streamcl.parts import check_first
from streamcl.plugins.current_classes import current_classes_loss
from streamcl.plugins.l2p import cosine_pull, find_vit, freeze_all_but, frozen_query, takes_task, eval_query, uniform


class PrefixAttention(nn.Module):
    """A timm ``Attention`` (``attn``, its ``qkv``, ``q_norm``/``k_norm``, ``scale``, ``attn_drop``, ``norm``, ``gate``,
    ``proj``, ``proj_drop`` reused as they are) with prefixes prepended to its keys and values (prefix-tuning, DualPrompt
    Sec. 4.2: ``MSA(h_Q, [p_K; h_K], [p_V; h_V])``).

    A prompt is ``2 x L x D`` (``D`` the attention's width, heads x head width): ``p[0]`` the key prefix, ``p[1]`` the
    value prefix, ``L`` tokens each, in the space of the projected keys and values (as the authors' code; the query
    tokens and their number are unchanged, the keys and values gain ``L``). ``g`` is the layer's G-prompt (or
    ``None``), ``e`` its E-prompts, one per experience. While ``route`` (one E-prompt index per row, set by
    :class:`DualPromptNet` for one call) is set, row ``i`` gets ``[g; e[route[i]]]``; outside such a call the layer is
    the plain attention (the query pass).
    """

    def __init__(self, attn: nn.Module, g: nn.Parameter | None):
        super().__init__()
        self.attn, self.g = attn, g
        self.e = nn.ParameterList()
        self.route: Tensor | None = None

    def prefix(self, b: int) -> Tensor | None:
        """``b x 2 x P x D``, the prefixes of the call's rows, or ``None`` outside a prompted call."""
        if self.route is None:
            return None
        parts = [] if self.g is None else [self.g.expand(b, *self.g.shape)]
        if len(self.e):
            parts.append(torch.stack(list(self.e))[self.route])
        return torch.cat(parts, 2) if parts else None

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        prefix = self.prefix(x.shape[0])
        if prefix is None:
            return self.attn(x, attn_mask=attn_mask, is_causal=is_causal)
        return prefixed_attention(self.attn, x, prefix, attn_mask, is_causal)

    def extra_repr(self) -> str:
        g = 0 if self.g is None else self.g.shape[1]
        e = self.e[0].shape[1] if len(self.e) else 0
        return f"g_length={g}, e_prompts={len(self.e)}, e_length={e}"


def prefixed_attention(attn: nn.Module, x: Tensor, prefix: Tensor, attn_mask: Tensor | None = None,
                       is_causal: bool = False) -> Tensor:
    """timm ``Attention.forward`` of ``attn`` on ``x`` (``B x N x C``) with ``prefix`` (``B x 2 x P x D``) prepended
    to the projected keys (``prefix[:, 0]``) and values (``prefix[:, 1]``); a mask (``attn_mask``, ``is_causal``) over
    the ``N`` keys lets every query see the ``P`` prefix keys."""
    b, n, _ = x.shape
    heads, width = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(b, n, 3, heads, width).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    p = prefix.shape[2]
    pk, pv = (prefix[:, i].reshape(b, p, heads, width).transpose(1, 2).to(k.dtype) for i in (0, 1))
    k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    mask = _prefix_mask(attn_mask, is_causal, n, p, x)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0,
                                         scale=attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(b, n, heads * width))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _prefix_mask(attn_mask: Tensor | None, is_causal: bool, n: int, p: int, x: Tensor) -> Tensor | None:
    if is_causal:
        attn_mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        pad = torch.ones(*attn_mask.shape[:-1], p, dtype=torch.bool, device=attn_mask.device)
    else:
        pad = torch.zeros(*attn_mask.shape[:-1], p, dtype=attn_mask.dtype, device=attn_mask.device)
    return torch.cat([pad, attn_mask], -1)


class DualPromptNet(nn.Module):
    """The user's ``model`` with :class:`PrefixAttention` at ``attn_paths``, run twice per call: without prompts and
    without gradients for the query ``q(x)`` (the [CLS] feature of the ViT at ``vit_path``), then with the G-prompts and
    one E-prompt per row. ``keys`` holds one task key per E-prompt (per experience). In training mode the row's
    E-prompt is the newest (the experience being trained); in evaluation mode the one whose key has the highest cosine
    similarity to ``q(x)``. In training mode with gradients on ``(q(x), route)`` is kept as ``match`` for the matching
    loss (:meth:`take_match`). ``e_paths`` are the layers of ``attn_paths`` that hold E-prompts. ``get_classifier()``
    is the user's head (``head_path`` inside ``model``)."""

    def __init__(self, model: nn.Module, vit_path: str, head_path: str, attn_paths: Sequence[str],
                 e_paths: Sequence[str]):
        super().__init__()
        self.model, self.vit_path, self.head_path = model, vit_path, head_path
        self.attn_paths, self.e_paths = list(attn_paths), list(e_paths)
        self.keys = nn.ParameterList()
        self.inner_takes_task = takes_task(model)
        self.match: tuple[Tensor, Tensor] | None = None

    def vit(self) -> nn.Module:
        return self.model.get_submodule(self.vit_path) if self.vit_path else self.model

    def get_classifier(self) -> nn.Module:
        return self.model.get_submodule(self.head_path)

    def layers(self) -> list[PrefixAttention]:
        return [self.model.get_submodule(p) for p in self.attn_paths]

    def select(self, query: Tensor) -> Tensor:
        """For each query row, the E-prompt whose key is nearest by cosine similarity (``0`` with no key yet)."""
        if not len(self.keys):
            return torch.zeros(len(query), dtype=torch.long, device=query.device)
        keys = torch.stack([k.detach() for k in self.keys])
        return (F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T).argmax(1)

    def take_match(self) -> tuple[Tensor, Tensor] | None:
        match, self.match = self.match, None
        return match

    def forward(self, x: Tensor, task_labels: Tensor | None = None) -> Tensor:
        kwargs = {"task_labels": task_labels} if self.inner_takes_task else {}
        query = frozen_query(self.model, self.vit(), x, kwargs)
        if self.training and len(self.keys):
            route = torch.full((len(x),), len(self.keys) - 1, dtype=torch.long, device=x.device)
        else:
            route = self.select(query)
        if self.training and torch.is_grad_enabled() and len(self.keys):
            self.match = (query, route)
        layers = self.layers()
        for layer in layers:
            layer.route = route
        try:
            return self.model(x, **kwargs)
        finally:
            for layer in layers:
                layer.route = None

    def extra_repr(self) -> str:
        return f"vit_path={self.vit_path!r}, head_path={self.head_path!r}, attn_paths={self.attn_paths}"


def place(layers: Sequence[int] | None, default: Sequence[int], depth: int) -> list[int]:
    """``layers`` (0-based block indices; ``None``: ``default``) without those at or past ``depth``, sorted."""
    chosen = default if layers is None else layers
    return sorted({int(i) for i in chosen if 0 <= int(i) < depth})


class DualPrompt(Plugin):
    """DualPrompt (Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning", ECCV 2022).

    A frozen pre-trained ViT is prompted by prefix-tuning (Sec. 4.2: a prompt ``p`` split into a key prefix ``p_K``
    and a value prefix ``p_V``, prepended to the keys and values of a block's self-attention, :class:`PrefixAttention`)
    at two sets of blocks: the G-prompt (``g_length`` tokens), one per layer of ``g_layers`` and shared by every
    experience, and the E-prompts (``e_length`` tokens), one per experience at each layer of ``e_layers``. Each E-prompt
    has a task key ``k_t`` (D). The query ``q(x)`` is the [CLS] feature of the frozen ViT without prompts (a pass
    without gradients). In training on experience ``t`` every sample uses E-prompt ``t`` and the objective (Sec. 4.3) is

        L = CE(h(f(x; g, e_t)), y) + lambda * (1 - cos(q(x), k_t)),

    the second term (the matching loss, averaged over the minibatch, logged as ``loss/dual_prompt``) pulls the
    experience's key to its queries. At test each sample uses the E-prompt whose key is nearest to its query by cosine
    similarity. The classifier reads the ViT's own pooled feature (the [CLS] token, the authors' ``head_type='token'``).
    Only the G-prompts, the current E-prompts and key, and the classifier head train; an experience's E-prompts and key
    are frozen once it is over (they take no part in later training steps). A new experience's E-prompts start from the
    previous experience's (the authors' ``shared_prompt_pool``), its key is drawn uniformly in [-1, 1] (as the first
    E-prompts and the G-prompts). The task loss masks the logits of classes outside the experience (and the minibatch's
    labels) to -inf, as the authors' ``train_mask``.

    Defaults: G-prompt of length 5 at blocks 1-2 (``g_layers=(0, 1)``, 0-based), E-prompts of length 20 at blocks 3-5
    (``e_layers=(2, 3, 4)``), lambda 1 (the paper's settings; the authors' configurations use E-prompts of length 5). A
    length is the number of prefix tokens given to the keys and, separately, to the values (the authors' code; the
    paper writes ``p_K, p_V`` of ``L/2`` tokens each). Layers at or past the ViT's depth are dropped; if no E-layer is
    left, the E-prompts go to the last block (beside a G-prompt there, if any: the prefixes are concatenated). On the
    4-block PT-SFM-5 backbone: G at blocks 0-1, E at blocks 2-3.

    The ViT is the first timm ``VisionTransformer`` among the model's modules; each prompted block's ``attn`` becomes a
    :class:`PrefixAttention` around it, and the model is wrapped in :class:`DualPromptNet` (which holds the keys) at the
    first experience, so every prompt and key is a parameter of the model. Owns ``architecture`` and ``criterion``.
    """

    owns = frozenset({"architecture", "criterion"})
    requires = frozenset({"head"})

    def __init__(self, g_length: int = 5, e_length: int = 20, g_layers: Sequence[int] | None = None,
                 e_layers: Sequence[int] | None = None, lambda_: float = 1.0, inherit: bool = True,
                 train_mask: bool = True):
        for name, value in (("g_length", g_length), ("e_length", e_length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"DualPrompt {name}={value!r}: must be an integer >= 0")
        for name, value in (("g_layers", g_layers), ("e_layers", e_layers)):
            if value is not None and not (isinstance(value, (list, tuple)) and all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)):
                raise ConfigError(f"DualPrompt {name}={value!r}: must be a list of block indices >= 0 (0-based)")
        if not isinstance(lambda_, (int, float)) or isinstance(lambda_, bool) or not lambda_ >= 0:
            raise ConfigError(f"DualPrompt lambda_={lambda_!r}: must be a number >= 0")
        self.g_length, self.e_length, self.lambda_ = g_length, e_length, float(lambda_)
        self.g_layers = None if g_layers is None else list(g_layers)
        self.e_layers = None if e_layers is None else list(e_layers)
        self.inherit, self.train_mask = bool(inherit), bool(train_mask)

    def layers_for(self, depth: int) -> tuple[list[int], list[int]]:
        """The G- and E-layers on a ViT of ``depth`` blocks."""
        g = place(self.g_layers, (0, 1), depth) if self.g_length else []
        e = place(self.e_layers, (2, 3, 4), depth)
        return g, e or [depth - 1]

    @hookimpl
    def setup(self, strategy) -> None:
        if isinstance(strategy.model, DualPromptNet):
            return
        path, vit = find_vit(strategy.model, "dual_prompt")
        from timm.layers import Attention
        g, e = self.layers_for(len(vit.blocks))
        for i in sorted({*g, *e}):
            attn = getattr(vit.blocks[i], "attn", None)
            if type(attn) is not Attention:
                raise ConfigError(f"dual_prompt prefix-tunes timm's Attention, and block {i} of the ViT at "
                                  f"{path or 'the model'!r} has {type(attn).__name__} as its attn")

    @hookimpl
    def adapt_model(self, strategy, model: nn.Module) -> nn.Module:
        if isinstance(model, DualPromptNet):
            net = model
        else:
            check_first(strategy, model, "dual_prompt", "wraps")
            vit_path, vit = find_vit(model, "dual_prompt")
            g, e = self.layers_for(len(vit.blocks))
            paths, e_paths = [], []
            for i in sorted({*g, *e}):
                block = vit.blocks[i]
                attn = block.attn
                prompt = uniform((2, self.g_length, attn.num_heads * attn.head_dim), strategy, vit.cls_token) \
                    if i in g else None
                block.attn = PrefixAttention(attn, prompt)
                paths.append(".".join(p for p in (vit_path, "blocks", str(i), "attn") if p))
                if i in e:
                    e_paths.append(paths[-1])
            net = DualPromptNet(model, vit_path, strategy.head_path, paths, e_paths)
        self._add_experience(strategy, net)
        keep = [*net.get_classifier().parameters(), net.keys[-1]]
        for layer in net.layers():
            keep += ([layer.g] if layer.g is not None else []) + ([layer.e[-1]] if len(layer.e) else [])
        freeze_all_but(net, {id(p) for p in keep})
        return net

    def _add_experience(self, strategy, net: DualPromptNet) -> None:
        """An E-prompt at each E-layer (the previous one's copy with ``inherit``, else drawn) and a key."""
        like = net.vit().cls_token
        for path in net.e_paths:
            layer = net.model.get_submodule(path)
            width = layer.attn.num_heads * layer.attn.head_dim
            if self.inherit and len(layer.e):
                layer.e.append(nn.Parameter(layer.e[-1].detach().clone()))
            else:
                layer.e.append(uniform((2, self.e_length, width), strategy, like))
        net.keys.append(uniform((like.shape[-1],), strategy, like))

    @hookimpl
    def loss_terms(self, strategy) -> dict[str, Tensor] | None:
        net = strategy.model
        match = net.take_match() if isinstance(net, DualPromptNet) else None
        if match is None or self.lambda_ == 0:
            return None
        query, route = match
        keys = torch.stack(list(net.keys))[route]
        return {"dual_prompt": self.lambda_ * cosine_pull(query, keys[:, None, :])}

    @hookimpl
    def task_loss(self, strategy, output, batch) -> Tensor | None:
        return current_classes_loss(strategy, output.logits, batch.y) if self.train_mask else None

    @staticmethod
    def selected(strategy, x: Tensor) -> Tensor:
        """For each input of ``x``, the E-prompt (experience) the model would use at test."""
        net = strategy.model
        if not isinstance(net, DualPromptNet):
            raise ConfigError("dual_prompt: the model is not prompted yet (it is wrapped at the first experience)")
        return net.select(eval_query(net, x))
