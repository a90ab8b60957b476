"""BiC: the correction layer and its fit against hand computations, the held-out split (the held_out hook),
set_correction, refusals, state."""
import math

import pytest
import torch
from torch.nn import functional as F

from streamcl import Batch, ConfigError, PluginError, Strategy, hookimpl
from streamcl.methods import RECIPES
from streamcl.models import MLP
from streamcl.plugins.bias_correction import BiasCorrection, correct, fit_pair, is_held, row_keys
from streamcl.plugins.distill import LwFDistill
from streamcl.plugins.replay import Replay
from tests.conftest import warns_once_when_no_class_is_new
from tests.synthetic import tiny_benchmark

PAIRS = [{"experience": 1, "classes": [2, 3], "alpha": 0.5, "beta": 0.25},
         {"experience": 2, "classes": [4, 5], "alpha": 2.0, "beta": -1.0}]


def with_pairs(pairs=PAIRS):
    plugin = BiasCorrection()
    plugin.load_state_dict({"pairs": pairs, "held": None, "held_classes": None})
    return plugin


# ----------------------------------------------------------------------------- the layer
def test_bics_layer_leaves_old_logits_untouched():
    z = torch.tensor([[1.0, -2.0, 3.0, 4.0, 0.5, -1.5, 7.0],
                      [0.0, 5.0, -4.0, 2.0, 1.0, 3.0, -7.0]])
    out = with_pairs().adapt_logits(logits=z)
    assert torch.equal(out[:, [0, 1, 6]], z[:, [0, 1, 6]])  # classes of experience 0, and a class not seen yet
    # eq. 5, each experience's own pair on its own classes
    assert out[:, 2:4].tolist() == [[1.75, 2.25], [-1.75, 1.25]]  # 0.5 z + 0.25
    assert out[:, 4:6].tolist() == [[0.0, -4.0], [1.0, 5.0]]  # 2 z - 1
    assert torch.equal(correct(z, PAIRS), out)
    assert with_pairs([]).adapt_logits(logits=z) is None  # nothing fitted yet: the logits pass through
    narrow = with_pairs().adapt_logits(logits=z[:, :3])  # a head that has not grown to class 3 yet
    assert narrow.tolist() == [[1.0, -2.0, 1.75], [0.0, 5.0, -1.75]]


def test_the_layer_is_differentiable_through_the_logits():
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], requires_grad=True)
    with_pairs().adapt_logits(logits=z).sum().backward()
    assert z.grad.tolist() == [[1.0, 1.0, 0.5, 0.5, 2.0, 2.0]]


def test_set_correction_off_passes_the_logits_through_and_on_applies_the_pairs_again():
    plugin, z = with_pairs(), torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    plugin.set_correction(active=False)
    assert plugin.adapt_logits(logits=z) is None
    plugin.set_correction(active=True)
    assert plugin.adapt_logits(logits=z).tolist() == [[1.0, 2.0, 1.75, 2.25, 9.0, 11.0]]


# ----------------------------------------------------------------------------- the fit (eq. 6)
def test_the_fit_by_hand():
    # old class 0 with logit 0, new class 1 with logit s: p(new) = sigmoid(alpha s + beta), two values of s and
    # two parameters, so the optimum reproduces each group's frequency of the new class exactly:
    # s = +1: 3 of 4 new -> alpha + beta = log 3; s = -1: 1 of 2 new -> -alpha + beta = 0
    z = torch.tensor([[0.0, 1.0]] * 4 + [[0.0, -1.0]] * 2)
    y = torch.tensor([1, 1, 1, 0, 1, 0])
    alpha, beta = fit_pair(z, y, old=[0], new=[1])
    assert alpha == pytest.approx(math.log(3) / 2, abs=1e-9) and beta == pytest.approx(math.log(3) / 2, abs=1e-9)


