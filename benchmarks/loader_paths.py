"""The tensor fast path vs. the DataLoader path on a real protocol: same seed, same data, same augmentation.

The DataLoader path reads the same Fashion-MNIST images one by one from a map-style dataset (as a
user's torchvision dataset is read) with ``num_workers`` worker processes; the engine then augments
on the device as on the fast path. Prints both accuracy matrices, whether they are equal, and the
seconds of each run.

    python benchmarks/loader_paths.py [--protocol SFM-5-CNN] [--method replay] [--workers 2] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import time

from torch.utils.data import Dataset

from streamcl import config, runner
from streamcl.scenarios import TensorData


class Items(Dataset):
    """A map-style dataset over tensors: items ``(x[i], y[i])``, labels in ``targets``."""

    def __init__(self, data: TensorData):
        self.x, self.targets = data.x, data.y

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], int(self.targets[i])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default="SFM-5-CNN", choices=sorted(config.PROTOCOLS))
    parser.add_argument("--method", default="replay")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base = {**config.PROTOCOLS[args.protocol], "seed": args.seed, "method": {"name": args.method},
            "log": {"tensorboard": False, "console": False}}
    out = {}
    for name, train in (("tensors", {}), ("dataloader", {"num_workers": args.workers, "persistent_workers": True})):
        cfg = config.parse({**base, "train": {**base.get("train", {}), **train}})
        bench = runner.build_benchmark(cfg)
        if train:  # the same experiences, read item by item
            for stream in (bench.train_stream, bench.test_stream):
                for e in stream:
                    e.dataset = Items(e.dataset)
        start = time.perf_counter()
        out[name] = (runner.run(cfg, benchmark=bench)["accuracy_matrix"], time.perf_counter() - start)
        print(f"{name}: {out[name][1]:.1f} s, final row {json.dumps(out[name][0][-1])}", flush=True)
    print("same accuracy matrix:", out["tensors"][0] == out["dataloader"][0])


if __name__ == "__main__":
    main()
