"""DualPrompt: prefix shapes, prefix attention by hand, E-prompt selection by key, the shared G-prompt, what trains."""
import math

import pytest
import torch
from torch.nn import functional as F

from streamcl import Batch, ConfigError, Strategy
from streamcl.plugins.dual_prompt import DualPrompt, DualPromptNet, PrefixAttention, prefixed_attention
from tests.conftest import image_benchmark, mlp, rgb_benchmark, vit


def deep_vit(n_classes: int = 4, depth: int = 4):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=n_classes, embed_dim=32, depth=depth,
                             num_heads=2, mlp_ratio=2.0)


def strategy(plugin: DualPrompt, model=None, **kwargs) -> Strategy:
    torch.manual_seed(0)
    model = deep_vit() if model is None else model
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=[plugin], batch_size=8,
                    seed=0, **kwargs)


def batch(n: int = 5) -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(n, 1, 28, 28, generator=g), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))


def test_layers_follow_the_paper_clipped_to_the_depth():
    plugin = DualPrompt()
    assert plugin.layers_for(12) == ([0, 1], [2, 3, 4])
    assert plugin.layers_for(4) == ([0, 1], [2, 3])  # the PT-SFM-5 backbone
    assert plugin.layers_for(2) == ([0, 1], [1])  # no E-layer left: the last block
    assert plugin.layers_for(1) == ([0], [0])
    assert DualPrompt(g_layers=[1], e_layers=[0, 9]).layers_for(4) == ([1], [0])
    assert DualPrompt(g_length=0).layers_for(4) == ([], [2, 3])


def test_prefixes_lengthen_the_keys_and_values_not_the_tokens(monkeypatch):
    s = strategy(DualPrompt(g_length=3, e_length=4))
    s.train(next(iter(image_benchmark().train_stream)))
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.shape[2], k.shape[2], v.shape[2]))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    blocks = s.model.vit().blocks
    shapes = []
    hooks = [b.register_forward_hook(lambda m, a, out: shapes.append((a[0].shape, out.shape))) for b in blocks]
    s.infer(batch())
    for h in hooks:
        h.remove()
    tokens = 1 + 16
    assert seen[-4:] == [(tokens, tokens + 3, tokens + 3)] * 2 + [(tokens, tokens + 4, tokens + 4)] * 2
    assert all(a == b == (5, tokens, 32) for a, b in shapes)


def test_an_empty_prefix_gives_the_original_attention():
    from timm.layers import Attention
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(3, 5, 8)
    assert torch.allclose(prefixed_attention(attn, x, torch.zeros(3, 2, 0, 8)), attn(x), atol=1e-6)
    layer = PrefixAttention(attn, None)
    assert torch.equal(layer(x), attn(x))  # outside a prompted call


def test_prefix_attention_by_hand():
    from timm.layers import Attention
    torch.manual_seed(0)
    attn = Attention(4, num_heads=2, qkv_bias=True).eval()
    x, prefix = torch.randn(1, 3, 4), torch.randn(1, 2, 2, 4)
    qkv = x[0] @ attn.qkv.weight.T + attn.qkv.bias  # 3 x 12
    q, k, v = qkv[:, :4], qkv[:, 4:8], qkv[:, 8:]
    k, v = torch.cat([prefix[0, 0], k]), torch.cat([prefix[0, 1], v])  # 5 keys and values
    heads = []
    for h in range(2):
        cols = slice(2 * h, 2 * h + 2)
        weights = torch.softmax(q[:, cols] @ k[:, cols].T / math.sqrt(2), dim=1)
        heads.append(weights @ v[:, cols])
    expected = torch.cat(heads, 1) @ attn.proj.weight.T + attn.proj.bias
    assert torch.allclose(prefixed_attention(attn, x, prefix)[0], expected, atol=1e-5)


def test_a_mask_over_the_tokens_lets_every_query_see_the_prefix():
    from timm.layers import Attention
    torch.manual_seed(0)
    attn = Attention(4, num_heads=2).eval()
    x, prefix = torch.randn(1, 3, 4), torch.randn(1, 2, 2, 4)
    causal = prefixed_attention(attn, x, prefix, is_causal=True)
    same = prefixed_attention(attn, x, prefix, attn_mask=torch.ones(3, 3, dtype=torch.bool).tril())
    assert torch.allclose(causal, same)
    assert torch.allclose(causal[:, -1], prefixed_attention(attn, x, prefix)[:, -1], atol=1e-6)  # the last sees all


