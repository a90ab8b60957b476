"""Every pair of built-in plugins either runs two experiences or is refused naming both and the role."""
import itertools

import pytest

from streamcl import PluginError
from streamcl.registry import build_plugin
from tests.reliability import BUILTIN_PLUGINS, tiny_run

PAIRS = list(itertools.combinations_with_replacement(BUILTIN_PLUGINS, 2))


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_pair_runs_or_is_refused_by_role(a, b):
    first, second = build_plugin(a), build_plugin(b)
    shared = set(getattr(first, "owns", ())) & set(getattr(second, "owns", ()))
    owned = set(getattr(first, "owns", ())) | set(getattr(second, "owns", ()))
    unmet = (set(getattr(first, "needs", ())) | set(getattr(second, "needs", ()))) - owned
    part = {"plugins": [{"name": a}, {"name": b}]}
    if unmet and not shared:
        with pytest.raises(PluginError, match=rf"needs a plugin that owns the role '{sorted(unmet)[0]}'"):
            tiny_run(part)
        return
    if shared:
        role = sorted(shared)[0]
        with pytest.raises(PluginError, match=rf"{type(first).__name__}.* and {type(second).__name__}.* both own the "
                                              rf"role '{role}'"):
            tiny_run(part)
        return
    res = tiny_run(part)
    assert len(res["accuracy_matrix"]) == 3 and len(res["plugins"]) == 2
    assert 0.0 <= res["final_accuracy"] <= 1.0


def test_every_builtin_plugin_builds_with_defaults_and_is_listed():
    assert BUILTIN_PLUGINS, "no built-in plugin registered: is streamcl installed (pip install -e .)?"
    for name in BUILTIN_PLUGINS:
        plugin = build_plugin(name)
        assert callable(getattr(plugin, "state_dict", None)), f"{name} has no state_dict()"
