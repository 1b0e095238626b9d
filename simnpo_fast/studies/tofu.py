"""The TOFU protocol at CPU scale, shared by ``make demo`` and ``simnpo-fast study tofu-mini``.

Protocol (TOFU, Maini et al. 2024, shrunk): a tiny Llama is finetuned on *all* of a TOFU-layout corpus (the
"target" model that knows the forget authors) and, separately, on the retain split only (the "retain" model:
the gold standard of forgetting, its forget-set truth ratios are the forget-quality reference). The target is
then unlearned on ``forget_split`` with each method and every model is evaluated with
:func:`simnpo_fast.eval.evaluate_tofu`; optionally the relearning attack is run on the unlearned models.

    simnpo-fast study tofu-mini                         # the committed study (configs/study_tofu_mini.yaml)
    simnpo-fast study tofu-mini --data ../shared/data/tofu --seeds 0 1 2 --out runs/study
    simnpo-fast study my.yaml key=value ...             # any study config, dotted overrides

Every model is a :class:`~simnpo_fast.train.Stage` of the trainer, its config a
:class:`~simnpo_fast.train.TrainConfig` made by the trainer's own schema (the ``default`` config, the study's
values coerced by :func:`~simnpo_fast.train.coerce.from_dict`): the two finetunes are
:func:`~simnpo_fast.train.finetune_config` of the study's ``finetune`` section, each unlearning stage starts from
the target's exported model (:func:`~simnpo_fast.train.stages.on_finetuned`). :func:`finish` runs a stage through
:mod:`simnpo_fast.train.stages` in its own folder, or reuses it when it finished with the same config.

Study config keys (besides ``name``, ``seeds``, ``threads``, ``forget_split``, ``retain_split``, ``model``, ``data``,
``eval`` and ``relearn``): ``finetune`` (the fields of :class:`~simnpo_fast.train.FinetuneConfig`, plus
``weight_decay``), ``unlearn`` (:data:`UNLEARN_KEYS` and ``methods``), ``unlearn.methods`` (a label -> a variant:
``base``, a registered method name, default the label itself, matched case-insensitively, and
:data:`VARIANT_KEYS`), ``methods`` (the labels to run, default every variant).
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..errors import ConfigError
from ..methods import Method, get_method, method_names
from ..train import Stage, TrainConfig, config_to_dict, finetune_config, load_config
from ..train.coerce import from_dict
from ..train.stages import ensure_finished, on_finetuned, train

DEFAULT_NAME = "tofu-mini"
#: ``unlearn`` keys of the study config -> the TrainConfig key each sets (every method of the study).
UNLEARN_KEYS = {"epochs": "epochs", "batch_size": "batch_size", "micro_batch_size": "micro_batch_size",
                "lr": "optim.lr", "schedule": "optim.schedule"}
#: keys of a variant in ``unlearn.methods`` -> the TrainConfig key each sets (that method only).
VARIANT_KEYS = {"beta": "loss.beta", "gamma": "loss.gamma", "forget_weight": "loss.forget_weight",
                "retain_weight": "loss.retain_weight", "epochs": "epochs", "lr": "optim.lr"}


# ============================================================================= config

def resolve(raw: dict, *, overrides: Optional[List[str]] = None, quick: bool = False,
            data: Optional[str] = None) -> dict:
    """The study config to run: ``raw`` with the ``key=value`` overrides; ``data`` (a TOFU-layout folder) replaces
    the synthetic corpus. ``quick`` is the Markov study's option: a ConfigError here."""
    from ..train.config_io import apply_overrides

    cfg = apply_overrides(raw, overrides or [])
    if quick:
        raise ConfigError("--quick applies to `simnpo-fast study markov` only")
    if data:
        cfg.setdefault("data", {})["path"] = data
    return cfg


def default_results(out_dir: str, quick: bool = False) -> str:
    return os.path.join("docs", "results")


def retain_split(cfg: dict) -> str:
    """The study's retain split: ``retain_split``, else the complement of ``forget_split`` (forget10 -> retain90)."""
    return cfg.get("retain_split") or "retain" + str(100 - int(cfg["forget_split"][-2:]))


def set_threads(cfg: dict) -> None:
    """``threads`` of the config (default 1): tiny models gain nothing from intra-op threads, and the spinning
    OpenMP threads of processes sharing a few cores slow each other down."""
    import torch

    torch.set_num_threads(int(cfg.get("threads", 1)))


