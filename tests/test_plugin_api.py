"""Plugins go through the engine's public API: no plugin manager, no private attribute, no model argument
the user's model may lack, no replaced criterion (docs/hooks.md lists what a plugin may use)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

PLUGINS = sorted((Path(__file__).resolve().parent.parent / "plugins").glob("*.py"))
FORBIDDEN = {
    r"strategy\.pm\b": "the plugin manager (call a service or declare a hook instead)",
    r"strategy\._\w": "a private attribute of the strategy",
    r"return_features": "a return_features argument (features come from strategy.forward / embed)",
    r"strategy\.criterion\s*=[^=]": "a replaced criterion (use the task_loss transform)",
    r"\bfrom_plugin\b": "the optimizer's private group marker",
    r"strategy\.model\.(head|backbone|feature_dim)\b": "an attribute the user's model may not have (strategy.head)",
}


@pytest.mark.parametrize("path", PLUGINS, ids=[p.stem for p in PLUGINS])
def test_plugin_uses_only_the_public_api(path):
    text = path.read_text()
    found = [f"line {text[:m.start()].count(chr(10)) + 1}: {why}"
             for pattern, why in FORBIDDEN.items() for m in re.finditer(pattern, text)]
    assert not found, f"{path.name}: " + "; ".join(found)


def test_the_scan_finds_a_reach_in(tmp_path):
    text = "def f(strategy):\n    return strategy.pm.hook.param_groups(strategy=strategy)\n"
    assert any(re.search(p, text) for p in FORBIDDEN)
