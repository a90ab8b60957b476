"""The replay memory's maths against hand computations: herding, reservoir, budgets, storage, compression."""
import math

import pytest
import torch

from streamcl import ConfigError
from streamcl.memory import Budget, Codec, Memory, balanced, herding, random_pick, reservoir


def test_herding_picks_by_hand():
    # Normalised features on the unit circle; mean mu = (0.6, 0.4)/... computed below.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    mu = f.mean(0)  # (0.6, 0.6); all rows already have unit norm
    # pick 1: the row closest to mu: distances^2 = 0.52, 0.52, 0.04, 0.04 -> index 2 (first of the ties)
    # pick 2: argmin || mu - (f[2] + f[i]) / 2 ||: i=3 gives (0.7, 0.7) -> 0.02; i=0 (0.8, 0.4) -> 0.08;
    #         i=1 (0.3, 0.9) -> 0.18 -> index 3
    # pick 3: (f2 + f3 + f_i)/3: i=0 -> (0.8, 0.467): 0.0578; i=1 -> (0.467, 0.8): 0.0578 -> index 0 (first)
    assert herding(f, 3).tolist() == [2, 3, 0]
    assert torch.allclose(mu, torch.tensor([0.6, 0.6]))
    # scale does not matter: features are L2-normalised first
    assert herding(f * torch.tensor([[3.0], [0.5], [2.0], [7.0]]), 3).tolist() == [2, 3, 0]
    assert herding(f, 10).tolist() == [2, 3, 0, 1]  # never more than there are, never a repeat



