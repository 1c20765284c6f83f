"""YAML config loading with key=value overrides, checked against a schema of defaults."""

from __future__ import annotations

import copy

import pytest
import yaml

from prune_env.config_files import ConfigError, load_config, merge, parse_override

DEFAULTS = {
    "seed": 0,
    "env": {"target_sparsity": 0.5, "granularity": "block", "data": {"text": "debian-handbook", "n_facts": 200}},
    "agent": {"name": "uniform", "params": {}},  # params: free-form
    "algo": {},  # free-form section
    "tags": None,
}


def write(tmp_path, data, name="config.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_file_and_overrides_layer(tmp_path):
    path = write(tmp_path, {"env": {"target_sparsity": 0.7, "data": {"n_facts": 50}}, "seed": 3})
    config = load_config(path, ["env.granularity=linear", "seed=4"], DEFAULTS)
    assert config["seed"] == 4  # override beats file
    assert config["env"]["target_sparsity"] == 0.7  # file beats defaults
    assert config["env"]["granularity"] == "linear"
    assert config["env"]["data"] == {"text": "debian-handbook", "n_facts": 50}  # deep merge keeps siblings
    assert config["agent"] == DEFAULTS["agent"]


def test_defaults_are_not_mutated(tmp_path):
    snapshot = copy.deepcopy(DEFAULTS)
    config = load_config(None, ["env.data.n_facts=7", "algo.lr=0.1"], DEFAULTS)
    config["env"]["granularity"] = "changed"
    assert DEFAULTS == snapshot


@pytest.mark.parametrize("text,expected", [
    ("seed=7", 7), ("seed=0.25", 0.25), ("seed=1e-3", 1e-3), ("seed=3E+4", 3e4), ("seed=-2.5e-1", -0.25),
    ("seed=1.0e-5", 1e-5), ("seed=1e", "1e"), ("seed=0x10", 16), ("seed=true", True), ("seed=false", False),
    ("seed=null", None), ("seed=[1, 2]", [1, 2]), ("seed={a: 1}", {"a": 1}), ("seed=hello", "hello"),
    ("seed='0.5'", "0.5"), ("seed=", ""), ("seed=a=b", "a=b"),
])
def test_override_value_types(text, expected):
    config = load_config(None, [text], DEFAULTS)
    assert config["seed"] == expected
    assert type(config["seed"]) is type(expected)
    assert parse_override(text) == (["seed"], expected)


def test_exponent_floats_in_files_and_lists(tmp_path):
    """PyYAML alone reads 3e-4 as the string '3e-4' (YAML 1.1); a learning rate must be a number."""
    path = write(tmp_path, "algo:\n  learning_rate: 3e-4\n  clip: [1e-2, 2]\n  name: 1e-3x\n")
    config = load_config(path, ["algo.ent_coef=1e-3"], DEFAULTS)
    assert config["algo"] == {"learning_rate": 3e-4, "clip": [0.01, 2], "name": "1e-3x", "ent_coef": 0.001}
    assert yaml.safe_load("3e-4") == "3e-4"  # the global SafeLoader is left as it is


def test_nested_override_path():
    assert parse_override("env.data.n_facts=12") == (["env", "data", "n_facts"], 12)
    config = load_config(None, ["env.data.n_facts=12"], DEFAULTS)
    assert config["env"]["data"]["n_facts"] == 12


@pytest.mark.parametrize("data,key", [
    ({"sed": 1}, "'sed'"),
    ({"env": {"target_sparsty": 0.6}}, "env.'target_sparsty'"),
    ({"env": {"data": {"n_fact": 3}}}, "env.data.'n_fact'"),
    ({"agent": {"nam": "x"}}, "agent.'nam'"),
])
def test_unknown_key_in_file(tmp_path, data, key):
    with pytest.raises(ConfigError, match="unknown config key") as error:
        load_config(write(tmp_path, data), None, DEFAULTS)
    message = str(error.value)
    assert key in message
    assert "valid keys here are" in message


def test_unknown_key_error_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, {"env": {"target_sparsty": 0.6}}), None, DEFAULTS)
    assert str(sorted(DEFAULTS["env"])) in str(error.value)


