"""The TOFU protocol at CPU scale, shared by ``make demo`` and ``simnpo-fast study tofu-mini``.

Protocol (TOFU, Maini et al. 2024, shrunk): a tiny Llama is finetuned on *all* of a TOFU-layout corpus (the
"target" model that knows the forget authors) and, separately, on the retain split only (the "retain" model:
the gold standard of forgetting, its forget-set truth ratios are the forget-quality reference). The target is
then unlearned on ``forget_split`` with each method (GA, GradDiff, NPO, SimNPO) and every model is evaluated
with :func:`simnpo_fast.eval.evaluate_tofu`; optionally the relearning attack is run on the unlearned models.

    simnpo-fast study tofu-mini                         # the committed study (configs/study_tofu_mini.yaml)
    simnpo-fast study tofu-mini --data ../shared/data/tofu --seeds 0 1 2 --out runs/study
    simnpo-fast study my.yaml key=value ...             # any study config, dotted overrides

Training goes through :func:`simnpo_fast.train.train` (the FSDP2 trainer, one CPU process here); the command
line is :mod:`simnpo_fast.cli.study`.
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Dict, List, Optional

import numpy as np
import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

#: The study's method names -> registered methods (:mod:`simnpo_fast.methods`; every registered name works too).
#: What a method needs (retain term, reference, normaliser, default beta) comes from the registry.
METHODS: Dict[str, str] = {"GA": "ga", "GradDiff": "graddiff", "NPO": "npo", "SimNPO": "simnpo"}


# ============================================================================= config

def load_study_config(name_or_path: str, overrides: Optional[List[str]] = None) -> dict:
    """A study YAML (``tofu-mini`` -> ``configs/study_tofu_mini.yaml``, ``demo`` -> ``configs/demo.yaml``) with
    the ``key.sub=value`` overrides of :func:`simnpo_fast.train.config_io.apply_overrides`."""
    from .train.config_io import apply_overrides

    path = name_or_path
    if not os.path.isfile(path):
        stem = name_or_path.replace("-", "_")
        for cand in (f"study_{stem}.yaml", f"{stem}.yaml"):
            p = os.path.join(CONFIG_DIR, cand)
            if os.path.isfile(p):
                path = p
                break
        else:
            raise FileNotFoundError(f"no study config {name_or_path!r} (looked in {CONFIG_DIR})")
    with open(path, encoding="utf-8") as f:
        cfg = apply_overrides(yaml.safe_load(f) or {}, overrides or [])
    cfg["_source"] = path
    return cfg


def retain_split(cfg: dict) -> str:
    """The study's retain split: ``retain_split``, else the complement of ``forget_split`` (forget10 -> retain90)."""
    return cfg.get("retain_split") or "retain" + str(100 - int(cfg["forget_split"][-2:]))


# ============================================================================= stages

def set_threads(cfg: dict) -> None:
    """``threads`` of the config (default 1): tiny models gain nothing from intra-op threads, and the spinning
    OpenMP threads of processes sharing a few cores slow each other down."""
    import torch

    torch.set_num_threads(int(cfg.get("threads", 1)))


