"""DER (dynamically expandable representation): aux labels, frozen extractors, masks (eq. 5-6), sparsity (eq. 8),
pruning by hand, parameter counts, the classifier stage, refusals, resume."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from streamcl import Plugin, Strategy, hookimpl
from streamcl.errors import ConfigError
from streamcl.models import MLP, SmallCNN
from streamcl.plugins.der import DER, DERNet, aux_labels
from streamcl.plugins.replay import Replay
from tests.reliability import Crash, crash_at_step, numbers, tiny_run
from tests.synthetic import tiny_benchmark


def strategy(plugins, seed: int = 0, hidden=(16,), n_classes: int = 6, growing: bool = False, epochs: int = 2):
    torch.manual_seed(seed)
    model = MLP(8, list(hidden), n_classes, growing=growing)
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=plugins,
                    epochs=epochs, batch_size=16, seed=seed)


def bench(n_experiences: int = 3):
    return tiny_benchmark(n_classes=2 * n_experiences, n_experiences=n_experiences)


def net(hidden=(16, 16), n_classes: int = 4, seed: int = 0) -> DERNet:
    torch.manual_seed(seed)
    return DERNet(MLP(8, list(hidden), n_classes))


# ------------------------------------------------------------------------------ auxiliary classifier
def test_aux_labels_map_old_classes_to_0_and_new_ones_to_1_to_n():
    y = torch.tensor([0, 1, 2, 3, 4, 5, 4, 0])
    assert aux_labels(y, (4, 5)).tolist() == [0, 0, 0, 0, 1, 2, 1, 0]
    assert aux_labels(y, [5, 4]).tolist() == [0, 0, 0, 0, 2, 1, 2, 0]  # in the experience's order
    assert aux_labels(torch.tensor([2, 3]), (2, 3, 7)).tolist() == [1, 2]


def test_the_aux_term_is_the_cross_entropy_of_the_aux_head_on_the_whole_batch_by_hand():
    seen = {}

    class Spy(Plugin):
        @hookimpl
        def after_training_iteration(self, strategy):
            if "der_aux" in strategy.loss_terms and "done" not in seen:
                model, batch = strategy.model, strategy.batch
                with torch.no_grad():
                    new = model.extract(1, batch.x)  # the second extractor's (masked) features
                    logits = new @ model.aux.weight.T + model.aux.bias
                seen["done"] = True
                seen["labels"] = [0 if c not in (2, 3) else 1 + (2, 3).index(c) for c in batch.y.tolist()]
                seen["expected"] = F.cross_entropy(logits, torch.tensor(seen["labels"]))
                seen["term"] = strategy.loss_terms["der_aux"].detach()
                seen["n_old"] = int((batch.y < 2).sum())
                seen["outputs"] = model.aux.out_features

    # the spy reads the model before the step, so it must see the weights the term was computed with: lr 0
    torch.manual_seed(0)
    model = MLP(8, [16], 4)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.0), plugins=[Replay(memory=20), DER(), Spy()],
                 epochs=1, batch_size=16, seed=0)
    s.train(bench(2).train_stream)
    assert seen["outputs"] == 3  # |new classes| + 1
    assert seen["n_old"] > 0  # replayed samples are in the term, as class 0
    assert torch.allclose(seen["term"], seen["expected"], atol=1e-6)


def test_no_aux_classifier_at_the_first_experience_and_none_left_after_training():
    terms = []

    class Spy(Plugin):
        @hookimpl
        def after_training_iteration(self, strategy):
            terms.append((strategy.experience.index, sorted(strategy.loss_terms)))

    s = strategy([DER(), Spy()])
    s.train(bench().train_stream[:2])
    assert all(t == ["der_sparsity", "task"] for e, t in terms if e == 0)
    assert all(t == ["der_aux", "der_sparsity", "task"] for e, t in terms if e == 1)
    assert s.model.aux is None and len(s.model.mask_logits) == 0


# ------------------------------------------------------------------------------ expansion and freezing
def test_frozen_extractors_do_not_change():
    s = strategy([Replay(memory=20), DER()], hidden=(16, 16))
    stream = bench().train_stream
    s.train(stream[0])
    first = {k: v.clone() for k, v in s.model.extractors[0].state_dict().items()}
    s.train(stream[1])
    assert all(not p.requires_grad for p in s.model.extractors[0].parameters())
    assert all(torch.equal(first[k], v) for k, v in s.model.extractors[0].state_dict().items())
    second = {k: v.clone() for k, v in s.model.extractors[1].state_dict().items()}
    s.train(stream[2])
    assert all(torch.equal(first[k], v) for k, v in s.model.extractors[0].state_dict().items())
    assert all(torch.equal(second[k], v) for k, v in s.model.extractors[1].state_dict().items())
    assert len(s.model.extractors) == 3
    assert all(p.requires_grad for p in s.model.extractors[2].parameters())


def test_frozen_extractors_run_in_evaluation_mode():
    torch.manual_seed(0)
    model = DERNet(MLP(8, [16], 4, dropout=0.5))
    model.expand(torch.Generator().manual_seed(0), 2)
    model.train()
    assert not model.extractors[0].training and model.extractors[1].training
    x = torch.randn(5, 8)
    assert torch.equal(model.extract(0, x), model.extract(0, x))  # no dropout in the frozen one


def test_the_new_head_starts_from_the_old_one_and_the_features_are_concatenated():
    model = net(hidden=(16,))
    old = model.head.blocks[0].detach().clone()
    x = torch.randn(5, 8)
    before = model(x)
    model.expand(torch.Generator().manual_seed(0), 2)
    logits, features = model(x, return_features=True)
    f0, f1 = model.extract(0, x), model.extract(1, x)
    assert torch.equal(features, torch.cat([f0, f1], 1)) and features.shape == (5, 32)
    assert torch.equal(model.head.blocks[0], old)
    assert torch.allclose(logits, before + f1 @ model.head.blocks[1].T, atol=1e-6)
    assert model.aux.in_features == 16 and model.aux.out_features == 3
    assert model.feature_dim == 32


def test_a_fresh_extractor_is_drawn_from_the_generator():
    a, b = net(hidden=(16,)), net(hidden=(16,))
    a.expand(torch.Generator().manual_seed(3), 2)
    b.expand(torch.Generator().manual_seed(3), 2)
    c = net(hidden=(16,))
    c.expand(torch.Generator().manual_seed(4), 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.extractors[1][1].weight, c.extractors[1][1].weight)
    assert not torch.equal(a.extractors[1][1].weight, a.extractors[0][1].weight)


def test_the_optimizer_follows_the_new_and_the_pruned_parameters():
    s = strategy([DER()])
    stream = bench().train_stream
    for exp in stream[:2]:
        s.train(exp)
        held = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
        assert held == {id(p) for p in s.model.parameters()}


def test_a_growing_head_grows_every_block():
    s = strategy([Replay(memory=20), DER()], growing=True)
    stream = bench().train_stream
    for i, exp in enumerate(stream):
        s.train(exp)
        assert [b.shape[0] for b in s.model.head.blocks] == [2 * (i + 1)] * (i + 1)
        assert s.model.head.bias.shape == (2 * (i + 1),)
    res = s.eval(bench().test_stream)
    assert len(res["accuracy"]) == 3


# ------------------------------------------------------------------------------ masks (eq. 5-6) and sparsity (eq. 8)
def test_the_mask_is_sigmoid_of_s_e_with_hat_compensated_gradient():
    model = net()
    model.add_masks(torch.Generator().manual_seed(0), s_max=400.0)
    model.train()
    model.s = 7.0
    e = model.mask_logits[0]
    (m, _) = model.masks()
    assert torch.equal(m.detach(), torch.sigmoid(7.0 * e.detach()))
    c = torch.randn(16)
    (m * c).sum().backward()
    sig = torch.sigmoid(e.detach())
    assert torch.allclose(e.grad, 400.0 * sig * (1 - sig) * c, rtol=1e-6)
    model.eval()
    assert torch.equal(model.masks()[0].detach(), torch.sigmoid(400.0 * e.detach()))


def test_the_masks_multiply_the_units_of_the_newest_extractor():
    model = net(hidden=(16, 16))
    model.add_masks(torch.Generator().manual_seed(0), s_max=400.0)
    model.eval()
    x = torch.randn(5, 8)
    m1, m2 = (torch.sigmoid(400.0 * e.detach()) for e in model.mask_logits)
    ext = model.extractors[0]
    h = F.relu(ext[1](x)) * m1
    h = F.relu(ext[3](h)) * m2
    assert torch.allclose(model.extract(0, x), h, atol=1e-6)


def test_s_anneals_within_each_epoch_as_eq_6():
    s_values = []

    class Spy(Plugin):
        @hookimpl
        def before_forward(self, strategy):
            s_values.append((strategy.epoch, strategy.iteration, strategy.model.s))

    s = strategy([DER(s_max=100.0), Spy()])  # 40 samples, batch 16: B = 3 batches an epoch
    s.train(bench().train_stream[0])
    expected = [1 / 100 + (100 - 1 / 100) * b / 2 for b in range(3)]
    assert [v for _, _, v in s_values] == pytest.approx(expected * 2)


def test_the_sparsity_loss_is_eq_8_by_hand():
    model = net(hidden=(16, 12))
    model.add_masks(torch.Generator().manual_seed(0), s_max=400.0)
    model.train()
    model.s = 2.0
    m1, m2 = (torch.sigmoid(2.0 * e.detach()) for e in model.mask_logits)
    expected = (8 * m1.sum() + m1.sum() * m2.sum()) / (8 * 16 + 16 * 12)
    assert torch.allclose(model.sparsity().detach(), expected)
    with torch.no_grad():
        for e in model.mask_logits:
            e.fill_(float("inf"))
    assert model.sparsity().item() == pytest.approx(1.0)


def test_mask_embeddings_stay_within_hats_bound():
    seen = []

    class Spy(Plugin):
        @hookimpl
        def after_training_iteration(self, strategy):
            seen.append(max(float(e.detach().abs().max()) for e in strategy.model.mask_logits))

    s = strategy([DER(sparsity_weight=1e4), Spy()])
    s.train(bench().train_stream[0])
    assert seen and max(seen) == 6.0  # pushed to the bound, and no further
    assert all(math.isfinite(v) for v in seen)


# ------------------------------------------------------------------------------ pruning
def binary_masks(model: DERNet, keep1, keep2):
    with torch.no_grad():
        for e, keep in zip(model.mask_logits, (keep1, keep2)):
            e.copy_(torch.where(torch.tensor(keep), float("inf"), float("-inf")))


def test_pruning_removes_units_and_keeps_the_outputs_for_a_0_1_mask():
    model = net(hidden=(16, 16))
    model.expand(torch.Generator().manual_seed(0), 2)
    model.add_masks(torch.Generator().manual_seed(1), s_max=400.0)
    keep1 = [i % 3 == 0 for i in range(16)]  # 6 units
    keep2 = [i % 2 == 1 for i in range(16)]  # 8 units
    binary_masks(model, keep1, keep2)
    model.eval()
    x = torch.randn(7, 8)
    before, features_before = model(x, return_features=True)
    ext = model.extractors[1]
    w1, b1, w2, b2 = (t.detach().clone() for t in (ext[1].weight, ext[1].bias, ext[3].weight, ext[3].bias))
    block = model.head.blocks[1].detach().clone()
    kept = model.prune()
    assert kept == [6, 8]
    i1, i2 = torch.tensor(keep1).nonzero().flatten(), torch.tensor(keep2).nonzero().flatten()
    assert torch.equal(ext[1].weight, w1[i1]) and torch.equal(ext[1].bias, b1[i1])
    assert torch.equal(ext[3].weight, w2[i2][:, i1]) and torch.equal(ext[3].bias, b2[i2])
    assert torch.equal(model.head.blocks[1], block[:, i2])
    assert model.aux is None and len(model.mask_logits) == 0
    after, features_after = model(x, return_features=True)
    assert torch.allclose(after, before, atol=1e-6)
    assert torch.allclose(features_after, torch.cat([features_before[:, :16], features_before[:, 16 + i2]], 1))
    assert model.feature_dim == 16 + 8


def test_pruning_folds_the_kept_masks_into_the_weights():
    model = net(hidden=(16,))
    model.add_masks(torch.Generator().manual_seed(0), s_max=400.0)
    x = torch.randn(7, 8)
    values = [torch.linspace(0, 1, 16)]  # units with a mask below 0.5 go, the others keep their scale
    expected = model.head(F.relu(model.extractors[0][1](x)) * (values[0] * (values[0] >= 0.5)))
    model.prune(values)
    assert model.widths() == [8]
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_pruning_keeps_one_unit_of_a_layer_the_mask_closed_entirely():
    model = net(hidden=(16,))
    model.add_masks(torch.Generator().manual_seed(0), s_max=400.0)
    values = torch.full((16,), 0.1)
    values[5] = 0.2
    weight = model.extractors[0][1].weight.detach().clone()
    assert model.prune([values]) == [1]
    assert torch.allclose(model.extractors[0][1].weight, 0.2 * weight[5:6])


def test_the_parameter_count_falls_after_pruning_by_hand():
    model = net(hidden=(16, 16))  # 8-16-16, head 4
    full = 8 * 16 + 16 + 16 * 16 + 16 + 4 * 16 + 4
    assert sum(p.numel() for p in model.parameters()) == full == model.unpruned_parameters()
    model.add_masks(torch.Generator().manual_seed(0), s_max=400.0)
    binary_masks(model, [i < 5 for i in range(16)], [i < 3 for i in range(16)])
    model.prune()
    pruned = 8 * 5 + 5 + 5 * 3 + 3 + 4 * 3 + 4
    assert sum(p.numel() for p in model.parameters()) == pruned < full
    assert model.unpruned_parameters() == full


def test_the_plugin_records_fewer_parameters_per_experience_than_without_pruning():
    pruned = DER(sparsity_weight=1.0)
    s = strategy([Replay(memory=20), pruned], hidden=(16, 16))
    s.train(bench().train_stream)
    full = DER(prune=False)
    t = strategy([Replay(memory=20), full], hidden=(16, 16))
    t.train(bench().train_stream)
    one = 8 * 16 + 16 + 16 * 16 + 16
    assert full.params_per_experience == [k * one + 6 * 16 * k + 6 for k in (1, 2, 3)]
    assert full.units_per_experience == [[16, 16]] * 3
    assert pruned.unpruned_params_per_experience == full.params_per_experience
    assert all(p < q for p, q in zip(pruned.params_per_experience, full.params_per_experience))
    assert pruned.params_per_experience == sorted(pruned.params_per_experience)
    assert pruned.params_per_experience[-1] == sum(p.numel() for p in s.model.parameters())
    assert pruned.params_per_experience[-1] < 3 * one  # it grows less than one backbone per experience


# ------------------------------------------------------------------------------ classifier learning stage
def test_the_classifier_stage_moves_only_the_head_and_only_after_the_first_experience():
    import copy
    der = DER(classifier_epochs=3, classifier_temperature=5.0)
    s = strategy([Replay(memory=20), der], hidden=(16, 16))
    calls = []
    original = der._learn_classifier
    der._learn_classifier = lambda strategy, model: (calls.append(strategy.experience.index), original(strategy, model))
    s.train(bench().train_stream[:2])
    assert calls == [1]
    before = copy.deepcopy(s.model)
    der._learn_classifier(s, s.model)  # once more, by hand: only the head's entries move
    old, new = before.state_dict(), s.model.state_dict()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(k.startswith("head.") for k in changed)


def test_the_classifier_stage_needs_a_memory_listed_before_der():
    with pytest.raises(ConfigError, match="owns 'memory'"):
        strategy([DER(classifier_epochs=2)]).train(bench().train_stream[0])
    with pytest.raises(ConfigError, match="list Replay before der"):
        strategy([DER(classifier_epochs=2), Replay(memory=20)]).train(bench().train_stream[0])


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kwargs,match", [
    ({"aux_weight": -1.0}, "aux_weight"), ({"aux_weight": float("nan")}, "aux_weight"),
    ({"sparsity_weight": float("inf")}, "sparsity_weight"), ({"sparsity_weight": True}, "sparsity_weight"),
    ({"s_max": 0.5}, "s_max"), ({"s_max": 1e6}, "s_max"), ({"prune": 1}, "prune"),
    ({"classifier_epochs": -1}, "classifier_epochs"), ({"classifier_epochs": 2.0}, "classifier_epochs"),
    ({"classifier_temperature": 0.0}, "classifier_temperature"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DER(**kwargs)


def test_models_it_cannot_expand_are_refused():
    torch.manual_seed(0)
    cnn = SmallCNN()
    s = Strategy(cnn, torch.optim.SGD(cnn.parameters(), lr=0.1), plugins=[DER()], batch_size=16, seed=0)
    with pytest.raises(ConfigError, match="not ToImage, Conv2d, MaxPool2d"):
        s.train(tiny_benchmark_images())
    with pytest.raises(ConfigError, match="backbone is an nn.Sequential"):
        DERNet(nn.Linear(8, 4))
    with pytest.raises(ConfigError, match="at least one Linear"):
        bad = MLP(8, [16], 4)
        bad.backbone = nn.Sequential(nn.Flatten())
        DERNet(bad)


def tiny_benchmark_images():
    from streamcl.scenarios import TensorData, class_incremental
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(40, 784, generator=g), torch.arange(2).repeat_interleave(20))
    return class_incremental(data, data, 1).train_stream[0]


# ------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("step", [2, 5, 7, 11, 16])
def test_replay_with_der_and_its_classifier_stage_resumes_bit_for_bit(tmp_path, monkeypatch, step):
    part = {"plugins": [{"name": "replay", "memory": 20},
                        {"name": "der", "classifier_epochs": 2, "classifier_temperature": 5.0}]}
    full = numbers(tiny_run(part))
    with monkeypatch.context() as m:
        crash_at_step(m, step)
        with pytest.raises(Crash):
            tiny_run(part, tmp_path)
    assert numbers(tiny_run(part, tmp_path, resume=True)) == full


def test_uncorrected_predicts_with_the_classifier_before_the_stage_and_puts_it_back():
    der = DER(classifier_epochs=3)
    s = strategy([Replay(memory=20), der], hidden=(16, 16))
    s.train(bench().train_stream[0])
    assert der.head_before_stage is None  # no stage after the first experience
    s.train(bench().train_stream[1])
    x = torch.randn(5, 8)
    with torch.no_grad():
        after = s.model(x)
        blocks = [b.clone() for b in s.model.head.blocks]
        features = s.model(x, return_features=True)[1]
        before = features @ torch.cat([der.head_before_stage["blocks.0"], der.head_before_stage["blocks.1"]], 1).T \
            + der.head_before_stage["bias"]
        with der.uncorrected():
            inside = s.model(x)
        assert torch.allclose(inside, before, atol=1e-6) and not torch.allclose(inside, after)
        assert torch.equal(s.model(x), after)
        assert all(torch.equal(b, c) for b, c in zip(s.model.head.blocks, blocks))
    assert DER().uncorrected is None  # nothing to undo without the stage


def test_a_crash_between_training_and_evaluation_resumes_with_the_uncorrected_numbers(tmp_path, monkeypatch):
    part = {"plugins": [{"name": "replay", "memory": 20}, {"name": "der", "classifier_epochs": 2}]}
    full = tiny_run(part)
    calls = [0]
    original = Strategy.eval

    def eval_or_crash(self, stream):
        calls[0] += 1
        if calls[0] == 3:  # the uncorrected evaluation after the second experience
            raise Crash("crash in evaluation")
        return original(self, stream)

    with monkeypatch.context() as m:
        m.setattr(Strategy, "eval", eval_or_crash)
        with pytest.raises(Crash):
            tiny_run(part, tmp_path, checkpoint_every=0)
    resumed = tiny_run(part, tmp_path, resume=True, checkpoint_every=0)
    assert numbers(resumed) == numbers(full)
    assert resumed["uncorrected"] == full["uncorrected"]
