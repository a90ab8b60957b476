"""DER (dynamically expandable representation): aux labels, frozen extractors, fresh extractors, masks (eq. 5-6),
sparsity (eq. 8), pruning by hand, parameter counts, the classifier stage and its correction, any model (masks
refused where the layers do not allow them, DER(masks=False) on ResNet-18 and a ViT), refusals, resume."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from streamcl import Batch, Plugin, Strategy, hookimpl
from streamcl.errors import ConfigError
from streamcl.masks import MaskedSequential, annealed_scale, find_units, hat_mask
from streamcl.models import MLP, SmallCNN
from streamcl.plugins.der import DER, DERNet, aux_labels
from streamcl.plugins.replay import Replay
from tests.conftest import USER_MODELS, image_benchmark
from tests.reliability import Crash, crash_at_step, numbers, tiny_run
from tests.synthetic import tiny_benchmark


def strategy(plugins, seed: int = 0, hidden=(16,), n_classes: int = 6, growing: bool = False, epochs: int = 2):
    torch.manual_seed(seed)
    model = MLP(8, list(hidden), n_classes, growing=growing)
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), plugins=plugins,
                    epochs=epochs, batch_size=16, seed=seed)


def bench(n_experiences: int = 3):
    return tiny_benchmark(n_classes=2 * n_experiences, n_experiences=n_experiences)


def net(hidden=(16, 16), n_classes: int = 4, seed: int = 0, masks: bool = True, dropout: float = 0.0) -> DERNet:
    """DER's network on an MLP, as the plugin builds it: the extractor (head -> Identity) and the head."""
    torch.manual_seed(seed)
    model = MLP(8, list(hidden), n_classes, dropout=dropout)
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1))
    units = find_units(s.extractor(), "MLP", "der", "use DER(masks=False)") if masks else None
    return DERNet(s.extractor(), s.head, units)


def body(model: DERNet, k: int) -> nn.Sequential:
    """Extractor k's Linear layers (the MLP's backbone; inside the masks while it has them)."""
    seq = model.extractors[k].backbone
    return seq.seq if isinstance(seq, MaskedSequential) else seq


def state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, module: nn.Module) -> bool:
    b = module.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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

    # the spy reads the model after the step, so it must see the weights the term was computed with: lr 0
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
    assert s.model.aux is None and s.model.masked() is None


# ------------------------------------------------------------------------------ expansion and freezing
def test_frozen_extractors_do_not_change():
    s = strategy([Replay(memory=20), DER()], hidden=(16, 16))
    stream = bench().train_stream
    s.train(stream[0])
    first = state(s.model.extractors[0])
    s.train(stream[1])
    assert all(not p.requires_grad for p in s.model.extractors[0].parameters())
    assert same(first, s.model.extractors[0])
    second = state(s.model.extractors[1])
    s.train(stream[2])
    assert same(first, s.model.extractors[0]) and same(second, s.model.extractors[1])
    assert len(s.model.extractors) == 3
    assert all(p.requires_grad for p in s.model.extractors[2].parameters())


def test_frozen_extractors_run_in_evaluation_mode():
    model = net(hidden=(16,), masks=False, dropout=0.5)
    model.expand(torch.Generator().manual_seed(0), 2)
    model.train()
    assert not model.extractors[0].training and model.extractors[1].training
    x = torch.randn(5, 8)
    assert torch.equal(model.extract(0, x), model.extract(0, x))  # no dropout in the frozen one


def test_the_new_head_starts_from_the_old_one_and_the_features_are_concatenated():
    model = net(hidden=(16,), masks=False)
    old = model.head.weight.detach().clone()
    x = torch.randn(5, 8)
    before = model(x)
    model.expand(torch.Generator().manual_seed(0), 2)
    f0, f1 = model.extract(0, x), model.extract(1, x)
    assert torch.equal(model.head.weight[:, :16], old) and model.head.weight.shape == (4, 32)
    assert torch.allclose(model(x), before + f1 @ model.head.weight[:, 16:].T, atol=1e-6)
    assert torch.allclose(model(x), torch.cat([f0, f1], 1) @ model.head.weight.T + model.head.bias, atol=1e-6)
    assert model.aux.in_features == 16 and model.aux.out_features == 3
    assert model.feature_dim == 32