def test_herding_is_the_distance_rule_on_random_features_with_a_zero_row():
    """The matrix-vector form picks what Alg. 4's distances pick, pick by pick."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    f = torch.randn(300, 16, generator=g).relu()
    f[7] = 0  # normalises to a zero vector: its squared norm is 0, not 1
    phi = F.normalize(f, dim=1)
    mu, running, picks = phi.mean(0), torch.zeros(16), []
    for k in range(40):
        gap = (mu - (running + phi) / (k + 1)).pow(2).sum(1)
        gap[picks] = float("inf")
        picks.append(int(gap.argmin()))
        running += phi[picks[-1]]
    assert herding(f, 40).tolist() == picks

def test_reservoir_fills_then_keeps_each_item_with_equal_probability():
    g = torch.Generator().manual_seed(0)
    slots, items = reservoir(0, 5, 8, g)
    assert slots.tolist() == items.tolist() == [0, 1, 2, 3, 4]  # filling: item i goes to slot i
    capacity, stream, trials = 10, 50, 4000
    counts = torch.zeros(stream)
    for trial in range(trials):
        memory = torch.full((capacity,), -1)
        seen = 0
        for batch in (7, 13, 5, 25):  # uneven minibatches, as a stream would give
            slots, items = reservoir(seen, batch, capacity, g)
            memory[slots] = items + seen
            seen += batch
        counts[memory] += 1
    # each of the 50 items is kept with probability 10/50: chi-square over 49 degrees of freedom
    expected = trials * capacity / stream
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 76.2, chi2  # the 0.99 quantile of chi-square(49)


def test_reservoir_within_one_batch_keeps_the_later_of_two_items_on_one_slot():
    g = torch.Generator().manual_seed(3)
    slots, items = reservoir(10, 200, 2, g)
    assert len(set(slots.tolist())) == len(slots)  # each slot written once
    for s, i in zip(slots.tolist(), items.tolist()):
        # no later item chose the same slot
        g2 = torch.Generator().manual_seed(3)
        count = 10 + torch.arange(200)
        draw = (torch.rand(200, generator=g2) * (count + 1)).long()
        assert s == draw[i] and not (draw[i + 1:] == s).any()


def test_budget_split_by_hand():
    assert Budget(total=500).quotas([0, 1]) == {0: 250, 1: 250}
    assert Budget(total=500).quotas([0, 1, 2]) == {0: 167, 1: 167, 2: 166}
    assert Budget(total=500).quotas(list(range(10))) == {c: 50 for c in range(10)}
    assert Budget(per_class=7).quotas([4, 9]) == {4: 7, 9: 7}


def test_balanced_keeps_each_groups_first_members():
    groups = torch.tensor([0, 1, 0, 0, 1, 2])
    assert balanced(groups, {0: 2, 1: 1}).tolist() == [0, 2, 1]
    priority = torch.tensor([3, 2, 0, 4, 1, 5])
    assert balanced(groups, {0: 2, 1: 5}, priority).tolist() == [3, 2, 4, 1]


def test_random_pick_is_a_subset_without_repeats():
    pick = random_pick(10, 4, torch.Generator().manual_seed(1))
    assert len(pick) == 4 == len(set(pick.tolist())) and pick.max() < 10


def test_memory_storage_is_preallocated_and_indexed():
    m = Memory(4)
    x, y, t = torch.arange(12.0).reshape(3, 4), torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long)
    m.append(x, y, t, logits=torch.ones(3, 2))
    storage = m.x.data_ptr()
    assert len(m) == 3 and m.x.shape == (4, 4) and m.extras["logits"].shape == (4, 2)
    m.write(torch.tensor([0]), x[2:], y[2:], t[2:], logits=torch.zeros(1, 2))
    assert m.x.data_ptr() == storage and m.y[:3].tolist() == [3, 2, 3]
    m.keep(torch.tensor([2, 1]))
    assert len(m) == 2 and m.labels.tolist() == [3, 2] and torch.equal(m.inputs(), torch.stack([x[2], x[1]]))
    with pytest.raises(ConfigError, match="free slots"):
        m.append(x, y, t, logits=torch.ones(3, 2))
    slots, batch = m.sample(5, torch.Generator().manual_seed(0))
    assert len(batch) == 5 and slots.max() < 2


@pytest.mark.parametrize("capacity", [0, -3, 2.5])
def test_memory_capacity_must_be_positive(capacity):
    with pytest.raises(ConfigError, match="memory capacity"):
        Memory(capacity)


def test_uint8_codec_round_trip_and_bytes():
    codec = Codec("uint8")
    x = torch.randn(5, 784)
    q, scale = codec.encode(x)
    back = codec.decode(q, scale, (784,), torch.float32)
    step = (x.max(1).values - x.min(1).values) / 255
    assert q.dtype == torch.uint8 and ((back - x).abs() <= step[:, None] / 2 + 1e-5).all()
    assert Codec().bytes_per_sample((784,), torch.float32) == 784 * 4 + 16
    assert codec.bytes_per_sample((784,), torch.float32) == 784 + 8 + 16
    # the same bytes as 500 float32 samples hold 1950 quantised ones
    assert (500 * (784 * 4 + 16)) // codec.bytes_per_sample((784,), torch.float32) == 1950


def test_downsampling_codec():
    codec = Codec(None, downsample=2, image_shape=(1, 4, 4))
    x = torch.arange(16.0).reshape(1, 16)
    q, _ = codec.encode(x)
    assert q.shape == (1, 1, 2, 2) and q[0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4
    back = codec.decode(q, None, (16,), torch.float32)
    assert back.shape == (1, 16) and back[0, :2].tolist() == [2.5, 2.5]
    with pytest.raises(ConfigError):
        Codec(None, downsample=2)
    with pytest.raises(ConfigError):
        Codec("jpeg")


def test_memory_counts_in_bytes_hold_more_when_compressed():
    assert math.floor(1_576_000 / Codec("uint8").bytes_per_sample((784,), torch.float32)) == 1950


def test_balanced_is_the_per_group_rule_in_quota_order_on_random_cases():
    """One sort gives what taking each named group's first members in priority order, group by group, gives."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        n, n_groups = int(torch.randint(0, 40, (1,), generator=gen)), int(torch.randint(1, 6, (1,), generator=gen))
        groups = torch.randint(0, n_groups + 2, (n,), generator=gen)
        named = torch.randperm(n_groups + 3, generator=gen)[:int(torch.randint(0, n_groups + 3, (1,), generator=gen))]
        quotas = {int(k): int(torch.randint(0, 5, (1,), generator=gen)) for k in named}
        priority = torch.randperm(n, generator=gen) if trial % 2 else None
        order = priority if priority is not None else torch.arange(n)
        expected = [int(i) for g, q in quotas.items() for i in order[groups[order] == g][:q]]
        assert balanced(groups, quotas, priority).tolist() == expected