def prepare_corpus(cfg: dict, out_dir: str):
    """The data folder and the tokenizer. The synthetic corpus is generated into ``<out>/data``; a TOFU folder
    (``data.path``) is copied there (its JSON files, a few MB), never written to.

    ``data.world_knowledge`` (default true) adds the real-authors / world-facts QA to both finetuning sets
    (``pretrain_full.json``, ``pretrain_retainXX.json``): a tiny model trained from scratch has no pretraining,
    and TOFU's model utility presumes a base model that knows these facts."""
    import shutil

    from .data import load_tofu, load_tokenizer, synthetic, train_tokenizer

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
    controls = []
    if d.get("world_knowledge", True):
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
    tok_dir = os.path.join(out_dir, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        files = [f for f in ("full.json", "real_authors.json", "world_facts.json",
                             f"{cfg['forget_split']}_perturbed.json", "retain_perturbed.json")
                 if os.path.isfile(os.path.join(data_dir, f))]
        train_tokenizer(data_dir, tok_dir, vocab_size=int(d.get("vocab_size", 1024)), files=files)
    return data_dir, kind, tok_dir, load_tokenizer(tok_dir)


def _base_train_config(cfg: dict, data_dir: str, kind: str, tok_dir: str, out_dir: str, seed: int):
    from .train import load_config

    t = load_config("default", [f"output_dir={out_dir}", f"seed={seed}", "progress=true", "evaluate=false",
                                "plot=true", "finetune.enabled=false"])
    t.data.kind = kind
    t.data.path = data_dir
    t.data.tokenizer = tok_dir
    t.data.forget_split = cfg["forget_split"]
    t.data.retain_split = retain_split(cfg)
    t.data.max_length = int(cfg["data"].get("max_length", 128))
    t.data.synthetic = dict(cfg["data"].get("synthetic", {}))
    t.checkpoint.every = 0
    t.checkpoint.final = False
    t.checkpoint.export_hf = True
    return t


def finetune(cfg: dict, data_dir, kind, tok_dir, out_dir: str, split: str, seed: int) -> str:
    """Plain NLL on ``split`` from a seeded tiny Llama; returns the HF folder (skipped when it exists)."""
    from .train import FINETUNE_METHOD, train

    hf = os.path.join(out_dir, "hf")
    if os.path.isfile(os.path.join(hf, "config.json")):
        return hf
    t = _base_train_config(cfg, data_dir, kind, tok_dir, out_dir, seed)
    f = cfg["finetune"]
    t.name = f"finetune-{split}"
    t.model.preset = "tiny-llama"
    t.model.path = None
    t.model.config = dict(cfg["model"])
    t.model.seed = seed
    t.loss.objective = FINETUNE_METHOD
    t.loss.retain_weight = 0.0
    t.data.forget_split = t.data.finetune_split = split
    t.epochs = float(f["epochs"])
    t.batch_size = t.micro_batch_size = int(f["batch_size"])
    t.optim.lr = float(f["lr"])
    t.optim.schedule = f.get("schedule", "cosine")
    t.optim.weight_decay = float(f.get("weight_decay", 0.0))
    t.optim.warmup_steps = int(f.get("warmup_steps", 0))
    t.validate()
    train(t)
    return hf


def unlearn(cfg: dict, method: str, base_hf: str, data_dir, kind, tok_dir, out_dir: str, seed: int,
            hook=None) -> str:
    """Unlearn ``forget_split`` from ``base_hf`` with ``method`` (a key of :data:`METHODS`, a registered method
    or a variant of the config's ``unlearn.methods``); returns the HF folder."""
    from .methods import get_method
    from .train import train

    hf = os.path.join(out_dir, "hf")
    if os.path.isfile(os.path.join(hf, "config.json")) and hook is None:
        return hf
    t = _base_train_config(cfg, data_dir, kind, tok_dir, out_dir, seed)
    u = copy.deepcopy(cfg["unlearn"])
    over = dict(u.get("methods", {}).get(method, {}))
    base = over.pop("base", method)  # a variant: {"SimNPO-b4.5": {"base": "SimNPO", "beta": 4.5}}
    try:
        objective = get_method(METHODS.get(base, base)).name
    except ValueError:
        raise ValueError(f"unknown method {method!r} (base {base!r}); known: {sorted(METHODS)} and the registered "
                         "methods") from None
    m = {"objective": objective, **over}
    t.name = f"unlearn-{method}"
    t.model.path, t.model.preset, t.model.config = base_hf, None, {}
    t.loss.objective = m.pop("objective")
    for k in ("beta", "gamma", "forget_weight", "retain_weight"):
        if k in m:
            setattr(t.loss, k, None if m[k] is None else float(m[k]))  # beta None: the method's default
    t.epochs = float(m.get("epochs", u["epochs"]))
    t.batch_size = int(u["batch_size"])
    t.micro_batch_size = int(u.get("micro_batch_size", u["batch_size"]))
    t.optim.lr = float(m.get("lr", u["lr"]))
    t.optim.schedule = u.get("schedule", "constant")
    t.optim.weight_decay = 0.0
    t.validate()
    train(t, hooks={"after_backward": hook} if hook is not None else None)
    return hf


def load_hf(path: str):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path)
    m.eval()
    return m


