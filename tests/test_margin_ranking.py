"""MarginRanking (LUCIR eq. 8-9) on hand examples; which samples and scores it uses; refusals."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, Output, Plugin, PluginError, Strategy, hookimpl
from streamcl.models import MLP
from streamcl.plugins.cosine_head import CosineHead, CosineLinear
from streamcl.plugins.margin_ranking import MarginRanking
from streamcl.plugins.replay import Replay
from tests.conftest import image_benchmark, sequential, warns_once_when_no_class_is_new
from tests.synthetic import tiny_benchmark

# old classes 0, 1; new classes 2, 3, 4
SCORES = [[0.9, 0.1, 0.5, 0.7, -0.2],   # y = 0: top-2 new 0.7, 0.5 -> (0.5 - 0.9 + 0.7) + (0.5 - 0.9 + 0.5) = 0.4
          [0.2, 0.8, 0.1, 0.0, 0.3],    # y = 1: top-2 new 0.3, 0.1 -> both hinges 0
          [0.0, 0.9, 0.2, 0.1, 0.8],    # y = 3: a new class, not ranked
          [-0.5, 0.0, 0.6, -1.0, 0.2]]  # y = 0: top-2 new 0.6, 0.2 -> 1.6 + 1.2 = 2.8
LABELS = [0, 1, 3, 0]


def term(plugin, scores=SCORES, labels=LABELS, classes=(2, 3, 4), head=None, features=None):
    z = torch.tensor(scores, requires_grad=True)
    y = torch.tensor(labels)
    batch = Batch(torch.zeros(len(y), 3), y, torch.zeros_like(y))
    strategy = SimpleNamespace(experience=SimpleNamespace(classes=list(classes)), head=head,
                               head_path=None if head is None else "head")
    return plugin.loss_terms(strategy=strategy, batch=batch, output=Output(z, features, z)), z


def plugin_after(old, **kwargs):
    plugin = MarginRanking(**kwargs)
    plugin.load_state_dict({"old_classes": old})
    return plugin


# ----------------------------------------------------------------------------- the maths
def test_the_margin_ranking_loss_on_a_hand_example():
    terms, z = term(plugin_after([0, 1]))
    assert set(terms) == {"margin_ranking"}
    assert terms["margin_ranking"].item() == pytest.approx((0.4 + 0.0 + 2.8) / 3, rel=1e-6)  # mean over old samples
    terms["margin_ranking"].backward()
    # d/ds: -K_active on the true score, +1 on each active new score, over 3 old samples; nothing elsewhere
    expected = torch.zeros(4, 5)
    expected[0, 0], expected[0, 3], expected[0, 2] = -2 / 3, 1 / 3, 1 / 3
    expected[3, 0], expected[3, 2], expected[3, 4] = -2 / 3, 1 / 3, 1 / 3
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_k_margin_and_weight():
    # K = 1: 0.3 + 0 + 1.6; margin 0: K = 2: 0 + 0 + (1.1 + 0.7); weight 0.5 halves
    one = term(plugin_after([0, 1], k=1))[0]["margin_ranking"].item()
    assert one == pytest.approx((0.3 + 0.0 + 1.6) / 3, rel=1e-6)
    flat = term(plugin_after([0, 1], margin=0.0))[0]["margin_ranking"].item()
    assert flat == pytest.approx((0.0 + 1.1 + 0.7) / 3, rel=1e-6)
    half = term(plugin_after([0, 1], weight=0.5))[0]["margin_ranking"].item()
    assert half == pytest.approx(0.5 * 3.2 / 3, rel=1e-6)
    many = term(plugin_after([0, 1], k=5), classes=(2, 3))[0]["margin_ranking"].item()  # K above the 2 new classes
    # y=0: (0.5-0.9+0.7) + (0.5-0.9+0.5) = 0.4; y=1: 0; y=0: (0.5+0.5+0.6) + (0.5+0.5-1.0) = 1.6
    assert many == pytest.approx((0.4 + 0.0 + 1.6) / 3, rel=1e-6)  # the class-3 sample (new) is not ranked


def test_the_cosine_head_ranks_cosine_scores_before_the_scale():
    head = CosineLinear(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), scale=10.0)
    features = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    # sample 0, class 0: cos (1, 0, 0.7071); sample 1 is class 2 (new)
    plugin = plugin_after([0, 1], k=2)
    terms, _ = term(plugin, scores=[[10.0, 0.0, 7.07], [0.0, 0.0, 0.0]], labels=[0, 2], classes=(2,), head=head,
                    features=features)
    assert terms["margin_ranking"].item() == pytest.approx(0.5 - 1.0 + 2 ** -0.5, rel=1e-5)


def test_other_heads_and_models_without_a_head_rank_the_models_own_logits():
    raw = torch.tensor([[1.0, 2.0]])
    out = Output(raw + 100, torch.ones(1, 2), raw)  # logits after an adapt_logits differ from the raw ones
    for head in (nn.Linear(2, 2), None):
        strategy = SimpleNamespace(head=head, head_path=None if head is None else "fc")
        assert MarginRanking.scores(strategy, out) is raw


def test_no_old_class_no_old_sample_or_no_new_class_no_term():
    assert term(MarginRanking())[0] is None  # the first experience
    assert term(plugin_after([0, 1]), labels=[2, 3, 4, 2])[0] is None  # no replayed sample in the batch
    assert term(plugin_after([0, 1, 2, 3, 4]))[0] is None  # domain-incremental: no new class
    assert term(plugin_after([0, 1], weight=0.0))[0] is None


# ----------------------------------------------------------------------------- in a run
class Terms(Plugin):
    def __init__(self):
        self.seen = []

    @hookimpl
    def after_training_iteration(self, strategy):
        self.seen.append({k: v.item() for k, v in strategy.loss_terms.items()})


def build(plugins, n_classes=6, n_exp=3, seed=0):
    torch.manual_seed(seed)
    bench = tiny_benchmark(n_classes, n_exp)
    model = MLP(8, [16], n_classes)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=plugins, epochs=2,
                 batch_size=16, seed=seed)
    return s, bench


@pytest.mark.parametrize("head", [False, True], ids=["linear", "cosine"])
def test_term_from_the_second_experience_on_replayed_samples(head):
    plugin, terms = MarginRanking(), Terms()
    s, bench = build([Replay(memory=12), *([CosineHead()] if head else []), plugin, terms])
    for exp in bench.train_stream:
        s.train(exp)
    assert plugin.old_classes == [0, 1, 2, 3, 4, 5]
    assert all("margin_ranking" not in t for t in terms.seen[:6])
    values = [t["margin_ranking"] for t in terms.seen[6:]]
    assert len(values) == 12 and min(values) >= 0
    if head:
        assert max(values) <= 2 * (0.5 + 2)  # K hinges of cosine scores


def test_a_plain_sequential_with_the_cosine_head_ranks_cosine_scores():
    torch.manual_seed(0)
    model = sequential(4)
    plugin, terms, seen = MarginRanking(), Terms(), []

    class Check(Plugin):
        @hookimpl
        def after_forward(self, strategy):
            seen.append(torch.equal(plugin.scores(strategy, strategy.output),
                                    model[5].cosine(strategy.output.features)))

    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                 plugins=[Replay(memory=8), CosineHead(), plugin, terms, Check()], batch_size=8, seed=0)
    for exp in image_benchmark().train_stream:
        s.train(exp)
    assert isinstance(model[5], CosineLinear) and seen and all(seen)
    values = [t["margin_ranking"] for t in terms.seen if "margin_ranking" in t]
    assert values and 0 <= min(values) and max(values) <= 2 * (0.5 + 2)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs", [dict(margin=-0.1), dict(margin=float("nan")), dict(k=0), dict(k=2.0),
                                    dict(k=True), dict(weight=-1.0), dict(weight=float("inf")), dict(margin="0.5")])
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        MarginRanking(**kwargs)


def test_refused_without_a_memory_and_twice():
    with pytest.raises(PluginError, match="needs a plugin that owns the role 'memory'"):
        build([MarginRanking()])
    with pytest.raises(PluginError, match="both own the role 'margin_ranking'"):
        build([Replay(memory=12), MarginRanking(), MarginRanking(k=1)])


def test_state_round_trip():
    plugin = plugin_after([0, 1])
    copy = MarginRanking()
    copy.load_state_dict(plugin.state_dict())
    assert copy.old_classes == [0, 1] and copy.old_classes is not plugin.old_classes


def test_an_experience_with_no_new_class_is_warned_about_once():
    s, bench = build([Replay(memory=12), MarginRanking()])
    warns_once_when_no_class_is_new(s, bench, "margin_ranking: experience 1 brings no class not seen before")
