"""Property: any value for any key of a tiny recipe, given as a dotted override, loads to a valid
config or fails with a ConfigError (the CLI's one line), never with another exception."""

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import mimar
from mimar.config import ConfigError, dotted_keys, to_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/*/*_fmnist.yaml"))

SCALARS = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6),
    st.sampled_from([0, -1, 1, 2**31, -(2**63), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300]),
    st.text(max_size=10),
    st.none(),
    st.booleans(),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=4),
    st.dictionaries(st.text(max_size=5), SCALARS, max_size=2),
)
# What follows '=': a value written as YAML, or any text at all (not always valid YAML)
TEXTS = st.one_of(
    VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6)),
    st.text(max_size=16),
    st.sampled_from(["[", "{a: ", "!!python/name:os.system", "*x", "&a [*a]", "'", "- - -"]),
)
EDGES = ("0", "-1", ".nan")
FUZZ = settings(
    max_examples=2,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure names its key already
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


KEYS = {recipe: dotted_keys(to_dict(mimar.load_config(ROOT / recipe))) for recipe in RECIPES}


def _load(recipe: str, overrides: list[str]) -> None:
    try:
        mimar.load_config(ROOT / recipe, overrides)
    except ConfigError as err:
        assert str(err), overrides  # a message to print
    # any other exception fails the property


def test_every_tiny_recipe_is_fuzzed():
    assert len(RECIPES) >= 7 and all(len(keys) > 40 for keys in KEYS.values())


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_key_takes_the_edge_values_or_a_config_error(recipe):
    for key in KEYS[recipe]:
        for text in EDGES:  # zero, negative, nan: where ranges break (e.g. a division by 0)
            _load(recipe, [f"{key}={text}"])


@pytest.mark.parametrize("recipe", RECIPES)
@FUZZ
@given(data=st.data())
def test_every_key_takes_any_value_or_a_config_error(recipe, data):
    for key in KEYS[recipe]:
        _load(recipe, [f"{key}={data.draw(TEXTS, label=key)}"])


@pytest.mark.parametrize("recipe", RECIPES)
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_several_overrides_at_once_load_or_fail_as_config_errors(recipe, data):
    pairs = data.draw(st.lists(st.tuples(st.sampled_from(KEYS[recipe]), TEXTS), max_size=4))
    _load(recipe, [f"{key}={text}" for key, text in pairs])