def test_the_fit_only_moves_the_new_classes_and_lowers_the_loss():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(60, 5, generator=g)
    z[:, 3:] += 2.0  # the new classes 3, 4 are favoured
    y = torch.arange(5).repeat(12)  # balanced
    z[torch.arange(60), y] += 1.5
    alpha, beta = fit_pair(z, y, old=[0, 1, 2], new=[3, 4])
    pairs = [{"experience": 1, "classes": [3, 4], "alpha": alpha, "beta": beta}]
    fitted = correct(z, pairs)
    ce = torch.nn.functional.cross_entropy
    assert ce(fitted, y) < ce(z, y)
    # at the optimum the gradient of eq. 6 in (alpha, beta) is zero
    theta = torch.tensor([alpha, beta], dtype=torch.float64, requires_grad=True)
    q = torch.cat([z.double()[:, :3], theta[0] * z.double()[:, 3:] + theta[1]], 1)
    ce(q, y).backward()
    assert theta.grad.abs().max() < 1e-8
    assert beta < 0  # the favoured new classes are pushed down
    # a column not seen yet takes no part in the fit (its logit is never a target's competitor)
    wide = torch.cat([z, torch.full((60, 1), 50.0)], 1)
    assert fit_pair(wide, y, old=[0, 1, 2], new=[3, 4]) == pytest.approx((alpha, beta), abs=1e-9)


# ----------------------------------------------------------------------------- the held-out set
def test_rows_are_matched_bit_for_bit():
    held = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x = torch.tensor([[3.0, 4.0], [1.0, 2.5], [1.0, 2.0], [0.0, 0.0], [3.0, 4.0]])
    assert is_held(x, held, row_keys(held)).tolist() == [True, False, True, False, True]
    assert torch.equal(row_keys(x[[0]]), row_keys(x)[[0]])  # a row's key does not depend on its batch
    # two rows that differ only where the key does not look share a key, and are still told apart
    a = torch.zeros(2, 784)
    a[1, 1] = 1.0
    assert row_keys(a)[0] == row_keys(a)[1]
    assert is_held(a, a[:1], row_keys(a[:1])).tolist() == [True, False]
    zero = torch.tensor([[0.0, 1.0]])
    assert is_held(-zero, -zero, row_keys(-zero)).tolist() == [True]
    assert is_held(torch.tensor([[-0.0, 1.0]]), zero, row_keys(zero)).tolist() == [False]  # bits: only copies match
    h = torch.arange(12, dtype=torch.uint8).reshape(4, 3)  # rows of 3 bytes: compared byte by byte
    assert is_held(h[[2, 0]], h[[0, 1]], row_keys(h[[0, 1]])).tolist() == [False, True]


def test_the_held_out_hook_marks_the_rows_equal_to_a_held_out_sample():
    plugin = BiasCorrection()
    x = torch.tensor([[3.0, 4.0], [5.0, 6.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.5]])
    batch = Batch(x, torch.tensor([2, 3, 0, 0, 0]), torch.zeros(5, dtype=torch.long))
    assert plugin.held_out(batch=batch) is None  # nothing held out: no mask
    held = Batch(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0, 2]), torch.zeros(2, dtype=torch.long))
    plugin.load_state_dict({"pairs": [], "held": held, "held_classes": ([0], [2])})
    # the rows 2, 3 (replayed copies of the held-out exemplar) and 0 (a new sample held out); the engine drops them
    assert plugin.held_out(batch=batch).tolist() == [True, False, True, True, False]


def build(plugins, n_classes=6, n_exp=3, epochs=2):
    torch.manual_seed(0)
    bench = tiny_benchmark(n_classes, n_exp)
    model = MLP(8, [16], n_classes)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=plugins, epochs=epochs,
                 batch_size=16, seed=0)
    return s, bench


class Spy:
    """Records the held-out set of each experience and every row the model trained on."""

    def __init__(self, bic):
        self.bic, self.held, self.trained = bic, {}, {}

    @hookimpl
    def before_training_exp(self, strategy):
        i = strategy.experience.index
        self.held[i] = None if self.bic.held is None else (self.bic.held, self.bic.held_classes)
        self.trained[i] = []

    @hookimpl
    def after_forward(self, strategy):
        self.trained[strategy.experience.index].append(strategy.batch.x.clone())


