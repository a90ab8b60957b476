import json

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
    """What ``Metrics.after_eval`` reads of a strategy, at a recording evaluation after training."""

    def __init__(self, trained, results, recording=True):
        self.trained, self.eval_results = trained, results
        self.recording, self.is_training, self.global_step, self.epoch = recording, False, 0, 0


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
    # a second eval after the same experience replaces the cells it measured
    m.after_eval(FakeStrategy([e0, e1], [counts(0, {0: 5}, {0: 10}), counts(1, {2: 9}, {2: 10})]))
    assert m.summary()["accuracy_matrix"] == [[0.8, 0.0], [0.5, 0.9]]


def test_joined_experience_covers_all_of_the_stream():
    e = Experience(0, None, (0, 1, 2, 3), 4, covers=(0, 1))
    m = Metrics()
    m.after_eval(FakeStrategy([e], [counts(0, {0: 5}, {0: 10}), counts(1, {2: 10}, {2: 10})]))
    assert m.summary()["seen_accuracy"] == [0.75]


def test_a_correction_plugin_is_also_measured_switched_off():
    """runner.evaluate: with plugins that implement ``set_correction``, a first evaluation without the correction."""
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

        @hookimpl
        def set_correction(self, strategy, active):
            self.on = active

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
    with s.uncorrected():
        plain = s.eval(bench.test_stream)["accuracy"]  # equal-sized test experiences: old = exp 0, new = exp 1
    before = summary["uncorrected"]
    assert before["old_accuracy"] == [None, plain[0]] and before["new_accuracy"][-1] == plain[1]
    assert before["final_accuracy"][-1] == sum(plain) / 2 != summary["final_accuracy"]


# ----------------------------------------------------------------------------- rows by training state
def exps(n, n_classes=None):
    """Train experiences 0..n-1 of one class each, covering the test experience of the same index."""
    return [Experience(i, None, (i,), n_classes or n) for i in range(n)]


def accs(n_classes, correct: dict[int, int], total=10):
    """EvalCounts for test experiences ``correct``'s keys (one class each): that many right out of ``total``."""
    return [counts(j, {j: c}, {j: total}, n_classes) for j, c in correct.items()]


def test_unknown_cells_and_learned_rows_by_hand():
    R = [[0.9, None, None],
         [0.6, 0.8, None],
         [0.3, 0.7, 0.9]]
    assert final_accuracy(R) == pytest.approx((0.3 + 0.7 + 0.9) / 3)
    # j=0: max(0.9, 0.6) - 0.3 = 0.6; j=1: only row 1 known, 0.8 - 0.7 = 0.1
    assert forgetting(R) == pytest.approx((0.6 + 0.1) / 2)
    assert backward_transfer(R) == pytest.approx((0.3 - 0.9 + 0.7 - 0.8) / 2)
    assert final_accuracy([[None, 0.5, None]]) == 0.5
    # test experience 1 learned at row 0 and 0 at row 1 (trained in the order 1, 0)
    R = [[0.1, 0.9],
         [0.8, 0.5]]
    learned = {1: 0, 0: 1}
    assert forgetting(R, learned) == pytest.approx(0.4) and backward_transfer(R, learned) == pytest.approx(-0.4)
    # nothing qualifies: a just-learned cell that was never measured
    assert backward_transfer([[None, None], [0.5, 0.5]]) is None
    assert forgetting([[None, None], [0.5, 0.5]]) is None


def test_evaluating_only_the_seen_experiences_by_hand():
    """After experience i, evaluate test experiences 0..i only: no IndexError, cells above the diagonal are None."""
    e = exps(3)
    m = Metrics()
    m.after_eval(FakeStrategy(e[:1], accs(3, {0: 9})))
    m.after_eval(FakeStrategy(e[:2], accs(3, {0: 6, 1: 8})))
    m.after_eval(FakeStrategy(e[:3], accs(3, {0: 3, 1: 7, 2: 9})))
    s = m.summary()
    assert s["accuracy_matrix"] == [[0.9, None, None], [0.6, 0.8, None], [0.3, 0.7, 0.9]]
    assert s["final_accuracy"] == pytest.approx((0.3 + 0.7 + 0.9) / 3)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.7)) / 2)
    assert s["bwt"] == pytest.approx(((0.3 - 0.9) + (0.7 - 0.8)) / 2)
    assert s["seen_accuracy"] == [0.9, pytest.approx(14 / 20), pytest.approx(19 / 30)]
    assert s["old_accuracy"] == [None, 0.6, pytest.approx(10 / 20)] and s["new_accuracy"] == [0.9, 0.8, 0.9]
    assert json.loads(json.dumps(s))["accuracy_matrix"][0] == [0.9, None, None]  # JSON null