def test_a_fresh_extractor_is_drawn_from_the_generator_and_leaves_torchs_generator_alone():
    a, b, c = net(hidden=(16,)), net(hidden=(16,)), net(hidden=(16,))
    rng = torch.get_rng_state()
    a.expand(torch.Generator().manual_seed(3), 2)
    assert torch.equal(torch.get_rng_state(), rng)  # forked: torch's own generator is where it was
    b.expand(torch.Generator().manual_seed(3), 2)
    c.expand(torch.Generator().manual_seed(4), 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(body(a, 1)[1].weight, body(c, 1)[1].weight)
    assert not torch.equal(body(a, 1)[1].weight, body(a, 0)[1].weight)
    bound = 1 / math.sqrt(8)  # nn.Linear's initialisation, at full width
    assert body(a, 1)[1].weight.shape == (16, 8) and body(a, 1)[1].weight.abs().max() <= bound


def test_a_fresh_extractor_is_full_width_after_the_first_was_pruned():
    model = net(hidden=(16, 12))
    model.add_masks(torch.Generator().manual_seed(0), s_max=400.0)
    model.prune([(torch.arange(16) < 3).float(), (torch.arange(12) < 5).float()])
    assert model.widths(0) == [3, 5]
    model.expand(torch.Generator().manual_seed(0), 2)
    assert model.widths(1) == [16, 12] and model.head.in_features == 5 + 12


def test_the_optimizer_follows_the_new_and_the_pruned_parameters():
    s = strategy([DER()])
    stream = bench().train_stream
    for exp in stream[:2]:
        s.train(exp)
        held = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
        assert held == {id(p) for p in s.model.parameters()}


def test_a_growing_head_grows_with_every_extractors_columns():
    s = strategy([Replay(memory=20), DER(masks=False)], growing=True)
    stream = bench().train_stream
    for i, exp in enumerate(stream):
        s.train(exp)
        assert s.model.head.weight.shape == (2 * (i + 1), 16 * (i + 1))
        assert s.model.head.bias.shape == (2 * (i + 1),)
    res = s.eval(bench().test_stream)
    assert len(res["accuracy"]) == 3


def test_max_extractors_stops_the_growth_and_the_newest_goes_on_learning():
    plugin = DER(max_extractors=2, sparsity_weight=0.0)  # masks and pruning, without the pressure to cut units
    s = strategy([Replay(memory=16), plugin], n_classes=8)
    for i, exp in enumerate(bench(4).train_stream):
        if i == 3:
            before = {k: v.clone() for k, v in s.model.extractors[1].state_dict().items()}
            frozen = {k: v.clone() for k, v in s.model.extractors[0].state_dict().items()}
        s.train(exp)
    model = s.model
    assert len(model.extractors) == 2 and model.aux is None and model.masked() is None
    assert plugin.params_per_experience[2] == plugin.params_per_experience[3]  # no growth past the cap
    assert any(not torch.equal(v, before[k]) for k, v in model.extractors[1].state_dict().items())  # it learnt
    assert all(torch.equal(v, frozen[k]) for k, v in model.extractors[0].state_dict().items())


def test_a_warning_once_the_parameters_pass_a_multiple_of_the_first_experiences():
    plugin = DER(masks=False, warn_growth=2.5)
    s = strategy([Replay(memory=16), plugin], n_classes=8)
    with pytest.warns(RuntimeWarning, match="times the first experience's") as caught:
        for exp in bench(4).train_stream:
            s.train(exp)
    assert len([w for w in caught if "max_extractors" in str(w.message)]) == 1  # once, past 2.5x: the third
    assert plugin.params_per_experience[2] > 2.5 * plugin.params_per_experience[0]
    for bad in ({"max_extractors": 0}, {"max_extractors": 1.5}, {"warn_growth": 1}, {"warn_growth": True}):
        with pytest.raises(ConfigError, match="der (max_extractors|warn_growth)"):
            DER(**bad)


def test_the_wrapper_exposes_its_head_to_the_engine():
    s = strategy([Replay(memory=20), DER()])
    s.train(bench().train_stream[:2])
    assert s.head_path == "head" and s.head is s.model.head
    assert s.feature_dim == s.model.head.in_features
    x = torch.randn(4, 8)
    out = s.infer(Batch(x, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)))
    s.model.eval()
    assert torch.allclose(out.features, torch.cat([s.model.extract(0, x), s.model.extract(1, x)], 1))


