"""Plots and a Markdown report of finished runs (``streamcl report``), drawn from their ``results.json``.

Each ``*_figure`` function returns the picture as a ``numpy.uint8`` array of shape H x W x 3 (RGB),
drawn with matplotlib's Agg canvas (no display, no pyplot state); :func:`write_png` saves one.
matplotlib is imported inside the functions, never when ``streamcl`` is imported.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from streamcl.errors import ConfigError

GREY = (0.8, 0.8, 0.8)  # a cell of the accuracy matrix that was not measured
CMAP = "viridis"  # accuracy 0 dark blue ... 1 yellow
MARKERS = "osD^vP*Xph"

Matrix = list[list[float | None]]


def _known(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _square(R: Matrix) -> Matrix:
    """R with every row as wide as the widest and NaN (a cell with no test samples) as ``None``."""
    width = max((len(r) for r in R), default=0)
    return [[v if _known(v) else None for v in r] + [None] * (width - len(r)) for r in R]


def _canvas(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _heat_axes(fig, title: str | None, xlabel: str, ylabel: str):
    ax = fig.add_subplot()
    if title:
        ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def _nothing(fig, ax, text: str) -> np.ndarray:
    """The figure with ``text`` in place of an empty heat map."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([]), ax.set_yticks([])
    return _pixels(fig)


def write_png(image: np.ndarray, path: str | Path) -> Path:
    """Save an H x W x 3 uint8 array as a PNG file; returns the path."""
    from matplotlib.image import imsave

    imsave(path, image, format="png")
    return Path(path)


def matrix_figure(R: Matrix, title: str | None = None) -> np.ndarray:
    """The accuracy matrix as a heat map: row i after training experience i, column j test experience j.

    Colours follow viridis over [0, 1] (colour bar beside); each cell shows its accuracy (3 decimals,
    2 beyond 10 columns); a cell not measured (``None`` or NaN) is grey with "-".
    """
    from matplotlib import colormaps

    R = _square(R)
    rows, cols = len(R), len(R[0]) if R else 0
    cell = max(0.3, min(0.7, 8 / max(rows, cols, 1)))
    fig = _canvas(1.9 + cell * cols, 1.2 + cell * rows + (0.3 if title else 0))
    ax = _heat_axes(fig, title, "evaluated on experience", "trained up to experience")
    if not cols:
        return _nothing(fig, ax, "nothing measured")
    values = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in r] for r in R], dtype=float))
    cmap = colormaps[CMAP].with_extremes(bad=GREY)
    image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    ax.set_xticks(range(cols)), ax.set_yticks(range(rows))
    fig.colorbar(image, ax=ax, label="accuracy", fraction=0.05)
    size = max(5.0, min(10.0, 14 * cell))
    for i, r in enumerate(R):
        for j, v in enumerate(r):
            text = "-" if v is None else f"{v:.{3 if cols <= 10 else 2}f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=size,
                    color="black" if v is None or v > 0.6 else "white")
    return _pixels(fig)


