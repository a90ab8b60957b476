import pytest
import torch

from streamcl import Batch, DataError, Plugin, PluginError, Strategy, hookimpl
from streamcl.models import MLP, IncrementalLinear
from streamcl.scenarios import Experience, TensorData
from tests.synthetic import tiny_benchmark


def make(plugins=(), growing=False, lr=0.1, **kwargs):
    torch.manual_seed(0)
    model = MLP(8, [16], 4, growing=growing)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    kwargs.setdefault("epochs", 5)
    return Strategy(model, opt, plugins=plugins, batch_size=16, seed=0, **kwargs)


class Recorder(Plugin):
    def __init__(self, tag, log):
        self.tag, self.log = tag, log

    @hookimpl
    def before_training_exp(self, strategy):
        self.log.append(self.tag)

    @hookimpl
    def adapt_logits(self, logits):
        self.log.append(f"logits:{self.tag}")
        return logits


def test_plugins_run_in_list_order_and_engine_plugins_last():
    log = []

    class Engine:
        @hookimpl
        def before_training_exp(self, strategy):
            log.append("logger")

    s = make([Recorder("a", log), Recorder("b", log), Recorder("c", log)], loggers=[Engine()])
    s.train(tiny_benchmark().train_stream[0])
    assert log[:4] == ["a", "b", "c", "logger"]
    assert log[4:7] == ["logits:a", "logits:b", "logits:c"]


def test_transforms_chain_in_plugin_order():
    class Add(Plugin):
        @hookimpl
        def adapt_logits(self, logits):
            return logits + 1

    class Double(Plugin):
        @hookimpl
        def adapt_logits(self, logits):
            return logits * 2

    batch = Batch(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    plain = make().forward(batch).logits
    assert torch.allclose(make([Add(), Double()]).forward(batch).logits, (plain + 1) * 2)
    assert torch.allclose(make([Double(), Add()]).forward(batch).logits, plain * 2 + 1)


class L2(Plugin):
    def __init__(self, name="l2", weight=1e-3):
        self.name_, self.weight = name, weight

    @hookimpl
    def loss_terms(self, strategy):
        return {self.name_: self.weight * sum(p.pow(2).sum() for p in strategy.model.parameters())}


def test_loss_terms_are_added_and_kept_by_name():
    seen = {}

    class Spy(Plugin):
        @hookimpl
        def after_training_iteration(self, strategy):
            seen.update({k: float(v.detach()) for k, v in strategy.loss_terms.items()}, total=float(strategy.loss.detach()))

    s = make([L2(), Spy()])
    s.train(tiny_benchmark().train_stream[0])
    assert set(seen) == {"task", "l2", "total"} and seen["l2"] > 0
    assert seen["total"] == pytest.approx(seen["task"] + seen["l2"], rel=1e-6)


def test_two_loss_terms_with_one_name_are_refused():
    with pytest.raises(PluginError, match="'l2'"):
        make([L2(), L2()]).train(tiny_benchmark().train_stream[0])


def test_two_owners_of_a_role_fail_at_construction_naming_both():
    class HeadA(Plugin):
        owns = frozenset({"classifier"})

    class HeadB(Plugin):
        owns = frozenset({"classifier", "sampler"})

    with pytest.raises(PluginError, match=r"HeadA\(\) and HeadB\(\) both own the role 'classifier'"):
        make([HeadA(), HeadB()])
    make([HeadA()])  # alone it is fine


def test_misspelled_and_unmarked_hooks_are_rejected():
    class Typo:
        @hookimpl
        def after_trainig_exp(self, strategy):
            pass

    class Unmarked:
        def after_training_exp(self, strategy):
            pass

    with pytest.raises(PluginError, match="after_trainig_exp"):
        make([Typo()])
    with pytest.raises(PluginError, match="after_training_exp without @streamcl.hookimpl"):
        make([Unmarked()])


def test_a_hook_argument_the_spec_lacks_is_named_without_internal_names():
    class BadParam:
        @hookimpl
        def before_training_exp(self, strategy, nonsense):
            pass

    with pytest.raises(PluginError, match=r"^plugin bad_param \(BadParam\): hook 'before_training_exp'.*'nonsense'") as err:
        make([BadParam()])
    assert "1:" not in str(err.value)


def test_replay_batch_and_train_data_contributions():
    bench = tiny_benchmark()
    sizes = []

    class Extra(Plugin):
        @hookimpl
        def replay_batch(self, batch):
            return Batch(batch.x[:2], batch.y[:2], batch.t[:2])

        @hookimpl
        def train_data(self, experience):
            return bench.train_stream[0].dataset if experience.index == 1 else None

        @hookimpl
        def before_forward(self, strategy):
            sizes.append(len(strategy.batch))

    s = make([Extra()])
    s.train(bench.train_stream[1])
    # 40 samples of experience 1 + 40 joined from experience 0 = 80 = 5 batches of 16, each +2 replayed
    assert sizes == [18] * 5 * s.epochs


def test_param_groups_set_per_module_learning_rates():
    class SlowBackbone(Plugin):
        @hookimpl
        def param_groups(self, model):
            return [{"params": list(model.backbone.parameters()), "lr": 0.001}]

    s = make([SlowBackbone()])
    s.train(tiny_benchmark().train_stream[0])
    assert sorted(g["lr"] for g in s.optimizer.param_groups) == [0.001, 0.1]
    backbone = {id(p) for p in s.model.backbone.parameters()}
    for g in s.optimizer.param_groups:
        assert all((id(p) in backbone) == (g["lr"] == 0.001) for p in g["params"])


def test_growing_head_grows_and_optimizer_follows():
    bench = tiny_benchmark()
    s = make(growing=True)
    head = s.model.head
    assert isinstance(head, IncrementalLinear) and head.out_features == 0
    s.train(bench.train_stream[0])
    assert s.model.head.out_features == 2
    old_rows = s.model.head.weight.detach().clone()
    first_layer = s.model.backbone[1].weight
    momentum = s.optimizer.state[first_layer]["momentum_buffer"].clone()
    s.train(bench.train_stream[1])
    assert s.model.head.out_features == 4
    opt_params = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in s.model.parameters()}
    assert not torch.equal(s.model.head.weight[:2].detach(), old_rows)  # old rows kept training, from their values
    assert s.optimizer.state[first_layer]["momentum_buffer"].shape == momentum.shape
    assert s.eval(bench.test_stream)["accuracy"][1] > 0.5


