
import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, Strategy, hookimpl
from streamcl.models import MLP, Classifier
from streamcl.plugins.latent_replay import LatentReplay
from tests.conftest import USER_MODELS
from tests.synthetic import tiny_benchmark


def make(plugin, n_classes=6, n_exp=3, lr=0.1, **kwargs):
    torch.manual_seed(0)
    bench = tiny_benchmark(n_classes, n_exp)
    model = MLP(8, [16, 16], n_classes)  # backbone: Flatten, Linear, ReLU, Linear, ReLU; default cut at 3
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), plugins=[plugin],
                 epochs=2, batch_size=16, seed=0, **kwargs)
    return s, bench


def train(plugin, n_classes=6, n_exp=3, **kwargs):
    s, bench = make(plugin, n_classes, n_exp, **kwargs)
    for exp in bench.train_stream:
        s.train(exp)
    return s, bench


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def test_default_cut_is_after_the_first_hidden_relu():
    # [Flatten, Linear(784,256), ReLU | Linear(256,256), ReLU] + head: latents are backbone[:3](x)
    assert LatentReplay().find_cut(MLP(), "head") == "backbone.2"
    assert LatentReplay(layer=5).find_cut(MLP(), "head") == "backbone.4"  # an int k: the k-th module's output
    assert LatentReplay(layer="backbone.1").find_cut(MLP(), "head") == "backbone.1"


@pytest.mark.parametrize("name,cut", [("mlp", "backbone.0"), ("sequential", "2"), ("resnet18", "layer4.0"),
                                      ("vit", "norm_pre")])
def test_the_default_cut_is_before_the_last_weight_layer_before_the_head_on_any_model(name, cut):
    torch.manual_seed(0)
    model = USER_MODELS[name]()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[LatentReplay()])
    assert s.plugins[0].cut == cut


def test_lower_layers_do_not_change_after_the_first_experience_and_upper_ones_do():
    plugin = LatentReplay(memory=12)
    s, bench = make(plugin)
    s.train(bench.train_stream[0])
    lower, upper = snapshot(s.model.backbone[:3]), snapshot(s.model.backbone[3:])
    for exp in bench.train_stream[1:]:
        s.train(exp)
    assert all(torch.equal(a, b) for a, b in zip(lower, snapshot(s.model.backbone[:3])))
    assert not any(torch.equal(a, b) for a, b in zip(upper, snapshot(s.model.backbone[3:])))
    assert not any(p.requires_grad for p in s.model.backbone[:3].parameters())
    assert all(p.requires_grad for p in s.model.backbone[3:].parameters())
    frozen = [g for g in s.optimizer.param_groups if any(p is s.model.backbone[1].weight for p in g["params"])]
    assert frozen[0]["lr"] == 0.0


def test_slow_lower_layers_learn_at_the_factor_and_keep_their_gradients():
    plugin = LatentReplay(memory=12, lower_lr=0.1)
    s, bench = make(plugin)
    s.train(bench.train_stream[0])
    before = snapshot(s.model.backbone[:3])
    s.train(bench.train_stream[1])
    assert all(p.requires_grad for p in s.model.parameters())
    assert not torch.equal(before[0], s.model.backbone[1].weight)
    group = [g for g in s.optimizer.param_groups if any(p is s.model.backbone[1].weight for p in g["params"])][0]
    assert group["lr"] == pytest.approx(0.01)


def test_stored_latents_equal_the_lower_part_on_the_stored_samples():
    plugin = LatentReplay(memory=12)
    s, bench = train(plugin)
    mem = plugin.memory
    assert len(mem) == 12 and torch.bincount(mem.labels, minlength=6).tolist() == [2] * 6
    s.model.eval()
    with torch.no_grad():
        for exp in bench.train_stream:
            data = exp.dataset
            z = s.model.backbone[:3](data.x)
            for c in exp.classes:
                stored = mem.inputs()[mem.labels == c]
                gap = torch.cdist(stored, z[data.y == c])  # each stored latent is lower(x) of one sample of c
                assert gap.min(1).values.max() < 1e-5
                assert len(set(gap.argmin(1).tolist())) == len(stored)  # distinct samples
    assert torch.equal(mem.t[:len(mem)], torch.zeros(12, dtype=torch.long))


def test_old_classes_keep_their_first_latents_when_quotas_shrink():
    plugin = LatentReplay(memory=12)
    s, bench = make(plugin)
    s.train(bench.train_stream[0])  # 6 per class
    first = plugin.memory.inputs()[plugin.memory.labels == 0].clone()
    s.train(bench.train_stream[1])
    assert torch.equal(plugin.memory.inputs()[plugin.memory.labels == 0], first[:3])


