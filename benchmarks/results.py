"""Regenerate one protocol's section of docs/results.md: each method over seeds 0, 1, 2 (docs/protocols.md).

    python benchmarks/results.py [--protocol SFM-5|SFM-5-TIL|PFM-5|PFM-5-TL] [--methods naive replay:memory=2000]
                                 [--seeds 0 1 2] [--out docs/results.md]

Reports the mean ± std of final average accuracy, average incremental accuracy, forgetting and
train/eval seconds per method, then every seed's row with old/new accuracy. The other protocols'
sections of the file are kept as they are.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

from streamcl import config, runner
from streamcl.config import PROTOCOLS
from streamcl.methods import RECIPES

# Final average accuracy, Avalanche 0.6.0, mean of seeds 0-2 (docs/protocols.md; issue texts for seed 0 only)
REFERENCE = {
    "SFM-5": {"naive": 0.199, "joint": 0.860, "cumulative": 0.870, "replay": 0.784, "replay:memory=2000": 0.817,
              "er_ace": 0.778, "derpp": 0.790, "icarl": 0.668, "gdumb": 0.439, "replay_lwf": 0.787, "gem": 0.742, "bic": 0.773,
              "ewc": 0.199, "si": 0.199, "lwf": 0.199, "cwr_star": 0.437},
    "SFM-5-TIL": {"naive": 0.936, "replay": 0.988, "ewc:lambda_=1000": 0.972, "lwf": 0.989, "mas": 0.988, "gem": 0.988,
                  "agem": 0.988, "multihead": 0.936, "pnn": 0.990, "packnet": 0.986},  # Avalanche's naive there is multi-headed
    "PFM-5": {"naive": 0.734, "joint": 0.817, "replay": 0.792, "ewc": 0.774, "online_ewc": 0.781, "lwf": 0.749,
              "mas": 0.756, "gem": 0.789, "agem": 0.795, "si": 0.734},
}
DESCRIPTION = {
    "SFM-5": "Split Fashion-MNIST, 5 experiences of 2 classes, class-incremental (one 10-way head, no task label)",
    "SFM-5-TIL": "the same stream, task-incremental (task label given at train and test time; logits masked "
                 "to the task's classes)",
    "PFM-5": "Permuted Fashion-MNIST, 5 experiences of 12,000 images, each a fixed pixel permutation, "
             "domain-incremental (all 10 classes in every experience)",
    "PFM-5-TL": "PFM-5 with experience k given task label k at train and test time (for the methods that need "
                "the task label; one 10-way head)",
    "OSFM-5": "SFM-5's stream learned online: every training image once, in minibatches of 10 (`[benchmark] online "
              "= {}`), the experiences' boundaries kept",
    "PT-SFM-5": "SFM-5's stream from training images 30,000-59,999 on a vision transformer (width 64, depth 4, "
                "patch 4) pre-trained on images 0-29,999 (`benchmarks/pretrain.py`), a fresh 10-way head",
}
MODEL = "MLP 784-256-256-10, SGD lr 0.01 momentum 0.9, batch 128, 2 epochs per experience"
MODELS = {"OSFM-5": "MLP 784-256-256-10, SGD lr 0.01 momentum 0.9, batch 10, 1 epoch, memory 500",
          "PT-SFM-5": "SGD lr 0.01 momentum 0.9 (the slow learner: 1e-4 below the head), batch 128, 2 epochs per "
                      "experience"}
# compressed replay in the bytes of 500 float32 samples (with their two int64 labels)
COMPRESSED = 'replay:memory_bytes=1576000,compress="uint8"'
DEFAULT_METHODS = {  # SFM-5: every class-incremental recipe (exemplar-free ones sit at Naive's 0.199 there)
    "SFM-5": [*(n for n, r in RECIPES.items() if n not in ("lwf", "ewc", "online_ewc", "si", "mas", "hypernetwork",
                                                           "progress_compress", "multihead")),
              "replay:memory=2000", COMPRESSED, "cwr:lower_from=0", "cwr_star:lower_from=0"],
    "SFM-5-TIL": [*(n for n in RECIPES if n not in ("ewc", "progress_compress")), "ewc:lambda_=1000",
                  "progress_compress:lambda_=1000"],  # every recipe; EWC and P&C at the task-incremental lambda
    "PFM-5": ["naive", "joint", "replay", "lwf", "ewc", "online_ewc", "si", "mas", "gem", "agem"],
    "PFM-5-TL": ["naive", "packnet", "hat", "supsup", "pnn"],
    "OSFM-5": ["naive", "joint", 'replay:selection="reservoir"', "replay", 'mir:selection="reservoir",subsample=50',
               'mir:selection="reservoir",subsample=50,score="mi2"', "er_ace", "derpp", "gdumb", "exstream"],
    "PT-SFM-5": ["seq_ft", "slow_learner", "slca", "l2p", "dualprompt", "replay", "replay_ca", "lwf", "lwf_ca",
                 "joint", "joint_linear"],
}
NOTES = {
    "PT-SFM-5": "No Avalanche reference exists for this protocol. The backbone is built once by "
                "`python benchmarks/pretrain.py` (upstream test accuracy 0.844).",
    "OSFM-5": "replay (class-balanced) updates its memory after each experience, so nothing is replayed during the "
              "first; the reservoir forms and MIR, ER-ACE and DER++ update it after every minibatch. MIR draws 50 "
              "candidates for the 10 it replays (the paper's 5:1); score=\"mi2\" is the paper's MI-2. GDumb "
              "retrains on its memory before each evaluation (its cost is under eval seconds).",
    "SFM-5": "GDumb retrains from scratch at each evaluation point, so its cost is under eval seconds. "
             "`replay:memory_bytes=...` stores uint8 inputs: the bytes of 500 float32 samples hold 1950. "
             "multihead is left out (one head for task 0 without task labels: Naive's growing head).",
    "SFM-5-TIL": "Parameters per task: multihead shares the layers up to the features (266,752) and adds a "
                 "256 -> 2 head per task (514; 269,322 after five tasks, as many as the single 10-way head of naive), "
                 "ensemble adds a whole MLP per task (269,322 each; 1,346,610 after five).",
}


def fmt(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{_number(statistics.mean(values), digits)} ± {std:.{digits}f}"


def _number(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, without the sign of a value that rounds to zero ("-0.000")."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def method_table(spec: str) -> dict:
    """``name:key=value,key=value`` as a config's [method] table (values read as TOML)."""
    name, _, args = spec.partition(":")
    table = {"name": name}
    for item in filter(None, args.split(",")):
        config.apply_override(table, item)
    return table