# ------------------------------------------------------------------------------ masks (eq. 5-6) and sparsity (eq. 8)
def test_the_mask_is_sigmoid_of_s_e_with_hat_compensated_gradient():
    e = torch.randn(16, requires_grad=True)
    m = hat_mask(e, 7.0, 400.0)
    assert torch.equal(m.detach(), torch.sigmoid(7.0 * e.detach()))
    c = torch.randn(16)
    (m * c).sum().backward()
    sig = torch.sigmoid(e.detach())
    assert torch.allclose(e.grad, 400.0 * sig * (1 - sig) * c, rtol=1e-6)
    model = net()
    model.add_masks(torch.Generator().manual_seed(0), s_max=400.0)
    masked = model.masked()
    model.train()
    masked.s = 7.0
    assert torch.equal(masked.masks()[0].detach(), torch.sigmoid(7.0 * masked.mask_logits[0].detach()))
    model.eval()
    assert torch.equal(masked.masks()[0].detach(), torch.sigmoid(400.0 * masked.mask_logits[0].detach()))


def test_the_masks_multiply_the_units_of_the_newest_extractor():
    model = net(hidden=(16, 16))
    model.add_masks(torch.Generator().manual_seed(0), s_max=400.0)
    model.eval()
    x = torch.randn(5, 8)
    m1, m2 = (torch.sigmoid(400.0 * e.detach()) for e in model.masked().mask_logits)
    ext = body(model, 0)
    h = F.relu(ext[1](x)) * m1
    h = F.relu(ext[3](h)) * m2
    assert torch.allclose(model.extract(0, x), h, atol=1e-6)


def test_s_anneals_within_each_epoch_as_eq_6():
    s_values = []

    class Spy(Plugin):
        @hookimpl
        def before_forward(self, strategy):
            s_values.append(strategy.model.masked().s)

    s = strategy([DER(s_max=100.0), Spy()])  # 40 samples, batch 16: B = 3 batches an epoch
    s.train(bench().train_stream[0])
    expected = [1 / 100 + (100 - 1 / 100) * b / 2 for b in range(3)]
    assert s_values == pytest.approx(expected * 2)
    assert annealed_scale(0, 1, 100.0) == 100.0


def test_the_sparsity_loss_is_eq_8_by_hand():
    model = net(hidden=(16, 12))
    model.add_masks(torch.Generator().manual_seed(0), s_max=400.0)
    model.train()
    model.masked().s = 2.0
    m1, m2 = (torch.sigmoid(2.0 * e.detach()) for e in model.masked().mask_logits)
    expected = (8 * m1.sum() + m1.sum() * m2.sum()) / (8 * 16 + 16 * 12)
    assert torch.allclose(model.sparsity().detach(), expected)
    with torch.no_grad():
        for e in model.masked().mask_logits:
            e.fill_(float("inf"))
    assert model.sparsity().item() == pytest.approx(1.0)


def test_mask_embeddings_stay_within_hats_bound():
    seen = []

    class Spy(Plugin):
        @hookimpl
        def after_training_iteration(self, strategy):
            seen.append(max(float(e.detach().abs().max()) for e in strategy.model.masked().mask_logits))

    s = strategy([DER(sparsity_weight=1e4), Spy()])
    s.train(bench().train_stream[0])
    assert seen and max(seen) == 6.0  # pushed to the bound, and no further
    assert all(math.isfinite(v) for v in seen)


# ------------------------------------------------------------------------------ pruning
def binary_masks(model: DERNet, keep1, keep2):
    with torch.no_grad():
        for e, keep in zip(model.masked().mask_logits, (keep1, keep2)):
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
    before = model(x)
    features_before = torch.cat([model.extract(0, x), model.extract(1, x)], 1)
    ext = body(model, 1)
    w1, b1, w2, b2 = (t.detach().clone() for t in (ext[1].weight, ext[1].bias, ext[3].weight, ext[3].bias))
    head = model.head.weight.detach().clone()
    kept = model.prune()
    assert kept == [6, 8]
    i1, i2 = torch.tensor(keep1).nonzero().flatten(), torch.tensor(keep2).nonzero().flatten()
    ext = body(model, 1)
    assert isinstance(model.extractors[1].backbone, nn.Sequential)  # the masks are gone
    assert torch.equal(ext[1].weight, w1[i1]) and torch.equal(ext[1].bias, b1[i1])
    assert torch.equal(ext[3].weight, w2[i2][:, i1]) and torch.equal(ext[3].bias, b2[i2])
    assert torch.equal(model.head.weight, torch.cat([head[:, :16], head[:, 16 + i2]], 1))
    assert model.aux is None and model.masked() is None
    after = model(x)
    features_after = torch.cat([model.extract(0, x), model.extract(1, x)], 1)
    assert torch.allclose(after, before, atol=1e-6)
    assert torch.allclose(features_after, torch.cat([features_before[:, :16], features_before[:, 16 + i2]], 1))
    assert model.feature_dim == 16 + 8