def test_the_held_out_set_is_class_balanced_and_kept_out_of_training():
    replay, bic = Replay(memory=24), BiasCorrection(ratio=0.25)
    spy = Spy(bic)
    s, bench = build([replay, LwFDistill(), bic, spy])
    memories = []
    for e in bench.train_stream:
        memories.append(None if replay.memory is None else replay.memory.batch().select(slice(None)).cat())
        s.train(e)
    assert spy.held[0] is None  # no old classes yet: nothing held out, no pair
    for i, (old, new, k) in ((1, ([0, 1], [2, 3], 3)), (2, ([0, 1, 2, 3], [4, 5], 2))):
        held, classes = spy.held[i]
        assert classes == (old, new)
        # k = round(ratio * exemplars of the fewest old class): 24 / 2 = 12 -> 3, then 24 / 4 = 6 -> 1.5, rounded to 2
        assert torch.bincount(held.y, minlength=6).tolist() == [k if c in old + new else 0 for c in range(6)]
        exemplars, data = memories[i], bench.train_stream[i].dataset
        keys_mem, keys_new = row_keys(exemplars.x), row_keys(data.x)
        is_old = torch.isin(held.y, torch.tensor(old))
        old_rows, new_rows = held.x[is_old], held.x[~is_old]
        assert is_held(old_rows, exemplars.x, keys_mem).all() and is_held(new_rows, data.x, keys_new).all()
        trained = torch.cat(spy.trained[i])
        assert not is_held(trained, held.x, row_keys(held.x)).any()  # neither the experience's rows nor replayed ones
        assert is_held(trained, exemplars.x, keys_mem).any()  # replay did join (the other exemplars)
        # every other sample of the experience was trained on
        rest = data.x[~is_held(data.x, held.x, row_keys(held.x))]
        assert len(rest) == len(data.x) - len(new) * k
        assert is_held(rest, trained, row_keys(trained)).all()
    assert [(p["experience"], p["classes"]) for p in bic.pairs] == [(1, [2, 3]), (2, [4, 5])]
    assert bic.held is None  # the held-out set lives only while its experience trains


def test_a_real_run_fits_a_pair_per_experience_after_the_first_and_uncorrected_passes_through():
    logits = []

    class Eval:
        @hookimpl
        def after_eval_forward(self, strategy):
            logits.append((strategy.output.raw.clone(), strategy.output.logits.clone()))

    bic = BiasCorrection()
    s, bench = build([Replay(memory=30), LwFDistill(), bic, Eval()])
    for e in bench.train_stream:
        s.train(e)
    assert [p["experience"] for p in bic.pairs] == [1, 2]
    assert all(math.isfinite(p["alpha"]) and math.isfinite(p["beta"]) for p in bic.pairs)
    s.eval(bench.test_stream)
    n = len(logits)
    assert s.corrects  # BiC implements set_correction: the runner also evaluates it uncorrected
    with s.uncorrected():
        s.eval(bench.test_stream)
    s.eval(bench.test_stream)  # switched back on
    assert len(logits) == 3 * n
    for raw, out in logits[:n] + logits[2 * n:]:
        assert torch.equal(out, correct(raw, bic.pairs))
    for raw, out in logits[n:2 * n]:
        assert torch.equal(out, raw)


def test_each_pair_is_fitted_on_the_frozen_models_own_logits_with_the_earlier_pairs_applied():
    fits = []

    class Frozen:  # listed before BiC: sees the model BiC fits on, and the pairs before the new one
        def __init__(self, bic):
            self.bic = bic

        @hookimpl
        def after_training_exp(self, strategy):
            if self.bic.held is None:  # the first experience: nothing held out, no pair
                return
            held, (old, new) = self.bic.held, self.bic.held_classes
            model = strategy.model
            model.eval()
            with torch.no_grad():
                z = model(held.x)  # the bare model: no adapt_logits
            model.train()
            fits.append(fit_pair(correct(z, [dict(p) for p in self.bic.pairs]), held.y, old, new))

    bic = BiasCorrection()
    s, bench = build([Replay(memory=30), LwFDistill(), Frozen(bic), bic])
    for e in bench.train_stream:
        s.train(e)
    assert len(fits) == 2 and len(bic.pairs) == 2
    assert bic.pairs[0]["alpha"] != 1.0  # a real fit, and the second one saw the first pair
    for (alpha, beta), pair in zip(fits, bic.pairs):
        assert (pair["alpha"], pair["beta"]) == pytest.approx((alpha, beta), abs=1e-6)


