"""Engine overhead on SFM-5: ``Strategy`` vs. the fastest simple hand-written loop doing the same work.

``--method naive`` (default): no plugins vs. a plain loop. ``--method replay``: ``Replay(memory=500)``
vs. a hand-written experience-replay loop (class-balanced random memory of 500 samples updated
after each experience; every minibatch joined by 128 samples drawn uniformly from memory).


Both train the protocol's MLP (784-256-256-10, SGD lr 0.01 momentum 0.9, batch 128, 2 epochs
per experience) on real Split Fashion-MNIST from the same initial weights, in the same batch
order (shuffled index slices of in-memory tensors), alternating in one process. Each round
checks that both ended with the same weights, so they did the same work. Prints per-iteration
times, images per second and, on the last line, ``ratio <median of per-round Strategy/hand time ratios>``.

``--augment`` is SFM-5-CNN's loop: the small CNN, every minibatch (replayed samples too) cropped after
2-pixel padding and flipped on the device (``streamcl.augment.CropFlip``, drawn from the same seeds in
both loops) and a cosine learning rate per experience. ``--model resnet32 --data cifar-synthetic
--device cuda`` measures the GPU path: ResNet-32 on random uint8 CIFAR-shaped images (50,000, 100
classes in 10 experiences) standardised on the device, with the same augmentation.

    python benchmarks/overhead.py [--method naive|replay] [--augment] [--model mlp|cnn|resnet32]
                                  [--data fmnist|cifar-synthetic] [--device cpu|cuda] [--experiences N]
                                  [--rounds 9] [--warmup 1]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from streamcl import Strategy, schedule
from streamcl.augment import build as build_augment
from streamcl.datasets import fashion_mnist
from streamcl.models import MLP, SmallCNN
from streamcl.models.inputs import Standardize
from streamcl.plugins import Replay
from streamcl.scenarios import TensorData, class_incremental
from streamcl.scenarios.data import seeded

EPOCHS, BATCH, LR, MOMENTUM = 2, 128, 0.01, 0.9
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class Setup:
    """What both loops share: the augmentation (or none) and the schedule (or none)."""

    def __init__(self, augment: bool, device: str, sample_shape: tuple):
        padding = 4 if tuple(sample_shape) == (3, 32, 32) else None  # the CIFAR recipe; SFM-5-CNN's 2 otherwise
        self.augment = build_augment("crop_flip", sample_shape, padding) if augment else None
        self.schedule = schedule.Cosine() if augment else None
        self.device = torch.device(device)


def optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


MEMORY = 500


def hand_loop(model, stream, seed: int, replay: bool, setup: Setup) -> int:
    """The reference: per experience and epoch, a randperm, then index slices, forward, backward, step;
    with ``replay``, each minibatch also takes BATCH random memory samples, and the memory is rebuilt
    after each experience (old classes keep their first quota, new classes a random pick). With
    ``setup.augment`` every minibatch is augmented (seeded per step as the engine seeds it) and the
    learning rate follows the cosine of ``setup.schedule`` within each experience."""
    opt, gen, steps = optimizer(model), torch.Generator().manual_seed(seed), 0
    mem_x, mem_y, classes = None, None, []
    model.train()
    for exp in stream:
        x, y = exp.dataset.x.to(setup.device), exp.dataset.y.to(setup.device)
        per_epoch = -(-len(y) // BATCH)
        for epoch in range(EPOCHS):
            perm = torch.randperm(len(y), generator=gen).to(setup.device)
            for k, i in enumerate(range(0, len(y), BATCH)):
                idx = perm[i:i + BATCH]
                xb, yb = x[idx], y[idx]
                if replay and mem_y is not None:
                    r = torch.randint(len(mem_y), (BATCH,), generator=gen).to(setup.device)
                    xb, yb = torch.cat([xb, mem_x[r]]), torch.cat([yb, mem_y[r]])
                if setup.schedule is not None:
                    for g in opt.param_groups:
                        g["lr"] = LR * setup.schedule(epoch * per_epoch + k, EPOCHS * per_epoch)
                if setup.augment is not None:
                    with seeded(hash((seed, -1, steps)) % 2**63):
                        xb = setup.augment(xb)
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


def engine_loop(model, stream, seed: int, replay: bool, setup: Setup) -> int:
    plugins = [Replay(memory=MEMORY)] if replay else []
    strategy = Strategy(model, optimizer(model), plugins=plugins, epochs=EPOCHS, batch_size=BATCH, seed=seed,
                        augment=setup.augment, schedule=setup.schedule, device=setup.device)
    for exp in stream:
        strategy.train(exp)
    return strategy.global_step


def timed(fn, *args) -> tuple[float, int]:
    device = args[-1].device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    steps = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, steps


def data_and_model(data: str, model: str):
    """The training stream and a model factory: real Split Fashion-MNIST (flat for the MLP, 1x28x28 images
    for the CNN), or 50,000 random uint8 images of 3x32x32 in 10 experiences of 10 classes."""
    if data == "fmnist":
        train, test = fashion_mnist(flatten=model == "mlp")
        stream = class_incremental(train, test, 5, class_order=list(range(10))).train_stream
        n_classes, shape = 10, tuple(train.x.shape[1:])
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.arange(100).repeat(500)
        stream = class_incremental(TensorData(x, y), TensorData(x[:100], y[:100]), 10).train_stream
        n_classes, shape = 100, (3, 32, 32)
    if model == "mlp":
        return stream, lambda: MLP()
    if model == "cnn":
        return stream, lambda: SmallCNN(1, n_classes)
    from streamcl.models import build  # the registry's models (resnet32, ...)
    return stream, lambda: Standardize(build(model, n_classes=n_classes, sample_shape=shape), CIFAR_MEAN, CIFAR_STD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("naive", "replay"), default="naive")
    parser.add_argument("--augment", action="store_true", help="crop-and-flip on the device and a cosine schedule")
    parser.add_argument("--model", default=None, help="mlp (default; cnn with --augment), cnn, resnet32, ...")
    parser.add_argument("--data", choices=("fmnist", "cifar-synthetic"), default=None,
                        help="default: fmnist, cifar-synthetic for resnet models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--experiences", type=int, default=None, help="train on the first N experiences only")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    args = parser.parse_args()
    model_name = args.model or ("cnn" if args.augment else "mlp")
    data = args.data or ("fmnist" if model_name in ("mlp", "cnn") else "cifar-synthetic")
    stream, make = data_and_model(data, model_name)
    stream = stream[:args.experiences] if args.experiences else stream
    setup = Setup(args.augment, args.device, tuple(stream[0].dataset.x.shape[1:]))
    torch.manual_seed(0)
    init = make().state_dict()
    images = sum(len(e) for e in stream) * EPOCHS
    print(f"{args.method} on {model_name}, {data}, {'augmented, cosine' if args.augment else 'plain'}, "
          f"{setup.device}: {images} new images per run (plus replayed ones)")
    ratios, hand_ms, engine_ms = [], [], []
    for r in range(-args.warmup, args.rounds):
        models = {}
        for name, fn in (("hand", hand_loop), ("engine", engine_loop))[:: 1 if r % 2 == 0 else -1]:
            model = make()
            model.load_state_dict(copy.deepcopy(init))
            seconds, steps = timed(fn, model.to(setup.device), stream, r, args.method == "replay", setup)
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
    print(f"new images per second: hand {images * len(hand_ms) / sum(hand_ms) / (hs / 1000):.0f}, "
          f"strategy {images * len(engine_ms) / sum(engine_ms) / (es / 1000):.0f}")
    print(f"ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