def test_pruning_folds_the_kept_masks_into_the_weights():
    model = net(hidden=(16,))
    model.add_masks(torch.Generator().manual_seed(0), s_max=400.0)
    x = torch.randn(7, 8)
    values = [torch.linspace(0, 1, 16)]  # units with a mask below 0.5 go, the others keep their scale
    expected = model.head(F.relu(body(model, 0)[1](x)) * (values[0] * (values[0] >= 0.5)))
    model.prune(values)
    assert model.widths() == [8]
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_pruning_keeps_one_unit_of_a_layer_the_mask_closed_entirely():
    model = net(hidden=(16,))
    model.add_masks(torch.Generator().manual_seed(0), s_max=400.0)
    values = torch.full((16,), 0.1)
    values[5] = 0.2
    weight = body(model, 0)[1].weight.detach().clone()
    assert model.prune([values]) == [1]
    assert torch.allclose(body(model, 0)[1].weight, 0.2 * weight[5:6])


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


def test_the_plugin_records_fewer_parameters_per_experience_than_without_masks():
    pruned = DER(sparsity_weight=1.0)
    s = strategy([Replay(memory=20), pruned], hidden=(16, 16))
    s.train(bench().train_stream)
    full = DER(masks=False)
    t = strategy([Replay(memory=20), full], hidden=(16, 16))
    t.train(bench().train_stream)
    one = 8 * 16 + 16 + 16 * 16 + 16
    assert full.params_per_experience == [k * one + 6 * 16 * k + 6 for k in (1, 2, 3)]
    assert full.units_per_experience == [[16]] * 3  # without masks: each extractor's features
    assert [len(u) for u in pruned.units_per_experience] == [2] * 3
    assert pruned.unpruned_params_per_experience == full.params_per_experience
    assert all(p < q for p, q in zip(pruned.params_per_experience, full.params_per_experience))
    assert pruned.params_per_experience == sorted(pruned.params_per_experience)
    assert pruned.params_per_experience[-1] == sum(p.numel() for p in s.model.parameters())
    assert pruned.params_per_experience[-1] < 3 * one  # it grows less than one backbone per experience


# ------------------------------------------------------------------------------ classifier learning stage
def test_the_classifier_stage_moves_only_the_head_and_only_after_the_first_experience():
    der = DER(classifier_epochs=3, classifier_temperature=5.0)
    s = strategy([Replay(memory=20), der], hidden=(16, 16))
    calls = []
    original = der._learn_classifier
    der._learn_classifier = lambda strategy: (calls.append(strategy.experience.index), original(strategy))
    s.train(bench().train_stream[:2])
    assert calls == [1]
    before = copy.deepcopy(s.model)
    der._learn_classifier(s)  # once more, by hand: only the head's entries move
    old, new = before.state_dict(), s.model.state_dict()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(k.startswith("head.") for k in changed)


def test_the_classifier_stage_is_sgd_on_the_memorys_features_at_the_temperature_by_hand():
    der = DER(classifier_epochs=3, classifier_temperature=5.0)
    s = strategy([Replay(memory=20), der], hidden=(16, 16))
    s.train(bench().train_stream[:2])
    data = s.memory.batch()
    s.model.eval()
    with torch.no_grad():
        features = torch.cat([s.model.extract(0, data.x), s.model.extract(1, data.x)], 1)
    s.model.train()
    w = s.head.weight.detach().clone().requires_grad_()
    b = s.head.bias.detach().clone().requires_grad_()
    start = (w.detach().clone(), b.detach().clone())
    order = torch.Generator()
    order.set_state(s.generator.get_state())
    der._learn_classifier(s)
    opt = torch.optim.SGD([w, b], lr=0.1, momentum=0.9)  # the strategy's kind and settings, a fresh one
    for _ in range(3):
        perm = torch.randperm(len(data), generator=order)
        for i in range(0, len(perm), 16):
            idx = perm[i:i + 16]
            opt.zero_grad()
            F.cross_entropy((features[idx] @ w.T + b) / 5.0, data.y[idx]).backward()
            opt.step()
    assert torch.allclose(s.head.weight, w, atol=1e-5) and torch.allclose(s.head.bias, b, atol=1e-5)
    assert torch.equal(der.head_before_stage["weight"], start[0])
    assert torch.equal(der.head_before_stage["bias"], start[1])


