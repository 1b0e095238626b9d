"""MUSE evaluation (Shi et al., 2024): VerbMem, KnowMem and PrivLeak from files in MUSE's JSON layout.

Layout of a MUSE corpus folder (``muse-bench/MUSE-News`` / ``MUSE-Books`` ``data/<corpus>/``)::

    verbmem/forget.json                 [{"prompt": str, "gt": str}, ...]     (VerbMem: continue the prompt)
    knowmem/forget_qa.json              [{"question": str, "answer": str}, ...]
    knowmem/retain_qa.json              (same; KnowMem on retain = utility)
    knowmem/forget_qa_icl.json          few-shot examples for the forget QA prompts
    knowmem/retain_qa_icl.json          few-shot examples for the retain QA prompts
    privleak/forget.json                [str, ...] or [{"text": str}, ...]    (members)
    privleak/holdout.json               (non-members)

Metrics (:mod:`simnpo_fast.eval.metrics`):

* VerbMem: ROUGE-L F1 between the 128-token greedy continuation of ``prompt`` and ``gt`` (mean over items);
* KnowMem: ROUGE-L F1 between the greedy answer (few-shot prompt ``Question: q\\nAnswer: a\\n\\n`` x k, then the
  question; the answer is cut at the first blank line) and ``answer``;
* PrivLeak: Min-K% Prob (k = 40%) of each forget / holdout text (first ``max_length`` tokens), AUC of
  "forget scores higher than holdout", and ``(AUC - AUC_retrain) / AUC_retrain`` when the retrained model's AUC
  is given (a number or a saved MUSE eval JSON).

Every likelihood uses the fused per-token kernel; generation is batched and sharded like the TOFU evaluation.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import numpy as np

from . import metrics as M
from .runner import dist_info, generate, pad_id_of, token_logprobs

MUSE_SUBSETS = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak")


@dataclass
class MuseEvalConfig:
    subsets: Sequence[str] = MUSE_SUBSETS
    verbmem_max_new_tokens: int = 128
    knowmem_max_new_tokens: int = 32
    max_prompt_tokens: int = 1024  # VerbMem prompts are cut to their last N tokens
    privleak_max_length: int = 2048
    k: float = 0.4
    n_shots: Optional[int] = None  # None: all ICL examples in the *_icl.json file
    batch_size: int = 8
    max_examples: Optional[int] = None


def _read(path: str):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # JSON Lines
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def _texts(rows) -> list[str]:
    out = []
    for r in rows:
        if isinstance(r, str):
            out.append(r)
        elif isinstance(r, dict) and isinstance(r.get("text"), str):
            out.append(r["text"])
        else:
            raise ValueError(f"expected strings or {{'text': ...}} objects, got {type(r).__name__}")
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _decode_all(tokenizer, gens):
    return [tokenizer.decode(g, skip_special_tokens=True) for g in gens]


def verbmem(model, tokenizer, items: Sequence[dict], cfg: MuseEvalConfig, progress=False) -> dict:
    prompts = [(_bos(tokenizer) + _ids(tokenizer, it["prompt"]))[-cfg.max_prompt_tokens:] for it in items]
    gens = generate(model, prompts, max_new_tokens=cfg.verbmem_max_new_tokens, pad_id=pad_id_of(tokenizer),
                    eos_id=tokenizer.eos_token_id, batch_size=cfg.batch_size, desc="verbmem", progress=progress)
    texts = _decode_all(tokenizer, gens)
    scores = [M.rouge_l_f1(it["gt"], t) for it, t in zip(items, texts)]
    return {"n": len(items), "rouge_l_f1": float(np.mean(scores)), "per_example": {"rouge_l_f1": scores,
                                                                                   "generation": texts}}


def knowmem_prompt(question: str, shots: Sequence[dict]) -> str:
    fs = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return f"{fs}Question: {question}\nAnswer:"


def knowmem(model, tokenizer, items: Sequence[dict], shots: Sequence[dict], cfg: MuseEvalConfig,
            progress=False) -> dict:
    shots = list(shots)[: cfg.n_shots] if cfg.n_shots is not None else list(shots)
    prompts = [_bos(tokenizer) + _ids(tokenizer, knowmem_prompt(it["question"], shots)) for it in items]
    gens = generate(model, prompts, max_new_tokens=cfg.knowmem_max_new_tokens, pad_id=pad_id_of(tokenizer),
                    eos_id=tokenizer.eos_token_id, batch_size=cfg.batch_size, desc="knowmem", progress=progress)
    texts = [t.split("\n\n")[0].split("Question:")[0].strip() for t in _decode_all(tokenizer, gens)]
    scores = [M.rouge_l_f1(it["answer"], t) for it, t in zip(items, texts)]
    return {"n": len(items), "rouge_l_f1": float(np.mean(scores)), "per_example": {"rouge_l_f1": scores,
                                                                                   "generation": texts}}


def min_k_scores(model, tokenizer, texts: Sequence[str], cfg: MuseEvalConfig, progress=False) -> list[float]:
    exs = []
    for t in texts:
        ids = (_bos(tokenizer) + _ids(tokenizer, t))[: cfg.privleak_max_length]
        if len(ids) < 2:
            raise ValueError("a PrivLeak text has no token to score")
        exs.append({"input_ids": ids, "labels": ids})
    lps = token_logprobs(model, exs, pad_id_of(tokenizer), cfg.batch_size, desc="min-k%", progress=progress)
    return [M.min_k_prob(lp, cfg.k) for lp in lps]


def read_retrain_auc(retrain) -> Optional[float]:
    if retrain is None:
        return None
    if isinstance(retrain, (int, float)):
        return float(retrain)
    with open(retrain) as f:
        return float(json.load(f)["privleak"]["auc"])


def evaluate_muse(model, tokenizer, muse_dir: str, cfg: Optional[MuseEvalConfig] = None, *,
                  retrain_auc: Union[None, float, str] = None, progress: bool = False) -> dict:
    """VerbMem / KnowMem / PrivLeak of ``model`` on the MUSE folder ``muse_dir``; identical on every rank."""
    cfg = cfg or MuseEvalConfig()
    unknown = set(cfg.subsets) - set(MUSE_SUBSETS)
    if unknown:
        raise ValueError(f"unknown MUSE subset(s) {sorted(unknown)}; choose from {MUSE_SUBSETS}")
    cut = (lambda xs: list(xs)[: cfg.max_examples]) if cfg.max_examples else list
    out = {"task": "muse", "data_dir": os.path.abspath(muse_dir), "world_size": dist_info()[1],
           "config": {**asdict(cfg), "subsets": list(cfg.subsets)}}
    summary = {}
    if "verbmem_forget" in cfg.subsets:
        items = cut(_read(os.path.join(muse_dir, "verbmem", "forget.json")))
        out["verbmem_forget"] = verbmem(model, tokenizer, items, cfg, progress)
        summary["verbmem_forget"] = out["verbmem_forget"]["rouge_l_f1"]
    for split in ("forget", "retain"):
        key = f"knowmem_{split}"
        if key in cfg.subsets:
            items = cut(_read(os.path.join(muse_dir, "knowmem", f"{split}_qa.json")))
            icl = os.path.join(muse_dir, "knowmem", f"{split}_qa_icl.json")
            shots = _read(icl) if os.path.isfile(icl) else []
            out[key] = knowmem(model, tokenizer, items, shots, cfg, progress)
            summary[key] = out[key]["rouge_l_f1"]
    if "privleak" in cfg.subsets:
        forget = cut(_texts(_read(os.path.join(muse_dir, "privleak", "forget.json"))))
        holdout = cut(_texts(_read(os.path.join(muse_dir, "privleak", "holdout.json"))))
        sf = min_k_scores(model, tokenizer, forget, cfg, progress)
        sh = min_k_scores(model, tokenizer, holdout, cfg, progress)
        a = M.auc(sf, sh)
        pl = {"auc": a, "k": cfg.k, "forget_min_k": sf, "holdout_min_k": sh}
        ra = read_retrain_auc(retrain_auc)
        if ra is not None:
            pl["retrain_auc"] = ra
            pl["privleak"] = M.privleak(a, ra)
            summary["privleak"] = pl["privleak"]
        out["privleak"] = pl
        summary["privleak_auc"] = a
    out["summary"] = summary
    return out
