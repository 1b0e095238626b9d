"""Configs in and out: packaged names or YAML files, ``key.sub=value`` overrides, the resolved config as YAML.

    cfg = load_config("default", ["optim.lr=1e-4", "loss.beta=3"])    # validated for $WORLD_SIZE ranks
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import List, Optional

import yaml

from ..errors import ConfigError, ConfigPathError
from .coerce import from_dict, yaml_value
from .config import TrainConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_path(name_or_path: str) -> str:
    """A YAML file, or the packaged config of that name (``default`` -> ``simnpo_fast/configs/default.yaml``)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    cand = os.path.join(CONFIG_DIR, name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if os.path.isfile(cand):
        return cand
    raise ConfigPathError(f"config {name_or_path!r} not found (not a file, not one of "
                          f"{sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith('.yaml'))})")


def apply_overrides(d: dict, overrides: List[str]) -> dict:
    """``key.sub=value`` strings (value parsed as YAML; an empty value is None) applied to a copy of the nested
    dict ``d``; missing sections are created."""
    d = copy.deepcopy(d)
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not key=value")
        key, val = ov.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {ov!r}: empty key")
        node = d
        for i, p in enumerate(parts[:-1]):
            parent = node
            node = parent.get(p)
            if node is None:
                node = parent[p] = {}
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {'.'.join(parts[:i + 1])} is not a section")
        node[parts[-1]] = yaml_value(val, key) if val != "" else None
    return d


def read_config_file(path: str) -> dict:
    """A YAML config file as a mapping; a ConfigError naming the file (and line) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from None
    if d is None:
        raise ConfigError(f"{path}: the config file is empty (no keys); give at least one key, or no --config for "
                          "the embedded default")
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping of keys, got a {type(d).__name__}")
    return d


def load_config(name_or_path: Optional[str] = None, overrides: Optional[List[str]] = None) -> TrainConfig:
    """The config ``name_or_path`` (none: the schema's defaults) with ``overrides`` applied, validated for the
    ``WORLD_SIZE`` of the environment (1 outside torchrun)."""
    d = read_config_file(config_path(name_or_path)) if name_or_path else {}
    cfg = from_dict(TrainConfig, apply_overrides(d, overrides or []))
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: TrainConfig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(config_yaml(cfg))
