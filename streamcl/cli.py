"""``streamcl run CONFIG.toml``, ``streamcl plugins``, ``streamcl models``, ``streamcl benchmarks``, ``streamcl methods``,
``streamcl demo``, ``streamcl report RUN_DIR...``."""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from streamcl.errors import StreamclError

DEMO_METHODS = ("naive", "replay", "replay_lwf", "icarl", "derpp", "joint")


def parser() -> argparse.ArgumentParser:
    """The command line's parser (tests/test_docs.py checks every ``streamcl ...`` line of the docs with it)."""
    parser = argparse.ArgumentParser(prog="streamcl", description="Continual learning on a stream of experiences.")
    parser.add_argument("--version", action="version", version=f"streamcl {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate as a TOML config says")
    run.add_argument("config", help="path to a TOML config (see docs/config.md)")
    run.add_argument("--out", help="folder for results.json and the TensorBoard run (default runs/<config name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one key, e.g. --set train.epochs=1 (repeatable)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-experience lines: "
                     "warnings, errors and the summary only")
    run.add_argument("-v", "--verbose", action="store_true", help="also a line per epoch and every value plugins log")
    run.add_argument("--resume", action="store_true", help="go on from OUT/checkpoints/last.pt of an earlier run")
    run.add_argument("--overwrite", action="store_true", help="replace the run an earlier command wrote to OUT")
    sub.add_parser("plugins", help="list built-in and installed plugins and where each comes from")
    sub.add_parser("models", help="list the models [model] name takes and where each comes from")
    sub.add_parser("benchmarks", help="list the benchmarks [benchmark] name takes and where each comes from")
    sub.add_parser("methods", help="list the named recipes")
    demo = sub.add_parser("demo", help="run SFM-5 with a few methods and print a results table")
    demo.add_argument("--out", default="runs/demo", help="folder for the runs (default runs/demo)")
    demo.add_argument("--methods", nargs="+", default=list(DEMO_METHODS), help="recipes to compare")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    report = sub.add_parser("report", help="plots and a Markdown comparison of finished runs",
                            description="Reads RUN_DIR/results.json of each run (a folder without one: the runs in "
                            "its subfolders) and writes into --out: report.md (a table of final accuracy, average "
                            "incremental accuracy, forgetting and training seconds, and each run's accuracy matrix), "
                            "accuracy_curves.png, and per run <label>_matrix.png and <label>_old_new.png. The run "
                            "folders are only read.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a folder that streamcl run or demo wrote")
    report.add_argument("--out", default="report", help="folder for the report (default report, in the current folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = {"run": _run, "plugins": _plugins, "models": _models, "benchmarks": _benchmarks, "methods": _methods,
                "demo": _demo, "report": _report}[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at the interpreter's exit
        return code
    except StreamclError as err:
        print(f"streamcl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, between checkpoints
        print("\nstreamcl: interrupted; the last checkpoint written (if any) is intact"
              + (f"; resume with: {_resume_command(args)}" if args.command == "run" else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (streamcl plugins | head): no traceback, nothing more to write
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _ask_to_stop(signum, frame) -> None:
    """Ctrl-C under ``streamcl run``: stop at the end of the current step with a checkpoint; a second one at once."""
    from streamcl.strategy import STOP
    if STOP.is_set():
        raise KeyboardInterrupt
    STOP.set()
    print("\nstreamcl: stopping at the end of this step and writing a checkpoint (Ctrl-C again: stop at once)",
          file=sys.stderr, flush=True)


def _resume_command(args) -> str:
    """The command that goes on with the run ``args`` describe."""
    words = ["streamcl", "run", args.config, "--out", str(args.out or Path("runs") / Path(args.config).stem)]
    words += [w for item in args.overrides for w in ("--set", item)] + (["--quiet"] if args.quiet else [])
    return shlex.join(words + ["--resume"])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("streamcl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _run(args) -> int:
    from streamcl import config, runner

    from streamcl.loggers.console import configure
    configure(-1 if args.quiet else int(args.verbose))
    cfg = config.load(args.config, args.overrides)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    runner.prepare_out(out, resume=args.resume, overwrite=args.overwrite)
    from streamcl.errors import Stopped
    from streamcl.strategy import STOP
    previous = signal.signal(signal.SIGINT, _ask_to_stop)
    try:
        res = runner.run(cfg, out, console=False if args.quiet else None, resume=args.resume)
    except Stopped as err:
        print(f"\nstreamcl: {err}\nresume with: {_resume_command(args)}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
        STOP.clear()
    from streamcl.distributed import is_main
    if not is_main():
        return 0
    if args.quiet or not cfg["log"]["console"]:  # else the console logger has printed it
        from streamcl.loggers.console import summary_line
        print(summary_line(res, res["train_seconds"]))
    print(f"results: {out / 'results.json'}   TensorBoard: {_tensorboard()} --logdir {out}")
    return 0


def _plugins(args) -> int:
    from streamcl.registry import available_plugins

    _listing("plugin", available_plugins())
    return 0


def _models(args) -> int:
    from streamcl.registry import available_models

    _listing("model", available_models(), [("timm:<name>", "timm", "any timm model (pip install 'streamcl[pretrained]')")])
    return 0


def _benchmarks(args) -> int:
    from streamcl.registry import available_benchmarks

    _listing("benchmark", available_benchmarks())
    return 0


def _listing(kind: str, entries: dict, extra: list[tuple] = ()) -> None:
    """One row per registered entry: its name, built-in or the distribution (and version) it comes from, the object."""
    rows = [(i.name, "built-in" if i.builtin else f"{i.distribution} {i.version}", i.target) for i in entries.values()]
    _table((kind, "from", "object"), rows + list(extra))


def _methods(args) -> int:
    from streamcl.methods import RECIPES

    _table(("method", "what it does"), [(r.name, r.summary) for r in RECIPES.values()])
    return 0


def _demo(args) -> int:
    from streamcl import config, runner

    out, rows = Path(args.out), []
    print(f"SFM-5 (Split Fashion-MNIST, 5 experiences, class-incremental): {', '.join(args.methods)}")
    for name in args.methods:
        cfg = config.parse({"method": {"name": name}}, args.overrides)
        start = time.perf_counter()
        runner.prepare_out(out / name, overwrite=True)  # a demo run again replaces the last demo
        res = runner.run(cfg, out / name, console=False)
        rows.append((name, f"{res['final_accuracy']:.4f}", f"{res['avg_incremental_accuracy']:.4f}",
                     _fmt(res["forgetting"]), f"{time.perf_counter() - start:.1f}"))
        print(f"  {name}: final accuracy {rows[-1][1]}, average incremental {rows[-1][2]}, forgetting {rows[-1][3]} "
              f"({rows[-1][4]} s)", flush=True)
    print()
    _table(("method", "final acc", "avg inc acc", "forgetting", "seconds"), rows)
    print(f"\nper-method results.json under {out}/<method>/; curves: {_tensorboard()} --logdir {out}")
    _print_report([out / name for name in dict.fromkeys(args.methods)], out)
    return 0


def _report(args) -> int:
    from streamcl.report import run_folders

    _print_report(run_folders(args.run_dirs), Path(args.out))
    return 0


def _print_report(run_dirs: list[Path], out: Path) -> None:
    from streamcl.report import report

    markdown, curves = report(run_dirs, out)
    print(f"report: {markdown}\naccuracy curves: {curves}")


def _tensorboard() -> str:
    """The tensorboard command beside this interpreter (the virtual environment's), else plain ``tensorboard``."""
    beside = Path(sys.executable).parent / "tensorboard"
    return str(beside) if beside.exists() else "tensorboard"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _table(head: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for i, row in enumerate([head, *rows]):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