def test_replay_term_matches_a_hand_computation():
    plugin = LatentReplay(memory=12, batch_size=5)
    s, bench = train(plugin, n_exp=2)
    model, mem = s.model, plugin.memory
    twin = torch.Generator()
    twin.set_state(s.generator.get_state())
    slots = torch.randint(len(mem), (5,), generator=twin)  # the draw the plugin makes next
    z, y = mem.x[slots], mem.y[slots]
    lin, head = model.backbone[3], model.head
    logits = torch.relu(z @ lin.weight.T + lin.bias) @ head.weight.T + head.bias
    hand = (torch.logsumexp(logits, 1) - logits[torch.arange(5), y]).mean()
    batch = Batch(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    terms = plugin.loss_terms(strategy=s, batch=batch, output=None)
    assert set(terms) == {"latent_replay"}
    assert torch.allclose(terms["latent_replay"], hand, atol=1e-6)
    assert torch.equal(s.generator.get_state(), twin.get_state())  # it drew from strategy.generator


def test_replayed_latents_are_scored_with_the_adapted_logits_a_task_mask_included():
    class HideFirst:  # a task mask that hides class 0 from every sample, once switched on
        active = False

        @hookimpl
        def adapt_logits(self, logits):
            return logits.masked_fill(torch.arange(logits.shape[1]) == 0, float("-inf")) if self.active else None

    torch.manual_seed(0)
    bench = tiny_benchmark(4, 2)
    model, plugin, hide = MLP(8, [16, 16], 4), LatentReplay(memory=12, batch_size=5), HideFirst()
    s = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin, hide], batch_size=16, seed=0)
    for exp in bench.train_stream:
        s.train(exp)
    mem = plugin.memory.batch()
    keep = mem.y != 0
    mem = Batch(mem.x[keep], mem.y[keep], mem.t[keep])
    raw = plugin.upper_logits(s, mem.x, mem.t)
    assert torch.allclose(plugin.replay_logits(s, mem), raw)  # nothing adapts: the raw logits
    hide.active = True
    masked = plugin.replay_logits(s, mem)
    assert torch.isneginf(masked[:, 0]).all() and torch.allclose(masked[:, 1:], raw[:, 1:])


def test_replay_term_flows_into_the_loss_from_the_second_experience():
    plugin = LatentReplay(memory=12)
    s, bench = make(plugin)
    s.train(bench.train_stream[0])
    assert "latent_replay" not in s.loss_terms
    s.train(bench.train_stream[1])
    assert set(s.loss_terms) == {"task", "latent_replay"}
    assert s.loss_terms["latent_replay"].requires_grad


def test_memory_bytes_counts_latents_not_inputs():
    plugin = LatentReplay(memory_bytes=800)  # 16 floats * 4 + 16 bytes of labels = 80 bytes a latent
    train(plugin)
    assert plugin.capacity == 10 and len(plugin.memory) == 10
    with pytest.raises(ConfigError, match="holds no latent"):
        train(LatentReplay(memory_bytes=40))


class NoHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 4)

    def forward(self, x):
        return self.net(x)


def test_bad_configs_are_refused_clearly():
    for kwargs in ({"memory": 0}, {"memory": -3}, {"memory": None}, {"memory": 2.5}, {"layer": 0}, {"layer": 1.5},
                   {"layer": ""}, {"batch_size": 0}, {"lower_lr": -0.1}, {"lower_lr": float("nan")},
                   {"memory_bytes": 0}):
        with pytest.raises(ConfigError):
            LatentReplay(**kwargs)
    with pytest.raises(ConfigError, match="needs a classifier head to place the default cut.*layer='path.to.module'"):
        Strategy(headless := NoHead(), torch.optim.SGD(headless.parameters(), lr=0.1), plugins=[LatentReplay()])
    with pytest.raises(ConfigError, match="layer=9 is out of range.*1 to 5"):
        make(LatentReplay(layer=9))
    with pytest.raises(ConfigError, match="layer='backbone.7': MLP has no module there; its modules include backbone"):
        make(LatentReplay(layer="backbone.7"))
    with pytest.raises(ConfigError, match="layer='head' holds or is MLP's classifier head"):
        make(LatentReplay(layer="head"))
    flat = Classifier(nn.Sequential(nn.Flatten()), nn.Linear(8, 4), 8)
    with pytest.raises(ConfigError, match="no layer with a weight matrix before its classifier head"):
        Strategy(flat, torch.optim.SGD(flat.parameters(), lr=0.1), plugins=[LatentReplay()])


# ------------------------------------------------------------------------------ models that are not a chain
class Reshaping(nn.Module):
    """Work between its modules in forward (a learned shift, a reshape, functional ReLUs), as ResNet's flatten
    and ViT's class token: chain 'a', 'norm', 'b', 'fc'; the default cut is 'norm' (before 'b')."""

    def __init__(self, n_classes=6):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(8))
        self.a, self.norm = nn.Linear(8, 6), nn.BatchNorm1d(6)
        self.b, self.fc = nn.Linear(3, 4), nn.Linear(8, n_classes)

    def forward(self, x):
        h = torch.relu(self.norm(self.a(x + self.shift)))
        return self.fc(torch.relu(self.b(h.view(-1, 2, 3))).flatten(1))


def make_model(model, plugin, lr=0.1, **kwargs):
    return Strategy(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), plugins=[plugin], epochs=2,
                    batch_size=16, seed=0, **kwargs)