def eval_config(cfg: dict):
    """The study's TOFU evaluation: ``eval.protocol`` (default ``tofu``: the reference's first 300 questions per
    set, 200-token candidates, greedy generation up to 200 tokens in total); ``eval.max_new_tokens``,
    ``eval.max_length`` and ``eval.max_examples`` override the protocol when set."""
    from .eval import TofuEvalConfig

    e = cfg.get("eval", {})

    def opt(key):
        return None if e.get(key) is None else int(e[key])

    return TofuEvalConfig(forget_split=cfg["forget_split"], protocol=e.get("protocol", "tofu"),
                          batch_size=int(e.get("batch_size", 32)), gen_batch_size=int(e.get("gen_batch_size", 32)),
                          max_new_tokens=opt("max_new_tokens"), max_length=opt("max_length"), template="plain",
                          max_examples=opt("max_examples"))


# ============================================================================= the study

def _summary_stats(rows: List[dict]) -> tuple[dict, dict]:
    keys = sorted(set().union(*[r.keys() for r in rows]))
    mean, std = {}, {}
    for k in keys:
        v = [r[k] for r in rows if r.get(k) is not None]
        if k == "forget_quality":  # average in log space (values span hundreds of decades)
            lv = np.log10(np.maximum(v, 1e-300))
            mean[k], std[k] = float(10 ** lv.mean()), None
            mean["log10_forget_quality"], std["log10_forget_quality"] = float(lv.mean()), float(lv.std())
            continue
        if k == "log10_forget_quality":
            continue
        mean[k] = float(np.mean(v)) if v else None
        std[k] = float(np.std(v)) if v else None
    return mean, std


def run_study(cfg: dict, out_dir: str, *, seeds: Optional[List[int]] = None, methods: Optional[List[str]] = None,
              results_dir: Optional[str] = None, command: str = "") -> dict:
    """Run the protocol for every seed and method; write per-run JSONs and (with ``results_dir``) the table,
    plot and Markdown there. Returns ``{"rows": {name: mean summary}, "std": ..., "per_seed": ...}``."""
    from .eval import evaluate_tofu
    from .eval.relearn import RelearnConfig, relearn_attack
    from .eval.report import save_json

    t0 = time.perf_counter()
    set_threads(cfg)
    seeds = list(seeds if seeds is not None else cfg.get("seeds", [0]))
    methods = list(methods or cfg.get("methods", list(METHODS)))
    relearn_methods = set(cfg.get("relearn", {}).get("methods", []))
    os.makedirs(out_dir, exist_ok=True)
    data_dir, kind, tok_dir, tok = prepare_corpus(cfg, out_dir)
    ecfg = eval_config(cfg)
    per_seed: Dict[str, List[dict]] = {}

    def add(name, summary):
        per_seed.setdefault(name, []).append(summary)

    for seed in seeds:
        sd = os.path.join(out_dir, f"seed{seed}")
        target = finetune(cfg, data_dir, kind, tok_dir, os.path.join(sd, "target"), "pretrain_full", seed)
        retain = finetune(cfg, data_dir, kind, tok_dir, os.path.join(sd, "retain"),
                          f"pretrain_{retain_split(cfg)}", seed)
        ref = evaluate_tofu(load_hf(retain), tok, data_dir, copy.deepcopy(ecfg), progress=True)
        ref = _with_fq(ref, ref)
        save_json(ref, os.path.join(sd, "eval_retain.json"))
        add("retain (oracle)", ref["summary"])
        tgt_res = evaluate_tofu(load_hf(target), tok, data_dir, copy.deepcopy(ecfg), reference=ref, progress=True)
        save_json(tgt_res, os.path.join(sd, "eval_target.json"))
        add("target (finetuned)", tgt_res["summary"])
        for method in methods:
            hf = unlearn(cfg, method, target, data_dir, kind, tok_dir, os.path.join(sd, method), seed)
            model = load_hf(hf)
            res = evaluate_tofu(model, tok, data_dir, copy.deepcopy(ecfg), reference=ref, progress=True)
            save_json(res, os.path.join(sd, f"eval_{method}.json"))
            add(method, res["summary"])
            if method in relearn_methods:
                rc = RelearnConfig(**{k: v for k, v in cfg["relearn"].items() if k != "methods"}, seed=seed)
                rl = relearn_attack(model, tok, data_dir, rc, eval_cfg=copy.deepcopy(ecfg), reference=ref,
                                    progress=True)
                save_json(rl, os.path.join(sd, f"relearn_{method}.json"))
                add(f"{method} + relearn", rl["after"]["summary"])
    rows, std = {}, {}
    for name, runs in per_seed.items():
        rows[name], std[name] = _summary_stats(runs)
    elapsed = time.perf_counter() - t0
    out = {"config": {k: v for k, v in cfg.items()}, "seeds": seeds, "methods": methods, "rows": rows, "std": std,
           "per_seed": per_seed, "elapsed_s": elapsed, "command": command, "protocol": ecfg.protocol,
           "eval_settings": ecfg.resolved(), "machine": _machine()}
    save_json(out, os.path.join(out_dir, "study.json"))
    if results_dir:
        write_study_results(out, results_dir)
    return out


