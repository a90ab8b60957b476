"""Cost per experience on long streams: does a recipe's training time or memory grow with the experiences seen?

    python benchmarks/long_stream.py [--experiences 5 20 100] [--methods naive ewc gem ...] [--out docs/speed.md]
    python benchmarks/long_stream.py --online   # 1000 experiences of 60 images, minibatches of 10

The stream: permuted Fashion-MNIST cut into T experiences in dataset order (T = 100: 600 training images each;
permutation k seeded with k, experience 0 unpermuted), the PFM-5 model and optimizer (MLP 784-256-256-10, SGD
lr 0.01 momentum 0.9, batch 128), 1 epoch, no evaluation. Each recipe runs in its own process, one thread;
"early" is the mean training seconds of experiences 1-3 (the first has no memory to replay yet), "late" the mean
of the last three; RSS growth is the resident set size after the last experience minus after the first. The
table goes under "## Long streams" in ``--out``. ``--online``: T = 1000 (60 images each) trained with minibatches of
10 (a single pass, as online learning), "early" and "late" the means of experiences 1-50 and of the last 50, the
methods designed for it by default (10th percentiles: an experience takes milliseconds here and the machine's
other load only adds time); the table goes under "## Online long stream".
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["naive", "replay", "lwf", "derpp", "si", "mas", "ewc", "online_ewc", "progress_compress", "gem", "agem",
           "der"]
ONLINE = ["naive", "replay", "derpp", "er_ace", "ewc", "si"]
HEADING, ONLINE_HEADING = "## Long streams", "## Online long stream"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(method: str, n_experiences: int, batch_size: int = 128) -> dict:
    """Train ``method`` on the T-experience stream in this process; seconds per experience and RSS."""
    import torch

    from streamcl import Strategy
    from streamcl.methods import build_method
    from streamcl.models import MLP
    from streamcl.scenarios import permuted_fmnist

    torch.set_num_threads(1)
    torch.manual_seed(0)
    bench = permuted_fmnist(n_experiences=n_experiences)
    model = MLP(784, [256, 256], 10)
    plugins, _ = build_method(method)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), plugins=plugins,
                        batch_size=batch_size, epochs=1, seed=0)
    seconds, rss = [], []
    for exp in bench.train_stream:
        start = time.perf_counter()
        strategy.train(exp)
        seconds.append(time.perf_counter() - start)
        rss.append(rss_mb())
    params = sum(p.numel() for p in strategy.model.parameters())
    return {"seconds": seconds, "rss": rss, "params": params}


def measure(method: str, n_experiences: int, batch_size: int = 128) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", method, str(n_experiences), str(batch_size)],
                         capture_output=True,
                         text=True, cwd=ROOT, env={"OMP_NUM_THREADS": "1", **_env()})
    if out.returncode:
        raise SystemExit(f"{method} T={n_experiences} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env() -> dict:
    import os
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def cell(run: dict, window: int = 3) -> str:
    """Early -> late seconds per experience: means of ``window`` experiences (3); when longer (online, where an
    experience takes milliseconds and other load on the machine only adds time), their 10th percentiles."""
    s = run["seconds"]
    first, last = s[1:1 + window] or s[:1], s[-window:]
    average = (lambda v: statistics.quantiles(v, n=10)[0]) if window > 3 else statistics.mean
    early, late = average(first), average(last)
    digits = 2 if early >= 0.1 else 4
    return f"{early:.{digits}f} -> {late:.{digits}f} s ({late / early:.1f}x)"


def table(results: dict, sizes: list[int], window: int = 3) -> list[str]:
    lines = [f"| recipe | {' | '.join(f'T = {t}' for t in sizes)} | RSS growth over T = {sizes[-1]} | "
             f"parameters at T = {sizes[-1]} |", "|---|" + "---|" * (len(sizes) + 2)]
    for method, runs in results.items():
        last = runs[sizes[-1]]
        lines.append(f"| {method} | {' | '.join(cell(runs[t], window) for t in sizes)} | "
                     f"{last['rss'][-1] - last['rss'][0]:+.0f} MB | {last['params']:,} |")
    return lines


def write(out: Path, lines: list[str], sizes: list[int], online: bool = False) -> None:
    heading = ONLINE_HEADING if online else HEADING
    intro = [heading, "", f"Training seconds per experience early in the stream -> at its end (experiences 1-3 "
             f"against the last three), permuted Fashion-MNIST cut into T experiences (T = 100: 600 images each), "
             f"1 epoch, one thread, no evaluation; regenerate with `python benchmarks/long_stream.py "
             f"--experiences {' '.join(map(str, sizes))}`.", ""]
    if online:
        intro[2] = ("Training seconds per experience early in the stream -> at its end (the 10th percentile of "
                    "experiences 1-50 against that of the last 50), permuted Fashion-MNIST cut into 1000 experiences of 60 images, a single pass with "
                    "minibatches of 10, one thread, no evaluation; regenerate with `python "
                    "benchmarks/long_stream.py --online`.")
    text = out.read_text() if out.exists() else "# Speed\n"
    section = "\n".join(intro + lines) + "\n"
    if heading in text:
        text = re.sub(rf"(?ms)^{re.escape(heading)}\n.*?(?=^## |\Z)", section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    out.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiences", nargs="+", type=int, default=[5, 20, 100])
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--online", action="store_true", help="1000 experiences of 60 images, minibatches of 10")
    parser.add_argument("--out", default=str(ROOT / "docs" / "speed.md"))
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return 0
    sizes, batch, window = ([1000], 10, 50) if args.online else (args.experiences, 128, 3)
    results = {}
    for method in args.methods or (ONLINE if args.online else METHODS):
        results[method] = {}
        for t in sizes:
            results[method][t] = measure(method, t, batch)
            print(method, t, cell(results[method][t], window), flush=True)
    lines = table(results, sizes, window)
    print("\n".join(lines))
    write(Path(args.out), lines, sizes, args.online)
    return 0


if __name__ == "__main__":
    sys.exit(main())
