"""TOFU evaluation of a model on a TOFU-layout folder (the real TOFU files or the embedded synthetic corpus).

Sets (file stems of the folder):

===============  ==============================  =============================================================
set              file                            metrics
===============  ==============================  =============================================================
forget           ``<forget_split>_perturbed``    probability, ROUGE-L recall, truth ratio: raw mean ``R`` and
                                                 ``mean(min(R, 1/R))``; per-question ``R`` -> forget quality
retain           ``retain_perturbed``            probability, ROUGE-L recall, ``mean(max(0, 1 - R))``
real_authors     ``real_authors(_perturbed)``    option-normalised probability, ROUGE-L recall, ``mean(max(0, 1 - R))``
world_facts      ``world_facts(_perturbed)``     option-normalised probability, ROUGE-L recall, ``mean(max(0, 1 - R))``
===============  ==============================  =============================================================

Definitions: :mod:`simnpo_fast.eval.metrics` (the reference code's, cited there). Protocols
(:data:`PROTOCOLS`, recorded in every result under ``config.protocol`` with the resolved settings):

* ``tofu`` (default) -- locuslab/tofu ``config/eval_everything.yaml`` as ``evaluate_util.py`` uses it: each set
  is cut to its first ``ds_size: 300`` questions; candidates are tokenised with ``max_length: 200`` (longer
  ones truncated, EOS lost: ``TextDatasetQA``); greedy generation with ``generation.max_length: 200``,
  ``max_new_tokens: null``: HF ``generate`` counts the prompt *left-padded to the longest prompt of its batch*
  of ``batch_size: 30`` questions (consecutive, in file order), so the new-token budget of a question is
  ``200 - (longest prompt of its batch of 30)``; reproduced here per question whatever our own batching.
* ``open-unlearning`` -- open-unlearning ``configs/eval/tofu*.yaml``: every question, ``max_length: 512``,
  greedy generation of up to ``max_new_tokens: 200`` new tokens (``configs/generation/default.yaml`` of its
  TOFU releases).

Any field set explicitly in :class:`TofuEvalConfig` (``max_examples``, ``max_length``, ``max_new_tokens``)
overrides the protocol's value (``max_new_tokens`` then fixes the budget of every question, as HF's
``max_new_tokens`` takes precedence over ``max_length``). The ROUGE ground truth is the answer as tokenised
for the likelihoods (decoded; cut like it when truncated), as the reference decodes its input ids.

Every result stores, per question, the mean log-likelihood and token count of the answer, the paraphrase and
each perturbed answer (``per_example``), so every aggregate can be recomputed independently. ``forget_quality``
needs the forget-set truth ratios of a retain-only model: a list, an :func:`evaluate_tofu` result or the path of
its saved JSON (``reference=``). Likelihoods are fused :func:`simnpo_fast.sequence_logprob` calls; generation is
batched greedy decoding; all of it is sharded over the ranks of an initialised process group.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import numpy as np

from ..data.template import PromptTemplate, get_template
from ..data.views import candidates_path, encode_candidates, load_candidates
from ..distributed import world_size
from . import metrics as M
from .runner import IGNORE, generate, logprobs, pad_id_of, prompt_of

SETS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SETS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("probability", "rouge_l_recall", "truth_ratio_stat")

#: Evaluation protocols: defaults of the fields left at ``None`` in :class:`TofuEvalConfig`.
PROTOCOLS = {
    "tofu": {"max_examples": 300, "max_length": 200, "gen_max_length": 200, "max_new_tokens": None,
             "gen_reference_batch": 30,
             "source": "locuslab/tofu config/eval_everything.yaml (ds_size 300, generation.max_length 200, "
                       "max_new_tokens null, batch_size 30)"},
    "open-unlearning": {"max_examples": None, "max_length": 512, "gen_max_length": None, "max_new_tokens": 200,
                        "gen_reference_batch": None,
                        "source": "open-unlearning configs/eval/tofu.yaml + configs/generation/default.yaml "
                                  "(all questions, max_length 512, max_new_tokens 200)"},
}


@dataclass
class TofuEvalConfig:
    forget_split: str = "forget10"
    sets: Sequence[str] = SETS
    protocol: str = "tofu"
    batch_size: int = 16
    gen_batch_size: int = 16
    max_new_tokens: Optional[int] = None  # None: the protocol's (tofu: 200 tokens in total; open-unlearning: 200)
    max_length: Optional[int] = None  # None: the protocol's (tofu 200, open-unlearning 512)
    max_examples: Optional[int] = None  # None: the protocol's (tofu: first 300 of each set; open-unlearning: all)
    truth_ratio_mean: str = "geometric"  # the reference code's; "arithmetic" = the paper's prose
    template: Optional[Union[str, PromptTemplate]] = None
    generation: bool = True
    keep_generations: bool = True

    def file_of(self, name: str) -> str:
        return {"forget": f"{self.forget_split}_perturbed", "retain": "retain_perturbed"}.get(name, name)

    def resolved(self) -> dict:
        """The effective settings: the protocol's defaults with this config's explicit values on top."""
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown TOFU protocol {self.protocol!r}; choose from {sorted(PROTOCOLS)}")
        if self.truth_ratio_mean not in ("geometric", "arithmetic"):
            raise ValueError(f"truth_ratio_mean must be 'geometric' or 'arithmetic', got {self.truth_ratio_mean!r}")
        r = dict(PROTOCOLS[self.protocol])
        for k in ("max_examples", "max_length", "max_new_tokens"):
            v = getattr(self, k)
            if v is not None:
                r[k] = int(v)
        if self.max_new_tokens is not None:  # HF: max_new_tokens wins over max_length
            r["gen_max_length"] = None
        return r


def _set_rows(data_dir: str, cfg: TofuEvalConfig, name: str) -> list[dict]:
    rows = load_candidates(data_dir, cfg.file_of(name))
    cap = cfg.resolved()["max_examples"]
    if cap is not None:
        rows = rows[:cap]
    return rows


def generation_budgets(prompt_lengths: Sequence[int], settings: dict) -> list[int]:
    """New-token budget of each question (in question order). ``max_new_tokens`` set: that number for all.
    Else (``tofu``): ``gen_max_length - width`` with ``width`` the longest prompt among the consecutive
    ``gen_reference_batch`` questions it shares a reference batch with (HF ``generate(max_length=)`` on
    left-padded batches, ``evaluate_util.run_generation``)."""
    n = len(prompt_lengths)
    if settings.get("max_new_tokens") is not None:
        return [int(settings["max_new_tokens"])] * n
    total = settings.get("gen_max_length")
    if total is None:
        raise ValueError("no generation limit: set max_new_tokens or the protocol's gen_max_length")
    group = settings.get("gen_reference_batch") or 1
    out = []
    for s in range(0, n, group):
        width = max(prompt_lengths[s:s + group])
        out += [max(0, int(total) - width)] * len(prompt_lengths[s:s + group])
    return out


def _answer_text(tokenizer, example: dict, tpl: PromptTemplate) -> str:
    """The ground truth for ROUGE: the answer tokens of ``example`` decoded (EOS and BOS dropped), without the
    template's answer prefix (TOFU phi: ``'Answer: '``), stripped."""
    toks = [t for t in example["labels"] if t != IGNORE]
    text = tokenizer.decode(toks, skip_special_tokens=True).strip()
    prefix = tpl.answer_prefix.strip() if not tpl.use_chat_template else ""
    if prefix and text.startswith(prefix):
        text = text[len(prefix):].strip()
    return text