def test_a_skipped_evaluation_gives_the_right_bwt_by_hand():
    """No evaluation after experience 0: row 0 stays unknown, and experience 1's BWT is measured
    from row 1 (right after it was trained), not from the second row ever recorded."""
    e = exps(3)
    m = Metrics()
    m.after_eval(FakeStrategy(e[:2], accs(3, {0: 4, 1: 9, 2: 0})))
    m.after_eval(FakeStrategy(e[:3], accs(3, {0: 2, 1: 5, 2: 10})))
    s = m.summary()
    assert s["accuracy_matrix"] == [[None, None, None], [0.4, 0.9, 0.0], [0.2, 0.5, 1.0]]
    # j=0 was learned at row 0, never measured: left out. j=1: 0.5 - 0.9.
    assert s["bwt"] == pytest.approx(-0.4)  # a row-per-call matrix gives 0.2 - 0.4 = -0.2
    # forgetting: j=0: 0.4 - 0.2; j=1: 0.9 - 0.5
    assert s["forgetting"] == pytest.approx((0.2 + 0.4) / 2)
    assert s["seen_accuracy"] == [None, pytest.approx(13 / 20), pytest.approx(17 / 30)]
    assert s["avg_incremental_accuracy"] == pytest.approx((13 / 20 + 17 / 30) / 2)
    assert s["old_accuracy"][-1] == pytest.approx(7 / 20) and s["new_accuracy"][-1] == 1.0
    assert m.recorded(2) and m.recorded(3) and not m.recorded(1)


def test_training_out_of_order_uses_covers_not_the_row_number():
    e0, e1 = exps(2)
    m = Metrics()
    m.after_eval(FakeStrategy([e1], accs(2, {0: 1, 1: 9})))
    m.after_eval(FakeStrategy([e1, e0], accs(2, {0: 8, 1: 5})))
    s = m.summary()
    assert s["accuracy_matrix"] == [[0.1, 0.9], [0.8, 0.5]]
    assert s["forgetting"] == pytest.approx(0.4) and s["bwt"] == pytest.approx(-0.4)  # test exp 1 only
    assert s["old_accuracy"] == [None, 0.5] and s["new_accuracy"] == [0.9, 0.8]


def test_two_partial_evaluations_after_one_experience_fill_one_row():
    e = exps(3)
    m = Metrics()
    m.after_eval(FakeStrategy(e[:2], accs(3, {0: 7})))
    m.after_eval(FakeStrategy(e[:2], accs(3, {1: 9})))
    assert m.summary()["accuracy_matrix"] == [[None, None], [0.7, 0.9]]
    m.after_eval(FakeStrategy(e[:2], accs(3, {0: 6})))  # measured again: updated; column 1 kept
    assert m.summary()["accuracy_matrix"] == [[None, None], [0.6, 0.9]]
    assert m.summary()["seen_accuracy"] == [None, pytest.approx(15 / 20)]
    m.after_eval(FakeStrategy(e[:3], accs(3, {2: 10})))
    s = m.summary()
    assert s["accuracy_matrix"] == [[None, None, None], [0.6, 0.9, None], [None, None, 1.0]]
    assert s["final_accuracy"] == 1.0 and s["forgetting"] is None and s["bwt"] is None
    assert s["seen_accuracy"][-1] is None  # test experiences 0 and 1 not measured after experience 2