def test_without_a_memory_der_warns_that_it_rehearses_nothing_and_has_no_classifier_stage():
    with pytest.warns(RuntimeWarning, match="der without a replay memory: nothing is rehearsed"):
        strategy([DER()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy([Replay(memory=20), DER()])  # a memory: no warning


def test_the_classifier_stage_needs_a_memory_listed_before_der_refused_at_construction():
    with pytest.raises(ConfigError, match="owns 'memory'"):
        strategy([DER(classifier_epochs=2)])
    with pytest.raises(ConfigError, match="list Replay before der"):
        strategy([DER(classifier_epochs=2), Replay(memory=20)])


def test_the_correction_off_predicts_with_the_classifier_before_the_stage_and_on_puts_it_back():
    der = DER(classifier_epochs=3)
    s = strategy([Replay(memory=20), der], hidden=(16, 16))
    s.train(bench().train_stream[0])
    assert der.head_before_stage is None  # no stage after the first experience
    s.train(bench().train_stream[1])
    x = torch.randn(5, 8)
    s.model.eval()
    with torch.no_grad():
        after = s.model(x)
        weight, bias = s.head.weight, s.head.bias
        retrained = (weight.clone(), bias.clone())
        features = torch.cat([s.model.extract(0, x), s.model.extract(1, x)], 1)
        before = features @ der.head_before_stage["weight"].T + der.head_before_stage["bias"]
        assert s.corrects
        with s.uncorrected():
            inside = s.model(x)
        assert torch.allclose(inside, before, atol=1e-6) and not torch.allclose(inside, after)
        assert torch.equal(s.model(x), after)
        assert s.head.weight is weight and torch.equal(weight, retrained[0]) and torch.equal(bias, retrained[1])


def test_without_the_stage_the_correction_changes_nothing():
    s = strategy([Replay(memory=20), DER()])
    s.train(bench().train_stream[:2])
    x = torch.randn(5, 8)
    s.model.eval()
    with torch.no_grad():
        after = s.model(x)
        with s.uncorrected():
            assert torch.equal(s.model(x), after)


# ------------------------------------------------------------------------------ any model
def user_strategy(name: str, plugins):
    torch.manual_seed(0)
    model = USER_MODELS[name]()
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), plugins=plugins, epochs=1,
                    batch_size=8, eval_batch_size=16, seed=0)


@pytest.mark.parametrize("name,holds", [("resnet18", "ResNet's extractor holds Conv2d, BatchNorm2d"),
                                        ("vit", "VisionTransformer's extractor holds VisionTransformer.cls_token")])
def test_masks_on_a_backbone_without_fully_connected_units_are_refused_at_construction(name, holds):
    with pytest.raises(ConfigError, match=f"der masks the units of fully connected layers; {holds}.*"
                                          r"use DER\(masks=False\)"):
        user_strategy(name, [DER()])
    from streamcl.methods import build_method
    with pytest.raises(ConfigError, match="der masks the units"):
        user_strategy(name, build_method("der")[0])
    user_strategy(name, build_method("der", masks=False)[0])  # the recipe switches them off


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_der_without_masks_runs_on_any_backbone_and_keeps_earlier_extractors_bit_identical(name):
    fresh = {}

    class Spy(Plugin):
        @hookimpl
        def before_training_exp(self, strategy):
            fresh[strategy.experience.index] = state(strategy.model.extractors[-1])

    torch.manual_seed(0)
    initial = state(USER_MODELS[name]())  # the model user_strategy builds, before any training
    s = user_strategy(name, [Replay(memory=8), DER(masks=False, classifier_epochs=1), Spy()])
    bench = image_benchmark(n_classes=4, n_experiences=2, n_per_class=4)
    s.train(bench.train_stream[0])
    first = state(s.model.extractors[0])
    assert not same({k: v for k, v in initial.items() if k in first}, s.model.extractors[0])  # it trained
    s.train(bench.train_stream[1])
    assert same(first, s.model.extractors[0])  # weights and batch-norm statistics, bit for bit
    assert all(not p.requires_grad for p in s.model.extractors[0].parameters())
    s.model.train()
    assert not s.model.extractors[0].training and s.model.extractors[1].training
    assert len(s.model.extractors) == 2 and s.head is s.model.head
    assert s.head.weight.shape == (10, 2 * s.model.width)
    # the new extractor was re-initialised: what reset_parameters() covers differs from the first, and what it
    # does not (the ViT's position embedding and class token) starts from the first extractor's initial values
    moved = [n for n in fresh[1] if n.endswith("weight") and not torch.equal(fresh[1][n], first[n])]
    assert moved, "the fresh extractor is a copy of the trained one"
    assert s.model.initial_names == ([] if name == "resnet18" else ["cls_token", "pos_embed"])
    for n in s.model.initial_names:
        assert torch.equal(fresh[1][n], initial[n]) and not torch.equal(first[n], initial[n])
    res = s.eval(bench.test_stream)
    assert all(math.isfinite(a) for a in res["accuracy"])


