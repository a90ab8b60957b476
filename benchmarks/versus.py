"""Side by side with Avalanche: streamcl and Avalanche 0.6.0 train the same recipes on SFM-5 in one process.

    pip install avalanche-lib==0.6.0   # not a streamcl dependency; only this script uses it
    python benchmarks/versus.py [--methods naive replay lwf ewc derpp icarl gem] [--rounds 3] [--out docs/speed.md]

SFM-5 (docs/protocols.md): Fashion-MNIST in 5 experiences of 2 classes (order 0..9), MLP 784-256-256-10, SGD lr
0.01 momentum 0.9, batch 128, 2 epochs per experience, memory 500. Both libraries read the same in-memory tensors
(streamcl's ``class_incremental``; Avalanche's ``nc_benchmark`` over a ``TensorDataset`` of them) and start every
round from the same initial weights, seed 0. Each streamcl recipe (``build_method(name)`` with its defaults)
meets the Avalanche strategy that implements it, with the recipe's hyperparameters:

    naive   Naive
    replay  Replay(mem_size=500), Avalanche's default storage policy
    lwf     LwF(alpha=weight * T^2 = 1, temperature=2): streamcl's term has the T^2 factor, Avalanche's not
    ewc     EWC(ewc_lambda=20, mode="separate"), the recipe's lambda_ (its Fisher is scaled differently)
    derpp   DER(mem_size=500, alpha=0.1, beta=0.5): Avalanche's alpha, not the recipe's 1.0, which makes its DER
            diverge here (NaN in experience 1: it stores the logits after the experience, about 40 in size)
    icarl   ICaRL(feature_extractor=the MLP's backbone, classifier=its head, memory_size=500, fixed_memory=True)
    gem     GEM(patterns_per_exp=100, memory_strength=0.05): the recipe's per_experience and margin

Rounds alternate (streamcl, Avalanche, streamcl, ...); each is a fresh 5-experience training, one thread, and
only the ``train(experience)`` calls are timed (no evaluation: Avalanche with an evaluator without metrics or
loggers, streamcl without loggers). The table reports the median training seconds of each library, their ratio
(Avalanche / streamcl) and the final average accuracy each reached on the 5 test experiences, a check that both
did comparable work (streamcl's ``Strategy.eval``; Avalanche's model in eval mode, iCaRL's nearest-mean
classifier included). ``--out`` writes the rows under "## Side by side with Avalanche", keeping the rows of
recipes not measured in this run (so slow recipes can be run with fewer rounds).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

METHODS = ["naive", "replay", "lwf", "ewc", "derpp", "icarl", "gem"]
AVALANCHE = "0.6.0"
HEADING = "## Side by side with Avalanche"
EPOCHS, BATCH, EVAL_BATCH, LR, MOMENTUM, MEMORY, SEED = 2, 128, 512, 0.01, 0.9, 500, 0
DER_ALPHA = 0.1
INSTALL = f"pip install avalanche-lib=={AVALANCHE}"


def avalanche_version() -> str:
    """The installed Avalanche's version; exits saying how to install it when there is none."""
    try:
        version = importlib.metadata.version("avalanche-lib")
        importlib.import_module("avalanche")  # installed but broken: say so now, not after streamcl's first round
    except (importlib.metadata.PackageNotFoundError, ImportError) as e:
        raise SystemExit(f"benchmarks/versus.py compares streamcl with Avalanche, which is not installed ({e}).\n"
                         f"Install it beside streamcl (it is not a streamcl dependency): {INSTALL}")
    if version != AVALANCHE:
        print(f"warning: Avalanche {version} installed; the strategies' arguments are those of {AVALANCHE} "
              f"({INSTALL})", file=sys.stderr)
    return version


def quiet_avalanche() -> None:
    """Drop the warnings Avalanche's own files raise ("No loggers specified", deprecations of its internals): it
    resets its filters (``simplefilter("once", ...)``), so they are dropped where they are shown."""
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if f"{os.sep}avalanche{os.sep}" not in str(filename):
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def data():
    """SFM-5's tensors: streamcl's benchmark and Avalanche's, cut from the same train and test sets."""
    from torch.utils.data import TensorDataset

    from avalanche.benchmarks import nc_benchmark
    from streamcl.datasets import fashion_mnist
    from streamcl.scenarios import class_incremental

    train, test = fashion_mnist()
    ours = class_incremental(train, test, 5, class_order=list(range(10)))
    theirs = nc_benchmark(TensorDataset(train.x, train.y), TensorDataset(test.x, test.y), 5, task_labels=False,
                          shuffle=False, fixed_class_order=list(range(10)))
    assert [tuple(e.classes_in_this_experience) for e in theirs.train_stream] == [e.classes for e in ours.train_stream]
    return ours, theirs, test


