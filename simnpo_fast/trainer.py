"""The lean FSDP2 unlearning trainer: typed configs, data, one readable loop.

    cfg = load_config("default", ["optim.lr=1e-4"])
    result = train(cfg)            # same code from 1 CPU process to torchrun --nnodes N --nproc_per_node G

Exact normalisation. One optimizer step = ``grad_accum`` micro-batches on each of ``world_size`` ranks. Before
any forward, the ranks all-reduce the number of forget sequences (tokens for GA) and retain answer tokens of the
*whole* step; every micro-batch loss is ``sum / that global count`` and FSDP *sums* the gradients over ranks
(divide factor 1), so the accumulated gradient equals the gradient of the mean loss over the global batch,
whatever the split into ranks and micro-batches.

NPO keeps no live reference model: one pass over the forget set before training caches ``log p_ref(y|x)`` per
forget example (stored in every checkpoint). A retain-KL term keeps a frozen, sharded reference model
(``reshard_after_forward=True``) whose final hidden states feed the fused KL (``simnpo_fast.kl_loss``) together
with one copy of its LM head (``[V, d]``, taken on first use): no ``[tokens, V]`` reference log-probabilities.

The output folder belongs to one run (:mod:`simnpo_fast.run_folder`: lock, run id, fresh / resume / overwrite
rules) and checkpoints are verified before use (:mod:`simnpo_fast.checkpoint`). Configs are checked strictly
before any work: every bad key, type or value is a :class:`~simnpo_fast.errors.ConfigError` naming it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import yaml

from .distributed import (DistInfo, all_reduce_sum, apply_ac, apply_compile, apply_fsdp, barrier, clip_grad_norm_,
                          init_distributed, mixed_precision_policy)
from .model import (ModelConfig, UnlearnModel, build_hf_model, logprob_task, nll_task, shifted_targets,
                    ref_hidden_task, unlearn_task)
from .errors import ConfigError, ConfigPathError, ModelError, NonFiniteError, RunFolderError
from .modules import UnlearningLoss

OBJECTIVES = ("simnpo", "npo", "ga", "graddiff", "finetune")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("cosine", "linear", "constant")
SYNTHETIC_KEYS = {"n_authors": int, "facts_per_author": int, "seed": int, "n_perturbed": int}


# ============================================================================= configs

@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | tofu | qa | muse
    path: Optional[str] = None  # data folder (synthetic: generated there; default <output_dir>/data)
    forget_split: str = "forget10"
    retain_split: str = "retain90"
    finetune_split: str = "full"
    template: str = "plain"
    max_length: int = 256
    window: int = 256  # muse: tokens per window
    tokenizer: Optional[str] = None  # folder; default: model.path, or trained on the synthetic corpus
    vocab_size: int = 1024  # tokenizer trained on the synthetic corpus
    synthetic: Dict[str, Any] = field(default_factory=lambda: {"n_authors": 20, "facts_per_author": 10, "seed": 0})
    pairing: str = "random"


@dataclass
class LossConfig:
    objective: str = "simnpo"
    beta: Optional[float] = None  # simnpo default 2.5, npo default 0.1
    gamma: float = 0.0
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    retain_loss: str = "nll"  # nll | kl


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still logged)
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0


@dataclass
class ParallelConfig:
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "auto"  # auto (bf16 on GPU) | bf16 | no
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    compile: bool = False
    reshard_after_forward: bool = True


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0: only the final one
    keep: int = 2  # newest checkpoints kept (0: all)
    resume: Union[bool, str] = False  # true: continue from the newest verified checkpoint (error if none);
    #                                   auto: resume if there is one, else start fresh
    final: bool = True  # checkpoint after the last step
    export_hf: bool = True  # write <output_dir>/hf at the end


@dataclass
class FinetuneConfig:
    """Optional first stage (embedded default): plain NLL on ``data.finetune_split`` so there is something to
    unlearn; the result (an HF folder) becomes the unlearning stage's model."""

    enabled: bool = False
    epochs: float = 10
    lr: float = 3e-3
    batch_size: int = 16
    micro_batch_size: int = 16
    schedule: str = "cosine"
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    name: str = "run"
    output_dir: str = "runs/default"
    seed: int = 0
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 32  # global: sequences per optimizer step over all ranks and micro-batches
    micro_batch_size: int = 4  # forget (and as many retain) sequences per rank per forward
    log_every: int = 1
    progress: bool = True
    plot: bool = True
    evaluate: bool = True  # forget / retain mean log-likelihood before and after
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self, world_size: Optional[int] = None) -> None:
        """Fail before any work on a config that cannot run (:class:`~simnpo_fast.errors.ConfigError` naming the
        key). Normalises ``data.synthetic`` (integers) and ``checkpoint.resume`` in place."""
        L, o, d, pc, ck, ft = self.loss, self.optim, self.data, self.parallel, self.checkpoint, self.finetune
        if L.objective not in OBJECTIVES:
            raise ConfigError(f"loss.objective: unknown objective {L.objective!r}; choose one of {OBJECTIVES}")
        if L.beta is not None:
            _check_num("loss.beta", L.beta, gt=0)
        _check_num("loss.gamma", L.gamma)
        _check_num("loss.forget_weight", L.forget_weight, ge=0)
        _check_num("loss.retain_weight", L.retain_weight, ge=0)
        if L.retain_loss not in ("nll", "kl"):
            raise ConfigError(f"loss.retain_loss must be nll or kl, got {L.retain_loss!r}")
        if d.kind not in ("synthetic", "tofu", "qa", "muse"):
            raise ConfigError(f"data.kind must be synthetic, tofu, qa or muse, got {d.kind!r}")
        _check_int("data.max_length", d.max_length, ge=2)
        _check_int("data.window", d.window, ge=2)
        _check_int("data.vocab_size", d.vocab_size, ge=259, why="256 bytes + 3 special tokens")
        if d.pairing not in ("random", "cycle", "fixed"):
            raise ConfigError(f"data.pairing must be random, cycle or fixed, got {d.pairing!r}")
        d.synthetic = _check_synthetic(d.synthetic)
        if d.kind != "synthetic":
            if not d.path:
                raise ConfigError(f"data.path is required for data.kind={d.kind!r}")
            if not os.path.exists(d.path):
                raise ConfigPathError(f"data.path {d.path!r} does not exist (relative to {os.getcwd()})")
        if d.tokenizer and not os.path.isdir(d.tokenizer):
            raise ConfigPathError(f"data.tokenizer {d.tokenizer!r} is not a folder")
        try:
            self.model.validate()
        except FileNotFoundError as e:
            raise ConfigPathError(str(e)) from None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.model.path is None and d.kind != "synthetic" and not d.tokenizer:
            raise ConfigError("a model built from a preset needs data.tokenizer (or data.kind=synthetic)")
        _check_num("optim.lr", o.lr, gt=0)
        _check_num("optim.weight_decay", o.weight_decay, ge=0)
        _check_num("optim.eps", o.eps, gt=0)
        _check_num("optim.max_grad_norm", o.max_grad_norm, ge=0)
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        if o.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be cosine, linear or constant, got {o.schedule!r}")
        _check_int("optim.warmup_steps", o.warmup_steps, ge=0)
        _check_num("optim.warmup_ratio", o.warmup_ratio, ge=0, lt=1)
        _check_num("optim.min_lr_ratio", o.min_lr_ratio, ge=0, le=1)
        _check_int("batch_size", self.batch_size, ge=1)
        _check_int("micro_batch_size", self.micro_batch_size, ge=1)
        _check_num("epochs", self.epochs, ge=0)
        _check_int("max_steps", self.max_steps, ge=0)
        if not (self.epochs > 0 or self.max_steps > 0):
            raise ConfigError("set epochs > 0 or max_steps > 0")
        _check_int("log_every", self.log_every, ge=1)
        if not self.output_dir:
            raise ConfigError("output_dir must not be empty")
        dev = pc.device
        if dev not in DEVICES and not (dev.startswith("cuda:") and dev[5:].isdigit()):
            raise ConfigError(f"parallel.device must be auto, cpu, cuda or cuda:N, got {dev!r}")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"parallel.device={dev!r} but CUDA is not available on this machine")
        if pc.mixed_precision not in ("auto", "bf16", "no"):
            raise ConfigError(f"parallel.mixed_precision must be auto, bf16 or no, got {pc.mixed_precision!r}")
        _check_int("checkpoint.every", ck.every, ge=0)
        _check_int("checkpoint.keep", ck.keep, ge=0)
        if ck.resume not in (False, True, "auto"):
            raise ConfigError(f"checkpoint.resume must be false, true or auto, got {ck.resume!r}")
        if ft.enabled and L.objective != "finetune":
            _check_num("finetune.epochs", ft.epochs, gt=0)
            _check_num("finetune.lr", ft.lr, gt=0)
            _check_int("finetune.batch_size", ft.batch_size, ge=1)
            _check_int("finetune.micro_batch_size", ft.micro_batch_size, ge=1)
            _check_int("finetune.warmup_steps", ft.warmup_steps, ge=0)
            if ft.schedule not in SCHEDULES:
                raise ConfigError(f"finetune.schedule must be cosine, linear or constant, got {ft.schedule!r}")
        _check_paths(self)
        if world_size is not None:
            grad_accum(self, world_size)
            if ft.enabled and L.objective != "finetune":
                grad_accum(finetune_config(self), world_size, prefix="finetune.")


