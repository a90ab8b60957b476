"""Engine overhead on SFM-5: ``Strategy`` vs. the fastest simple hand-written loop doing the same work.

``--method naive`` (default): no plugins vs. a plain loop. ``--method replay``: ``Replay(memory=500)``
vs. a hand-written experience-replay loop (class-balanced random memory of 500 samples updated
after each experience; every minibatch joined by 128 samples drawn uniformly from memory).


Both train the protocol's MLP (784-256-256-10, SGD lr 0.01 momentum 0.9, batch 128, 2 epochs
per experience) on real Split Fashion-MNIST from the same initial weights, in the same batch
order (shuffled index slices of in-memory tensors), alternating in one process. Each round
checks that both ended with the same weights, so they did the same work. Prints per-iteration
times and, on the last line, ``ratio <median of per-round Strategy/hand time ratios>``.

    python benchmarks/overhead.py [--method naive|replay] [--rounds 9] [--warmup 1]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from streamcl import Strategy
from streamcl.datasets import fashion_mnist
from streamcl.models import MLP
from streamcl.plugins import Replay
from streamcl.scenarios import class_incremental

EPOCHS, BATCH, LR, MOMENTUM = 2, 128, 0.01, 0.9


def optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


MEMORY = 500


def hand_loop(model, stream, seed: int, replay: bool = False) -> int:
    """The reference: per experience and epoch, a randperm, then index slices, forward, backward, step;
    with ``replay``, each minibatch also takes BATCH random memory samples, and the memory is rebuilt
    after each experience (old classes keep their first quota, new classes a random pick)."""
    opt, gen, steps = optimizer(model), torch.Generator().manual_seed(seed), 0
    mem_x, mem_y, classes = None, None, []
    model.train()
    for exp in stream:
        x, y = exp.dataset.x, exp.dataset.y
        for _ in range(EPOCHS):
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), BATCH):
                idx = perm[i:i + BATCH]
                xb, yb = x[idx], y[idx]
                if replay and mem_y is not None:
                    r = torch.randint(len(mem_y), (BATCH,), generator=gen)
                    xb, yb = torch.cat([xb, mem_x[r]]), torch.cat([yb, mem_y[r]])
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
        if replay:
            classes += list(exp.classes)
            quota = {c: MEMORY // len(classes) + (k < MEMORY % len(classes)) for k, c in enumerate(classes)}
            pool_x = x if mem_x is None else torch.cat([mem_x, x])
            pool_y = y if mem_y is None else torch.cat([mem_y, y])
            n_old = 0 if mem_y is None else len(mem_y)
            keep = [torch.nonzero(pool_y[:n_old] == c).flatten()[:quota[c]] for c in classes if c not in exp.classes]
            for c in exp.classes:
                members = torch.nonzero(pool_y == c).flatten()
                keep.append(members[torch.randperm(len(members), generator=gen)[:quota[c]]])
            keep = torch.cat(keep)
            mem_x, mem_y = pool_x[keep], pool_y[keep]
    return steps


def engine_loop(model, stream, seed: int, replay: bool = False) -> int:
    plugins = [Replay(memory=MEMORY)] if replay else []
    strategy = Strategy(model, optimizer(model), plugins=plugins, epochs=EPOCHS, batch_size=BATCH, seed=seed)
    for exp in stream:
        strategy.train(exp)
    return strategy.global_step


def timed(fn, *args) -> tuple[float, int]:
    start = time.perf_counter()
    steps = fn(*args)
    return time.perf_counter() - start, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("naive", "replay"), default="naive")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    args = parser.parse_args()
    torch.manual_seed(0)
    train, test = fashion_mnist()
    stream = class_incremental(train, test, 5, class_order=list(range(10))).train_stream
    init = MLP().state_dict()
    ratios, hand_ms, engine_ms = [], [], []
    for r in range(-args.warmup, args.rounds):
        models = {}
        for name, fn in (("hand", hand_loop), ("engine", engine_loop))[:: 1 if r % 2 == 0 else -1]:
            model = MLP()
            model.load_state_dict(copy.deepcopy(init))
            seconds, steps = timed(fn, model, stream, r, args.method == "replay")
            models[name] = (model, seconds, steps)
        (hm, ht, hs), (em, et, es) = models["hand"], models["engine"]
        same = hs == es and all(torch.equal(a, b) for a, b in zip(hm.state_dict().values(), em.state_dict().values()))
        if not same:
            raise SystemExit(f"round {r}: the two loops did different work ({hs} vs {es} steps or other weights)")
        if r < 0:
            print(f"warm-up round: hand {1000 * ht / hs:.3f} ms/it, strategy {1000 * et / es:.3f} ms/it (not counted)")
            continue
        hand_ms.append(1000 * ht / hs)
        engine_ms.append(1000 * et / es)
        ratios.append(et / ht)
        print(f"round {r}: hand {hand_ms[-1]:.3f} ms/it, strategy {engine_ms[-1]:.3f} ms/it, "
              f"ratio {ratios[-1]:.3f} ({hs} iterations, same weights)")
    print(f"median ms per iteration: hand {statistics.median(hand_ms):.3f}, strategy {statistics.median(engine_ms):.3f}")
    print(f"ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
