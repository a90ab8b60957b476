"""Regenerate docs/results.md: each recipe on SFM-5 over seeds 0, 1, 2 (../shared/PROTOCOLS.md).

    python benchmarks/results.py [--methods naive cumulative joint] [--seeds 0 1 2] [--out docs/results.md]

Reports the mean ± std of final average accuracy, average incremental accuracy, forgetting and
train seconds per recipe, then every seed's row.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from streamcl import config, runner
from streamcl.methods import RECIPES

# Final average accuracy on SFM-5, Avalanche 0.6.0, mean of seeds 0-2 (../shared/PROTOCOLS.md).
REFERENCE = {"naive": 0.199, "joint": 0.860, "cumulative": 0.870, "replay": 0.784, "replay:memory=2000": 0.817,
             "er_ace": 0.778, "derpp": 0.790, "icarl": 0.668, "gdumb": 0.439, "replay_lwf": 0.787}
# compressed replay in the bytes of 500 float32 samples (with their two int64 labels)
COMPRESSED = 'replay:memory_bytes=1576000,compress="uint8"'
PROTOCOL = "SFM-5 (Split Fashion-MNIST, 5 experiences of 2 classes, class-incremental; MLP 784-256-256-10, " \
           "SGD lr 0.01 momentum 0.9, batch 128, 2 epochs per experience)"


def fmt(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def method_table(spec: str) -> dict:
    """``name:key=value,key=value`` as a config's [method] table (values read as TOML)."""
    name, _, args = spec.partition(":")
    table = {"name": name}
    for item in filter(None, args.split(",")):
        config.apply_override(table, item)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=[*RECIPES, "replay:memory=2000", COMPRESSED],
                        help="recipe names, optionally with arguments: replay:memory=2000,selection=herding")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="docs/results.md")
    args = parser.parse_args()
    keys = ("final_accuracy", "avg_incremental_accuracy", "forgetting", "train_seconds", "eval_seconds")
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            for seed in args.seeds:
                cfg = config.parse({"seed": seed, "method": method_table(name), "log": {"tensorboard": False}})
                res = runner.run(cfg, Path(tmp) / f"{name}-{seed}", console=False)
                runs.setdefault(name, []).append(res)
                print(name, seed, *(f"{k}={res[k]}" for k in keys), flush=True)
    seeds = ", ".join(map(str, args.seeds))
    lines = ["# Results", "", f"Protocol: {PROTOCOL}. Mean ± std over seeds {seeds}.",
             "Regenerate with `python benchmarks/results.py`.", "",
             "| method | final accuracy | reference (Avalanche 0.6.0) | avg incremental accuracy | forgetting | train seconds "
             "| eval seconds |", "|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        cells = [fmt([r[k] for r in rs], 1 if k.endswith("seconds") else 3) for k in keys]
        ref = f"{REFERENCE[name]:.3f}" if name in REFERENCE else "-"
        lines.append(f"| {name} | {cells[0]} | {ref} | " + " | ".join(cells[1:]) + " |")
    lines += ["", "Seconds are on a 2-core CPU. GDumb retrains from scratch at each evaluation point, so its cost is "
              "under eval seconds. `replay:memory_bytes=...` stores uint8 inputs: the bytes of 500 float32 samples "
              "hold 1950.", "", "## Every seed", "", "| method | seed | final | avg incremental | forgetting | old / new accuracy after the last experience |",
              "|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        for seed, r in zip(args.seeds, rs):
            old, new = r["old_accuracy"][-1], r["new_accuracy"][-1]
            old_new = "-" if old is None else f"{old:.3f} / {new:.3f}"
            forget = "-" if r["forgetting"] is None else f"{r['forgetting']:.3f}"
            lines.append(f"| {name} | {seed} | {r['final_accuracy']:.3f} | {r['avg_incremental_accuracy']:.3f} | "
                         f"{forget} | {old_new} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
