"""The checks of :meth:`TrainConfig.validate <simnpo_fast.train.config.TrainConfig.validate>`, one per section.

Every check raises a :class:`~simnpo_fast.errors.ConfigError` whose message starts with the dotted key (a
missing data / model / tokenizer folder: the ``ConfigPathError`` of its kind, exit 4 / 5 / 6). They read the
config's attributes only (no import of the schema), run in microseconds and touch no data: the checks that need
the data package are :func:`check_data_names`.
"""
from __future__ import annotations

import math
import os

import torch

from ..errors import ConfigError, DataPathError, ModelPathError, TokenizerPathError
from ..backends.filter import resolve
from ..methods import get_method
from ..objectives import NORMALIZATIONS
from .coerce import coerce

DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("cosine", "linear", "constant")
DATA_KINDS = ("synthetic", "tofu", "qa", "muse")
#: data.pairs.PAIRINGS, written here so that validating a config does not import the data package
PAIRINGS = ("random", "cycle", "fixed", "seeded_offset")
SYNTHETIC_KEYS = {"n_authors": int, "facts_per_author": int, "seed": int, "n_perturbed": int}
#: What a run writes into its output folder (no input may lie there).
WRITTEN = ("hf", "hf.tmp", "checkpoints", "replaced", "log.jsonl", "config.yaml")