def test_masks_on_a_users_sequential_prune_its_hidden_units():
    der = DER()
    s = user_strategy("sequential", [Replay(memory=12), der])
    assert der._units == ""  # the extractor is the nn.Sequential itself (its last Linear is the head)
    bench = image_benchmark(n_classes=4, n_experiences=2)
    for exp in bench.train_stream:
        s.train(exp)
    assert [len(u) for u in der.units_per_experience] == [2, 2]
    assert der.params_per_experience[-1] < der.unpruned_params_per_experience[-1]
    assert s.head.in_features == der.units_per_experience[0][-1] + der.units_per_experience[1][-1]


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kwargs,match", [
    ({"aux_weight": -1.0}, "aux_weight"), ({"aux_weight": float("nan")}, "aux_weight"),
    ({"sparsity_weight": float("inf")}, "sparsity_weight"), ({"sparsity_weight": True}, "sparsity_weight"),
    ({"s_max": 0.5}, "s_max"), ({"s_max": 1e6}, "s_max"), ({"masks": 1}, "masks"),
    ({"classifier_epochs": -1}, "classifier_epochs"), ({"classifier_epochs": 2.0}, "classifier_epochs"),
    ({"classifier_temperature": 0.0}, "classifier_temperature"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DER(**kwargs)


def build(model: nn.Module, plugins, **kwargs) -> Strategy:
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=plugins, batch_size=16, seed=0,
                    **kwargs)


class Scaled(nn.Module):
    """Features that are twice the nn.Sequential's output: masking its units would not be what the head reads."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(2 * self.body(x))


class Mean(nn.Module):
    """A linear-looking head that is not nn.Linear."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 16, 4
        self.w = nn.Parameter(torch.randn(4, 16))

    def forward(self, x):
        return x @ self.w.T


def test_models_it_cannot_expand_or_mask_are_refused_when_the_strategy_is_built():
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="SmallCNN's extractor holds Conv2d"):
        build(SmallCNN(), [DER()])
    build(SmallCNN(), [DER(masks=False)])
    gelu = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    with pytest.raises(ConfigError, match=r"not one nn.Sequential of Linear.*\(it holds GELU\)"):
        build(gelu, [DER()])
    with pytest.raises(ConfigError, match=r"features are not the output of the nn.Sequential at 'body'.*differs"):
        build(Scaled(), [DER()])
    build(Scaled(), [DER(masks=False)])
    with pytest.raises(ConfigError, match="its own head"):
        build(nn.Linear(8, 4), [DER(masks=False)])
    odd = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    odd.add_module("out", Mean())
    with pytest.raises(ConfigError, match="needs an nn.Linear or IncrementalLinear head.*Mean"):
        build(odd, [DER(masks=False)], head="out")


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


def test_a_crash_between_training_and_evaluation_resumes_with_the_uncorrected_numbers(tmp_path, monkeypatch):
    part = {"plugins": [{"name": "replay", "memory": 20}, {"name": "der", "classifier_epochs": 2}]}
    full = tiny_run(part)
    calls = [0]
    original = Strategy.eval

    def eval_or_crash(self, stream, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # the uncorrected evaluation after the second experience
            raise Crash("crash in evaluation")
        return original(self, stream, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Strategy, "eval", eval_or_crash)
        with pytest.raises(Crash):
            tiny_run(part, tmp_path, checkpoint_every=0)
    resumed = tiny_run(part, tmp_path, resume=True, checkpoint_every=0)
    assert numbers(resumed) == numbers(full)
    assert resumed["uncorrected"] == full["uncorrected"]
