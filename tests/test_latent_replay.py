
import pytest
import torch
from torch import nn

from streamcl import Batch, ConfigError, Strategy
from streamcl.models import MLP, Classifier
from streamcl.plugins.latent_replay import LatentReplay
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
    assert LatentReplay().split(MLP()) == 3  # [Flatten, Linear(784,256), ReLU | Linear(256,256), ReLU] + head
    assert LatentReplay(layer=5).split(MLP()) == 5


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


class NoSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 4)

    def forward(self, x):
        return self.net(x)


def test_bad_configs_are_refused_clearly():
    for kwargs in ({"memory": 0}, {"memory": -3}, {"memory": None}, {"memory": 2.5}, {"layer": 0}, {"layer": 1.5},
                   {"batch_size": 0}, {"lower_lr": -0.1}, {"lower_lr": float("nan")}, {"memory_bytes": 0}):
        with pytest.raises(ConfigError):
            LatentReplay(**kwargs)
    with pytest.raises(ConfigError, match="nn.Sequential .backbone"):
        s = Strategy(NoSequential(), torch.optim.SGD(NoSequential().parameters(), lr=0.1), plugins=[LatentReplay()])
        s.train(tiny_benchmark(4, 2).train_stream[0])
    with pytest.raises(ConfigError, match="layer=9 is out of range.*1 to 5"):
        train(LatentReplay(layer=9))
    flat = Classifier(nn.Sequential(nn.Flatten()), nn.Linear(8, 4), 8)
    with pytest.raises(ConfigError, match="no nn.Linear"):
        Strategy(flat, torch.optim.SGD(flat.parameters(), lr=0.1), plugins=[LatentReplay()]).train(
            tiny_benchmark(4, 2).train_stream[0])


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