def test_empty_experience_is_refused():
    empty = Experience(0, TensorData(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), (0,), 4)
    with pytest.raises(DataError, match="empty"):
        make().train(empty)


def test_eval_reports_matrix_and_same_seed_gives_same_numbers():
    def run():
        bench = tiny_benchmark()
        s = make()
        for exp in bench.train_stream:
            s.train(exp)
            out = s.eval(bench.test_stream)
        return out

    a, b = run(), run()
    assert a == b
    assert len(a["accuracy_matrix"]) == 2 and a["accuracy_matrix"][-1] == a["accuracy"]
    assert a["final_accuracy"] == pytest.approx(sum(a["accuracy"]) / 2)
    assert a["old_accuracy"][0] is None and a["new_accuracy"][1] > 0.9


def test_train_takes_a_list_and_events_bracket_it():
    log = []

    class Events(Plugin):
        @hookimpl
        def before_training(self):
            log.append("start")

        @hookimpl
        def after_training_exp(self, strategy):
            log.append(strategy.experience.index)

        @hookimpl
        def after_training(self):
            log.append("end")

    make([Events()]).train(tiny_benchmark().train_stream)
    assert log == ["start", 0, 1, "end"]


def test_bad_loop_settings_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        make(epochs=1, eval_batch_size=0)
    with pytest.raises(ValueError, match="epochs"):
        make(epochs=0)


def test_ordering_options_are_refused():
    class First(Plugin):
        @hookimpl(tryfirst=True)
        def before_training_exp(self, strategy):
            pass

    with pytest.raises(PluginError, match="tryfirst"):
        make([First()])


def test_a_plugin_may_replace_the_batch_before_replay_and_before_eval_forward():
    sizes = []

    class Shrink(Plugin):
        @hookimpl
        def before_training_iteration(self, strategy):
            strategy.batch = Batch(*(v[:4] for v in strategy.batch))

        @hookimpl
        def replay_batch(self, batch):
            return Batch(batch.x[:1], batch.y[:1], batch.t[:1])

        @hookimpl
        def before_eval_forward(self, strategy):
            strategy.batch = Batch(*(v[:3] for v in strategy.batch))

        @hookimpl
        def before_forward(self, strategy):
            sizes.append(len(strategy.batch))

    bench = tiny_benchmark()
    s = make([Shrink()], epochs=1)
    s.train(bench.train_stream[0])
    assert sizes == [5, 5, 5]
    s.eval(bench.test_stream[0])  # 20 samples in eval batches of 16: two batches, each cut to 3
    assert int(s.eval_results[0].total.sum()) == 6


def test_plugin_without_init_takes_no_config_arguments():
    from streamcl.errors import ConfigError
    from streamcl.registry import check_arguments

    class Bare(Plugin):
        pass

    check_arguments(Bare, {}, "plugin 'bare'")
    with pytest.raises(ConfigError, match="has no argument 'typo'"):
        check_arguments(Bare, {"typo": 1}, "plugin 'bare'")
    assert repr(Bare()) == "Bare()"