def evaluate_set(model, tokenizer, rows: Sequence[dict], name: str, cfg: TofuEvalConfig, *,
                 progress: bool = False) -> dict:
    """Metrics of one TOFU set. Returns ``{"n", "file", "probability", "rouge_l_recall", "truth_ratio",
    "truth_ratio_stat", "truth_ratio_stat_def", "per_example": {...}}`` (means over questions).

    ``truth_ratio`` is the mean of the per-question ``R``; ``truth_ratio_stat`` is TOFU's "Truth Ratio <set>":
    ``mean(min(R, 1/R))`` on the forget set, ``mean(max(0, 1 - R))`` on the others. ``per_example`` holds, per
    question, ``row``, the mean log-likelihood and token count of the answer (``answer_mean_logp``,
    ``answer_n_tokens``), the paraphrase (``paraphrased_*``, ``None`` on real authors / world facts: the answer
    is the denominator there) and every perturbed answer (``perturbed_*``, lists), then ``probability``,
    ``truth_ratio``, and with generation ``rouge_l_recall``, ``generation``, ``ground_truth``."""
    settings = cfg.resolved()
    tpl = get_template(cfg.template, tokenizer)
    ds = encode_candidates(rows, tokenizer, template=tpl, max_length=settings["max_length"], source=name)
    per_q = _candidate_logps(model, ds, name, pad_id_of(tokenizer), cfg.batch_size, progress)
    multiple_choice = name in ("real_authors", "world_facts")
    prob, tr = [], []
    for d in per_q:
        p_ans = math.exp(d["answer"][0])
        pert = [c[0] for c in d["perturbed"]]
        prob.append(M.option_probability(p_ans, [math.exp(x) for x in pert]) if multiple_choice else p_ans)
        denom = d["paraphrased"][0] if d["paraphrased"] is not None else d["answer"][0]
        tr.append(M.truth_ratio_logp(denom, pert, mean=cfg.truth_ratio_mean))
    if name == "forget":
        stat, stat_def = M.forget_truth_ratio_stat(tr), "mean(min(R, 1/R))"
    else:
        stat, stat_def = M.truth_ratio_stat(tr), "mean(max(0, 1 - R))"
    out = {"n": len(ds.items), "file": cfg.file_of(name), "probability": float(np.mean(prob)),
           "truth_ratio": float(np.mean(tr)), "truth_ratio_stat": float(np.mean(stat)),
           "truth_ratio_stat_def": stat_def}
    if ds.dropped_rows:
        out["dropped_rows"] = list(ds.dropped_rows)
    per_ex = {"row": [int(it["row"]) for it in ds.items],
              "answer_mean_logp": [d["answer"][0] for d in per_q],
              "answer_n_tokens": [d["answer"][1] for d in per_q],
              "paraphrased_mean_logp": [d["paraphrased"][0] if d["paraphrased"] else None for d in per_q],
              "paraphrased_n_tokens": [d["paraphrased"][1] if d["paraphrased"] else None for d in per_q],
              "perturbed_mean_logp": [[c[0] for c in d["perturbed"]] for d in per_q],
              "perturbed_n_tokens": [[c[1] for c in d["perturbed"]] for d in per_q],
              "probability": [float(p) for p in prob], "truth_ratio": [float(t) for t in tr]}
    if cfg.generation:
        out["rouge_l_recall"] = _generation_metrics(model, tokenizer, ds, tpl, name, cfg, settings, per_ex, progress)
    out["per_example"] = per_ex
    return out