# ----------------------------------------------------------------------------- refusals and state
def test_refusals():
    for ratio in (0, 1, -0.1, True, "0.1", float("nan")):
        with pytest.raises(ConfigError, match="ratio"):
            BiasCorrection(ratio=ratio)
    with pytest.raises(PluginError, match="needs a plugin that owns the role 'memory'"):
        build([BiasCorrection()])

    class NoMemory:  # owns the role but keeps no replay memory
        owns = frozenset({"memory"})

    with pytest.raises(ConfigError, match=r"NoMemory.*owns 'memory' but keeps no replay memory \(\.memory\)"):
        build([NoMemory(), BiasCorrection()])  # refused by the setup hook, when the Strategy is built


def test_state_round_trip():
    replay, bic = Replay(memory=24), BiasCorrection()
    s, bench = build([replay, bic])
    s.train(bench.train_stream[0])
    s.experience = bench.train_stream[1]
    bic.before_training_exp(strategy=s)  # as inside experience 1: a held-out set
    bic.pairs = [dict(PAIRS[0])]
    state = bic.state_dict()
    copy = BiasCorrection()
    copy.load_state_dict(state)
    assert copy.pairs == bic.pairs and copy.held_classes == bic.held_classes
    assert all(torch.equal(a, b) for a, b in zip(copy.held, bic.held))
    bic.held.x.add_(1.0)
    bic.pairs[0]["alpha"] = 3.0
    assert not torch.equal(copy.held.x, bic.held.x) and copy.pairs[0]["alpha"] == 0.5  # nothing shared


# ----------------------------------------------------------------------------- stage 1's loss (eq. 1-3)
def hand_corrected(z, pairs):
    z = z.clone()
    for p in pairs:
        z[:, p["classes"]] = p["alpha"] * z[:, p["classes"]] + p["beta"]
    return z


def test_the_bic_recipe_distils_with_bics_own_loss_and_distill_lwf_keeps_the_earlier_form():
    replay, bic = RECIPES["bic"].plugins()
    assert isinstance(bic, BiasCorrection) and bic.distill and bic.temperature == 2.0 and bic.weighting == "relative"
    assert "logit_distillation" in bic.owns and not BiasCorrection().owns  # another distiller beside it is refused
    old_form = RECIPES["bic"].plugins(distill="lwf")
    assert [type(p).__name__ for p in old_form] == ["Replay", "LwFDistill", "BiasCorrection"]
    assert not old_form[2].distill and not old_form[1].replayed and old_form[1].weight == 1.0
    with pytest.raises(ConfigError, match="distill"):
        RECIPES["bic"].plugins(distill="new")
    with pytest.raises(ConfigError, match="distill"):
        BiasCorrection(distill="yes")
    with pytest.raises(ConfigError, match="temperature"):
        BiasCorrection(temperature=0)
    with pytest.raises(ConfigError, match="weighting"):
        BiasCorrection(weighting="none")