def _check_num(key: str, v, *, gt=None, ge=None, lt=None, le=None) -> None:
    """A finite number within the bounds, or a ConfigError naming ``key``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{key} must be a finite number, got {v!r}")
    for bound, ok, sym in ((gt, lambda: v > gt, ">"), (ge, lambda: v >= ge, ">="), (lt, lambda: v < lt, "<"),
                           (le, lambda: v <= le, "<=")):
        if bound is not None and not ok():
            raise ConfigError(f"{key} must be {sym} {bound}, got {v}")


def _check_int(key: str, v, *, ge=None, why: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    if ge is not None and v < ge:
        raise ConfigError(f"{key} must be >= {ge}{f' ({why})' if why else ''}, got {v}")


def _check_data_names(cfg: "TrainConfig") -> None:
    """The checks that need the data package (a few seconds to import, so not in ``validate``, which stays
    instant for ``load_config``): run by :func:`train` before any work."""
    from .data.synthetic import FACTS
    from .data.template import TEMPLATES

    d = cfg.data
    if d.template not in TEMPLATES:
        raise ConfigError(f"data.template: unknown template {d.template!r}; choose one of {sorted(TEMPLATES)}")
    n = d.synthetic.get("facts_per_author", 1)
    if not n <= len(FACTS):
        raise ConfigError(f"data.synthetic.facts_per_author must be in 1..{len(FACTS)}, got {n}")


def _check_synthetic(syn) -> dict:
    if not isinstance(syn, dict):
        raise ConfigError(f"data.synthetic must be a mapping, got {syn!r}")
    unknown = set(syn) - set(SYNTHETIC_KEYS)
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)} in data.synthetic; valid: {sorted(SYNTHETIC_KEYS)}")
    out = {k: _coerce(SYNTHETIC_KEYS[k], v, f"data.synthetic.{k}") for k, v in syn.items()}
    if out.get("n_authors", 2) < 2:
        raise ConfigError(f"data.synthetic.n_authors must be >= 2, got {out['n_authors']}")
    if out.get("facts_per_author", 1) < 1:
        raise ConfigError(f"data.synthetic.facts_per_author must be >= 1, got {out['facts_per_author']}")
    if out.get("n_perturbed", 3) < 3:
        raise ConfigError(f"data.synthetic.n_perturbed must be >= 3, got {out['n_perturbed']}")
    return out


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _check_paths(cfg: "TrainConfig") -> None:
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
        for sub in ("hf", "hf.tmp", "checkpoints", "replaced", "log.jsonl", "config.yaml"):
            if _inside(p, os.path.join(out, sub)):
                raise ConfigError(f"{key} {p!r} lies inside {os.path.join(out, sub)!r}, which this run writes; "
                                  "copy it elsewhere or choose another output_dir")


def grad_accum(cfg: TrainConfig, world_size: int, prefix: str = "") -> int:
    per_rank, r = divmod(cfg.batch_size, world_size)
    if r or per_rank % cfg.micro_batch_size:
        raise ConfigError(f"{prefix}batch_size={cfg.batch_size} must be a multiple of {prefix}micro_batch_size * "
                          f"world_size = {cfg.micro_batch_size} * {world_size}")
    return per_rank // cfg.micro_batch_size


def _coerce(tp, value, where: str):
    """``value`` (from YAML or an override) as type ``tp``; a ConfigError naming ``where`` otherwise. Strict:
    no float -> int truncation, no bool -> number, no mapping -> string."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if type(None) in typing.get_args(tp) and (value is None or (isinstance(value, str)
                                                                     and value.lower() in ("none", "null"))):
            return None
        if set(args) == {bool, str}:  # checkpoint.resume: a boolean or a word
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return _coerce(bool, value, where)
            if isinstance(value, str):
                return value
            raise ConfigError(f"{where}: expected a boolean or a word, got {value!r}")
        return _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin in (list, List):
        if isinstance(value, str):
            value = _yaml_value(value, where)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [v if item is Any else _coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if isinstance(value, str):
            value = _yaml_value(value, where)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _yaml_value(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML value {text!r} ({' '.join(str(e).split())})") from None


def _from_dict(cls, d: dict, where: str = ""):
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(map(str, unknown))} in {where or cls.__name__}; "
                          f"valid: {sorted(names)}")
    kw = {k: _coerce(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in d.items()}
    return cls(**kw)


def config_path(name_or_path: str) -> str:
    if os.path.isfile(name_or_path):
        return name_or_path
    cand = os.path.join(CONFIG_DIR, name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if os.path.isfile(cand):
        return cand
    raise ConfigPathError(f"config {name_or_path!r} not found (not a file, not one of "
                          f"{sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith('.yaml'))})")


def apply_overrides(d: dict, overrides: List[str]) -> dict:
    """``key.sub=value`` strings (value parsed as YAML) applied to a nested dict."""
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
        node[parts[-1]] = _yaml_value(val, key) if val != "" else None
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
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping of keys, got a {type(d).__name__}")
    return d


def load_config(name_or_path: Optional[str] = None, overrides: Optional[List[str]] = None) -> TrainConfig:
    d = read_config_file(config_path(name_or_path)) if name_or_path else {}
    cfg = _from_dict(TrainConfig, apply_overrides(d, overrides or []))
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


# ============================================================================= data

class _Single(torch.utils.data.Dataset):
    """Items ``{"forget": ex}`` (finetune stage: one dataset, no pairing)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return {"forget": self.ds[i]}

    def set_epoch(self, epoch):
        pass


def _synthetic_corpus(path: str, params: dict) -> None:
    """Rank 0: make sure ``path`` holds the synthetic corpus of ``params``: generated into a missing or empty
    folder, reused when its recorded parameters match, and never written over a folder of other files."""
    from .data import synthetic

    meta = os.path.join(path, synthetic.META_FILE)
    if os.path.isfile(meta):
        want = {"n_authors": 200, "facts_per_author": 20, "seed": 0, "n_perturbed": 5}
        want.update(params)
        try:
            with open(meta, encoding="utf-8") as f:
                have = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{meta}: unreadable synthetic-corpus record ({e})") from None
        diff = [f"{k}: {have.get(k)!r} in the folder, {v!r} asked" for k, v in want.items() if have.get(k) != v]
        if diff:
            raise ConfigError(f"data.path {path!r} holds a synthetic corpus made with other parameters "
                              f"({'; '.join(diff)}); choose another data.path or match data.synthetic")
        return
    if os.path.isdir(path) and os.listdir(path):
        raise ConfigError(f"data.path {path!r} (data.kind=synthetic) is a folder of other files, not a generated "
                          f"corpus (no {synthetic.META_FILE}); the corpus is only generated into a new or empty "
                          "folder. For real TOFU-layout data set data.kind=tofu")
    synthetic.generate(path, **params)


def prepare_data(cfg: TrainConfig, info: DistInfo):
    """Tokenizer and encoded ``(forget, retain)`` datasets (``retain`` None for finetuning). Rank 0 generates the
    synthetic corpus / trains its tokenizer when missing; the others wait.

    Inputs are never written to: a tokenizer is trained only into the synthetic corpus's own ``tokenizer``
    folder; given ``data.tokenizer`` or ``model.path``, the tokenizer is loaded from there or the run stops."""
    from . import data as D
    from .distributed import on_rank0

    dc = cfg.data
    path = dc.path or os.path.join(cfg.output_dir, "data")
    tok_dir = dc.tokenizer or cfg.model.path
    if dc.kind == "synthetic":
        own_tok = None if tok_dir else os.path.join(path, "tokenizer")

        def make():
            _synthetic_corpus(path, dc.synthetic)
            if own_tok and not os.path.isfile(os.path.join(own_tok, "tokenizer.json")):
                D.train_tokenizer(path, own_tok, vocab_size=dc.vocab_size)

        on_rank0(make, info.is_main)
        tok_dir = tok_dir or own_tok
    tok = D.load_tokenizer(tok_dir)

    def qa(split):
        src = f"{path}:{split}" if dc.kind != "qa" else os.path.join(path, split)
        ds = D.encode_qa(D.load_tofu(path, split) if dc.kind in ("synthetic", "tofu")
                         else D.load_qa(os.path.join(path, split)), tok,
                         template=dc.template, max_length=dc.max_length, source=src)
        _non_empty(ds, src)
        return ds

    if dc.kind == "muse":
        docs = D.load_muse(path, splits=(dc.forget_split, dc.retain_split))
        enc = {k: D.encode_text_windows(v, tok, window=dc.window, source=k) for k, v in docs.items()}
        forget, retain = enc[dc.forget_split], enc[dc.retain_split]
        _non_empty(forget, os.path.join(path, dc.forget_split))
        _non_empty(retain, os.path.join(path, dc.retain_split))
    elif cfg.loss.objective == "finetune":
        forget, retain = qa(dc.finetune_split), None
    else:
        forget, retain = qa(dc.forget_split), qa(dc.retain_split)
    return tok, forget, retain


def _non_empty(ds, source: str) -> None:
    if len(ds) == 0:
        from .data import DataError

        raise DataError(source, "no examples to train on (an empty split, or every example dropped by "
                                "data.max_length / data.window: see the warnings above)")


class StepStream:
    """Per optimizer step: this rank's ``grad_accum`` collated micro-batches. Resumable (sampler state)."""

    def __init__(self, dataset, sampler, collator, micro: int, accum: int, with_retain: bool):
        self.ds, self.sampler, self.collator = dataset, sampler, collator
        self.micro, self.accum, self.with_retain = micro, accum, with_retain
        self._it = iter(self.sampler)

    def next_step(self) -> List[dict]:
        try:
            idx = next(self._it)
        except StopIteration:
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self.ds.set_epoch(self.sampler.epoch)
            self._it = iter(self.sampler)
            idx = next(self._it)
        return [self.collate(idx[i * self.micro:(i + 1) * self.micro]) for i in range(self.accum)]

    def collate(self, idx: List[int]) -> dict:
        items = [self.ds[i] for i in idx]
        examples = [it["forget"] for it in items]
        if self.with_retain:
            examples += [it["retain"] for it in items]
        batch = self.collator.pad(examples)
        batch["n_forget"] = len(idx)
        batch["index"] = torch.tensor(idx, dtype=torch.long)
        return batch

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, st: dict) -> None:
        self.sampler.load_state_dict(st)
        self.ds.set_epoch(self.sampler.epoch)
        self._it = iter(self.sampler)


# ============================================================================= schedule

def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        span = max(1, total - warmup)
        prog = min(1.0, (step - warmup) / span)
        if schedule == "linear":
            return min_ratio + (1 - min_ratio) * (1 - prog)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


# ============================================================================= the run

@dataclass
class Run:
    cfg: TrainConfig
    info: DistInfo
    model: UnlearnModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stream: StepStream
    tokenizer: Any
    forget: Any
    retain: Any
    total_steps: int
    accum: int
    criterion: Optional[UnlearningLoss] = None
    ref_logp: Optional[torch.Tensor] = None
    ref_model: Optional[UnlearnModel] = None
    ref_head: dict = field(default_factory=dict)  # the frozen reference's LM head (retain KL), copied once
    step: int = 0


def _device_batch(b: dict, dev: torch.device) -> dict:
    return {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}


def setup(cfg: TrainConfig) -> Run:
    """Everything but the loop: process group, data, model (sharded), optimizer, schedule, NPO cache."""
    info = init_distributed(cfg.parallel.device)
    cfg.validate(info.world_size)
    accum = grad_accum(cfg, info.world_size)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    from . import data as D

    tok, forget, retain = prepare_data(cfg, info)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hf = build_hf_model(cfg.model, vocab_size=len(tok) if cfg.model.path is None else None,
                        special_ids=special if cfg.model.path is None else None, device=info.device)
    n_emb = hf.get_input_embeddings().num_embeddings
    if len(tok) > n_emb:
        raise ModelError(f"model.path {cfg.model.path!r} has {n_emb} token embeddings but the tokenizer "
                         f"({cfg.data.tokenizer or cfg.model.path}) has {len(tok)} tokens: they do not belong together")
    ref_model = None
    if cfg.loss.retain_loss == "kl" and cfg.loss.objective != "finetune" and cfg.loss.retain_weight > 0:
        ref_hf = copy.deepcopy(hf)
        ref_hf.requires_grad_(False)
        ref_model = UnlearnModel(ref_hf)
    model = UnlearnModel(hf)
    pc = cfg.parallel
    if pc.activation_checkpointing:
        apply_ac(model)
    if pc.compile:
        apply_compile(model)
    mp = mixed_precision_policy(info.device, pc.mixed_precision)
    if info.device.type == "cuda" and not pc.cpu_offload:
        model.to(info.device)
    apply_fsdp(model, mp_policy=mp, reshard_after_forward=pc.reshard_after_forward, cpu_offload=pc.cpu_offload)
    if ref_model is not None:
        if info.device.type == "cuda" and not pc.cpu_offload:
            ref_model.to(info.device)
        apply_fsdp(ref_model, mp_policy=mp, reshard_after_forward=True, cpu_offload=pc.cpu_offload)
        ref_model.eval()
    model.train()

    dataset = _Single(forget) if retain is None else D.ForgetRetainDataset(forget, retain, seed=cfg.seed,
                                                                             pairing=cfg.data.pairing)
    per_rank = cfg.batch_size // info.world_size
    sampler = D.ShardedBatchSampler(len(dataset), per_rank, rank=info.rank, world_size=info.world_size,
                                    seed=cfg.seed, drop_last=False)
    collator = D.DataCollator.from_tokenizer(tok)
    objective = cfg.loss.objective
    with_retain = retain is not None and objective != "ga" and cfg.loss.retain_weight > 0
    stream = StepStream(dataset, sampler, collator, cfg.micro_batch_size, accum, with_retain)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * sampler.num_steps))

    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                  foreach=True)
    warm = o.warmup_steps or int(round(o.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.schedule, warm, total, o.min_lr_ratio))
    criterion = None
    if objective != "finetune":
        criterion = UnlearningLoss(objective, forget_weight=cfg.loss.forget_weight,
                                   retain_weight=cfg.loss.retain_weight if with_retain else 0.0,
                                   beta=cfg.loss.beta, gamma=cfg.loss.gamma)
    return Run(cfg, info, model, optimizer, scheduler, stream, tok, forget, retain, total, accum,
               criterion=criterion, ref_model=ref_model)


