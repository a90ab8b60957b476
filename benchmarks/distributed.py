"""Samples per second on SFM-5 for 1 and 2 processes (torchrun, gloo on CPU or NCCL on GPUs).

Runs the same `streamcl run` (Naive, the SFM-5 protocol: 5 experiences x 12,000 samples x 2
epochs = 120,000 training samples) as one plain process and under
``torchrun --nproc_per_node=N`` for each N given, in one go, and prints training samples per
second (from results.json's train_seconds), wall seconds, and final accuracy.

    python benchmarks/distributed.py [--procs 1 2] [--device cpu] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLES = 5 * 12000 * 2


def run(cmd: list[str], out: Path) -> tuple[float, float, float]:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - start
    res = json.loads((out / "results.json").read_text())
    return SAMPLES / res["train_seconds"], wall, res["final_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "naive.toml"
        cfg.write_text(f'seed = 0\n[train]\ndevice = "{args.device}"\n[log]\ntensorboard = false\n')
        setups = [("1 process (plain)", [])] + [(f"{n} process(es) (torchrun)", [n]) for n in args.procs]
        for name, procs in setups:
            measured = []
            for r in range(args.repeats):
                out = Path(tmp) / f"{len(rows)}-{r}"
                launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={procs[0]}"] if procs else [sys.executable])
                measured.append(run(launcher + ["-m", "streamcl", "run", str(cfg), "--out", str(out), "--quiet"], out))
            rate = statistics.median(m[0] for m in measured)
            rows.append((name, rate, statistics.median(m[1] for m in measured), measured[0][2]))
            print(f"{name}: {rate:,.0f} samples/s, wall {rows[-1][2]:.1f} s, final accuracy {rows[-1][3]:.4f}",
                  flush=True)
    base = rows[0][1]
    print("\n| setup | training samples/s | vs 1 process | wall seconds | final accuracy |\n|---|---|---|---|---|")
    for name, rate, wall, acc in rows:
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {wall:.1f} | {acc:.4f} |")


if __name__ == "__main__":
    main()