def test_e_prompts_are_chosen_by_key_at_test_and_by_experience_in_training():
    s = strategy(DualPrompt())
    for exp in image_benchmark(n_experiences=2).train_stream:
        s.train(exp)
    net = s.model
    assert isinstance(net, DualPromptNet) and len(net.keys) == 2
    d = net.keys[0].shape[0]
    net.keys[0].data.copy_(F.one_hot(torch.tensor(0), d).float())
    net.keys[1].data.copy_(F.one_hot(torch.tensor(1), d).float())
    query = torch.zeros(3, d)
    query[0, 0], query[1, 1], query[2] = 1.0, 1.0, -1.0
    query[2, 1] = 0.0
    query[2, 0] = -1.0
    assert net.select(query).tolist() == [0, 1, 1]  # cos (-1, 0) for the last row
    routes = []
    layer = net.layers()[-1]  # an E-layer; the query pass runs it without a route
    hook = layer.register_forward_pre_hook(lambda m, a: routes.append(m.route.clone()) if m.route is not None else None)
    b = batch()
    s.infer(b)
    assert torch.equal(routes[-1], DualPrompt.selected(s, b.x))  # evaluation: the nearest key
    net.train()
    net(b.x)
    assert routes[-1].tolist() == [1] * len(b)  # training: the newest experience's E-prompt
    hook.remove()
    net.take_match()


def test_the_g_prompt_is_shared_and_trains_in_every_experience_old_e_prompts_freeze():
    s = strategy(DualPrompt(g_length=3, e_length=4))
    stream = list(image_benchmark(n_experiences=2).train_stream)
    s.train(stream[0])
    net = s.model
    g_layer, e_layer = net.model.blocks[0].attn, net.model.blocks[2].attn
    g0, e0 = g_layer.g.detach().clone(), e_layer.e[0].detach().clone()
    s.train(stream[1])
    assert g_layer.g is not None and not torch.equal(g0, g_layer.g)  # trained again
    assert torch.equal(e0, e_layer.e[0]) and not e_layer.e[0].requires_grad  # the first experience's is kept
    assert len(e_layer.e) == 2 and not torch.equal(e_layer.e[1], e0)  # the second started from it and trained
    assert g_layer.e is not None and len(g_layer.e) == 0 and e_layer.g is None
    e_layer.route = torch.tensor([0, 1])
    g_layer.route = torch.tensor([0, 1])
    gp, ep = g_layer.prefix(2), e_layer.prefix(2)
    assert gp.shape == (2, 2, 3, 32) and torch.equal(gp[0], gp[1])  # one G-prompt for rows of both experiences
    assert ep.shape == (2, 2, 4, 32) and torch.equal(ep[0], e_layer.e[0]) and torch.equal(ep[1], e_layer.e[1])
    e_layer.route = g_layer.route = None


def test_only_prompts_keys_and_head_train():
    torch.manual_seed(0)
    model = deep_vit()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = strategy(DualPrompt(), model, epochs=2)
    for exp in image_benchmark().train_stream:
        s.train(exp)
    renamed = {n.replace("attn.attn.", "attn.").removeprefix("model."): p for n, p in s.model.named_parameters()}
    assert {n for n in before if not torch.equal(before[n], renamed[n])} == {"head.weight", "head.bias"}
    assert {n for n, p in s.model.named_parameters() if p.requires_grad} == {
        "model.blocks.0.attn.g", "model.blocks.1.attn.g", "model.blocks.2.attn.e.1", "model.blocks.3.attn.e.1",
        "keys.1", "model.head.weight", "model.head.bias"}


def test_the_matching_loss_pulls_the_experience_key():
    plugin = DualPrompt(lambda_=1.0)
    s = strategy(plugin)
    s.train(next(iter(image_benchmark().train_stream)))
    net = s.model
    d = net.keys[0].shape[0]
    net.keys[0].data.copy_(F.one_hot(torch.tensor(0), d).float())
    query = torch.stack([F.one_hot(torch.tensor(0), d).float(), F.one_hot(torch.tensor(1), d).float()])
    net.match = (query, torch.tensor([0, 0]))
    assert plugin.loss_terms(strategy=s)["dual_prompt"].item() == pytest.approx(0.5)  # mean of (1 - 1, 1 - 0)


def test_a_model_without_a_vision_transformer_is_refused():
    model = mlp(4)
    with pytest.raises(ConfigError, match="dual_prompt needs a timm VisionTransformer"):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[DualPrompt()])
    with pytest.raises(ConfigError, match="g_layers"):
        DualPrompt(g_layers=[-1])


def test_one_block_vit_holds_g_and_e_prompts_in_one_layer():
    s = strategy(DualPrompt(g_length=2, e_length=3), vit(4))
    for exp in image_benchmark().train_stream:
        s.train(exp)
    layer = s.model.model.blocks[0].attn
    layer.route = torch.tensor([1])
    assert layer.prefix(1).shape == (1, 2, 5, 32)
    layer.route = None


def test_vit_tiny_224_trains_and_evaluates():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4)
    bench = rgb_benchmark()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), plugins=[DualPrompt()],
                 batch_size=4, seed=0)
    for exp in bench.train_stream:
        s.train(exp)
        res = s.eval(bench.test_stream)
    assert len(res["accuracy"]) == 2 and all(0 <= a <= 1 for a in res["accuracy"])
    net = s.model
    assert [p.rsplit(".", 2)[-2] for p in net.attn_paths] == ["0", "1", "2", "3", "4"] and len(net.keys) == 2