@pytest.mark.parametrize("weighting", ["relative", "paper"])
def test_stage_one_loss_by_hand_on_a_minibatch_with_exemplars(weighting):
    """Eq. 1-3: the distillation covers every row (exemplars too), the teacher's and the student's old-class logits
    both go through the pairs fitted so far, lambda = n / (n + m) weighs it and 1 - lambda the cross-entropy.
    LwF's form (the experience's own rows, uncorrected logits, unweighted cross-entropy) gives other values."""
    checked = []

    class Check:
        def __init__(self, bic):
            self.bic = bic

        @hookimpl
        def after_forward(self, strategy):
            bic, batch, out = self.bic, strategy.batch, strategy.output
            if bic.teacher is None or strategy.experience.index != 2 or len(batch) == strategy.n_current:
                return
            old, lam, T = [0, 1, 2, 3], 4 / 6, 2.0  # 4 old classes, 2 new
            scale = lam if bic.weighting == "paper" else lam / (1 - lam)
            with torch.no_grad():
                z_t = bic.teacher(batch.x)
            student = hand_corrected(out.raw.detach(), bic.pairs)[:, old] / T
            p = torch.softmax(hand_corrected(z_t, bic.pairs)[:, old] / T, 1)
            kl_rows = (p * (p.log() - torch.log_softmax(student, 1))).sum(1)
            term = bic.loss_terms(strategy=strategy, batch=batch, output=out)["bic_distill"].detach()
            assert float(term) == pytest.approx(scale * float(kl_rows.mean()), rel=1e-5, abs=1e-7)
            assert float(term) != pytest.approx(scale * float(kl_rows[:strategy.n_current].mean()), rel=1e-3)
            uncorrected = torch.softmax(z_t[:, old] / T, 1)
            kl_raw = (uncorrected * (uncorrected.log() - torch.log_softmax(out.raw.detach()[:, old] / T, 1))).sum(1)
            assert float(term) != pytest.approx(scale * float(kl_raw.mean()), rel=1e-3)
            ce = F.cross_entropy(out.logits.detach(), batch.y)
            if bic.weighting == "paper":  # (1 - lambda) L_c + lambda L_d
                task = bic.task_loss(strategy=strategy, loss=None, output=out, batch=batch).detach()
                assert float(task) == pytest.approx((1 - lam) * float(ce), rel=1e-6)
            else:  # L_c + lambda / (1 - lambda) L_d: the task loss as it is
                assert bic.task_loss(strategy=strategy, loss=None, output=out, batch=batch) is None
            checked.append(len(batch) - strategy.n_current)

    replay, bic = RECIPES["bic"].plugins(memory=30, weighting=weighting)
    assert bic.weighting == weighting
    s, bench = build([replay, bic, Check(bic)])
    for e in bench.train_stream:
        s.train(e)
    assert checked and all(n > 0 for n in checked)  # minibatches with exemplars were checked
    assert [p["experience"] for p in bic.pairs] == [1, 2] and bic.pairs[0]["alpha"] != 1.0  # a real correction
    assert bic.teacher is None  # the teacher lives while its experience trains


def test_stage_one_loss_is_off_in_the_first_experience_and_without_new_classes():
    bic = BiasCorrection(distill=True)
    s, bench = build([Replay(memory=24), bic])
    s.experience = bench.train_stream[0]
    bic.before_training_exp(strategy=s)
    assert bic.teacher is None and bic.task_loss(strategy=s, loss=torch.tensor(2.0), output=None, batch=None) == 2.0
    s.train(bench.train_stream[0])
    s.experience = bench.train_stream[0]  # its classes again: nothing new, no lambda
    bic.before_training_exp(strategy=s)
    assert bic.teacher is None
    s.experience = bench.train_stream[1]
    bic.before_training_exp(strategy=s)
    assert bic.teacher is not None and bic.old == [0, 1] and bic.lam == 0.5
    copy = BiasCorrection(distill=True)
    copy.load_state_dict(bic.state_dict())  # a resume inside the experience keeps the teacher
    assert copy.old == [0, 1] and copy.lam == 0.5
    assert all(torch.equal(a, b) for a, b in zip(copy.teacher.state_dict().values(),
                                                  bic.teacher.state_dict().values()))


def test_an_experience_with_no_new_class_is_warned_about_once():
    s, bench = build([Replay(memory=12), BiasCorrection()])
    warns_once_when_no_class_is_new(s, bench, "bias_correction: experience 1 brings no class not seen before")
