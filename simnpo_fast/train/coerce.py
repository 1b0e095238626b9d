"""Strict coercion of YAML / command-line values into typed config dataclasses.

A value is accepted only when it means the field's type without loss: no float -> int truncation, no
bool -> number, no mapping -> string. Strings (``key=value`` overrides) are parsed as YAML where a list or a
mapping is expected. Every failure is a :class:`~simnpo_fast.errors.ConfigError` naming the dotted key.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List

import yaml

from ..errors import ConfigError

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def yaml_value(text: str, where: str):
    """``text`` parsed as a YAML value; a ConfigError naming ``where`` when it does not parse."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML value {text!r} ({' '.join(str(e).split())})") from None


def _to_bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE:
        return True
    if isinstance(value, str) and value.lower() in _FALSE:
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{where}: expected a boolean, got {value!r}")


def _to_number(tp, value, where: str):
    """``int`` (integral floats allowed) or ``float``; never from a bool."""
    what = "an integer" if tp is int else "a number"
    if not isinstance(value, bool):
        if tp is int and isinstance(value, int):
            return value
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if tp is float and isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
    raise ConfigError(f"{where}: expected {what}, got {value!r}")


def _to_union(tp, value, where: str):
    """``Optional[X]`` (None / "none" / "null" -> None) and ``Union[bool, str]`` (a boolean or a word)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if type(None) in typing.get_args(tp) and (value is None or (isinstance(value, str)
                                                                 and value.lower() in ("none", "null"))):
        return None
    if set(args) == {bool, str}:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return _to_bool(value, where)
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a boolean or a word, got {value!r}")
    return coerce(args[0], value, where)


def _to_container(tp, value, where: str):
    """``List[X]`` (items coerced) or ``Dict[...]`` (None -> {}); a string is parsed as YAML first."""
    if isinstance(value, str):
        value = yaml_value(value, where)
    if typing.get_origin(tp) in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [v if item is Any else coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def coerce(tp, value, where: str):
    """``value`` as type ``tp`` (see the module docstring); a ConfigError naming ``where`` otherwise."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return _to_union(tp, value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        return _to_bool(value, where)
    if tp in (int, float):
        return _to_number(tp, value, where)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin in (list, List, dict, Dict):
        return _to_container(tp, value, where)
    return value


def from_dict(cls, d: dict, where: str = ""):
    """The dataclass ``cls`` built from the mapping ``d``, every field coerced; unknown keys are an error that
    lists the valid ones."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(map(str, unknown))} in {where or cls.__name__}; "
                          f"valid: {sorted(names)}")
    kw = {k: coerce(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in d.items()}
    return cls(**kw)