def fresh_model(init: dict):
    from streamcl.models import MLP

    model = MLP(784, [256, 256], 10)
    model.load_state_dict(copy.deepcopy(init))
    return model


def optimizer(model):
    import torch

    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def streamcl_run(method: str, bench, init: dict) -> tuple[float, float]:
    """Training seconds over the stream and final average accuracy, streamcl."""
    from streamcl import Strategy
    from streamcl.methods import build_method

    model = fresh_model(init)
    plugins, _ = build_method(method)
    strategy = Strategy(model, optimizer(model), plugins=plugins, batch_size=BATCH, eval_batch_size=EVAL_BATCH,
                        epochs=EPOCHS, seed=SEED)
    seconds = 0.0
    for exp in bench.train_stream:
        start = time.perf_counter()
        strategy.train(exp)
        seconds += time.perf_counter() - start
    accuracy = strategy.eval(bench.test_stream, record=False)["accuracy"]
    return seconds, sum(accuracy) / len(accuracy)


def recipe_args(method: str) -> dict:
    """The streamcl recipe's own hyperparameters, read from the plugins its defaults build."""
    from streamcl.methods import build_method

    plugins = build_method(method)[0]
    first = plugins[0] if plugins else None
    if method == "lwf":
        return {"alpha": first.weight * first.temperature ** 2, "temperature": first.temperature}
    if method == "ewc":
        return {"ewc_lambda": first.lambda_}
    if method == "derpp":  # alpha 1.0 makes Avalanche's DER diverge on SFM-5 (see above): its default 0.1
        return {"alpha": DER_ALPHA, "beta": first.beta}
    if method == "gem":
        return {"patterns_per_exp": first.per_experience, "memory_strength": first.margin}
    return {}


def avalanche_strategy(method: str, model):
    """The Avalanche 0.6.0 strategy for ``method``: no metrics, no loggers, no evaluation during training."""
    from torch.nn import CrossEntropyLoss

    from avalanche.training import DER, EWC, GEM, ICaRL, LwF, Naive, Replay

    common = dict(optimizer=optimizer(model), train_mb_size=BATCH, train_epochs=EPOCHS, eval_mb_size=EVAL_BATCH,
                  device="cpu", evaluator=None, eval_every=-1)
    args = recipe_args(method)
    if method == "icarl":
        return ICaRL(feature_extractor=model.backbone, classifier=model.head, memory_size=MEMORY,
                     buffer_transform=None, fixed_memory=True, **common)
    common["model"], common["criterion"] = model, CrossEntropyLoss()
    if method == "naive":
        return Naive(**common)
    if method == "replay":
        return Replay(mem_size=MEMORY, **common)
    if method == "lwf":
        return LwF(**args, **common)
    if method == "ewc":
        return EWC(mode="separate", **args, **common)
    if method == "derpp":
        return DER(mem_size=MEMORY, **args, **common)
    if method == "gem":
        return GEM(**args, **common)
    raise SystemExit(f"no Avalanche counterpart for {method!r}; choose among {', '.join(METHODS)}")