def variant(cfg: dict, label: str) -> tuple[Method, Dict[str, Any]]:
    """The registered method of the method label ``label`` and the TrainConfig values its variant sets."""
    spec = dict(cfg.get("unlearn", {}).get("methods", {}).get(label) or {})
    base = spec.pop("base", label)  # a variant: {"SimNPO-b4.5": {"base": "SimNPO", "beta": 4.5}}
    unknown = sorted(set(spec) - set(VARIANT_KEYS))
    if unknown:
        raise ConfigError(f"unlearn.methods.{label}: unknown key(s) {unknown}; valid: base, {sorted(VARIANT_KEYS)}")
    try:
        method = get_method(base)
    except ValueError:
        raise ConfigError(f"unknown method {label!r} (base {base!r}); known: the variants "
                          f"{sorted(cfg.get('unlearn', {}).get('methods', {}))} and the registered methods "
                          f"{method_names()}") from None
    return method, {VARIANT_KEYS[k]: v for k, v in spec.items()}


def with_values(cfg: TrainConfig, values: Dict[str, Any]) -> TrainConfig:
    """``cfg`` with the dotted keys of ``values`` set, coerced to the schema's types (a ConfigError naming a key
    whose value does not fit)."""
    d = config_to_dict(cfg)
    for key, value in values.items():
        *path, last = key.split(".")
        node = d
        for p in path:
            node = node[p]
        node[last] = copy.deepcopy(value)
    return from_dict(TrainConfig, d)


# ============================================================================= the corpus

@dataclass
class Corpus:
    """The study's data: ``data_dir`` (TOFU layout plus ``pretrain_<split>.json``), ``kind`` (``synthetic`` or
    ``tofu``), the tokenizer folder and the loaded tokenizer."""

    data_dir: str
    kind: str
    tokenizer_dir: str
    tokenizer: Any


def _write_pretrain_sets(cfg: dict, data_dir: str) -> None:
    """``pretrain_full.json`` and ``pretrain_<retain split>.json``: the QA of the split, plus (``data.world_knowledge``,
    default true) the real-authors / world-facts QA: a tiny model trained from scratch has no pretraining, and
    TOFU's model utility presumes a base model that knows these facts."""
    from ..data import load_tofu

    controls = []
    if cfg["data"].get("world_knowledge", True):
        for name in ("real_authors", "world_facts"):
            if os.path.isfile(os.path.join(data_dir, name + ".json")):
                controls += [{"question": r["question"], "answer": r["answer"]} for r in load_tofu(data_dir, name)]
    for split in ("full", retain_split(cfg)):
        path = os.path.join(data_dir, f"pretrain_{split}.json")
        if not os.path.isfile(path):
            rows = [{"question": r["question"], "answer": r["answer"]} for r in load_tofu(data_dir, split)]
            with open(path, "w", encoding="utf-8") as f:
                for r in rows + controls:
                    f.write(json.dumps(r) + "\n")