def _candidate_logps(model, ds, name: str, pad: int, batch_size: int, progress: bool) -> list[dict]:
    """Per question ``{"answer": (mean log p, n), "paraphrased": (...) | None, "perturbed": [(...), ...]}``: every
    candidate of the set scored in one sharded pass; a candidate without target tokens is an error."""
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
    res = logprobs(model, flat, pad, batch_size, desc=f"{name}: log p", progress=progress)
    per_q = [{"answer": None, "paraphrased": None, "perturbed": []} for _ in ds.items]
    for (q, kind), (lp, n) in zip(tags, res):
        if n <= 0:
            raise ValueError(f"{name}: question row {ds.items[q]['row']} has a {kind} answer with no target token")
        cand = (float(lp) / n, int(n))
        if kind == "perturbed":
            per_q[q]["perturbed"].append(cand)
        else:
            per_q[q][kind] = cand
    return per_q


def _generation_metrics(model, tokenizer, ds, tpl: PromptTemplate, name: str, cfg: TofuEvalConfig, settings: dict,
                        per_ex: dict, progress: bool) -> float:
    """Greedy generations of every question within the protocol's budgets; their ROUGE-L recall against the
    answers (per question into ``per_ex``, with the prompt lengths, budgets and, when kept, the texts); returns
    the mean."""
    prompts = [prompt_of(it["answer"]) for it in ds.items]
    budgets = generation_budgets([len(p) for p in prompts], settings)
    gens = generate(model, prompts, max_new_tokens=budgets, pad_id=pad_id_of(tokenizer),
                    eos_id=tokenizer.eos_token_id, batch_size=cfg.gen_batch_size, desc=f"{name}: generate",
                    progress=progress)
    texts = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in gens]
    truths = [_answer_text(tokenizer, it["answer"], tpl) for it in ds.items]
    rouge = [M.rouge_l_recall(gt, t) for gt, t in zip(truths, texts)]
    per_ex["rouge_l_recall"] = rouge
    per_ex["prompt_tokens"] = [len(p) for p in prompts]
    per_ex["max_new_tokens"] = budgets
    if cfg.keep_generations:
        per_ex["generation"] = texts
        per_ex["ground_truth"] = truths
    return float(np.mean(rouge))