@pytest.mark.parametrize("override,key", [
    ("sed=1", "'sed'"),
    ("env.target_sparsty=0.6", "'env.target_sparsty'"),
    ("env.data.n_fact=3", "'env.data.n_fact'"),
    ("bogus.deep.key=1", "'bogus'"),
    ("agent.nam=x", "'agent.nam'"),
])
def test_unknown_key_in_overrides(override, key):
    with pytest.raises(ConfigError, match="unknown config key") as error:
        load_config(None, [override], DEFAULTS)
    assert key in str(error.value)


def test_free_form_sections_accept_anything(tmp_path):
    path = write(tmp_path, {"algo": {"lr": 0.001, "net": {"layers": [64, 64]}, "anything": None},
                            "agent": {"params": {"temperature": 0.2, "nested": {"x": 1}}}})
    config = load_config(path, ["algo.lr=0.01", "algo.new.deep.key=3", "agent.params.top_p=0.9"], DEFAULTS)
    assert config["algo"] == {"lr": 0.01, "net": {"layers": [64, 64]}, "anything": None,
                              "new": {"deep": {"key": 3}}}
    assert config["agent"]["params"] == {"temperature": 0.2, "nested": {"x": 1}, "top_p": 0.9}
    assert config["agent"]["name"] == "uniform"


def test_no_defaults_means_no_schema(tmp_path):
    config = load_config(write(tmp_path, {"a": {"b": 1}}), ["a.c=2", "d=x"])
    assert config == {"a": {"b": 1, "c": 2}, "d": "x"}


@pytest.mark.parametrize("content,message", [
    ("env: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "mapping at the top level"),
    ("env: 3\n", "must be a mapping"),
])
def test_bad_files(tmp_path, content, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, content), None, DEFAULTS)


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml", None, DEFAULTS)
    with pytest.raises(ConfigError, match="is empty"):  # issue #24: an empty --config was silently the defaults
        load_config(write(tmp_path, ""), None, DEFAULTS)


@pytest.mark.parametrize("override,message", [
    ("seed", "not key=value"),
    ("=3", "empty key"),
    ("env..granularity=x", "empty key"),
    ("seed=[1, 2", "not valid YAML"),
    ("env.target_sparsity.x=1", "is not a mapping"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, [override], DEFAULTS)
    assert repr(override) in str(error.value) or message in str(error.value)


def test_merge_is_deep_and_copies():
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    update = {"a": {"c": [2]}, "e": {"f": 1}}
    merged = merge(base, update)
    assert merged == {"a": {"b": 1, "c": [2]}, "d": 1, "e": {"f": 1}}
    merged["a"]["c"].append(3)
    merged["e"]["f"] = 9
    assert update == {"a": {"c": [2]}, "e": {"f": 1}} and base == {"a": {"b": 1, "c": [1]}, "d": 1}


# ----------------------------------------------------------------------------- issue #24, round two
@pytest.mark.parametrize("content", ["", "\n", "# only a comment\n", "{}\n", "---\n"])
def test_empty_or_keyless_config_files_are_refused(tmp_path, content):
    """An empty --config is a lost or wrong file, not a request for the defaults (train.py once started the
    default SmolLM2 run from one)."""
    path = write(tmp_path, content)
    for defaults in (DEFAULTS, None):
        with pytest.raises(ConfigError, match=f"config file '{path}' is empty"):
            load_config(path, ["seed=3"], defaults)


@pytest.mark.parametrize("content, message", [
    ("run_dir: !!python/object/apply:os.system ['touch marker']\n", "could not determine a constructor"),
    ("env: [unclosed\n", "expected ',' or ']'"),
    (b"\x00\xff: [\n", "is not UTF-8 text"),
    ("- a\n", "mapping at the top level, not a list"),
])
def test_yaml_file_errors_are_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as error:
        load_config(path, None, DEFAULTS)
    text = str(error.value)
    assert str(path) in text and message in text and "\n" not in text
    assert not (tmp_path / "marker").exists()
