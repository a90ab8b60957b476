import pytest
import torch

from streamcl.metrics import EvalCounts, Metrics, backward_transfer, final_accuracy, forgetting, pooled_accuracy
from streamcl.scenarios import Experience

R = [[0.9, 0.0, 0.0],
     [0.5, 0.8, 0.0],
     [0.3, 0.6, 0.7]]


def test_matrix_metrics_by_hand():
    assert final_accuracy(R) == pytest.approx((0.3 + 0.6 + 0.7) / 3)
    # forgetting: j=0: max(0.9, 0.5) - 0.3 = 0.6; j=1: max(0.0, 0.8) - 0.6 = 0.2
    assert forgetting(R) == pytest.approx((0.6 + 0.2) / 2)
    # bwt: (0.3 - 0.9 + 0.6 - 0.8) / 2
    assert backward_transfer(R) == pytest.approx(-0.4)
    assert forgetting(R[:1]) is None and backward_transfer(R[:1]) is None


def counts(exp, correct, total, n=4):
    c, t = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    for k, v in correct.items():
        c[k] = v
    for k, v in total.items():
        t[k] = v
    return EvalCounts(exp, c, t)


def test_pooled_accuracy_weights_by_samples():
    cs = [counts(0, {0: 3}, {0: 4}), counts(1, {2: 1}, {2: 6})]
    assert pooled_accuracy(cs, {0, 1}) == pytest.approx(4 / 10)
    assert pooled_accuracy(cs, {1}) == pytest.approx(1 / 6)
    assert pooled_accuracy(cs, set()) is None


class FakeStrategy:
    def __init__(self, trained, results):
        self.trained, self.eval_results = trained, results


def test_metrics_plugin_rows_incremental_and_old_new():
    e0 = Experience(0, None, (0, 1), 4)
    e1 = Experience(1, None, (2, 3), 4)
    m = Metrics()
    m.after_eval(FakeStrategy([], [counts(0, {}, {0: 1})]))  # before any training: no row
    assert m.matrix == []
    m.after_eval(FakeStrategy([e0], [counts(0, {0: 8}, {0: 10}), counts(1, {}, {2: 10})]))
    m.after_eval(FakeStrategy([e0, e1], [counts(0, {0: 4}, {0: 10}), counts(1, {2: 9}, {2: 10})]))
    s = m.summary()
    assert s["accuracy_matrix"] == [[0.8, 0.0], [0.4, 0.9]]
    # seen after exp 0: test exp 0 only (0.8); after exp 1: both, 13/20
    assert s["seen_accuracy"] == [0.8, pytest.approx(0.65)]
    assert s["avg_incremental_accuracy"] == pytest.approx((0.8 + 0.65) / 2)
    assert s["old_accuracy"] == [None, 0.4] and s["new_accuracy"] == [0.8, 0.9]
    # a second eval after the same experience replaces the row
    m.after_eval(FakeStrategy([e0, e1], [counts(0, {0: 5}, {0: 10}), counts(1, {2: 9}, {2: 10})]))
    assert m.summary()["accuracy_matrix"] == [[0.8, 0.0], [0.5, 0.9]]


def test_joined_experience_covers_all_of_the_stream():
    e = Experience(0, None, (0, 1, 2, 3), 4, covers=(0, 1))
    m = Metrics()
    m.after_eval(FakeStrategy([e], [counts(0, {0: 5}, {0: 10}), counts(1, {2: 10}, {2: 10})]))
    assert m.summary()["seen_accuracy"] == [0.75]


def test_a_correction_plugin_is_also_measured_switched_off():
    """runner.evaluate: plugins with an ``uncorrected()`` context get a second evaluation without their correction."""
    import contextlib

    import torch

    from streamcl import Plugin, Strategy, hookimpl
    from streamcl.models import MLP
    from streamcl.runner import evaluate
    from tests.synthetic import tiny_benchmark

    class Newest(Plugin):
        """Predicts the newest experience's first class for every sample unless switched off."""

        on = True

        @hookimpl
        def adapt_logits(self, strategy, logits):
            if not self.on or strategy.is_training:
                return logits
            out = torch.zeros_like(logits)
            out[:, strategy.trained[-1].classes[0]] = 1.0
            return out

        @contextlib.contextmanager
        def uncorrected(self):
            self.on = False
            try:
                yield
            finally:
                self.on = True

    torch.manual_seed(0)
    bench = tiny_benchmark(4, 2)
    model = MLP(8, [16], 4)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[Newest()], batch_size=16, seed=0)
    for exp in bench.train_stream:
        s.train(exp)
        evaluate(s, bench.test_stream)
    summary = s.metrics.summary()
    assert summary["old_accuracy"][-1] == 0.0 and summary["new_accuracy"][-1] == 0.5  # one of two new classes
    assert len(summary["accuracy_matrix"]) == 2  # the corrected evaluation replaced the uncorrected one
    plugin = s.plugins[0]
    with plugin.uncorrected():
        plain = s.eval(bench.test_stream)["accuracy"]  # equal-sized test experiences: old = exp 0, new = exp 1
    before = summary["uncorrected"]
    assert before["old_accuracy"] == [None, plain[0]] and before["new_accuracy"][-1] == plain[1]
    assert before["final_accuracy"][-1] == sum(plain) / 2 != summary["final_accuracy"]
