"""YAML configs with `key.sub=value` command-line overrides, checked against a schema of defaults.

A config is a nested dict. `load_config(path, overrides, defaults)` reads the YAML, applies the
overrides (values parsed as YAML, so `0.6`, `true`, `[1, 2]` and `null` work), and rejects any key that
the defaults do not know, naming the key and the valid ones, so a typo never silently does nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

from .validation import is_finite_number, is_int

T = TypeVar("T")


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


def read_yaml(path: str | Path, what: str) -> dict:
    """The mapping in a YAML file (safe loader; empty file: {}), or a one-line ConfigError naming the file.

    One reader for every YAML file the project reads (configs, a run's config.yaml), so a missing, binary,
    malformed or tagged file is refused the same way everywhere."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist" if not path.exists()
                          else f"{what} {str(path)!r} is not a file")
    try:
        loaded = _load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text: give a YAML file") from None
    except yaml.YAMLError as error:  # PyYAML's message spans lines (problem, context, marks): one line here
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {' '.join(str(error).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping at the top level, not a "
                          f"{type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None, overrides: list[str] | None = None, defaults: dict | None = None) -> dict:
    """defaults <- YAML file <- overrides, with every key checked against the defaults' keys.

    An empty dict in the defaults means "free-form mapping" (e.g. algorithm hyperparameters). A file with
    no key is refused: an empty --config is a mistake (a lost file, a wrong path), not a request for defaults.
    """
    config: dict = copy.deepcopy(defaults or {})
    if path is not None:
        loaded = read_yaml(path, "config file")
        if not loaded:
            raise ConfigError(f"config file {str(path)!r} is empty: give at least one key (e.g. env.model), or "
                              "leave out --config for the defaults")
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


def dataclass_from_dict(cls: type[T], values: dict | None, what: str) -> T:
    """A typed config dataclass from a mapping: unknown keys, wrong types and nested mappings checked.

    Field types are read from the annotations (int, float, bool, str, `X | None`, list[...], dict[...],
    Literal[...] and nested dataclasses); a value of the wrong type is a ConfigError naming the dotted
    key, the value and the expected type, so the bad value is found before any work starts. Range
    checks live in each dataclass's `__post_init__` (with prune_env.validation).
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{what} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {unknown}: valid options are {sorted(known)}")
    kwargs = {name: _typed(hints[name], value, f"{what}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required field is missing
        raise ConfigError(f"{what}: {error}") from None
    except ValueError as error:
        raise ConfigError(f"{what}: {error}") from None


def _describe(hint: Any) -> str:
    """A type annotation in words, for error messages."""
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) in (list, tuple):
        return "a list"
    return getattr(hint, "__name__", str(hint))


def _typed(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _typed(arg, value, key)
            except ConfigError as error:
                errors.append(str(error))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        allowed = ", ".join(_describe(a) for a in args)
        raise ConfigError(f"{key}={value!r} is not allowed: give {allowed}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else dataclass_from_dict(hint, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        item = args[0] if args else Any
        return [_typed(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return dict(value)
    if hint in _SCALARS:
        accepts, convert, wanted = _SCALARS[hint]
        if not accepts(value):
            raise ConfigError(f"{key}={value!r} must be {wanted}")
        return convert(value)
    return value


# annotation -> (accepts the YAML value?, conversion, what to say when it does not)
_SCALARS: dict[type, tuple[Callable[[Any], bool], Callable[[Any], Any], str]] = {
    bool: (lambda v: isinstance(v, bool), bool, "true or false"),
    int: (is_int, int, "an integer"),
    float: (is_finite_number, float, "a finite number"),
    str: (lambda v: isinstance(v, str), str, "a string"),
}