def confusion_figure(matrix: list[list[int]], classes: list[int], title: str | None = None) -> np.ndarray:
    """A confusion matrix as a heat map: row a the true class ``classes[a]``, column b the predicted ``classes[b]``.

    A cell's colour is its share of its row (viridis over [0, 1], colour bar beside), its text the count
    (shown up to 20 classes); a row without samples is dark.
    """
    counts = np.array(matrix, dtype=float).reshape(len(classes), len(classes))
    n = len(classes)
    cell = max(0.3, min(0.6, 8 / max(n, 1)))
    fig = _canvas(2.2 + cell * n, 1.4 + cell * n + (0.3 if title else 0))
    ax = _heat_axes(fig, title, "predicted class", "true class")
    if not n:
        return _nothing(fig, ax, "nothing evaluated")
    rows = counts.sum(1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    image = ax.imshow(share, cmap=CMAP, vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    ax.set_xticks(range(n), [str(c) for c in classes]), ax.set_yticks(range(n), [str(c) for c in classes])
    fig.colorbar(image, ax=ax, label="share of the true class", fraction=0.05)
    if n <= 20:
        size = max(5.0, min(10.0, 14 * cell))
        for a in range(n):
            for b in range(n):
                ax.text(b, a, str(int(counts[a, b])), ha="center", va="center", fontsize=size,
                        color="black" if share[a, b] > 0.6 else "white")
    return _pixels(fig)


def _line(ax, values, label: str, marker: str) -> None:
    y = [np.nan if not _known(v) else v for v in values]
    ax.plot(range(len(y)), y, marker=marker, label=label, clip_on=False)


def _axes(fig, title, n: int, ylabel: str):
    ax = fig.add_subplot()
    if title:
        ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.set_xticks(range(n))
    ax.set_xlabel("trained up to experience")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return ax


def old_new_figure(summary: dict, title: str | None = None) -> np.ndarray:
    """``old_accuracy``, ``new_accuracy`` and ``seen_accuracy`` of a results dict over the trained experiences.

    old: the test experiences of earlier experiences; new: those of the latest; seen: all trained so far
    (see streamcl.metrics). ``None`` points are left out of their line.
    """
    keys = (("seen_accuracy", "seen (all trained so far)"), ("old_accuracy", "old (earlier experiences)"),
            ("new_accuracy", "new (latest experience)"))
    n = max((len(summary.get(k) or []) for k, _ in keys), default=0)
    fig = _canvas(6.4, 4.0)
    ax = _axes(fig, title, n, "accuracy")
    for (key, label), marker in zip(keys, MARKERS):
        _line(ax, summary.get(key) or [], label, marker)
    ax.legend(loc="best")
    return _pixels(fig)


def seen_curve(results: dict) -> list[float | None]:
    """Accuracy on the experiences seen after each trained experience: ``seen_accuracy`` when present, else
    the mean of the known cells ``R[i][0..i]`` of the accuracy matrix (test experience j learned at row j)."""
    if results.get("seen_accuracy") is not None:
        return list(results["seen_accuracy"])
    curve = []
    for i, row in enumerate(_square(results.get("accuracy_matrix") or [])):
        known = [v for v in row[:i + 1] if v is not None]
        curve.append(sum(known) / len(known) if known else None)
    return curve


def curves_figure(runs: dict[str, dict], title: str | None = None) -> np.ndarray:
    """One line per run (label -> results dict): :func:`seen_curve` over the trained experiences."""
    curves = {label: seen_curve(res) for label, res in runs.items()}
    fig = _canvas(6.4, 4.0)
    ax = _axes(fig, title, max((len(c) for c in curves.values()), default=0), "accuracy on the experiences seen")
    for k, (label, curve) in enumerate(curves.items()):
        _line(ax, curve, label, MARKERS[k % len(MARKERS)])
    if curves:
        ax.legend(loc="best")
    return _pixels(fig)


# ----------------------------------------------------------------------------- the report
def load_results(path: str | Path) -> dict:
    """A run's results: ``path/results.json`` (or ``path`` itself, a .json file); ConfigError naming the file
    when it is missing, not JSON, or has no accuracy matrix."""
    path = Path(path)
    file = path if path.suffix == ".json" and not path.is_dir() else path / "results.json"
    try:
        results = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file} does not exist: give the folder a streamcl run wrote (its --out)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {file}: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(results, dict) or not isinstance(results.get("accuracy_matrix"), list):
        raise ConfigError(f"{file} has no accuracy_matrix: it is not a streamcl results.json")
    return results


def run_folders(paths: list[str | Path]) -> list[Path]:
    """The run folders named: a folder without ``results.json`` whose subfolders hold one stands for those
    (sorted); anything else is kept as given (:func:`load_results` then says what is missing)."""
    folders = []
    for path in map(Path, paths):
        inner = sorted(f.parent for f in path.glob("*/results.json")) if path.is_dir() else []
        folders += inner if inner and not (path / "results.json").exists() else [path]
    return folders


def _method(results: dict) -> str | None:
    method = (results.get("config") or {}).get("method")
    return method.get("name") if isinstance(method, dict) else None


def _slug(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label).strip("_") or "run"


def _labels(folders: list[Path], results: list[dict]) -> list[str]:
    """The method's name, else the folder's; a name two runs share gets its folder, then a number, added."""
    names = [_method(r) or f.name for f, r in zip(folders, results)]
    labels = [n if names.count(n) == 1 else f"{n} ({f.name})" if n != f.name else n for n, f in zip(names, folders)]
    for i, label in enumerate(labels):
        if labels[:i].count(label):
            labels[i] = f"{label} #{labels[:i].count(label) + 1}"
    return labels


def _num(value, digits: int = 4) -> str:
    return "-" if not _known(value) else f"{value:.{digits}f}"


def report(run_dirs: list[str | Path], out_dir: str | Path) -> tuple[Path, Path]:
    """Compare runs: write into ``out_dir`` ``report.md`` (a table of final accuracy, average incremental
    accuracy, forgetting and training seconds, then each run's accuracy matrix), ``accuracy_curves.png``
    (:func:`curves_figure`), and per run ``<label>_matrix.png`` and ``<label>_old_new.png``. The run folders
    are only read. Returns the paths of ``report.md`` and ``accuracy_curves.png``."""
    from streamcl.loggers.tensorboard import matrix_markdown

    folders = [Path(d) for d in run_dirs]
    if not folders:
        raise ConfigError("no run folder to report on")
    results = [load_results(f) for f in folders]
    folders = [f.parent if f.suffix == ".json" and not f.is_dir() else f for f in folders]
    labels = _labels(folders, results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = write_png(curves_figure(dict(zip(labels, results))), out / "accuracy_curves.png")
    lines = ["# streamcl report", "",
             "| run | method | final accuracy | avg incremental accuracy | forgetting | train seconds |",
             "|---|---|---|---|---|---|"]
    for label, res in zip(labels, results):
        method = _method(res) or " + ".join(res.get("plugins") or []) or "-"
        lines.append(f"| {label} | {method} | {_num(res.get('final_accuracy'))} | "
                     f"{_num(res.get('avg_incremental_accuracy'))} | {_num(res.get('forgetting'))} | "
                     f"{_num(res.get('train_seconds'), 1)} |")
    lines += ["", f"![accuracy on the experiences seen]({curves.name})", ""]
    used: set[str] = set()
    for label, folder, res in zip(labels, folders, results):
        slug = _slug(label)
        while slug in used:
            slug += "_"
        used.add(slug)
        R = _square(res["accuracy_matrix"])
        matrix = write_png(matrix_figure(R, title=label), out / f"{slug}_matrix.png")
        old_new = write_png(old_new_figure(res, title=label), out / f"{slug}_old_new.png")
        lines += [f"## {label}", "", f"Run folder: `{folder}`; plugins: {', '.join(res.get('plugins') or []) or '-'}",
                  "", f"![accuracy matrix of {label}]({matrix.name}) ![old and new accuracy of {label}]({old_new.name})",
                  "", matrix_markdown(R) if R and R[0] else "(no accuracy measured)", ""]
    markdown = out / "report.md"
    markdown.write_text("\n".join(lines))
    return markdown, curves