def test_non_recording_evaluations_are_periodic_not_in_the_matrix():
    e = exps(2)
    m = Metrics()
    m.after_eval(FakeStrategy(e[:1], accs(2, {0: 9, 1: 0})))
    before = m.summary()
    periodic = FakeStrategy(e[:1], accs(2, {0: 5, 1: 3}), recording=False)
    periodic.global_step, periodic.epoch = 42, 1
    m.after_eval(periodic)
    s = m.summary()
    assert s["accuracy_matrix"] == before["accuracy_matrix"] and "periodic" not in before
    assert s["periodic"] == [{"step": 42, "trained": 1, "epoch": 1, "accuracy": {0: 0.5, 1: 0.3}}]
    # without a ``recording`` attribute (an engine before it existed), training in progress means periodic
    inside = FakeStrategy(e[:1], accs(2, {0: 1}))
    del inside.recording
    inside.is_training = True
    m.after_eval(inside)
    assert len(m.periodic) == 2 and m.summary()["accuracy_matrix"] == before["accuracy_matrix"]


def plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, (int, str)) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (int, float, str, bool))


def test_state_dict_is_plain_and_resumes_exactly():
    from streamcl.checkpoint import CheckpointError

    e = exps(3)
    m = Metrics()
    m.after_eval(FakeStrategy(e[:2], accs(3, {0: 4, 1: 9})))
    m.note_uncorrected()
    m.after_eval(FakeStrategy(e[:2], accs(3, {0: 5, 1: 9})))
    m.after_eval(FakeStrategy(e[:2], accs(3, {2: 1}), recording=False))
    state = m.state_dict()
    assert plain(state)
    again = Metrics()
    again.load_state_dict(state)
    assert again.summary() == m.summary() and again.state_dict() == state
    for later in (m, again):  # both go on alike, and neither shares lists with the other
        later.after_eval(FakeStrategy(e[:3], accs(3, {0: 3, 1: 8, 2: 7})))
    assert again.summary() == m.summary() and state["cells"] == {2: {0: [5, 10], 1: [9, 10]}}
    assert 3 not in state["cells"]
    with pytest.raises(CheckpointError, match="older streamcl"):
        Metrics().load_state_dict({"matrix": [[0.5]], "rows_of": [1]})


# ----------------------------------------------------------------------------- real runs
def tiny_strategy(n_classes=6, **kwargs):
    from streamcl import Strategy
    from streamcl.models import MLP

    torch.manual_seed(0)
    model = MLP(8, [16], n_classes)
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=16, seed=0, **kwargs)


def test_real_run_evaluating_the_seen_experiences_only():
    from tests.synthetic import tiny_benchmark

    bench = tiny_benchmark(6, 3)
    s = tiny_strategy()
    rows = []
    for i, exp in enumerate(bench.train_stream):
        s.train(exp)
        rows.append(s.eval(bench.test_stream[:i + 1])["accuracy"])  # no IndexError
    a = rows
    res = s.metrics.summary()
    assert res["accuracy_matrix"] == [[a[0][0], None, None], [a[1][0], a[1][1], None], a[2]]
    assert res["final_accuracy"] == pytest.approx(sum(a[2]) / 3)
    assert res["forgetting"] == pytest.approx((max(a[0][0], a[1][0]) - a[2][0] + a[1][1] - a[2][1]) / 2)
    assert res["bwt"] == pytest.approx((a[2][0] - a[0][0] + a[2][1] - a[1][1]) / 2)
    assert len(res["seen_accuracy"]) == 3 and None not in res["seen_accuracy"]


def test_real_run_with_a_skipped_evaluation():
    from tests.synthetic import tiny_benchmark

    bench = tiny_benchmark(6, 3)
    s = tiny_strategy()
    s.train(bench.train_stream[0])  # no evaluation after experience 0
    s.train(bench.train_stream[1])
    a1 = s.eval(bench.test_stream)["accuracy"]
    s.train(bench.train_stream[2])
    a2 = s.eval(bench.test_stream)["accuracy"]
    res = s.metrics.summary()
    assert res["accuracy_matrix"] == [[None] * 3, a1, a2]
    # BWT: test experience 0's just-learned cell (row 0) is unknown, so only test experience 1 counts
    assert res["bwt"] == pytest.approx(a2[1] - a1[1])
    assert res["forgetting"] == pytest.approx((a1[0] - a2[0] + a1[1] - a2[1]) / 2)
    assert res["seen_accuracy"][0] is None and None not in res["seen_accuracy"][1:]