def avalanche_accuracy(model, test) -> float:
    """Mean over the 5 test experiences of the accuracy of ``model`` in eval mode (Avalanche's eval forward)."""
    import torch

    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(test.x[i:i + EVAL_BATCH]).argmax(1) for i in range(0, len(test.y), EVAL_BATCH)])
    hits = [(predicted[test.y // 2 == k] == test.y[test.y // 2 == k]).float().mean().item() for k in range(5)]
    return sum(hits) / len(hits)


def avalanche_run(method: str, bench, test, init: dict) -> tuple[float, float]:
    """Training seconds over the stream and final average accuracy, Avalanche."""
    import torch

    torch.manual_seed(SEED)  # Avalanche draws its shuffles and memories from torch's global generator
    model = fresh_model(init)
    strategy = avalanche_strategy(method, model)
    seconds = 0.0
    for exp in bench.train_stream:
        start = time.perf_counter()
        strategy.train(exp)
        seconds += time.perf_counter() - start
    return seconds, avalanche_accuracy(strategy.model, test)


def measure(method: str, rounds: int, ours, theirs, test, init: dict) -> dict:
    runs = {"streamcl": [], "avalanche": []}
    for r in range(rounds):
        runs["streamcl"].append(streamcl_run(method, ours, init))
        runs["avalanche"].append(avalanche_run(method, theirs, test, init))
        (s, sa), (a, aa) = runs["streamcl"][-1], runs["avalanche"][-1]
        print(f"{method} round {r}: streamcl {s:.1f} s (accuracy {sa:.3f}), Avalanche {a:.1f} s (accuracy {aa:.3f})",
              flush=True)
    s, a = (statistics.median(t for t, _ in runs[k]) for k in ("streamcl", "avalanche"))
    return {"streamcl": s, "avalanche": a, "rounds": rounds,
            "streamcl_accuracy": statistics.median(acc for _, acc in runs["streamcl"]),
            "avalanche_accuracy": statistics.median(acc for _, acc in runs["avalanche"])}


STRATEGIES = {"naive": "Naive", "replay": "Replay", "lwf": "LwF", "ewc": "EWC", "derpp": "DER", "icarl": "ICaRL",
              "gem": "GEM"}
HEADER = ["| recipe | Avalanche strategy | streamcl | Avalanche | Avalanche / streamcl | final accuracy "
          "(streamcl / Avalanche) | rounds |", "|---|---|---|---|---|---|---|"]


def strategy_call(method: str) -> str:
    """``Name(arguments)`` of the Avalanche strategy, as the table shows it (besides the shared ones)."""
    args = {"replay": {"mem_size": MEMORY}, "derpp": {"mem_size": MEMORY},
            "icarl": {"memory_size": MEMORY, "fixed_memory": True}}.get(method, {})
    args.update(recipe_args(method))
    if method == "ewc":
        args["mode"] = "separate"
    shown = (f"{k}={v:g}" if isinstance(v, float) else f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}"
             for k, v in args.items())
    return f"{STRATEGIES[method]}({', '.join(shown)})"


def row(method: str, m: dict) -> str:
    return (f"| {method} | `{strategy_call(method)}` | {m['streamcl']:.1f} s | {m['avalanche']:.1f} s | "
            f"{m['avalanche'] / m['streamcl']:.1f}x | {m['streamcl_accuracy']:.3f} / {m['avalanche_accuracy']:.3f} | "
            f"{m['rounds']} |")


def write(out: Path, rows: dict[str, str], version: str) -> list[str]:
    """Put the table under ``HEADING`` in ``out``: the rows measured now, and the section's rows of other recipes."""
    text = out.read_text() if out.exists() else "# Speed\n"
    old = re.search(rf"(?ms)^{re.escape(HEADING)}\n.*?(?=^## |\Z)", text)
    kept = {m[1]: m[0] for m in re.finditer(r"(?m)^\| (\w+) \| `.*$", old[0])} if old else {}
    rows = {**kept, **rows}
    lines = HEADER + [rows[m] for m in [*METHODS, *sorted(set(rows) - set(METHODS))] if m in rows]
    intro = [HEADING, "", (
        f"Training seconds for the whole SFM-5 stream (5 experiences of 2 epochs, no evaluation during training), "
        f"each recipe against the Avalanche {version} strategy that implements it with the recipe's hyperparameters "
        f"(but DER's alpha: Avalanche's 0.1, as its DER diverges with the recipe's 1.0), in one process on one "
        f"thread, from the same initial weights and the same tensors; the median over alternating rounds, and the "
        f"final average accuracy each reached as a check that both did comparable work (the rounds of one library "
        f"train identically). The mapping is in the script's docstring. Regenerate with `{INSTALL}` (not a "
        f"streamcl dependency), then `python benchmarks/versus.py --out docs/speed.md`."), ""]
    section = "\n".join(intro + lines) + "\n"
    if old:
        text = text[:old.start()] + section + ("\n" if text[old.end():] else "") + text[old.end():]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    out.write_text(text)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, metavar="NAME",
                        help=f"recipes to compare (default: all of {', '.join(METHODS)})")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per library and recipe (median reported)")
    parser.add_argument("--out", help="write the table under its section of this Markdown file (docs/speed.md)")
    args = parser.parse_args()
    version = avalanche_version()
    import torch

    torch.set_num_threads(1)
    quiet_avalanche()
    torch.manual_seed(SEED)
    from streamcl.models import MLP
    init = MLP(784, [256, 256], 10).state_dict()
    ours, theirs, test = data()
    print(f"SFM-5, streamcl vs. Avalanche {version}, torch {torch.__version__}, one thread, {args.rounds} round(s)")
    rows = {}
    for method in args.methods:
        rows[method] = row(method, measure(method, args.rounds, ours, theirs, test, init))
    lines = HEADER + list(rows.values())
    if args.out:
        lines = write(Path(args.out), rows, version)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
