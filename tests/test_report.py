"""streamcl.report and ``streamcl report``: heat map colours, exact Markdown numbers, valid PNGs, refusals, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from streamcl import ConfigError, cli
from streamcl.report import GREY, curves_figure, matrix_figure, old_new_figure, report, seen_curve


def results(R, method=None, plugins=(), seconds=12.34, **extra) -> dict:
    """A results.json as streamcl run writes it (only the keys the report reads)."""
    out = {"accuracy_matrix": R, "final_accuracy": 0.5, "avg_incremental_accuracy": 0.625, "forgetting": 0.25,
           "seen_accuracy": [0.8, 0.5], "old_accuracy": [None, 0.4], "new_accuracy": [0.8, 0.6],
           "train_seconds": seconds, "plugins": list(plugins),
           "config": {"seed": 0, "plugins": [], **({"method": {"name": method}} if method else {})}}
    return {**out, **extra}


def write_run(folder, res: dict):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(res))
    return folder


def files(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def viridis(v: float) -> tuple:
    from matplotlib import colormaps
    return tuple(colormaps["viridis"](v, bytes=True)[:3])


def count(image: np.ndarray, rgb) -> int:
    return int((image == np.array(rgb, dtype=np.uint8)).all(-1).sum())


def test_the_heat_map_colours_each_cell_by_its_accuracy_and_greys_what_was_not_measured():
    image = matrix_figure([[1.0, None], [0.25, 1.0], [float("nan"), 0.25]], title="run")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) > 200
    high, low, grey = count(image, viridis(1.0)), count(image, viridis(0.25)), count(image, [round(255 * GREY[0])] * 3)
    assert viridis(1.0) != viridis(0.25) and low > 1000  # a cell is a block of its colormap colour
    assert 0.85 < high / low < 1.15 and 0.85 < grey / low < 1.15  # two cells each: equal values, equal colours


def test_the_line_plots_are_images():
    summary = results([[0.8, 0.0], [0.6, 0.4]])
    for image in (old_new_figure(summary), curves_figure({"a": summary, "b": results([[0.5]])})):
        assert image.dtype == np.uint8 and image.shape[2] == 3 and len(np.unique(image.reshape(-1, 3), axis=0)) > 10


def test_the_curve_is_seen_accuracy_else_the_mean_of_each_rows_seen_cells():
    assert seen_curve(results([[0.8, 0.0], [0.6, 0.4]])) == [0.8, 0.5]
    assert seen_curve({"accuracy_matrix": [[0.8, 0.0], [0.6, 0.9]]}) == [0.8, 0.75]
    assert seen_curve({"accuracy_matrix": [[None, 0.0], [0.6, None]]}) == [None, 0.6]


def test_the_report_compares_the_runs_with_their_exact_numbers(tmp_path):
    a = write_run(tmp_path / "a", results([[0.8, None], [0.6, 0.4]], method="replay"))
    b = write_run(tmp_path / "b", results([[0.9, 0.0], [0.3, 0.7]], plugins=["ewc"], final_accuracy=0.123456,
                                          forgetting=None))
    r1 = write_run(tmp_path / "r1", results([[1.0]], method="naive", seconds=3.0))
    r2 = write_run(tmp_path / "r2", results([[0.0]], method="naive", seconds=4.0))
    before = {f: files(f) for f in (a, b, r1, r2)}
    markdown, curves = report([a, b, r1, r2], tmp_path / "out")
    text = markdown.read_text()
    assert markdown == tmp_path / "out" / "report.md" and curves == tmp_path / "out" / "accuracy_curves.png"
    assert "| run | method | final accuracy | avg incremental accuracy | forgetting | train seconds |" in text
    assert "| replay | replay | 0.5000 | 0.6250 | 0.2500 | 12.3 |" in text
    assert "| b | ewc | 0.1235 | 0.6250 | - | 12.3 |" in text  # no method: the folder's name and the plugins
    assert "| naive (r1) | naive | 0.5000 | 0.6250 | 0.2500 | 3.0 |" in text  # one method twice: + the folder
    assert "| naive (r2) | naive | 0.5000 | 0.6250 | 0.2500 | 4.0 |" in text
    assert "| exp 0 | 0.800 | - |\n| exp 1 | 0.600 | 0.400 |" in text  # replay's matrix
    assert "| exp 0 | 0.900 | 0.000 |\n| exp 1 | 0.300 | 0.700 |" in text
    assert "![accuracy on the experiences seen](accuracy_curves.png)" in text
    pngs = {"accuracy_curves.png"} | {f"{s}_{k}.png" for s in ("replay", "b", "naive_r1", "naive_r2")
                                      for k in ("matrix", "old_new")}
    assert {p.name for p in (tmp_path / "out").iterdir()} == pngs | {"report.md"}
    from matplotlib.image import imread
    for name in pngs:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(tmp_path / "out" / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and f"({name})" in text
    assert {f: files(f) for f in (a, b, r1, r2)} == before  # the runs are only read


def test_a_missing_or_broken_results_json_is_refused_by_its_path(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'none' / 'results.json'} does not exist"):
        report([tmp_path / "none"], tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text('{"accuracy_matrix": [[0.5]')
    with pytest.raises(ConfigError, match=f"{bad / 'results.json'} is not valid JSON"):
        report([bad], tmp_path / "out")
    (bad / "results.json").write_text('{"final_accuracy": 0.5}')
    with pytest.raises(ConfigError, match="has no accuracy_matrix"):
        report([bad], tmp_path / "out")


def test_the_report_command_end_to_end(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs / "naive", results([[1.0, 0.0], [0.0, 1.0]], method="naive"))
    write_run(runs / "replay", results([[1.0, 0.0], [0.7, 0.9]], method="replay"))
    assert cli.main(["report", str(runs / "naive"), str(runs / "replay"), "--out", str(tmp_path / "rep")]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [f"report: {tmp_path / 'rep' / 'report.md'}",
                                                         f"accuracy curves: {tmp_path / 'rep' / 'accuracy_curves.png'}"]
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", "runs"]) == 0  # a folder of runs stands for them; default --out: report/
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| naive | naive |" in text and "| replay | replay |" in text and "| exp 1 | 0.700 | 0.900 |" in text
    capsys.readouterr()
    assert cli.main(["report", "runs/naive", "missing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamcl: error: missing/results.json does not exist") and "Traceback" not in err


def test_importing_streamcl_does_not_import_matplotlib():
    code = "import sys, streamcl, streamcl.cli, streamcl.report; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
