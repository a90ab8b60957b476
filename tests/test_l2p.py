"""L2P: top-N selection by key, the surrogate loss, where the prompts go, what trains, class masking, a timm ViT-Ti."""
import copy

import pytest
import torch
from torch.nn import functional as F

from streamcl import Batch, ConfigError, Strategy
from streamcl.plugins.current_classes import current_classes_loss
from streamcl.plugins.l2p import L2P, L2PNet, PromptInsert, frozen_query
from streamcl.scenarios import Experience, TensorData
from tests.conftest import image_benchmark, mlp, rgb_benchmark, vit


def prompted(plugin: L2P, model=None) -> Strategy:
    """A strategy whose model ``plugin`` has already wrapped (as at the first experience)."""
    torch.manual_seed(0)
    model = vit(4) if model is None else model
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin], batch_size=8, seed=0)
    s.model = plugin.adapt_model(strategy=s, model=s.model)
    s.model_changed()
    return s


def basis(i: int, d: int = 32) -> torch.Tensor:
    return F.one_hot(torch.tensor(i), d).float()


def test_top_n_keys_by_cosine_similarity():
    s = prompted(L2P(pool_size=4, length=2, top_k=2))
    net = s.model
    keys = torch.stack([basis(0), basis(1), -basis(0), 5 * basis(2)])
    net.vit().norm_pre.keys.data.copy_(keys)
    query = torch.stack([3 * basis(0) + basis(2), -basis(0) + 0.5 * basis(1), basis(1) + 2 * basis(2)])
    # cosines: row 0 -> (0.95, 0, -0.95, 0.32); row 1 -> (-0.89, 0.45, 0.89, 0); row 2 -> (0, 0.45, 0, 0.89)
    assert net.select(query).tolist() == [[0, 3], [2, 1], [3, 1]]


def test_surrogate_loss_is_lambda_times_one_minus_cosine_summed_over_the_chosen_keys():
    plugin = L2P(pool_size=3, length=2, top_k=2, lambda_=0.1)
    s = prompted(plugin)
    net = s.model
    net.vit().norm_pre.keys.data.copy_(torch.stack([basis(0), basis(1), basis(0) + basis(1)]))
    query = torch.stack([basis(0), basis(1)])
    net.match = (query, torch.tensor([[0, 1], [2, 0]]))
    # row 0: (1 - 1) + (1 - 0) = 1; row 1: (1 - 1/sqrt(2)) + (1 - 0); mean over rows, times 0.1
    expected = 0.1 * (1 + 2 - 2 ** -0.5) / 2
    term = plugin.loss_terms(strategy=s)["l2p"]
    assert term.item() == pytest.approx(expected, rel=1e-6)
    term.backward()
    assert net.vit().norm_pre.keys.grad is not None and net.match is None  # the match is used once


def test_prompts_go_after_the_class_token_in_the_chosen_order():
    prompts = torch.nn.Parameter(torch.arange(4 * 2 * 3, dtype=torch.float).reshape(4, 2, 3) + 100)
    insert = PromptInsert(torch.nn.Identity(), prompts, torch.nn.Parameter(torch.zeros(4, 3)), prefix_tokens=1)
    x = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)
    assert torch.equal(insert(x), x)  # no prompt outside a prompted call
    insert.chosen = torch.tensor([[2, 0], [1, 3]])
    out = insert(x)
    assert out.shape == (2, 5 + 2 * 2, 3)
    for row, (a, b) in enumerate(insert.chosen.tolist()):
        assert torch.equal(out[row, :1], x[row, :1])
        assert torch.equal(out[row, 1:5], torch.cat([prompts[a], prompts[b]]))
        assert torch.equal(out[row, 5:], x[row, 1:])


def test_the_blocks_see_n_times_lp_more_tokens_and_the_head_reads_their_mean():
    s = prompted(L2P(pool_size=6, length=3, top_k=2))
    vit_ = s.model.vit()
    seen, normed = [], []
    h1 = vit_.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    h2 = vit_.norm.register_forward_hook(lambda m, a, out: normed.append(out))
    x = torch.randn(5, 1, 28, 28)
    out = s.infer(Batch(x, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)))
    h1.remove(), h2.remove()
    assert seen == [1 + 16, 1 + 16 + 2 * 3]  # the query pass, then the prompted pass
    assert torch.allclose(out.features, normed[-1][:, 1:1 + 6].mean(1), atol=1e-6)


def test_the_query_is_the_class_token_of_the_unprompted_frozen_vit():
    torch.manual_seed(0)
    model = vit(4)
    original = copy.deepcopy(model).eval()
    s = prompted(L2P(), model)
    x = torch.randn(3, 1, 28, 28)
    s.model.train()
    assert torch.allclose(frozen_query(s.model.model, s.model.vit(), x, {}), original.forward_features(x)[:, 0])
    assert s.model.training and s.model.model.blocks.training  # modes are restored


def test_only_the_prompts_keys_and_head_train():
    torch.manual_seed(0)
    model = vit(4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=[L2P()], batch_size=8,
                 epochs=2, seed=0)
    prompts = None
    for exp in image_benchmark().train_stream:
        s.train(exp)
        if prompts is None:
            prompts = s.model.vit().norm_pre.prompts.detach().clone()
    after = dict(s.model.model.named_parameters())
    trained = {n for n in before if not torch.equal(before[n], after[n])}
    assert trained == {"head.weight", "head.bias"}
    assert not torch.equal(prompts, s.model.vit().norm_pre.prompts)  # the pool trained in the second experience
    assert {n for n, p in s.model.named_parameters() if p.requires_grad} == {
        "model.norm_pre.prompts", "model.norm_pre.keys", "model.head.weight", "model.head.bias"}


def test_training_masks_the_classes_outside_the_experience():
    s = prompted(L2P())
    s.experience = Experience(1, TensorData(torch.zeros(2, 1), torch.tensor([2, 3])), (2, 3), 4)
    logits = torch.randn(3, 4)
    y = torch.tensor([2, 3, 3])
    assert current_classes_loss(s, logits, y).item() == pytest.approx(F.cross_entropy(logits[:, 2:], y - 2).item(), rel=1e-6)
    y = torch.tensor([2, 0, 3])  # a replayed sample of class 0 keeps its class
    assert current_classes_loss(s, logits, y).item() == pytest.approx(
        F.cross_entropy(logits[:, [0, 2, 3]], torch.tensor([1, 0, 2])).item(), rel=1e-6)


def test_a_model_without_a_vision_transformer_is_refused():
    model = mlp(4)
    with pytest.raises(ConfigError, match="l2p needs a timm VisionTransformer"):
        Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[L2P()])


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="top_k=6 > pool_size=5"):
        L2P(pool_size=5, top_k=6)
    with pytest.raises(ConfigError, match="head='cls'"):
        L2P(head="cls")


def test_vit_tiny_224_trains_and_evaluates():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4)
    bench = rgb_benchmark()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), plugins=[L2P()], batch_size=4,
                 seed=0)
    for exp in bench.train_stream:
        s.train(exp)
        res = s.eval(bench.test_stream)
    assert len(res["accuracy"]) == 2 and all(0 <= a <= 1 for a in res["accuracy"])
    assert isinstance(s.model, L2PNet) and s.model.vit().norm_pre.prompts.shape == (10, 5, 192)
