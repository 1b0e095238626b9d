"""MUSE evaluation (Shi et al., 2024): VerbMem, KnowMem and PrivLeak, computed as swj0419/muse_bench computes them
(``eval.py: eval_model``, ``metrics/verbmem.py``, ``metrics/knowmem.py``, ``metrics/privleak.py``,
``constants.py``; definitions and citations in :mod:`simnpo_fast.eval.metrics`).

Files of a MUSE corpus folder (JSON, one list per file). Known layouts are accepted: the release folder of
jaechan-repo/muse_bench ``data/bbc/`` (retain files named ``retain2_*``), the layout of muse_bench's
``constants.DEFAULT_DATA`` (``retain_*``); any file can be given explicitly (``MuseEvalConfig.files``, CLI
``--muse-file ROLE=PATH``)::

    role                 file (first that exists)                               format
    verbmem_forget       verbmem/forget.json                                    [{"prompt": str, "gt": str}, ...]
    knowmem_forget       knowmem/forget_qa.json                                 [{"question": str, "answer": str}, ...]
    knowmem_forget_icl   knowmem/forget_qa_icl.json                             (same; the few-shot examples)
    knowmem_retain       knowmem/retain2_qa.json | knowmem/retain_qa.json       (same)
    knowmem_retain_icl   knowmem/retain2_qa_icl.json | knowmem/retain_qa_icl.json   (same)
    privleak_forget      privleak/forget.json                                   [str, ...] (or [{"text": str}, ...])
    privleak_holdout     privleak/holdout.json                                  (same)

Every file of the selected subsets is found, read and checked (types, keys, non-empty) before any model work
(:func:`load_muse_files`); a problem is one error naming the file, the row and the key.

What is computed, exactly as the reference does it:

* VerbMem: ``tokenizer(prompt, add_special_tokens=True)``, the *whole* prompt (no truncation), greedy
  continuation of ``verbmem_max_new_tokens`` (128) tokens; ground truth = ``tokenizer(gt,
  add_special_tokens=True)`` cut to its first 128 ids (a BOS counts), both decoded with
  ``skip_special_tokens=True, clean_up_tokenization_spaces=True``; ROUGE-L F1 without stemming, mean.
* KnowMem: prompt ``"Question: {q}\\nAnswer: {a}\\n\\n"`` for every ICL example, then
  ``"Question: {q}\\nAnswer: "`` (trailing space), greedy ``knowmem_max_new_tokens`` (32) tokens, the output cut
  at ``"\\n\\n"``, then ``"\\nQuestion"``, then ``"Question:"``; ROUGE-L F1 without stemming against ``answer``.
* PrivLeak: ``tokenizer(text, add_special_tokens=True)``, the *whole* text; the log-probability of every token
  after the first; Min-40% score per text; AUC of forget (label 0) vs holdout (label 1) on ``-score``;
  ``(AUC - AUC_retrain) / AUC_retrain * 100`` with ``AUC_retrain`` from ``--corpus news|books`` (0.4772 /
  0.5393), a number, or a retrained model's eval JSON. Near 0 is good, about -100 = the forget texts still look
  memorised (under-unlearned), large positive = over-unlearned.

Differences left, all explicit: likelihoods go through the fused per-token kernel on right-padded batches and
generation is batched greedy decoding on left-padded batches (the reference runs one unpadded text at a time:
equal up to float rounding); ``max_prompt_tokens`` / ``privleak_max_tokens`` (default ``None``: off) cut VerbMem
prompts to their last / PrivLeak texts to their first N tokens *only* where memory forces it, recorded in the
result and warned about, since MUSE does not cut.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Sequence, Union

import numpy as np

from ..data.formats import DataError, DataFileNotFoundError
from ..distributed import world_size
from . import metrics as M
from .runner import generate, pad_id_of, token_logprobs

MUSE_SUBSETS = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak")
#: File roles needed by each subset.
SUBSET_ROLES = {"verbmem_forget": ("verbmem_forget",),
                "knowmem_forget": ("knowmem_forget", "knowmem_forget_icl"),
                "knowmem_retain": ("knowmem_retain", "knowmem_retain_icl"),
                "privleak": ("privleak_forget", "privleak_holdout")}
#: Candidate paths of each role, relative to the corpus folder (first that exists wins).
FILE_CANDIDATES = {
    "verbmem_forget": ("verbmem/forget.json",),
    "knowmem_forget": ("knowmem/forget_qa.json",),
    "knowmem_forget_icl": ("knowmem/forget_qa_icl.json",),
    "knowmem_retain": ("knowmem/retain2_qa.json", "knowmem/retain_qa.json"),
    "knowmem_retain_icl": ("knowmem/retain2_qa_icl.json", "knowmem/retain_qa_icl.json"),
    "privleak_forget": ("privleak/forget.json",),
    "privleak_holdout": ("privleak/holdout.json",),
}
KNOWMEM_STOP = ("\n\n", "\nQuestion", "Question:")


@dataclass
class MuseEvalConfig:
    subsets: Sequence[str] = MUSE_SUBSETS
    verbmem_max_new_tokens: int = 128
    knowmem_max_new_tokens: int = 32
    k: float = M.MUSE_K
    corpus: Optional[str] = None  # "news" | "books": AUC_retrain of MUSE's constants.py
    files: Dict[str, str] = field(default_factory=dict)  # role -> path (overrides the layout search)
    n_shots: Optional[int] = None  # None: every ICL example of the *_icl.json file (MUSE)
    batch_size: int = 8
    max_examples: Optional[int] = None  # first N items of every file (quick looks; MUSE uses all)
    max_prompt_tokens: Optional[int] = None  # None = MUSE (whole prompt); N: keep the last N (memory only)
    privleak_max_tokens: Optional[int] = None  # None = MUSE (whole text); N: keep the first N (memory only)


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        try:  # JSON Lines
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise DataError(path, f"not valid JSON ({e})") from e


def resolve_muse_files(muse_dir: str, cfg: MuseEvalConfig) -> Dict[str, str]:
    """Path of every file the selected subsets need (explicit ``cfg.files`` first, else the known layouts)."""
    unknown = set(cfg.subsets) - set(MUSE_SUBSETS)
    if unknown:
        raise ValueError(f"unknown MUSE subset(s) {sorted(unknown)}; choose from {MUSE_SUBSETS}")
    bad_roles = set(cfg.files) - set(FILE_CANDIDATES)
    if bad_roles:
        raise ValueError(f"unknown MUSE file role(s) {sorted(bad_roles)}; choose from {sorted(FILE_CANDIDATES)}")
    if not cfg.files and not os.path.isdir(muse_dir):
        raise DataFileNotFoundError(muse_dir, "no such MUSE corpus folder")
    paths, missing = {}, []
    for sub in cfg.subsets:
        for role in SUBSET_ROLES[sub]:
            if role in cfg.files:
                p = cfg.files[role]
                if not os.path.isfile(p):
                    missing.append(f"{role}: {p}")
                paths[role] = p
                continue
            cands = [os.path.join(muse_dir, c) for c in FILE_CANDIDATES[role]]
            hit = next((c for c in cands if os.path.isfile(c)), None)
            if hit is None:
                missing.append(f"{role}: none of {', '.join(cands)}")
            paths[role] = hit
    if missing:
        raise DataFileNotFoundError(muse_dir, "MUSE files not found (give them with --muse-file ROLE=PATH or "
                                    "choose --sets): " + "; ".join(missing))
    return paths


def _check_rows(path: str, rows, kind: str):
    if not isinstance(rows, list) or not rows:
        raise DataError(path, "expected a non-empty JSON list")
    if kind == "text":
        out = []
        for i, r in enumerate(rows):
            if isinstance(r, dict) and isinstance(r.get("text"), str):
                r = r["text"]
            if not isinstance(r, str):
                raise DataError(path, "expected a string (or an object with a string 'text')", row=i)
            out.append(r)
        return out
    keys = ("prompt", "gt") if kind == "verbmem" else ("question", "answer")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(path, f"expected an object with keys {keys}", row=i)
        for k in keys:
            if not isinstance(r.get(k), str):
                raise DataError(path, "missing or not a string", row=i, field=k)
    return [{k: r[k] for k in keys} for r in rows]


def load_muse_files(muse_dir: str, cfg: MuseEvalConfig) -> Dict[str, dict]:
    """Find, read and check every file of the selected subsets. Returns ``{role: {"path", "rows"}}`` (rows cut
    to ``max_examples``, never the ICL examples). Raises :class:`simnpo_fast.data.DataError` (naming the file,
    row and key) before any model work."""
    out = {}
    for role, path in resolve_muse_files(muse_dir, cfg).items():
        kind = "text" if role.startswith("privleak") else ("verbmem" if role.startswith("verbmem") else "qa")
        rows = _check_rows(path, _read_json(path), kind)
        if cfg.max_examples and not role.endswith("_icl"):
            rows = rows[: cfg.max_examples]
        out[role] = {"path": os.path.abspath(path), "rows": rows}
    return out


def _encode(tokenizer, text: str) -> list[int]:
    """``tokenizer(text, add_special_tokens=True).input_ids`` (MUSE's call everywhere)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=True)


def verbmem(model, tokenizer, items: Sequence[dict], cfg: MuseEvalConfig, progress=False) -> dict:
    """MUSE ``metrics/verbmem.eval``: greedy continuation of each whole prompt vs the first
    ``verbmem_max_new_tokens`` ids of the tokenised ground truth; ROUGE-L F1 (no stemmer)."""
    n_new = int(cfg.verbmem_max_new_tokens)
    prompts = [_encode(tokenizer, it["prompt"]) for it in items]
    if cfg.max_prompt_tokens:
        prompts = [p[-int(cfg.max_prompt_tokens):] for p in prompts]
    gens = generate(model, prompts, max_new_tokens=n_new, pad_id=pad_id_of(tokenizer),
                    eos_id=tokenizer.eos_token_id, batch_size=cfg.batch_size, desc="verbmem", progress=progress)
    outputs = [_decode(tokenizer, g) for g in gens]
    gts = [_decode(tokenizer, _encode(tokenizer, it["gt"])[:n_new]) for it in items]
    scores = [M.rouge_l_f1(gt, o) for gt, o in zip(gts, outputs)]
    return {"n": len(items), "rouge_l_f1": float(np.mean(scores)), "max_new_tokens": n_new,
            "per_example": {"rouge_l_f1": scores, "prompt_tokens": [len(p) for p in prompts],
                            "generation": outputs, "ground_truth": gts}}


def knowmem_prompt(question: str, shots: Sequence[dict]) -> str:
    """MUSE ``metrics/knowmem.eval``'s prompt: the ICL examples, then the question, ending ``"Answer: "``."""
    fs = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return fs + f"Question: {question}\nAnswer: "


def cut_knowmem_output(text: str) -> str:
    """MUSE ``get_prefix_before_words_occur(output, ["\\n\\n", "\\nQuestion", "Question:"])``."""
    for w in KNOWMEM_STOP:
        text = text.split(w)[0]
    return text


def knowmem(model, tokenizer, items: Sequence[dict], shots: Sequence[dict], cfg: MuseEvalConfig,
            progress=False) -> dict:
    """MUSE ``metrics/knowmem.eval``: few-shot greedy answers, cut at the stop strings; ROUGE-L F1 (no stemmer)."""
    shots = list(shots)[: cfg.n_shots] if cfg.n_shots is not None else list(shots)
    n_new = int(cfg.knowmem_max_new_tokens)
    prompts = [_encode(tokenizer, knowmem_prompt(it["question"], shots)) for it in items]
    gens = generate(model, prompts, max_new_tokens=n_new, pad_id=pad_id_of(tokenizer),
                    eos_id=tokenizer.eos_token_id, batch_size=cfg.batch_size, desc="knowmem", progress=progress)
    outputs = [cut_knowmem_output(_decode(tokenizer, g)) for g in gens]
    scores = [M.rouge_l_f1(it["answer"], o) for it, o in zip(items, outputs)]
    return {"n": len(items), "rouge_l_f1": float(np.mean(scores)), "max_new_tokens": n_new, "n_shots": len(shots),
            "per_example": {"rouge_l_f1": scores, "generation": outputs}}


def min_k_scores(model, tokenizer, texts: Sequence[str], cfg: MuseEvalConfig, *, source: str = "privleak",
                 progress=False) -> tuple[list[float], list[int]]:
    """MUSE ``metrics/privleak.compute_ppl`` + ``inference``: per text, the Min-K% score of the log-probs of
    every token after the first of ``tokenizer(text, add_special_tokens=True)``. Returns (scores, token counts)."""
    exs = []
    for i, t in enumerate(texts):
        ids = _encode(tokenizer, t)
        if cfg.privleak_max_tokens:
            ids = ids[: int(cfg.privleak_max_tokens)]
        if int((len(ids) - 1) * cfg.k) < 1:
            raise DataError(source, f"{len(ids)} tokens leave no Min-{cfg.k:.0%} token to score", row=i)
        exs.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    lps = token_logprobs(model, exs, pad_id_of(tokenizer), cfg.batch_size, desc="min-k%", progress=progress)
    return [M.min_k_score(lp, cfg.k) for lp in lps], [len(e["input_ids"]) for e in exs]


def read_retrain_auc(retrain) -> Optional[float]:
    """The retrained model's AUC from a number, a numeric string (``"0.4772"``), ``"news"`` / ``"books"``
    (MUSE's constants) or the path of a MUSE eval JSON written by :func:`evaluate_muse` (``privleak.auc``)."""
    if retrain is None:
        return None
    if isinstance(retrain, (int, float)):
        v = float(retrain)
    elif isinstance(retrain, str) and retrain.strip().lower() in M.AUC_RETRAIN:
        v = M.AUC_RETRAIN[retrain.strip().lower()]
    else:
        try:
            v = float(retrain)
        except (TypeError, ValueError):
            path = os.fspath(retrain)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--retrain-auc {path!r} is neither a number, 'news'/'books', nor a file")
            try:
                with open(path) as f:
                    v = float(json.load(f)["privleak"]["auc"])
            except (KeyError, TypeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: no privleak.auc (not a MUSE evaluation JSON)") from e
    if not 0.0 < v <= 1.0:
        raise ValueError(f"retrain AUC must be in (0, 1], got {v}")
    return v


def infer_corpus(muse_dir: str) -> Optional[str]:
    """``news`` / ``books`` from the folder name (``news``, ``bbc`` / ``books``, ``hp``), else ``None``."""
    name = os.path.basename(os.path.normpath(muse_dir)).lower()
    if "news" in name or "bbc" in name:
        return "news"
    if "book" in name or name in ("hp", "harry_potter"):
        return "books"
    return None


def evaluate_muse(model, tokenizer, muse_dir: str, cfg: Optional[MuseEvalConfig] = None, *,
                  retrain_auc: Union[None, float, str] = None, data: Optional[Dict[str, dict]] = None,
                  progress: bool = False) -> dict:
    """VerbMem / KnowMem / PrivLeak of ``model`` on the MUSE folder ``muse_dir``; identical on every rank.

    ``data``: the output of :func:`load_muse_files` (read here when ``None``). PrivLeak needs ``AUC_retrain``:
    ``retrain_auc`` (number / JSON path / corpus name), else ``cfg.corpus``, else the corpus the folder name
    gives; without any, only the AUC is reported (with a warning). Summary: ``verbmem_forget``,
    ``knowmem_forget``, ``knowmem_retain`` (ROUGE-L F1 means in [0, 1]; MUSE's tables show x100),
    ``privleak_auc`` and ``privleak`` (percent, as MUSE)."""
    cfg = cfg or MuseEvalConfig()
    data = data if data is not None else load_muse_files(muse_dir, cfg)
    for flag, what in ((cfg.max_prompt_tokens, "VerbMem prompts cut to their last"),
                       (cfg.privleak_max_tokens, "PrivLeak texts cut to their first")):
        if flag:
            warnings.warn(f"{what} {flag} tokens: MUSE uses the whole text, so these numbers differ from MUSE's",
                          stacklevel=2)
    corpus = cfg.corpus or infer_corpus(muse_dir)
    ra = read_retrain_auc(retrain_auc) if retrain_auc is not None else (
        M.AUC_RETRAIN[corpus] if corpus in M.AUC_RETRAIN else None)
    out = {"task": "muse", "data_dir": os.path.abspath(muse_dir), "world_size": world_size(),
           "config": {**asdict(cfg), "subsets": list(cfg.subsets), "corpus": corpus},
           "files": {role: d["path"] for role, d in data.items()}}
    summary = {}
    if "verbmem_forget" in cfg.subsets:
        out["verbmem_forget"] = verbmem(model, tokenizer, data["verbmem_forget"]["rows"], cfg, progress)
        summary["verbmem_forget"] = out["verbmem_forget"]["rouge_l_f1"]
    for split in ("forget", "retain"):
        key = f"knowmem_{split}"
        if key in cfg.subsets:
            out[key] = knowmem(model, tokenizer, data[key]["rows"], data[f"{key}_icl"]["rows"], cfg, progress)
            summary[key] = out[key]["rouge_l_f1"]
    if "privleak" in cfg.subsets:
        sf, nf = min_k_scores(model, tokenizer, data["privleak_forget"]["rows"], cfg,
                              source=data["privleak_forget"]["path"], progress=progress)
        sh, nh = min_k_scores(model, tokenizer, data["privleak_holdout"]["rows"], cfg,
                              source=data["privleak_holdout"]["path"], progress=progress)
        a = M.privleak_auc(sf, sh)
        pl = {"auc": a, "k": cfg.k, "score": f"Min-{cfg.k:.0%} (MUSE: -mean of the lowest log-probs)",
              "forget_min_k": sf, "holdout_min_k": sh, "forget_n_tokens": nf, "holdout_n_tokens": nh}
        summary["privleak_auc"] = a
        if ra is not None:
            pl["retrain_auc"] = ra
            pl["privleak"] = M.privleak(a, ra)
            summary["privleak"] = pl["privleak"]
        else:
            warnings.warn("PrivLeak needs the retrained model's AUC: pass --corpus news|books or --retrain-auc; "
                          "only the AUC is reported", stacklevel=2)
        out["privleak"] = pl
    out["summary"] = summary
    return out
