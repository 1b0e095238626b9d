"""TOFU evaluation of a model on a TOFU-layout folder (the real TOFU files or the embedded synthetic corpus).

Sets (file stems of the folder):

===============  ==============================  =============================================================
set              file                            metrics
===============  ==============================  =============================================================
forget           ``<forget_split>_perturbed``    probability, ROUGE-L recall, truth ratio (raw: forget quality)
retain           ``retain_perturbed``            probability, ROUGE-L recall, truth-ratio stat
real_authors     ``real_authors(_perturbed)``    option-normalised probability, ROUGE-L recall, truth-ratio stat
world_facts      ``world_facts(_perturbed)``     option-normalised probability, ROUGE-L recall, truth-ratio stat
===============  ==============================  =============================================================

Definitions are those of :mod:`simnpo_fast.eval.metrics` (TOFU paper, Sec. 2.5). ``forget_quality`` needs the
forget-set truth ratios of a retain-only model: pass them, a :func:`evaluate_tofu` result, or the path of its
saved JSON (``reference=``). Every likelihood is a fused :func:`simnpo_fast.sequence_logprob` call; generation is
batched greedy decoding; all of it is sharded over the ranks of an initialised process group.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import numpy as np

from ..data.template import PromptTemplate
from ..data.views import encode_candidates, load_candidates
from . import metrics as M
from .runner import dist_info, generate, logprobs, pad_id_of, prompt_of

SETS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SETS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("probability", "rouge_l_recall", "truth_ratio_stat")


@dataclass
class TofuEvalConfig:
    forget_split: str = "forget10"
    sets: Sequence[str] = SETS
    batch_size: int = 16
    gen_batch_size: int = 16
    max_new_tokens: int = 64
    max_length: int = 512
    template: Optional[Union[str, PromptTemplate]] = None
    max_examples: Optional[int] = None  # evaluate the first N questions of each set (quick looks)
    generation: bool = True
    keep_generations: bool = True

    def file_of(self, name: str) -> str:
        return {"forget": f"{self.forget_split}_perturbed", "retain": "retain_perturbed"}.get(name, name)


def _set_rows(data_dir: str, cfg: TofuEvalConfig, name: str) -> list[dict]:
    rows = load_candidates(data_dir, cfg.file_of(name))
    if cfg.max_examples is not None:
        rows = rows[: cfg.max_examples]
    return rows


def evaluate_set(model, tokenizer, rows: Sequence[dict], name: str, cfg: TofuEvalConfig, *,
                 progress: bool = False) -> dict:
    """Metrics of one TOFU set. Returns ``{"n", "probability", "rouge_l_recall", "truth_ratio",
    "truth_ratio_stat", "per_example": {...}}`` (means over questions)."""
    multiple_choice = name in ("real_authors", "world_facts")
    ds = encode_candidates(rows, tokenizer, template=cfg.template, max_length=cfg.max_length, source=name)
    pad = pad_id_of(tokenizer)
    # flatten every candidate of every question into one list of examples
    flat, tags = [], []
    for q, it in enumerate(ds.items):
        flat.append(it["answer"])
        tags.append((q, "answer"))
        if it["paraphrased"] is not None:
            flat.append(it["paraphrased"])
            tags.append((q, "paraphrased"))
        for p in it["perturbed"]:
            flat.append(p)
            tags.append((q, "perturbed"))
    res = logprobs(model, flat, pad, cfg.batch_size, desc=f"{name}: log p", progress=progress)
    norm = M.length_normalised_prob([r[0] for r in res], [r[1] for r in res])
    per_q = [{"answer": None, "paraphrased": None, "perturbed": []} for _ in ds.items]
    for (q, kind), p in zip(tags, norm):
        if kind == "perturbed":
            per_q[q]["perturbed"].append(float(p))
        else:
            per_q[q][kind] = float(p)
    prob, tr = [], []
    for d in per_q:
        if multiple_choice:
            prob.append(M.option_probability(d["answer"], d["perturbed"]))
        else:
            prob.append(d["answer"])
        # no paraphrase (real authors / world facts): the answer itself is the denominator
        denom = d["paraphrased"] if d["paraphrased"] is not None else d["answer"]
        tr.append(M.truth_ratio(denom, d["perturbed"]))
    out = {"n": len(ds.items), "file": cfg.file_of(name), "probability": float(np.mean(prob)),
           "truth_ratio": float(np.mean(tr)), "truth_ratio_stat": float(np.mean(M.truth_ratio_stat(tr)))}
    per_ex = {"row": [int(it["row"]) for it in ds.items], "probability": [float(p) for p in prob],
              "truth_ratio": [float(t) for t in tr]}
    if cfg.generation:
        prompts = [prompt_of(it["answer"]) for it in ds.items]
        gens = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, pad_id=pad,
                        eos_id=tokenizer.eos_token_id, batch_size=cfg.gen_batch_size, desc=f"{name}: generate",
                        progress=progress)
        texts = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in gens]
        rouge = [M.rouge_l_recall(rows[it["row"]]["answer"], t) for it, t in zip(ds.items, texts)]
        out["rouge_l_recall"] = float(np.mean(rouge))
        per_ex["rouge_l_recall"] = rouge
        if cfg.keep_generations:
            per_ex["generation"] = texts
    out["per_example"] = per_ex
    return out


def reference_truth_ratios(reference) -> list[float]:
    """Forget-set truth ratios of a retain-only model from a list, an :func:`evaluate_tofu` result or its JSON."""
    if reference is None:
        raise ValueError("no reference given")
    if isinstance(reference, (str, os.PathLike)):
        with open(reference) as f:
            reference = json.load(f)
    if isinstance(reference, dict):
        try:
            return list(reference["sets"]["forget"]["per_example"]["truth_ratio"])
        except KeyError as e:
            raise ValueError("reference result has no sets.forget.per_example.truth_ratio") from e
    return [float(x) for x in reference]


def summarize(result: dict, reference=None) -> dict:
    """Add ``model_utility`` (when the 9 numbers are present) and ``forget_quality`` (when a reference is given)
    to a result in place; returns the flat summary ``{metric: value}``."""
    sets = result["sets"]
    flat = {}
    for name, s in sets.items():
        for k in ("probability", "rouge_l_recall", "truth_ratio", "truth_ratio_stat"):
            if k in s:
                flat[f"{name}/{k}"] = s[k]
    nine = [sets[s][m] for s in UTILITY_SETS for m in UTILITY_METRICS if s in sets and m in sets[s]]
    if len(nine) == 9:
        result["model_utility"] = flat["model_utility"] = M.harmonic_mean(nine)
    if reference is not None and "forget" in sets:
        ref = reference_truth_ratios(reference)
        result["forget_quality"] = flat["forget_quality"] = M.forget_quality(
            sets["forget"]["per_example"]["truth_ratio"], ref)
        result["log10_forget_quality"] = flat["log10_forget_quality"] = float(
            np.log10(max(result["forget_quality"], 1e-300)))
    result["summary"] = flat
    return flat


def evaluate_tofu(model, tokenizer, data_dir: str, cfg: Optional[TofuEvalConfig] = None, *, reference=None,
                  progress: bool = False, **overrides) -> dict:
    """Evaluate ``model`` on the TOFU sets of ``data_dir``. Returns ``{"task": "tofu", "config", "sets": {name:
    set result}, "model_utility", "forget_quality" (with ``reference``), "summary"}``; identical on every rank."""
    cfg = cfg or TofuEvalConfig()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    unknown = set(cfg.sets) - set(SETS)
    if unknown:
        raise ValueError(f"unknown TOFU set(s) {sorted(unknown)}; choose from {SETS}")
    result = {"task": "tofu", "data_dir": os.path.abspath(data_dir), "world_size": dist_info()[1],
              "config": {k: (v if not isinstance(v, PromptTemplate) else v.name) for k, v in asdict(cfg).items()},
              "sets": {}}
    result["config"]["sets"] = list(cfg.sets)
    for name in cfg.sets:
        rows = _set_rows(data_dir, cfg, name)
        result["sets"][name] = evaluate_set(model, tokenizer, rows, name, cfg, progress=progress)
    summarize(result, reference)
    return result