def measure(protocol: str, methods: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    keys = ("final_accuracy", "avg_incremental_accuracy", "forgetting", "train_seconds", "eval_seconds")
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in methods:
            for seed in seeds:
                cfg = config.parse({**PROTOCOLS[protocol], "seed": seed, "method": method_table(name),
                                    "log": {"tensorboard": False}})
                res = runner.run(cfg, Path(tmp) / f"{len(runs)}-{seed}", console=False)
                runs.setdefault(name, []).append(res)
                print(protocol, name, seed, *(f"{k}={res[k]}" for k in keys), flush=True)
    return runs


def section(protocol: str, runs: dict[str, list[dict]], seeds: list[int]) -> list[str]:
    keys = ("final_accuracy", "avg_incremental_accuracy", "forgetting", "train_seconds", "eval_seconds")
    refs = REFERENCE.get(protocol, {})
    lines = [f"## {protocol}", "", f"{protocol}: {DESCRIPTION[protocol]}; {MODELS.get(protocol, MODEL)}. Mean ± std over seeds "
             f"{', '.join(map(str, seeds))}. Regenerate with `python benchmarks/results.py --protocol {protocol}`.", "",
             "| method | final accuracy | reference (Avalanche 0.6.0) | avg incremental accuracy | forgetting | train seconds "
             "| eval seconds |", "|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        cells = [fmt([r[k] for r in rs], 1 if k.endswith("seconds") else 3) for k in keys]
        ref = f"{refs[name]:.3f}" if name in refs else "-"
        lines.append(f"| {name} | {cells[0]} | {ref} | " + " | ".join(cells[1:]) + " |")
    lines += ["", "Seconds are on a 2-core CPU. " + NOTES.get(protocol, ""), "", f"### {protocol}, every seed", "",
              "| method | seed | final | avg incremental | forgetting | old / new accuracy after the last experience |",
              "|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        for seed, r in zip(seeds, rs):
            old, new = r["old_accuracy"][-1], r["new_accuracy"][-1]
            old_new = "-" if old is None else f"{old:.3f} / {new:.3f}"
            if "uncorrected" in r and r["uncorrected"]["old_accuracy"][-1] is not None:
                u = r["uncorrected"]
                old_new += f" (before correction: {u['old_accuracy'][-1]:.3f} / {u['new_accuracy'][-1]:.3f}, " \
                           f"final {u['final_accuracy'][-1]:.3f})"
            forget = "-" if r["forgetting"] is None else _number(r["forgetting"])
            lines.append(f"| {name} | {seed} | {r['final_accuracy']:.3f} | {r['avg_incremental_accuracy']:.3f} | "
                         f"{forget} | {old_new} |")
    return lines


def add_rows(old: str, new: list[str]) -> list[str]:
    """The section ``old`` with the method rows of the section ``new`` put in (replacing rows of the same methods)."""
    def rows(lines):
        return [ln for ln in lines if ln.startswith("| ") and not ln.startswith(("| method ", "|---"))]

    new_rows = rows(new)
    names = {ln.split(" | ")[0] for ln in new_rows}
    out = []
    lines = old.rstrip("\n").splitlines()
    for i, ln in enumerate(lines):
        if not (ln.startswith("| ") and ln.split(" | ")[0] in names):
            out.append(ln)
        end_of_table = ln.startswith("|") and (i + 1 == len(lines) or not lines[i + 1].startswith("|"))
        if end_of_table:  # (also when its last row was one replaced)
            width = ln.count(" | ")
            out += [r for r in new_rows if r.count(" | ") == width]
    return out


def merge(text: str, protocol: str, lines: list[str]) -> str:
    """``text`` (a results file) with the section ``## protocol`` replaced by ``lines`` (or appended)."""
    parts = re.split(r"(?m)^(?=## )", text)
    head, sections = parts[0], {p.splitlines()[0][3:].strip(): p for p in parts[1:]}
    sections[protocol] = "\n".join(lines) + "\n\n"
    order = [p for p in PROTOCOLS if p in sections] + [p for p in sections if p not in PROTOCOLS]
    return (head.rstrip() + "\n\n" + "".join(sections[p] for p in order)).rstrip() + "\n"


def record(protocol: str, runs: dict[str, list[dict]], seeds: list[int]) -> None:
    """Write the runs' final accuracies where tests/accuracy.py looks for the record of ``[method]`` on ``protocol``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.accuracy import RECORDS, _record_path

    for name, rs in runs.items():
        key = json.dumps({"part": {**PROTOCOLS[protocol], "method": method_table(name)}, "overrides": []}, sort_keys=True)
        RECORDS.mkdir(exist_ok=True)
        _record_path(key).write_text(json.dumps({"run": json.loads(key), "seeds": seeds,
                                                 "finals": [r["final_accuracy"] for r in rs]}, indent=1))


HEAD = ["# Results", "", "Final average accuracy, average incremental accuracy and forgetting of every method on the",
        "protocols of `docs/protocols.md`, measured on this repository's code. Each protocol's section is",
        "regenerated by `python benchmarks/results.py --protocol NAME`.", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="SFM-5")
    parser.add_argument("--methods", nargs="+", help="recipe names, optionally with arguments: "
                        "replay:memory=2000,selection=herding (default: the protocol's list)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("--record", action="store_true", help="also write each method's final accuracies as the "
                        "accuracy record tests/test_accuracy.py checks (benchmarks/accuracy/)")
    parser.add_argument("--add", action="store_true", help="put these methods' rows into the protocol's section "
                        "(replacing theirs) instead of rewriting the section")
    args = parser.parse_args()
    runs = measure(args.protocol, args.methods or DEFAULT_METHODS[args.protocol], args.seeds)
    if args.record:
        record(args.protocol, runs, args.seeds)
    out = Path(args.out)
    text = out.read_text() if out.is_file() else "\n".join(HEAD)
    lines = section(args.protocol, runs, args.seeds)
    if args.add and f"## {args.protocol}\n" in text:
        current = re.split(r"(?m)^(?=## )", text)
        old = next(p for p in current if p.startswith(f"## {args.protocol}\n"))
        lines = add_rows(old, lines)
    out.write_text(merge(text, args.protocol, lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