@torch.no_grad()
def sequence_logps(model: UnlearnModel, dataset, collator, info: DistInfo, batch_size: int = 16) -> torch.Tensor:
    """``[len(dataset), 2]`` = (summed answer log-likelihood, answer tokens) of every example, computed sharded
    over ranks (every rank runs the same number of forwards, as FSDP requires) and all-reduced."""
    n = len(dataset)
    W, r = info.world_size, info.rank
    per = -(-n // W)
    steps = -(-per // batch_size)
    out = torch.zeros(n, 2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for s in range(steps):
        idx = [(r * per + s * batch_size + j) for j in range(batch_size)]
        idx = [i for i in idx if i < min(n, (r + 1) * per)]
        real = len(idx)
        if not idx:
            idx = [0]  # a dummy forward keeps the collectives in step
        b = _device_batch(collator.pad([dataset[i] for i in idx]), info.device)
        logp, ntok = model(b["input_ids"], b["attention_mask"], task=logprob_task(), labels=b["labels"])
        for j in range(real):
            out[idx[j], 0] = float(logp[j])
            out[idx[j], 1] = float(ntok[j])
    model.train(was_training)
    return all_reduce_sum(out.to(info.device)).cpu() if W > 1 else out


def mean_loglik(model, dataset, collator, info) -> float:
    """Mean per-token answer log-likelihood over a dataset."""
    lp = sequence_logps(model, dataset, collator, info)
    return float(lp[:, 0].sum() / lp[:, 1].sum().clamp_min(1))


def train_step(run: Run, micro_batches: List[dict], hooks: Optional[dict] = None) -> dict:
    """One optimizer step over this rank's micro-batches; returns global metrics (identical on every rank)."""
    cfg, info, model = run.cfg, run.info, run.model
    dev = info.device
    objective = cfg.loss.objective
    per_token_forget = objective in ("ga", "graddiff", "finetune")
    # ---- global counts first: exact normalisation across micro-batches and ranks
    counts = torch.zeros(4, dtype=torch.float64)
    for b in micro_batches:
        m = shifted_targets(b["labels"])
        nf = b["n_forget"]
        mf, mr = m[:nf], m[nf:]
        counts[0] += mf.sum() if per_token_forget else (mf.sum(1) > 0).sum()
        counts[1] += mr.sum()
        counts[2] += int(b["attention_mask"].sum())
        counts[3] += mf.sum()
    counts = all_reduce_sum(counts.to(dev)).cpu()
    f_norm = float(counts[0]) if counts[0] > 0 else None
    r_norm = float(counts[1]) if counts[1] > 0 else None
    if f_norm is None:
        raise ValueError("this step holds no forget answer token on any rank (check the labels / template)")
    stats = torch.zeros(5, dtype=torch.float64)  # loss, forget_loss, retain_loss, forget logp sum, retain logp sum
    t0 = time.perf_counter()
    for b in micro_batches:
        b = _device_batch(b, dev)
        nf = b["n_forget"]
        if objective == "finetune":
            loss, logp, _ = model(b["input_ids"], b["attention_mask"], task=nll_task(), labels=b["labels"],
                                  normalizer=f_norm)
            terms = {"forget_loss": loss.detach(), "forget_logp_sum": logp}
        else:
            kw = dict(n_forget=nf, labels=b["labels"], forget_normalizer=f_norm, retain_normalizer=r_norm)
            if objective == "npo":
                kw["ref_logp_sum"] = run.ref_logp[b["index"].cpu()].to(dev)
            if run.ref_model is not None and b["input_ids"].shape[0] > nf:
                with torch.no_grad():
                    ref_h = run.ref_model(b["input_ids"][nf:], b["attention_mask"][nf:],
                                          task=ref_hidden_task(run.ref_head))
                kw["retain_kl"] = (ref_h, run.ref_head["weight"], run.ref_head["bias"])
            out = model(b["input_ids"], b["attention_mask"], task=unlearn_task(run.criterion), **kw)
            loss, terms = out.loss, out.terms
        loss.backward()
        stats[0] += float(loss.detach())
        stats[1] += float(terms["forget_loss"])
        stats[2] += float(terms.get("retain_loss", 0.0))
        stats[3] += float(terms["forget_logp_sum"].sum())
        if "retain_logp_sum" in terms:
            stats[4] += float(terms["retain_logp_sum"].sum())
    stats = all_reduce_sum(stats.to(dev)).cpu()
    if hooks and "after_backward" in hooks:
        hooks["after_backward"](run, run.step + 1)
    gnorm = clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
    gnorm = float(gnorm)
    loss_v = float(stats[0])
    if not (math.isfinite(loss_v) and math.isfinite(gnorm)):
        run.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"step {run.step + 1}: non-finite {'loss' if not math.isfinite(loss_v) else 'gradient'}"
                             f" (loss={loss_v}, grad_norm={gnorm}); stopping before the optimizer step")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    dt = time.perf_counter() - t0
    rec = {"step": run.step, "epoch": run.stream.epoch, "loss": loss_v, "forget_loss": float(stats[1]),
           "retain_loss": float(stats[2]) if counts[1] > 0 else None,
           "forget_loglik": float(stats[3] / max(1.0, float(counts[3]))),
           "retain_loglik": float(stats[4] / float(counts[1])) if counts[1] > 0 and stats[4] != 0 else None,
           "grad_norm": gnorm, "lr": lr, "tokens": int(counts[2]), "tokens_per_s": float(counts[2]) / dt,
           "step_time_s": dt, "peak_mem_mb": peak_memory_mb(dev)}
    return rec


def peak_memory_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    records: List[dict]
    eval_before: Dict[str, float]
    eval_after: Dict[str, float]
    checkpoint: Optional[str]
    hf_dir: Optional[str]
    run_id: Optional[str] = None


def _evaluate(run: Run) -> Dict[str, float]:
    from . import data as D

    col = D.DataCollator.from_tokenizer(run.tokenizer)
    out = {"forget_loglik": mean_loglik(run.model, run.forget, col, run.info)}
    if run.retain is not None:
        out["retain_loglik"] = mean_loglik(run.model, run.retain, col, run.info)
    return out


#: What a run writes into its output_dir: the files ``overwrite`` moves aside together (plus ``data`` when the
#: synthetic corpus is the run's own, i.e. ``data.path`` is unset).
RUN_ARTIFACTS = ("checkpoints", "run.json", "log.jsonl", "config.yaml", "eval.json", "curves.png", "hf", "hf.tmp",
                 "finetune")


def train(cfg: TrainConfig, *, hooks: Optional[dict] = None, overwrite: bool = False) -> TrainResult:
    """Run (or resume) the configured job: finetune stage if enabled, then the loop. Collective under torchrun.

    The output folder is claimed first (:func:`simnpo_fast.run_folder.open_run`): a lock for the run's life, a
    fresh run refused over another run's checkpoints unless ``overwrite`` (which moves that run aside), and
    ``checkpoint.resume`` (true / auto) that resumes only a verified checkpoint of this run with an unchanged
    config. ``hooks``: ``{"after_backward": fn(run, s)}`` is called before optimizer step ``s`` (gradients
    complete), ``{"after_step": fn(run, s)}`` after step ``s`` is logged and checkpointed."""
    from . import run_folder as RF

    cfg.validate()
    _check_data_names(cfg)
    info = init_distributed(cfg.parallel.device)
    requested = config_to_dict(cfg)
    artifacts = RUN_ARTIFACTS + (("data",) if cfg.data.kind == "synthetic" and cfg.data.path is None else ())
    with RF.open_run(cfg.output_dir, requested, resume=cfg.checkpoint.resume, overwrite=overwrite,
                     artifacts=artifacts, is_main=info.is_main) as folder:
        if cfg.finetune.enabled and cfg.loss.objective != "finetune":
            cfg = _run_finetune_stage(cfg, hooks)
        return _train(cfg, folder, requested, hooks)


def _train(cfg: TrainConfig, folder, requested: dict, hooks: Optional[dict]) -> TrainResult:
    from . import checkpoint as C
    from .logging_utils import JsonlLogger, plot_curves, progress

    run = setup(cfg)
    info = run.info
    out = cfg.output_dir
    ck_root = folder.checkpoints
    if info.is_main:
        save_config(cfg, os.path.join(out, "config.yaml"))
    resume_from = folder.resume_from
    eval_before: Dict[str, float] = {}
    from . import data as D
    col = D.DataCollator.from_tokenizer(run.tokenizer)
    if resume_from:
        state, tensors = C.load_checkpoint(resume_from, run.model, run.optimizer, manifest=folder.manifest)
        run.scheduler.load_state_dict(state["scheduler"])
        run.stream.load_state_dict(state["sampler"])
        run.step = int(state["step"])
        run.ref_logp = tensors.get("ref_logp")
        eval_before = state.get("eval_before", {})
    else:
        if cfg.evaluate:
            eval_before = _evaluate(run)
        if cfg.loss.objective == "npo":
            run.ref_logp = sequence_logps(run.model, run.forget, col, info)[:, 0].float()
    logger = JsonlLogger(os.path.join(out, "log.jsonl"), enabled=info.is_main, append=bool(resume_from),
                         truncate_after=run.step)
    bar = progress(total=run.total_steps, initial=run.step, enabled=info.is_main and cfg.progress,
                   desc=cfg.loss.objective)
    last_ck = resume_from
    records = []

    def save(step):
        st = {"step": step, "sampler": run.stream.state_dict(), "scheduler": run.scheduler.state_dict(),
              "eval_before": eval_before, "name": cfg.name, "config": requested}
        tens = {"ref_logp": run.ref_logp} if run.ref_logp is not None else {}
        return C.save_checkpoint(ck_root, step, run.model, run.optimizer, state=st, tensors=tens,
                                 keep=cfg.checkpoint.keep, run_id=folder.run_id,
                                 files={"config.yaml": config_yaml(cfg)})

    try:
        while run.step < run.total_steps:
            batches = run.stream.next_step()
            try:
                rec = train_step(run, batches, hooks)
            except NonFiniteError as e:
                raise NonFiniteError(f"{e}. Last good checkpoint: {last_ck or 'none written yet'}") from None
            records.append(rec)
            if run.step % max(1, cfg.log_every) == 0 or run.step == run.total_steps:
                logger.write(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", fll=f"{rec['forget_loglik']:.3f}")
            if cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0 and run.step < run.total_steps:
                last_ck = save(run.step)
            folder.heartbeat()
            if hooks and "after_step" in hooks:
                hooks["after_step"](run, run.step)
    finally:
        bar.close()
        logger.close()
    if cfg.checkpoint.final:
        last_ck = save(run.step)
    eval_after = _evaluate(run) if cfg.evaluate else {}
    hf_dir = None
    if cfg.checkpoint.export_hf:
        hf_dir = C.export_hf(run.model, os.path.join(out, "hf"), run.tokenizer)
    if info.is_main:
        with open(os.path.join(out, "eval.json"), "w", encoding="utf-8") as f:
            json.dump({"before": eval_before, "after": eval_after, "steps": run.step, "run_id": folder.run_id},
                      f, indent=1)
        if cfg.plot:
            plot_curves(os.path.join(out, "log.jsonl"), os.path.join(out, "curves.png"), title=cfg.name)
    barrier()
    return TrainResult(out, run.step, records, eval_before, eval_after, last_ck, hf_dir, folder.run_id)


def finetune_config(cfg: TrainConfig) -> TrainConfig:
    """The finetune stage's config derived from an unlearning config."""
    f = cfg.finetune
    ft = copy.deepcopy(cfg)
    ft.name = cfg.name + "-finetune"
    ft.output_dir = os.path.join(cfg.output_dir, "finetune")
    ft.loss = LossConfig(objective="finetune", retain_weight=0.0)
    ft.epochs, ft.max_steps = f.epochs, 0
    ft.batch_size, ft.micro_batch_size = f.batch_size, f.micro_batch_size
    ft.optim = dataclasses.replace(cfg.optim, lr=f.lr, schedule=f.schedule, warmup_steps=f.warmup_steps,
                                   warmup_ratio=0.0)
    ft.finetune = FinetuneConfig(enabled=False)
    ft.checkpoint = CheckpointConfig(every=0, resume=False, final=False, export_hf=True)
    ft.evaluate = False
    if ft.data.kind == "synthetic" and ft.data.path is None:
        ft.data.path = os.path.join(cfg.output_dir, "data")
    return ft


def _run_finetune_stage(cfg: TrainConfig, hooks=None) -> TrainConfig:
    """Finetune once and point the unlearning stage at the result. A finished stage (``<output_dir>/finetune/hf``)
    is reused only when it was trained with this very finetune config; otherwise the run stops (use
    ``--overwrite`` or another output_dir) rather than unlearn from a model the config does not describe."""
    from . import run_folder as RF

    ft = finetune_config(cfg)
    hf_dir = os.path.join(ft.output_dir, "hf")
    if os.path.isfile(os.path.join(hf_dir, "config.json")):
        rec = RF.read_run_file(ft.output_dir)
        diffs = RF.config_differences(rec.get("config", {}), config_to_dict(ft)) if rec else ["run.json: missing"]
        if diffs:
            raise RunFolderError(
                f"{ft.output_dir} holds a finetuned model made with another finetune config ({'; '.join(diffs)}); "
                "pass --overwrite to move the previous run aside, or choose another output_dir")
    else:
        train(ft)
    new = copy.deepcopy(cfg)
    new.model = dataclasses.replace(cfg.model, path=hf_dir, preset=None, config={})
    new.finetune = FinetuneConfig(enabled=False)
    if new.data.kind == "synthetic" and new.data.path is None:
        new.data.path = ft.data.path
    return new
