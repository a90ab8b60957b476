"""benchmarks/results.py's --add: a protocol's method rows replaced or appended in place."""
import importlib.util
from pathlib import Path

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