def prepare_corpus(cfg: dict, out_dir: str) -> Corpus:
    """The data folder and the tokenizer. The synthetic corpus is generated into ``<out>/data``; a TOFU folder
    (``data.path``) is copied there (its JSON files, a few MB), never written to."""
    import shutil

    from ..data import load_tokenizer, synthetic, train_tokenizer

    d = cfg["data"]
    data_dir = os.path.join(out_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    if d.get("path"):
        kind = "tofu"
        src = os.path.abspath(d["path"])
        for f in sorted(os.listdir(src)):
            if f.endswith((".json", ".jsonl")) and not os.path.exists(os.path.join(data_dir, f)):
                shutil.copy(os.path.join(src, f), os.path.join(data_dir, f))
    else:
        kind = "synthetic"
        if not os.path.isfile(os.path.join(data_dir, synthetic.META_FILE)):
            synthetic.generate(data_dir, **d.get("synthetic", {}))
    _write_pretrain_sets(cfg, data_dir)
    tok_dir = os.path.join(out_dir, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        files = [f for f in ("full.json", "real_authors.json", "world_facts.json",
                             f"{cfg['forget_split']}_perturbed.json", "retain_perturbed.json")
                 if os.path.isfile(os.path.join(data_dir, f))]
        train_tokenizer(data_dir, tok_dir, vocab_size=int(d.get("vocab_size", 1024)), files=files)
    return Corpus(data_dir, kind, tok_dir, load_tokenizer(tok_dir))


# ============================================================================= the stages

def base_config(cfg: dict, corpus: Corpus, out_dir: str, seed: int) -> TrainConfig:
    """What every stage of the study shares: the ``default`` config on the study's corpus, one folder each, no
    checkpoints but the exported HF model, no evaluation inside the trainer."""
    return with_values(load_config("default"), {
        "output_dir": out_dir, "seed": seed, "progress": True, "evaluate": False, "plot": True,
        "finetune.enabled": False, "data.kind": corpus.kind, "data.path": corpus.data_dir,
        "data.tokenizer": corpus.tokenizer_dir, "data.forget_split": cfg["forget_split"],
        "data.retain_split": retain_split(cfg), "data.max_length": cfg["data"].get("max_length", 128),
        "data.synthetic": cfg["data"].get("synthetic", {}), "checkpoint.every": 0, "checkpoint.final": False,
        "checkpoint.export_hf": True})


def finetune_stage(cfg: dict, corpus: Corpus, out_dir: str, split: str, seed: int) -> Stage:
    """:data:`~simnpo_fast.train.FINETUNE_METHOD` on ``split`` from a tiny Llama (the study's ``model`` section,
    initialised with ``seed``): :func:`~simnpo_fast.train.finetune_config` of the study's ``finetune`` section,
    written to ``out_dir``."""
    f = dict(cfg["finetune"])
    weight_decay = f.pop("weight_decay", 0.0)
    base = with_values(base_config(cfg, corpus, out_dir, seed), {
        "model.preset": "tiny-llama", "model.path": None, "model.config": cfg["model"], "model.seed": seed,
        "data.finetune_split": split, "optim.weight_decay": weight_decay,
        "finetune": {"micro_batch_size": f.get("batch_size"), **f, "enabled": True}})
    stage = with_values(finetune_config(base), {"name": f"finetune-{split}", "output_dir": out_dir})
    return Stage(stage.name, stage)


def unlearn_stage(cfg: dict, label: str, target: Stage, corpus: Corpus, out_dir: str, seed: int) -> Stage:
    """The method label ``label`` (:func:`variant`) unlearning ``forget_split`` from the model ``target``
    exports, with the ``unlearn`` section's schedule, written to ``out_dir``."""
    u = cfg["unlearn"]
    unknown = sorted(set(u) - set(UNLEARN_KEYS) - {"methods"})
    if unknown:
        raise ConfigError(f"unlearn: unknown key(s) {unknown}; valid: methods, {sorted(UNLEARN_KEYS)}")
    method, values = variant(cfg, label)
    shared = {UNLEARN_KEYS[k]: v for k, v in u.items() if k in UNLEARN_KEYS}
    t = with_values(base_config(cfg, corpus, out_dir, seed), {
        "name": f"unlearn-{label}", "loss.objective": method.name, "optim.weight_decay": 0.0,
        "optim.schedule": "constant", "micro_batch_size": u["batch_size"], **shared, **values})
    return Stage(t.name, on_finetuned(t, target.cfg))


@dataclass
class SeedStages:
    """The stages of one seed: the target and the retain finetunes, then one unlearning stage per method label
    (each starting from the target's model)."""

    target: Stage
    retain: Stage
    unlearn: Dict[str, Stage]

    def all(self) -> List[Stage]:
        return [self.target, self.retain, *self.unlearn.values()]


def seed_stages(cfg: dict, corpus: Corpus, seed_dir: str, seed: int, labels: List[str]) -> SeedStages:
    """``<seed_dir>/target``, ``<seed_dir>/retain`` and ``<seed_dir>/<label>`` for every label."""
    target = finetune_stage(cfg, corpus, os.path.join(seed_dir, "target"), "pretrain_full", seed)
    retain = finetune_stage(cfg, corpus, os.path.join(seed_dir, "retain"), f"pretrain_{retain_split(cfg)}", seed)
    unlearn = {m: unlearn_stage(cfg, m, target, corpus, os.path.join(seed_dir, m), seed) for m in labels}
    return SeedStages(target, retain, unlearn)


def finish(stage: Stage, hook=None) -> str:
    """Run ``stage`` through :mod:`simnpo_fast.train.stages` and return its exported HF folder. Without ``hook`` a
    stage that already finished with this config is reused (another config there is a RunFolderError); with
    ``hook`` (``fn(run, step)`` before every optimizer step) it always runs."""
    if hook is None:
        ensure_finished(stage)
    else:
        train(stage.cfg, hooks={"after_backward": hook})
    return stage.hf_dir


def load_hf(path: str):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path)
    m.eval()
    return m


def eval_config(cfg: dict):
    """The study's TOFU evaluation: ``eval.protocol`` (default ``tofu``: the reference's first 300 questions per
    set, 200-token candidates, greedy generation up to 200 tokens in total); ``eval.max_new_tokens``,
    ``eval.max_length`` and ``eval.max_examples`` override the protocol when set."""
    from ..eval import TofuEvalConfig

    e = cfg.get("eval", {})

    def opt(key):
        return None if e.get(key) is None else int(e[key])

    return TofuEvalConfig(forget_split=cfg["forget_split"], protocol=e.get("protocol", "tofu"),
                          batch_size=int(e.get("batch_size", 32)), gen_batch_size=int(e.get("gen_batch_size", 32)),
                          max_new_tokens=opt("max_new_tokens"), max_length=opt("max_length"), template="plain",
                          max_examples=opt("max_examples"))


# ============================================================================= the study

def _evaluate_seed(cfg: dict, stages: SeedStages, corpus: Corpus, seed: int, sd: str, add) -> None:
    """Train the stages of one seed in order, evaluating each model (and the relearning attack on the labels of
    ``relearn.methods``); ``add(row name, summary)`` collects the summaries."""
    from ..eval import evaluate_tofu
    from ..eval.relearn import RelearnConfig, relearn_attack
    from ..eval.result_files import save_json
    from ..eval.tofu import summarize

    ecfg, tok, data_dir = eval_config(cfg), corpus.tokenizer, corpus.data_dir
    target, retain = finish(stages.target), finish(stages.retain)
    ref = evaluate_tofu(load_hf(retain), tok, data_dir, copy.deepcopy(ecfg), progress=True)
    summarize(ref, ref)
    save_json(ref, os.path.join(sd, "eval_retain.json"))
    add("retain (oracle)", ref["summary"])
    tgt = evaluate_tofu(load_hf(target), tok, data_dir, copy.deepcopy(ecfg), reference=ref, progress=True)
    save_json(tgt, os.path.join(sd, "eval_target.json"))
    add("target (finetuned)", tgt["summary"])
    relearn = cfg.get("relearn", {})
    for label, stage in stages.unlearn.items():
        model = load_hf(finish(stage))
        res = evaluate_tofu(model, tok, data_dir, copy.deepcopy(ecfg), reference=ref, progress=True)
        save_json(res, os.path.join(sd, f"eval_{label}.json"))
        add(label, res["summary"])
        if label in set(relearn.get("methods", [])):
            rc = RelearnConfig(**{k: v for k, v in relearn.items() if k != "methods"}, seed=seed)
            rl = relearn_attack(model, tok, data_dir, rc, eval_cfg=copy.deepcopy(ecfg), reference=ref, progress=True)
            save_json(rl, os.path.join(sd, f"relearn_{label}.json"))
            add(f"{label} + relearn", rl["after"]["summary"])


def run(cfg: dict, out_dir: str, *, seeds: Optional[List[int]] = None, methods: Optional[List[str]] = None,
        results_dir: Optional[str] = None, command: str = "") -> dict:
    """Run the protocol for every seed and method label (default: ``methods``, else every variant of
    ``unlearn.methods``); write per-run JSONs and (with ``results_dir``) the table, plot and Markdown there.
    Returns ``{"rows": {name: mean summary}, "std": ..., "per_seed": ..., "files": ...}``."""
    from ..eval.result_files import save_json
    from .tofu_results import machine, summary_stats, write_study_results

    t0 = time.perf_counter()
    set_threads(cfg)
    seeds = list(seeds if seeds is not None else cfg.get("seeds", [0]))
    methods = list(methods or cfg.get("methods") or cfg.get("unlearn", {}).get("methods", {}))
    os.makedirs(out_dir, exist_ok=True)
    corpus = prepare_corpus(cfg, out_dir)
    per_seed: Dict[str, List[dict]] = {}
    for seed in seeds:
        sd = os.path.join(out_dir, f"seed{seed}")
        stages = seed_stages(cfg, corpus, sd, seed, methods)
        _evaluate_seed(cfg, stages, corpus, seed, sd, lambda name, s: per_seed.setdefault(name, []).append(s))
    rows, std = {}, {}
    for name, runs in per_seed.items():
        rows[name], std[name] = summary_stats(runs)
    ecfg = eval_config(cfg)
    out = {"config": {k: v for k, v in cfg.items()}, "seeds": seeds, "methods": methods, "rows": rows, "std": std,
           "per_seed": per_seed, "elapsed_s": time.perf_counter() - t0, "command": command,
           "protocol": ecfg.protocol, "eval_settings": ecfg.resolved(), "machine": machine()}
    save_json(out, os.path.join(out_dir, "study.json"))
    if results_dir:
        out["files"] = write_study_results(out, results_dir)
    return out


def summary_text(result: dict) -> str:
    """The table of mean summaries and where the results went."""
    from ..eval.result_files import text_table

    files = result.get("files") or {}
    where = ", ".join(files[k] for k in ("markdown", "plot") if k in files) or "not written"
    return f"{text_table(result['rows'])}\n\nresults: {where} ({result['elapsed_s'] / 60:.1f} min)"