def test_a_model_that_is_not_a_chain_is_replayed_through_its_forward_with_a_hook_by_hand():
    torch.manual_seed(0)
    plugin, bench = LatentReplay(memory=12, batch_size=5), tiny_benchmark(6, 3)
    s = make_model(Reshaping(), plugin)
    assert plugin.cut == "norm"
    s.train(bench.train_stream[0])
    assert plugin.mode == "hook" and plugin.stub_rows == 1  # the chain b(norm(.)) does not fit: 6 features, not 3
    m = s.model
    z = plugin.memory.x[:5]
    with torch.no_grad():  # each stored latent is the norm's output (eval mode) on one of the samples
        m.eval()
        outputs = m.norm(m.a(bench.train_stream[0].dataset.x + m.shift))
        m.train()
    gap = (plugin.memory.inputs()[:, None] - outputs[None]).abs().amax(-1)
    assert gap.min(1).values.max() < 1e-5
    hand = m.fc(torch.relu(m.b(torch.relu(z).view(-1, 2, 3))).flatten(1))
    assert torch.allclose(plugin.upper_logits(s, z), hand, atol=1e-6)
    # below the cut: the parameters the replayed logits do not depend on, the learned shift included
    assert sorted(plugin.lower_names) == ["a.bias", "a.weight", "norm.bias", "norm.weight", "shift"]
    assert plugin.lower_modules == ["a", "norm"]


def test_below_a_hook_cut_parameters_and_normalisation_statistics_stay_fixed():
    torch.manual_seed(0)
    plugin, bench = LatentReplay(memory=12), tiny_benchmark(6, 3)
    s = make_model(Reshaping(), plugin)
    s.train(bench.train_stream[0])
    m = s.model
    lower = {n: t.clone() for n, t in [*m.a.state_dict().items(), *m.norm.state_dict().items(), ("shift", m.shift)]}
    upper = [p.detach().clone() for p in (*m.b.parameters(), *m.fc.parameters())]
    for exp in bench.train_stream[1:]:
        s.train(exp)
    now = {n: t for n, t in [*m.a.state_dict().items(), *m.norm.state_dict().items(), ("shift", m.shift)]}
    assert all(torch.equal(lower[n], now[n]) for n in lower), "lower weights or batch-norm statistics moved"
    assert not any(torch.equal(a, b) for a, b in zip(upper, (*m.b.parameters(), *m.fc.parameters())))


class SkipAcross(nn.Module):
    """fc(relu(b(relu(a(x)))) + x[:, :6]): the input skips over a cut at 'a'."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(8, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))) + x[:, :6])


def test_a_connection_skipping_over_the_cut_is_refused_naming_the_model():
    torch.manual_seed(0)
    s = make_model(SkipAcross(), LatentReplay(memory=12))
    assert s.plugins[0].cut == "a"
    with pytest.raises(ConfigError, match="cannot replay latents taken at 'a' of SkipAcross"):
        s.train(tiny_benchmark(6, 3).train_stream[0])


def test_a_cut_by_path_on_a_plain_sequential_replays_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 6))
    plugin, bench = LatentReplay(memory=12, layer="1"), tiny_benchmark(6, 3)
    s = make_model(model, plugin)
    s.train(bench.train_stream[0])
    assert plugin.mode == "chain" and plugin.lower_names == ["0.weight", "0.bias"]
    z = plugin.memory.x[:4]
    assert torch.equal(plugin.upper_logits(s, z), model[4](model[3](model[2](z))))


def test_state_dict_round_trip_continues_identically(tmp_path):
    plugin = LatentReplay(memory=12)
    s, bench = make(plugin)
    for exp in bench.train_stream[:2]:
        s.train(exp)
    s.save_checkpoint(tmp_path / "a.pt")
    s.train(bench.train_stream[2])
    expected = s.eval(bench.test_stream)

    again, _ = make(LatentReplay(memory=12))
    again.load_checkpoint(tmp_path / "a.pt")
    assert torch.equal(again.plugins[0].memory.inputs(), torch.load(tmp_path / "a.pt", weights_only=False)[
        "plugin_states"][0]["memory"]["x"][:12])
    again.train(bench.train_stream[2])
    assert again.eval(bench.test_stream)["accuracy"] == expected["accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(snapshot(s.model), snapshot(again.model)))


def test_resume_inside_an_experience_keeps_the_lower_layers_fixed(tmp_path, monkeypatch):
    from tests.reliability import Crash, crash_at_step

    s, bench = train(LatentReplay(memory=12))
    expected = snapshot(s.model)

    crashing, _ = make(LatentReplay(memory=12), checkpoint_dir=tmp_path, checkpoint_every=4)
    crash_at_step(monkeypatch, 17)  # in the third experience (6 steps each), after the checkpoint at step 16
    with pytest.raises(Crash):
        for exp in bench.train_stream:
            crashing.train(exp)
    monkeypatch.undo()
    resumed, _ = make(LatentReplay(memory=12), checkpoint_dir=tmp_path, checkpoint_every=4)
    resumed.load_checkpoint()
    for exp in bench.train_stream[2:]:
        resumed.train(exp)
    assert all(torch.equal(a, b) for a, b in zip(expected, snapshot(resumed.model)))
