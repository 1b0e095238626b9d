"""Small unlearning studies: a study config (YAML) names its ``kind``, and :data:`KINDS` names the module that runs
that kind.

==========  ==============================================================================================
``tofu``    :mod:`.tofu` (the default kind): the TOFU protocol at CPU scale; every model is a stage of the
            trainer (:class:`simnpo_fast.train.Stage`), run through :mod:`simnpo_fast.train.stages`
``markov``  :mod:`.markov`: the SimNPO paper's mixture-of-Markov-chains study (models of :mod:`simnpo_fast.markov`)
==========  ==============================================================================================

Each module offers the same four names: ``resolve(raw, *, overrides, quick, data)`` (the config to run, or a
:class:`~simnpo_fast.errors.ConfigError` naming what does not apply), ``default_results(out_dir, quick)``,
``run(cfg, out_dir, *, seeds, methods, results_dir, command)`` and ``summary_text(result)``; the command line is
:mod:`simnpo_fast.cli.study`.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import List, Optional

import yaml

from ..errors import ConfigError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

#: ``kind`` of a study config -> the module of this package that runs it.
KINDS = {"tofu": "tofu", "markov": "markov"}
DEFAULT_KIND = "tofu"


def config_file(name_or_path: str) -> str:
    """A YAML path, or the packaged study of that name: ``tofu-mini`` -> ``configs/study_tofu_mini.yaml``,
    ``demo`` -> ``configs/demo.yaml``."""
    if os.path.isfile(name_or_path):
        return name_or_path
    stem = name_or_path.replace("-", "_")
    for cand in (f"study_{stem}.yaml", f"{stem}.yaml"):
        path = os.path.join(CONFIG_DIR, cand)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no study config {name_or_path!r} (looked in {CONFIG_DIR})")


def load_study_config(name_or_path: str, overrides: Optional[List[str]] = None) -> dict:
    """The study config :func:`config_file` finds, with the ``key.sub=value`` overrides of
    :func:`simnpo_fast.train.config_io.apply_overrides`; ``_source`` records the file read."""
    from ..train.config_io import apply_overrides

    path = config_file(name_or_path)
    with open(path, encoding="utf-8") as f:
        cfg = apply_overrides(yaml.safe_load(f) or {}, overrides or [])
    cfg["_source"] = path
    return cfg


def study_kind(cfg: dict) -> ModuleType:
    """The module of :data:`KINDS` that runs ``cfg`` (``kind``, default :data:`DEFAULT_KIND`)."""
    kind = cfg.get("kind", DEFAULT_KIND)
    if kind not in KINDS:
        raise ConfigError(f"study kind {kind!r} is not one of {sorted(KINDS)}")
    return importlib.import_module(f"{__name__}.{KINDS[kind]}")


__all__ = ["CONFIG_DIR", "DEFAULT_KIND", "KINDS", "config_file", "load_study_config", "study_kind"]
