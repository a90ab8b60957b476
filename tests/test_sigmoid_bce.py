"""SigmoidBCE (iCaRL's classification loss, Alg. 3) by hand; the icarl recipe builds it and icarl_ce does not."""
import math
from types import SimpleNamespace

import pytest
import torch

from streamcl import ConfigError, Output, Strategy
from streamcl.methods import build_method
from streamcl.models import MLP
from streamcl.plugins.distill import Distill
from streamcl.plugins.replay import Replay
from streamcl.plugins.sigmoid_bce import SigmoidBCE, sigmoid_bce
from tests.synthetic import tiny_benchmark

LOGITS = torch.tensor([[1.0, 2.0, 0.5, -1.0, 3.0],    # label 2 (new)
                       [0.0, 1.0, 2.0, 1.0, 0.0],     # label 3 (new)
                       [2.0, -1.0, 0.0, 1.0, 4.0]])   # label 0 (an exemplar)
Y = torch.tensor([2, 3, 0])


def log_sig(z):
    return -math.log1p(math.exp(-z))


def log_one_minus_sig(z):
    return -math.log1p(math.exp(z))


def test_the_loss_by_hand_on_the_experiences_classes_only():
    # classes {2, 3}: targets (1, 0), (0, 1), (0, 0); outputs 0, 1 (old) and 4 (unseen) get no term
    hand = -((log_sig(0.5) + log_one_minus_sig(-1.0)) + (log_one_minus_sig(2.0) + log_sig(1.0))
             + (log_one_minus_sig(0.0) + log_one_minus_sig(1.0))) / 3
    assert sigmoid_bce(LOGITS, Y, torch.tensor([2, 3])).item() == pytest.approx(hand, rel=1e-6)
    logits = LOGITS.clone().requires_grad_()
    sigmoid_bce(logits, Y, torch.tensor([2, 3])).backward()
    assert logits.grad[:, [0, 1, 4]].eq(0).all() and logits.grad[:, [2, 3]].ne(0).all()


def test_the_task_loss_is_it_on_the_models_own_logits_not_the_softmax_cross_entropy():
    plugin = SigmoidBCE()
    strategy = SimpleNamespace(experience=SimpleNamespace(index=1, classes=[2, 3]))
    masked = LOGITS.clone()
    masked[:, 4] = float("-inf")  # a task mask's -inf on the adapted logits: the raw ones are used
    out = plugin.task_loss(strategy=strategy, output=Output(masked, None, raw=LOGITS), batch=SimpleNamespace(y=Y))
    assert out.item() == pytest.approx(sigmoid_bce(LOGITS, Y, torch.tensor([2, 3])).item(), rel=1e-6)
    assert out.item() != pytest.approx(torch.nn.functional.cross_entropy(LOGITS, Y).item(), rel=1e-3)


def test_icarl_is_the_papers_bce_and_icarl_ce_keeps_the_softmax_cross_entropy():
    plugins, _ = build_method("icarl")
    assert [type(p).__name__ for p in plugins] == ["Replay", "SigmoidBCE", "Distill", "NMEClassifier"]
    assert plugins[2].kind == "bce"
    for name, kwargs in (("icarl_ce", {}), ("icarl", {"loss": "ce"})):
        plugins, _ = build_method(name, **kwargs)
        assert [type(p).__name__ for p in plugins] == ["Replay", "Distill", "NMEClassifier"]
    with pytest.raises(ConfigError, match="icarl loss='softmax'"):
        build_method("icarl", loss="softmax")


def test_a_run_trains_with_it_and_the_distillation_beside_it():
    torch.manual_seed(0)
    bench = tiny_benchmark(6, 3)
    model = MLP(8, [16], 6)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=16, epochs=2, seed=0,
                 plugins=[Replay(memory=12), SigmoidBCE(), Distill(kind="bce")])
    losses = []
    for exp in bench.train_stream:
        s.train(exp)
        losses.append(float(s.loss_terms["task"].detach()))
        # the last minibatch's task loss is the BCE on the experience's classes, replayed rows included
        classes = torch.tensor(exp.classes)
        assert losses[-1] == pytest.approx(float(sigmoid_bce(s.output.raw.detach(), s.batch.y, classes)), rel=1e-5)
    assert len(s.batch) > s.n_current  # exemplars were in it
    assert all(math.isfinite(v) for v in losses) and "distill" in s.loss_terms
    assert 0 <= s.eval(bench.test_stream)["accuracy"][0] <= 1