def test_eval_inside_training_never_changes_the_matrix(tmp_path):
    from streamcl import Plugin, hookimpl
    from streamcl.loggers import TensorBoardLogger
    from tests.synthetic import tiny_benchmark
    from tests.test_tensorboard import read_events

    class EvalEachEpoch(Plugin):
        stream = None

        @hookimpl
        def after_training_epoch(self, strategy):
            strategy.eval(self.stream)

    bench = tiny_benchmark(4, 2)
    plain_run = tiny_strategy(4, epochs=2)
    peek = EvalEachEpoch()
    peek.stream = bench.test_stream
    s = tiny_strategy(4, epochs=2, plugins=[peek], loggers=[TensorBoardLogger(tmp_path)])
    for exp in bench.train_stream:
        for strategy in (plain_run, s):
            strategy.train(exp)
            strategy.eval(bench.test_stream)
    s.close()
    res, ref = s.metrics.summary(), plain_run.metrics.summary()
    assert res["accuracy_matrix"] == ref["accuracy_matrix"] and len(res["accuracy_matrix"]) == 2
    assert {k: v for k, v in res.items() if k != "periodic"} == ref
    steps = [3, 6, 9, 12]  # 40 samples an experience, batch 16: 3 steps an epoch
    when = [(p["step"], p["trained"], p["epoch"]) for p in res["periodic"]]
    assert when == [(3, 0, 0), (6, 0, 1), (9, 1, 0), (12, 1, 1)]
    assert all(set(p["accuracy"]) == {0, 1} for p in res["periodic"])
    events = read_events(tmp_path)
    assert [e.step for e in events.Scalars("periodic/exp1")] == steps
    assert [e.value for e in events.Scalars("periodic/mean")] == pytest.approx(
        [sum(p["accuracy"].values()) / 2 for p in res["periodic"]], abs=1e-6)
    assert [e.step for e in events.Scalars("accuracy/exp0")] == [0, 1]
    assert [e.step for e in events.Scalars("accuracy/mean")] == [0, 1]


def test_engine_periodic_evaluation_every_n_epochs():
    from tests.synthetic import tiny_benchmark

    bench = tiny_benchmark(4, 2)
    s = tiny_strategy(4, epochs=4, eval_every=2, eval_stream=bench.test_stream)
    for exp in bench.train_stream:
        s.train(exp)
        s.eval(bench.test_stream)
    res = s.metrics.summary()
    assert len(res["accuracy_matrix"]) == 2
    when = [(p["step"], p["trained"], p["epoch"]) for p in res["periodic"]]
    assert when == [(6, 0, 1), (12, 0, 3), (18, 1, 1), (24, 1, 3)]  # after epochs 2 and 4 of each experience


def test_record_false_is_periodic_not_in_the_matrix():
    from tests.synthetic import tiny_benchmark

    bench = tiny_benchmark(4, 2)
    s = tiny_strategy(4)
    s.train(bench.train_stream[0])
    s.eval(bench.test_stream)
    before = s.metrics.summary()
    validation = s.eval(bench.test_stream[:1], record=False)["accuracy"]
    res = s.metrics.summary()
    assert res["accuracy_matrix"] == before["accuracy_matrix"]
    assert res["periodic"] == [{"step": s.global_step, "trained": 1, "epoch": 0, "accuracy": {0: validation[0]}}]


def test_loggers_show_unknown_cells():
    import io

    from streamcl.loggers import ConsoleLogger
    from streamcl.loggers.tensorboard import matrix_markdown
    from tests.synthetic import tiny_benchmark

    R = [[0.0, None], [1.0, 0.5]]
    assert matrix_markdown(R).splitlines()[2] == "| exp 0 | 0.000 | - |"

    out = io.StringIO()
    bench = tiny_benchmark(4, 2)
    s = tiny_strategy(4, loggers=[ConsoleLogger(out)])
    s.train(bench.train_stream[0])
    s.eval(bench.test_stream[1:])
    s.close()
    text = out.getvalue()
    assert "accuracy per experience: - " in text and "final accuracy" in text