def check_num(key: str, v, *, gt=None, ge=None, lt=None, le=None) -> None:
    """A finite number within the bounds, or a ConfigError naming ``key``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{key} must be a finite number, got {v!r}")
    for bound, ok, sym in ((gt, lambda: v > gt, ">"), (ge, lambda: v >= ge, ">="), (lt, lambda: v < lt, "<"),
                           (le, lambda: v <= le, "<=")):
        if bound is not None and not ok():
            raise ConfigError(f"{key} must be {sym} {bound}, got {v}")


def check_int(key: str, v, *, ge=None, why: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    if ge is not None and v < ge:
        raise ConfigError(f"{key} must be >= {ge}{f' ({why})' if why else ''}, got {v}")


def check_choice(key: str, v, choices) -> None:
    if v not in choices:
        raise ConfigError(f"{key} must be {', '.join(choices[:-1])} or {choices[-1]}, got {v!r}")


def validate_config(cfg) -> None:
    """Every section of a :class:`~simnpo_fast.train.config.TrainConfig`, in the order of the schema."""
    _loss(cfg.loss)
    _data(cfg.data)
    _model(cfg)
    _optim(cfg.optim)
    _run(cfg)
    _parallel(cfg.parallel)
    _checkpoint(cfg.checkpoint)
    if cfg.finetune.enabled:
        _finetune(cfg.finetune)
    _paths(cfg)


def _loss(L) -> None:
    try:
        get_method(L.objective)
    except ValueError as e:
        raise ConfigError(f"loss.objective: {e}") from None
    if L.beta is not None:
        check_num("loss.beta", L.beta, gt=0)
    check_num("loss.gamma", L.gamma)
    check_num("loss.forget_weight", L.forget_weight, ge=0)
    check_num("loss.retain_weight", L.retain_weight, ge=0)
    check_choice("loss.retain_loss", L.retain_loss, ("nll", "kl"))
    check_choice("loss.normalize", L.normalize, NORMALIZATIONS)
    try:
        resolve(L.grad_filter, torch.bfloat16)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"loss.grad_filter: {e}") from None


def _data(d) -> None:
    check_choice("data.kind", d.kind, DATA_KINDS)
    check_int("data.max_length", d.max_length, ge=2)
    check_int("data.window", d.window, ge=2)
    check_int("data.vocab_size", d.vocab_size, ge=259, why="256 bytes + 3 special tokens")
    check_choice("data.pairing", d.pairing, PAIRINGS)
    d.synthetic = check_synthetic(d.synthetic)
    if d.kind != "synthetic":
        if not d.path:
            raise ConfigError(f"data.path is required for data.kind={d.kind!r}")
        if not os.path.exists(d.path):
            raise DataPathError(f"data.path {d.path!r} does not exist (relative to {os.getcwd()})")
    if d.tokenizer and not os.path.isdir(d.tokenizer):
        raise TokenizerPathError(f"data.tokenizer {d.tokenizer!r} is not a folder")


def check_synthetic(syn) -> dict:
    """``data.synthetic`` with integer values (coerced), or a ConfigError naming the sub-key."""
    if not isinstance(syn, dict):
        raise ConfigError(f"data.synthetic must be a mapping, got {syn!r}")
    unknown = set(syn) - set(SYNTHETIC_KEYS)
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)} in data.synthetic; valid: {sorted(SYNTHETIC_KEYS)}")
    out = {k: coerce(SYNTHETIC_KEYS[k], v, f"data.synthetic.{k}") for k, v in syn.items()}
    for key, least in (("n_authors", 2), ("facts_per_author", 1), ("n_perturbed", 3)):
        if out.get(key, least) < least:
            raise ConfigError(f"data.synthetic.{key} must be >= {least}, got {out[key]}")
    return out


def _model(cfg) -> None:
    try:
        cfg.model.validate()
    except FileNotFoundError as e:
        raise ModelPathError(str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.path is None and cfg.data.kind != "synthetic" and not cfg.data.tokenizer:
        raise ConfigError("a model built from a preset needs data.tokenizer (or data.kind=synthetic)")


def _optim(o) -> None:
    check_num("optim.lr", o.lr, gt=0)
    check_num("optim.weight_decay", o.weight_decay, ge=0)
    check_num("optim.eps", o.eps, gt=0)
    check_num("optim.max_grad_norm", o.max_grad_norm, ge=0)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    check_choice("optim.schedule", o.schedule, SCHEDULES)
    check_int("optim.warmup_steps", o.warmup_steps, ge=0)
    check_num("optim.warmup_ratio", o.warmup_ratio, ge=0, lt=1)
    check_choice("optim.weight_decay_rule", o.weight_decay_rule, ("all", "hf"))
    check_num("optim.min_lr_ratio", o.min_lr_ratio, ge=0, le=1)


def _run(cfg) -> None:
    check_int("batch_size", cfg.batch_size, ge=1)
    check_int("micro_batch_size", cfg.micro_batch_size, ge=1)
    check_num("epochs", cfg.epochs, ge=0)
    check_int("max_steps", cfg.max_steps, ge=0)
    if not (cfg.epochs > 0 or cfg.max_steps > 0):
        raise ConfigError("set epochs > 0 or max_steps > 0")
    check_int("log_every", cfg.log_every, ge=1)
    if not cfg.output_dir:
        raise ConfigError("output_dir must not be empty")


def _parallel(pc) -> None:
    dev = pc.device
    if dev not in DEVICES and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        raise ConfigError(f"parallel.device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"parallel.device={dev!r} but CUDA is not available on this machine")
    check_choice("parallel.mixed_precision", pc.mixed_precision, ("auto", "bf16", "no"))


def _checkpoint(ck) -> None:
    check_int("checkpoint.every", ck.every, ge=0)
    check_int("checkpoint.keep", ck.keep, ge=0)
    if ck.resume not in (False, True, "auto"):
        raise ConfigError(f"checkpoint.resume must be false, true or auto, got {ck.resume!r}")


def _finetune(ft) -> None:
    check_num("finetune.epochs", ft.epochs, gt=0)
    check_num("finetune.lr", ft.lr, gt=0)
    check_int("finetune.batch_size", ft.batch_size, ge=1)
    check_int("finetune.micro_batch_size", ft.micro_batch_size, ge=1)
    check_int("finetune.warmup_steps", ft.warmup_steps, ge=0)
    check_choice("finetune.schedule", ft.schedule, SCHEDULES)


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _paths(cfg) -> None:
    """Inputs are never written to: the output folder must not lie inside an input folder, and no input may lie
    where the run writes (its checkpoints, its exported model, the folders ``--overwrite`` moves aside)."""
    out = cfg.output_dir
    inputs = [("model.path", cfg.model.path), ("data.tokenizer", cfg.data.tokenizer)]
    if cfg.data.kind != "synthetic":
        inputs.append(("data.path", cfg.data.path))
    for key, p in inputs:
        if not p:
            continue
        if _inside(out, p):
            raise ConfigError(f"output_dir {out!r} lies inside the input {key} {p!r}: the run would write into its "
                              "input; choose another output_dir")
        for sub in WRITTEN:
            if _inside(p, os.path.join(out, sub)):
                raise ConfigError(f"{key} {p!r} lies inside {os.path.join(out, sub)!r}, which this run writes; "
                                  "copy it elsewhere or choose another output_dir")


def check_overwrite_keeps_inputs(cfg, artifacts) -> None:
    """``--overwrite`` moves ``artifacts`` of ``output_dir`` aside: refuse, before anything moves, when an input
    lies inside one of them (e.g. ``model.path`` in ``<output_dir>/finetune/hf``)."""
    for key, p in (("model.path", cfg.model.path), ("data.tokenizer", cfg.data.tokenizer),
                   ("data.path", cfg.data.path)):
        for name in artifacts:
            moved = os.path.join(cfg.output_dir, name)
            if p and _inside(p, moved):
                raise ConfigError(f"{key} {p!r} lies inside {moved!r}, which --overwrite would move aside into "
                                  f"{os.path.join(cfg.output_dir, 'replaced')}/; copy it elsewhere first, or choose "
                                  "another output_dir")


def check_data_names(cfg) -> None:
    """The checks that need the data package (a few seconds to import, so not in ``validate``, which stays
    instant for ``load_config``): the template name and the synthetic corpus's facts per author."""
    from ..data.synthetic import FACTS
    from ..data.template import TEMPLATES

    d = cfg.data
    if d.template not in TEMPLATES:
        raise ConfigError(f"data.template: unknown template {d.template!r}; choose one of {sorted(TEMPLATES)}")
    n = d.synthetic.get("facts_per_author", 1)
    if not n <= len(FACTS):
        raise ConfigError(f"data.synthetic.facts_per_author must be in 1..{len(FACTS)}, got {n}")
