"""Random configs: the loader accepts them or raises ConfigError, never a bare KeyError/TypeError."""
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamcl import ConfigError, StreamclError, config
from streamcl.config import SCHEMA
from streamcl.runner import build_plugins

KEYS = sorted({*SCHEMA, "seed", "plugins", "method", "name", "memory", "temperature"} |
              {k for section in SCHEMA.values() for k in section})
names = st.one_of(st.sampled_from(KEYS), st.text(string.ascii_letters + "_.", min_size=1, max_size=12))
scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.text(max_size=12), st.sampled_from(["naive", "joint", "cumulative", "mlp", "cnn", "sgd",
                                                           "class", "domain", "permuted-fmnist", "cpu", "cuda:3"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(names, inner, max_size=4)), max_leaves=12)
configs = st.dictionaries(names, values, max_size=6)
overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", st.text(string.ascii_letters + "_.0123", max_size=20),
                               st.text(max_size=10)), max_size=3)


def load_all_the_way(raw, sets=()):
    cfg = config.parse(raw, list(sets))
    build_plugins(cfg)  # names and arguments of plugins and recipes are checked too
    return cfg


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs, overrides)
def test_random_configs_are_accepted_or_refused_with_our_error(raw, sets):
    try:
        cfg = load_all_the_way(raw, sets)
    except StreamclError:
        return
    assert set(cfg) >= {"seed", "benchmark", "model", "train", "log", "plugins"}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted((s, k) for s, keys in SCHEMA.items() for k in keys)), values)
def test_random_values_for_real_keys(key, value):
    section, name = key
    try:
        cfg = load_all_the_way({section: {name: value}})
    except StreamclError:
        return
    assert cfg[section][name] == value


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_random_text_files(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.toml"
    path.write_text(text)
    try:
        config.load(path)
    except StreamclError:
        pass


def test_non_finite_numbers_are_refused():
    import pytest

    for value in (float("nan"), float("inf")):
        with pytest.raises(config.ConfigError, match="finite"):
            config.parse({"train": {"lr": value}})


@pytest.mark.parametrize("sets,words", [(["0=", "0..="], "a name between every two dots"),
                                        (["0=", "0.a.b=1"], "'0' is a value, not a table")])
def test_an_override_below_a_value_or_with_an_empty_name_is_refused(sets, words):
    with pytest.raises(ConfigError, match=words):
        config.parse({}, sets)
