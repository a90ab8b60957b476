"""benchmarks/results.py's --add: a protocol's method rows replaced or appended in place; docs/results.md's sections
are protocols, its means those of its seed rows, its seed rows those of the accuracy records."""
import importlib.util
import json
import re
import statistics
from pathlib import Path

from streamcl.config import PROTOCOLS

spec = importlib.util.spec_from_file_location("results", Path(__file__).resolve().parents[1] / "benchmarks" / "results.py")
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)

OLD = """## P

| method | final |
|---|---|
| naive | 0.1 |
| hat | 0.5 |

note
"""


def test_add_rows_replaces_a_methods_row_also_when_it_ends_the_table():
    new = ["| method | final |", "|---|---|", "| hat | 0.6 |", "| pnn | 0.9 |"]
    out = results.add_rows(OLD, new)
    assert out == ["## P", "", "| method | final |", "|---|---|", "| naive | 0.1 |", "| hat | 0.6 |", "| pnn | 0.9 |",
                   "", "note"]


# ----------------------------------------------------------------------------- docs/results.md against its sources
DOC = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def sections() -> dict[str, str]:
    parts = re.split(r"(?m)^(?=## )", DOC.read_text())
    return {p.splitlines()[0][3:].strip(): p for p in parts[1:]}


def seed_rows(section: str) -> dict[str, dict[int, float]]:
    """method -> seed -> final accuracy, from a section's every-seed table."""
    out: dict[str, dict[int, float]] = {}
    for m in re.finditer(r"^\| (\S+) \| (\d+) \| ([\d.]+) \|", section, re.M):
        out.setdefault(m[1], {})[int(m[2])] = float(m[3])
    return out


def test_every_section_is_a_protocol():
    assert set(sections()) <= set(PROTOCOLS), f"docs/results.md has sections for no protocol of " \
                                              f"streamcl.config.PROTOCOLS: {sorted(set(sections()) - set(PROTOCOLS))}"


def test_each_mean_is_the_mean_of_its_seed_rows():
    problems = []
    for protocol, text in sections().items():
        seeds = seed_rows(text)
        for m in re.finditer(r"^\| (\S+) \| ([\d.]+) ± ([\d.]+) \|", text, re.M):
            values = list(seeds.get(m[1], {}).values())
            if len(values) > 1 and abs(statistics.mean(values) - float(m[2])) > 0.0015:  # seed rows are rounded
                problems.append(f"{protocol} {m[1]}: mean {m[2]}, its seed rows {values}")
    assert not problems, "docs/results.md:\n  " + "\n  ".join(problems)


def test_seed_rows_agree_with_the_accuracy_records():
    """A seed's final accuracy in docs/results.md and in the record tests/test_accuracy.py checks
    (benchmarks/accuracy/) are one measurement: within 0.01, the accuracy tests' tolerance for a rerun."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.accuracy import _record_path

    disagree = set()
    for protocol, text in sections().items():
        for method, seeds in seed_rows(text).items():
            key = json.dumps({"part": {**PROTOCOLS[protocol], "method": results.method_table(method)},
                              "overrides": []}, sort_keys=True)
            path = _record_path(key)
            if not path.exists():
                continue
            record = json.loads(path.read_text())
            finals = dict(zip(record["seeds"], record["finals"]))
            if any(abs(value - finals[seed]) > 0.01 for seed, value in seeds.items() if seed in finals):
                disagree.add((protocol, method))
    assert not disagree, f"docs/results.md rows that disagree with their accuracy record: {sorted(disagree)}; " \
                         "measure them again (benchmarks/results.py --protocol P --methods M --add, one thread per run)"