def _machine() -> str:
    """CPU model and core count (wall times depend on them; the CPU may be shared)."""
    import platform

    from .train.metrics import machine_info

    info = machine_info()
    return f"{info.get('cpu') or platform.processor() or platform.machine()}, {info['cores']} cores"


def _with_fq(res: dict, ref: dict) -> dict:
    from .eval.tofu import summarize

    summarize(res, ref)
    return res


def write_study_results(study: dict, results_dir: str) -> Dict[str, str]:
    from .eval.report import bar_chart, markdown_table, save_json

    os.makedirs(results_dir, exist_ok=True)
    name = study["config"].get("name", "tofu-mini")
    rows, std = study["rows"], study["std"]
    cols = (("forget/probability", "forget prob"), ("forget/rouge_l_recall", "forget ROUGE-L"),
            ("forget/truth_ratio", "forget truth ratio"), ("forget/truth_ratio_stat", "forget TR min(R,1/R)"),
            ("log10_forget_quality", "log10 forget quality"),
            ("retain/probability", "retain prob"), ("retain/rouge_l_recall", "retain ROUGE-L"),
            ("model_utility", "model utility"))
    md_rows = {}
    for n, r in rows.items():
        md_rows[n] = {k: (f"{r[k]:.3f} ± {std[n][k]:.3f}" if r.get(k) is not None and std[n].get(k) is not None
                          and len(study["seeds"]) > 1 else r.get(k)) for k, _ in cols}
    png = bar_chart(rows, os.path.join(results_dir, f"{name}.png"), columns=cols, errors=std,
                    title=f"{name}: mean over seeds {study['seeds']}")
    cfg = {k: v for k, v in study["config"].items() if not k.startswith("_")}
    md = [f"# {name}", "", f"Command: `{study['command']}`", "",
          f"Seeds: {study['seeds']}; wall time {study['elapsed_s'] / 60:.1f} min on "
          f"{study.get('machine', 'a 2-core CPU')} (shared with other jobs: wall times are upper bounds).", "",
          markdown_table(md_rows, cols), "",
          "Metrics as the TOFU reference code computes them (protocol `" + str(study.get("protocol", "tofu"))
          + "`): truth ratio R = geometric mean of the perturbed answers' length-normalised probabilities over "
          "the paraphrased one's; `forget truth ratio` = mean R, `forget TR min(R,1/R)` = TOFU's forget "
          "statistic; forget quality = KS-test p-value of the forget-set R vs the retain-only model's (log10, "
          "mean over seeds); model utility = harmonic mean of the 9 retain / real-authors / world-facts numbers. "
          "`+ relearn` = after the relearning attack.", "", f"![{name}]({os.path.basename(png)})", "", "Config:", "",
          "```yaml",
          yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    md_path = os.path.join(results_dir, f"{name}.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    js = save_json({k: v for k, v in study.items()}, os.path.join(results_dir, f"{name}.json"))
    return {"markdown": md_path, "plot": png, "json": js}
