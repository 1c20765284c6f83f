"""YAML configs with `key.sub=value` command-line overrides, checked against a schema of defaults.

A config is a nested dict. `load_config(path, overrides, defaults)` reads the YAML, applies the
overrides (values parsed as YAML, so `0.6`, `true`, `[1, 2]` and `null` work), and rejects any key that
the defaults do not know, naming the key and the valid ones, so a typo never silently does nothing.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 / 3E+4 as floats (YAML 1.1 needs a dot: PyYAML gives '1e-3' a str)."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. env.target_sparsity=0.6)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = _load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({error})") from None
    return key.split("."), value


def _check_keys(config: dict, schema: dict, where: str) -> None:
    for key, value in config.items():
        if key not in schema:
            raise ConfigError(f"unknown config key {where}{key!r}: valid keys here are {sorted(schema)}")
        if isinstance(schema[key], dict) and schema[key] and isinstance(value, dict):
            _check_keys(value, schema[key], f"{where}{key}.")
        elif isinstance(schema[key], dict) and schema[key] and value is not None and not isinstance(value, dict):
            raise ConfigError(f"config key {where}{key!r} must be a mapping, got {value!r}")


def merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None, defaults: dict | None = None) -> dict:
    """defaults <- YAML file <- overrides, with every key checked against the defaults' keys.

    An empty dict in the defaults means "free-form mapping" (e.g. algorithm hyperparameters).
    """
    config: dict = copy.deepcopy(defaults or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = _load_yaml(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        if defaults:
            _check_keys(loaded, defaults, "")
        config = merge(config, loaded)
    for text in overrides or []:
        keys, value = parse_override(text)
        node, schema = config, defaults
        for depth, key in enumerate(keys[:-1]):
            if schema is not None and schema and key not in schema:
                raise ConfigError(f"unknown config key {'.'.join(keys[:depth + 1])!r}: valid keys are {sorted(schema)}")
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:depth + 1])!r} is not a mapping")
            schema = schema.get(key) if isinstance(schema, dict) else None
        if schema is not None and schema and keys[-1] not in schema:
            raise ConfigError(f"unknown config key {'.'.join(keys)!r}: valid keys are {sorted(schema)}")
        node[keys[-1]] = value
    return config


def dataclass_from_dict(cls, values: dict | None, what: str):
    """Build a dataclass from a mapping, naming any unknown key and the valid ones."""
    from dataclasses import fields

    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}: valid options are {sorted(known)}")
    return cls(**values)


def is_int(value) -> bool:
    """An int from YAML or JSON (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """An int or float from YAML or JSON that is finite (a bool is not one)."""
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