def truth_ratios_from_candidates(per_example: dict, mean: str = "geometric") -> list[float]:
    """Recompute the per-question ``R`` of a set result from its stored per-candidate mean log-likelihoods."""
    return [M.truth_ratio_logp(para if para is not None else a, pert, mean=mean)
            for a, para, pert in zip(per_example["answer_mean_logp"], per_example["paraphrased_mean_logp"],
                                     per_example["perturbed_mean_logp"])]


def reference_truth_ratios(reference, mean: str = "geometric") -> list[float]:
    """Forget-set truth ratios of a retain-only model: a list of numbers (taken as they are), or an
    :func:`evaluate_tofu` result / the path of its JSON, whose ``R`` are recomputed from the stored
    per-candidate log-likelihoods with ``mean`` (the evaluated model's definition; the reference code's is
    geometric). A JSON written before per-candidate numbers were stored is refused (its truth ratios used the
    arithmetic mean)."""
    if reference is None:
        raise ValueError("no reference given")
    src = "reference"
    if isinstance(reference, (str, os.PathLike)):
        src = os.fspath(reference)
        with open(reference) as f:
            reference = json.load(f)
    if isinstance(reference, dict):
        try:
            per_ex = reference["sets"]["forget"]["per_example"]
        except KeyError as e:
            raise ValueError(f"{src}: no sets.forget.per_example (not a TOFU evaluation result)") from e
        if "answer_mean_logp" not in per_ex:
            raise ValueError(f"{src}: this evaluation predates the per-candidate log-likelihoods (its truth ratios "
                             f"used an arithmetic mean); evaluate the retain model again")
        return truth_ratios_from_candidates(per_ex, mean)
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
        ref = reference_truth_ratios(reference, result.get("config", {}).get("truth_ratio_mean", "geometric"))
        mine = sets["forget"]["per_example"]["truth_ratio"]
        if len(ref) != len(mine):
            warnings.warn(f"forget quality compares {len(mine)} truth ratios with {len(ref)} of the reference model "
                          f"(TOFU compares 300 with 300: evaluate both with the same protocol)", stacklevel=2)
        result["forget_quality"] = flat["forget_quality"] = M.forget_quality(mine, ref)
        result["log10_forget_quality"] = flat["log10_forget_quality"] = float(
            np.log10(max(result["forget_quality"], 1e-300)))
    result["summary"] = flat
    return flat


def evaluate_tofu(model, tokenizer, data_dir: str, cfg: Optional[TofuEvalConfig] = None, *, reference=None,
                  progress: bool = False, **overrides) -> dict:
    """Evaluate ``model`` on the TOFU sets of ``data_dir``. Returns ``{"task": "tofu", "config" (with the
    protocol and its resolved settings), "sets": {name: set result}, "model_utility", "forget_quality" (with
    ``reference``), "summary"}``; identical on every rank."""
    cfg = cfg or TofuEvalConfig()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    unknown = set(cfg.sets) - set(SETS)
    if unknown:
        raise ValueError(f"unknown TOFU set(s) {sorted(unknown)}; choose from {SETS}")
    settings = cfg.resolved()
    tpl = get_template(cfg.template, tokenizer)
    conf = {k: (v if not isinstance(v, PromptTemplate) else v.name) for k, v in asdict(cfg).items()}
    conf.update(sets=list(cfg.sets), resolved=settings, template_used=tpl.name)
    result = {"task": "tofu", "data_dir": os.path.abspath(data_dir), "world_size": world_size(),
              "protocol": cfg.protocol, "config": conf, "sets": {}}
    for name in cfg.sets:
        rows = _set_rows(data_dir, cfg, name)
        result["sets"][name] = evaluate_set(model, tokenizer, rows, name, cfg, progress=progress)
        read = candidates_path(data_dir, cfg.file_of(name))  # what was read (real_authors_perturbed, ...)
        result["sets"][name]["file"] = os.path.splitext(os.path.basename(read))[0]
    summarize(result, reference)
    return result
