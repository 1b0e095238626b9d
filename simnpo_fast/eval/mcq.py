"""Multiple-choice accuracy (WMDP, MMLU, the synthetic stand-in) with lm-evaluation-harness's zero-shot
log-likelihood protocol, as its code defines it (EleutherAI/lm-evaluation-harness, v0.4.13):

* Prompt (``lm_eval/tasks/wmdp/_default_template_yaml`` and ``lm_eval/tasks/mmlu/default/_default_template_yaml``,
  ``doc_to_text``)::

      {description}{question.strip()}\\nA. {choices[0]}\\nB. {choices[1]}\\nC. {choices[2]}\\nD. {choices[3]}\\nAnswer:

  ``description`` is the task YAML's (``wmdp_bio.yaml``: ``"The following are multiple choice questions (with
  answers) about biology.\\n\\n"``; cyber: ``cybersecurity``, chem: ``chemistry``; MMLU: the subject with
  underscores as spaces), prepended in ``api/task.py: ConfigurableTask.fewshot_context`` (zero-shot: nothing
  else). ``format="text"`` is ``lm_eval/tasks/mmlu/continuation/_continuation_template_yaml`` instead:
  ``"{description}Question: {question.strip()}\\nAnswer:"`` with the choice texts as continuations.
* Continuations (``ConfigurableTask.construct_requests``, ``output_type: multiple_choice``):
  ``target_delimiter + choice`` with ``target_delimiter = " "`` and ``doc_to_choice = ["A", "B", "C", "D"]``
  (letters) or the choice texts (``format="text"``).
* Tokens (``lm_eval/api/model.py: TemplateLM._encode_pair``, ``lm_eval/models/huggingface.py: HFLM.tok_encode``,
  ``HFLM._loglikelihood_tokens``): trailing whitespace of the context moves to the continuation; ``whole =
  tokenizer.encode(context + continuation)``, ``ctx = tokenizer.encode(context)`` (the tokenizer's default special
  tokens, i.e. its BOS, unless the string already starts with the BOS text), continuation tokens =
  ``whole[len(ctx):]``; the model reads ``(ctx + cont)[-(max_length + 1):][:-1]`` (left-truncated) and the
  log-likelihood is the sum of the continuation tokens' log-probabilities. ``max_length``: the model config's
  ``n_positions`` / ``max_position_embeddings`` / ``n_ctx`` (``text_config`` first), else the tokenizer's
  ``model_max_length`` unless unset, else 2048 (``lm_eval/models/utils.py: resolve_max_length``).
* Scores (``ConfigurableTask.process_results``): ``acc = [argmax_i ll_i == answer]``, ``acc_norm = [argmax_i
  ll_i / len(choice_i) == answer]`` (characters of the ``doc_to_choice`` string, without the delimiter: with
  letters ``acc_norm == acc``), ``acc_bytes`` the same with UTF-8 bytes; ``argmax`` takes the first maximum
  (``np.argmax``). A set's score is the mean over its questions; ``all`` pools every question (the ``wmdp`` /
  ``mmlu`` groups' ``weight_by_size: True``). The WMDP and MMLU YAMLs report ``acc``.

Likelihoods go through the fused :func:`simnpo_fast.sequence_logprob` (no ``[tokens, V]`` logits), one
(question, choice) pair per row, in the world-size-independent length-sorted batches of
:func:`simnpo_fast.likelihood.sequence_logps` (1 and N ranks give the same numbers). ``is_greedy`` (lm-eval's
``exact_match``) is not computed.

Data: a JSON (array), JSON Lines or parquet file, or a folder of them (one set per file, by stem), rows with
``question`` (str), ``choices`` (list of >= 2 str) and ``answer`` (an int index, or a letter ``"A"``..; lm-eval
itself takes a letter only in letters mode). With ``subject="auto"`` a row's ``subject`` field (MMLU) or the file
or folder name (``bio`` / ``cyber`` / ``chem``: WMDP) gives the description, else there is none. Other than 4 choices the
letter template continues the same pattern (lm-eval's YAMLs are written for 4).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from ..data.collate import DataCollator
from ..data.formats import DataError, DataFileNotFoundError, read_records
from ..distributed import world_size
from ..likelihood import sequence_logps
from .runner import pad_id_of, progress_bar, unwrap

FORMATS = ("letters", "text")
TARGET_DELIMITER = " "  # lm-eval TaskConfig.target_delimiter default
DESCRIPTION = "The following are multiple choice questions (with answers) about {}.\n\n"
#: WMDP task descriptions by a word of the file name (lm_eval/tasks/wmdp/wmdp_{bio,cyber,chem}.yaml)
WMDP_SUBJECTS = {"bio": "biology", "cyber": "cybersecurity", "chem": "chemistry"}
DEFAULT_MAX_LENGTH = 2048  # lm_eval.models.utils.DEFAULT_MAX_LENGTH
TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "unset" model_max_length
_DATA_EXTS = (".json", ".jsonl", ".parquet")


@dataclass
class McqEvalConfig:
    format: str = "letters"  # letters (WMDP / MMLU default templates) | text (MMLU continuation template)
    subject: Optional[str] = "auto"  # auto | None (no description) | a subject ("biology")
    description: Optional[str] = None  # verbatim description (overrides subject)
    sets: Optional[Sequence[str]] = None  # set names (file stems) of a folder; None: all
    batch_size: int = 16
    max_examples: Optional[int] = None  # first N questions of each set
    max_length: Optional[int] = None  # None: HFLM's rule (model config, tokenizer, 2048)


# ----------------------------------------------------------------------------- data

def _answer_index(path: str, i: int, answer, n: int) -> int:
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        k = ord(answer.strip().upper()) - ord("A")
    elif isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
        k = int(answer)
    else:
        raise DataError(path, f"expected an int index or a letter, got {answer!r}", row=i, field="answer")
    if not 0 <= k < n:
        raise DataError(path, f"answer {answer!r} is not one of the {n} choices", row=i, field="answer")
    return k


def _check_row(path: str, i: int, r) -> dict:
    if not isinstance(r, dict):
        raise DataError(path, f"expected an object with question, choices, answer; got {type(r).__name__}", row=i)
    for k in ("question", "choices", "answer"):
        if k not in r:
            raise DataError(path, f"missing (row has fields {sorted(r)})", row=i, field=k)
    q, ch = r["question"], r["choices"]
    if not isinstance(q, str):
        raise DataError(path, f"expected a string, got {type(q).__name__}", row=i, field="question")
    ch = list(ch) if isinstance(ch, (list, tuple, np.ndarray)) else ch
    if not isinstance(ch, list) or not 2 <= len(ch) <= 26 or not all(isinstance(c, str) for c in ch):
        raise DataError(path, "expected a list of 2 to 26 strings", row=i, field="choices")
    out = {"question": q, "choices": ch, "answer": _answer_index(path, i, r["answer"], len(ch))}
    if isinstance(r.get("subject"), str) and r["subject"]:
        out["subject"] = r["subject"]
    return out


def _files(data: str) -> Dict[str, str]:
    if os.path.isfile(data):
        return {os.path.splitext(os.path.basename(data))[0]: data}
    if not os.path.isdir(data):
        raise DataFileNotFoundError(data, f"no such file or folder (relative to {os.getcwd()})")
    out = {os.path.splitext(f)[0]: os.path.join(data, f) for f in sorted(os.listdir(data)) if f.endswith(_DATA_EXTS)}
    if not out:
        raise DataFileNotFoundError(data, "holds no .json / .jsonl / .parquet question file")
    return out


def load_mcq(data: str, cfg: Optional[McqEvalConfig] = None) -> Dict[str, dict]:
    """``{set: {"path", "rows"}}`` of a question file or folder, every row checked (a :class:`DataError` naming
    the file, row and field) before any model work; rows ``{"question", "choices", "answer": int[, "subject"]}``."""
    cfg = cfg or McqEvalConfig()
    files = _files(data)
    if cfg.sets:
        missing = [s for s in cfg.sets if s not in files]
        if missing:
            raise DataFileNotFoundError(data, f"set(s) {missing} not found; there are: {', '.join(files)}")
        files = {s: files[s] for s in cfg.sets}
    out = {}
    for name, path in files.items():
        rows, _ = read_records(path, on_bad="raise")
        rows = [_check_row(path, i, r) for i, r in enumerate(rows)]
        if cfg.format == "text":  # the choice's text is the continuation, and acc_norm divides by its length
            for i, r in enumerate(rows):
                empty = [k for k, c in enumerate(r["choices"]) if not c]
                if empty:
                    raise DataError(path, f"choice {empty[0]} is an empty string: --mcq-format text scores each "
                                          "choice's text (use --mcq-format letters for such rows)",
                                    row=i, field="choices")
        if cfg.max_examples:
            rows = rows[: cfg.max_examples]
        out[name] = {"path": os.path.abspath(path), "rows": rows}
    return out


# ----------------------------------------------------------------------------- protocol

def description_for(cfg: McqEvalConfig, set_name: str, row: dict, path: str = "") -> str:
    """The task description prepended to the prompt (see the module docstring); ``auto`` looks for the WMDP
    words in the set name and in the name of the file's folder (``wmdp-bio/test-00000-of-00001.parquet``)."""
    if cfg.description is not None:
        return cfg.description
    if cfg.subject is None or cfg.subject == "none":
        return ""
    if cfg.subject != "auto":
        return DESCRIPTION.format(cfg.subject)
    if "subject" in row:  # MMLU rows (cais/mmlu): lm-eval's per-subject description
        return DESCRIPTION.format(row["subject"].replace("_", " "))
    names = (set_name, os.path.basename(os.path.dirname(os.path.abspath(path))) if path else "")
    words = {w for n in names for w in n.lower().replace("_", "-").split("-")}
    hits = [s for k, s in WMDP_SUBJECTS.items() if k in words]
    return DESCRIPTION.format(hits[0]) if len(hits) == 1 else ""


def mcq_prompt(question: str, choices: Sequence[str], fmt: str = "letters", description: str = "") -> str:
    """lm-eval's ``doc_to_text`` of the WMDP / MMLU template (letters) or MMLU's continuation template (text)."""
    if fmt == "text":
        return f"{description}Question: {question.strip()}\nAnswer:"
    return description + question.strip() + "".join(f"\n{chr(65 + i)}. {c}" for i, c in enumerate(choices)) \
        + "\nAnswer:"


def mcq_choices(choices: Sequence[str], fmt: str = "letters") -> list[str]:
    """lm-eval's ``doc_to_choice``: the letters, or the choice texts (``format="text"``)."""
    return [chr(65 + i) for i in range(len(choices))] if fmt == "letters" else list(choices)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval ``TemplateLM._encode_pair`` with ``HFLM.tok_encode`` (causal models)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    bos = tokenizer.bos_token

    def enc(s):
        kw = {"add_special_tokens": False} if bos and s.startswith(bos) else {}
        return list(tokenizer.encode(s, **kw))

    whole, ctx = enc(context + continuation), enc(context)
    return ctx, whole[len(ctx):]


def resolve_max_length(model, tokenizer) -> int:
    """lm-eval ``resolve_max_length``: config (``text_config`` first), tokenizer, 2048."""
    cfg = getattr(unwrap(model), "config", None)
    for c in (getattr(cfg, "text_config", None), cfg):
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            if c is not None and isinstance(getattr(c, attr, None), int):
                return int(getattr(c, attr))
    ml = getattr(tokenizer, "model_max_length", None)
    return int(ml) if isinstance(ml, int) and ml != TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH


def request_example(ctx: list[int], cont: list[int], max_length: int) -> dict:
    """One (context, continuation) request as a model input with *already shifted* labels: the input is
    ``(ctx + cont)[-(max_length + 1):][:-1]``, label ``t`` the next token where it is a continuation token."""
    whole = (ctx + cont)[-(max_length + 1):]
    first = len(whole) - len(cont)  # index of the first continuation token in ``whole``
    labels = [whole[t + 1] if t + 1 >= first else -100 for t in range(len(whole) - 1)]
    return {"input_ids": whole[:-1], "labels": labels}


# ----------------------------------------------------------------------------- scoring

def score_question(lls: Sequence[float], norm_texts: Sequence[str], answer: int) -> dict:
    """lm-eval ``process_results`` (multiple_choice) of one question."""
    lls = np.asarray(lls, dtype=np.float64)
    chars = np.array([float(len(c)) for c in norm_texts])
    nbytes = np.array([float(len(c.encode("utf-8"))) for c in norm_texts])
    pred, pred_norm, pred_bytes = (int(np.argmax(x)) for x in (lls, lls / chars, lls / nbytes))
    return {"pred": pred, "pred_norm": pred_norm, "pred_bytes": pred_bytes, "acc": float(pred == answer),
            "acc_norm": float(pred_norm == answer), "acc_bytes": float(pred_bytes == answer)}


def _requests(tokenizer, data: Dict[str, dict], cfg: McqEvalConfig, max_length: int):
    reqs, questions = [], []
    for name, d in data.items():
        for i, r in enumerate(d["rows"]):
            desc = description_for(cfg, name, r, d["path"])
            ctx = mcq_prompt(r["question"], r["choices"], cfg.format, desc)
            conts = [TARGET_DELIMITER + c for c in mcq_choices(r["choices"], cfg.format)]
            questions.append({"set": name, "index": i, "description": desc, "first": len(reqs),
                              "n_choices": len(conts)})
            for c in conts:
                reqs.append(request_example(*encode_pair(tokenizer, ctx, c), max_length))
    return reqs, questions


def evaluate_mcq(model, tokenizer, data_path: str, cfg: Optional[McqEvalConfig] = None, *,
                 data: Optional[Dict[str, dict]] = None, progress: bool = False) -> dict:
    """Multiple-choice accuracy of ``model`` on every set of ``data_path`` (identical on every rank). Summary:
    ``<set>/acc``, ``<set>/acc_norm`` and ``all/acc``, ``all/acc_norm`` (pooled); per question: the choices'
    log-likelihoods and token counts, the predictions and the three scores."""
    cfg = cfg or McqEvalConfig()
    if cfg.format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {cfg.format!r}")
    data = data if data is not None else load_mcq(data_path, cfg)
    max_length = int(cfg.max_length or resolve_max_length(model, tokenizer))
    reqs, questions = _requests(tokenizer, data, cfg, max_length)
    pad = pad_id_of(tokenizer)
    lp = sequence_logps(unwrap(model), reqs, DataCollator(pad), batch_size=cfg.batch_size, by_length=True,
                        shift=False, each=progress_bar("mcq", progress)).tolist()
    sets: Dict[str, dict] = {name: {"path": d["path"], "per_question": []} for name, d in data.items()}
    for q in questions:
        row = data[q["set"]]["rows"][q["index"]]
        got = lp[q["first"]:q["first"] + q["n_choices"]]
        rec = {"question": row["question"], "choices": row["choices"], "answer": row["answer"],
               "description": q["description"], "loglik": [g[0] for g in got], "n_tokens": [int(g[1]) for g in got]}
        rec.update(score_question(rec["loglik"], mcq_choices(row["choices"], cfg.format), row["answer"]))
        sets[q["set"]]["per_question"].append(rec)
    return _summarise(sets, data_path, cfg, max_length)


def _summarise(sets: Dict[str, dict], data_path: str, cfg: McqEvalConfig, max_length: int) -> dict:
    summary, pooled = {}, []
    for name, s in sets.items():
        pq = s["per_question"]
        pooled += pq
        s.update(n=len(pq), chance=float(np.mean([1.0 / len(r["choices"]) for r in pq])),
                 **{m: float(np.mean([r[m] for r in pq])) for m in ("acc", "acc_norm", "acc_bytes")})
        summary[f"{name}/acc"], summary[f"{name}/acc_norm"] = s["acc"], s["acc_norm"]
    if len(sets) > 1:
        summary["all/acc"] = float(np.mean([r["acc"] for r in pooled]))
        summary["all/acc_norm"] = float(np.mean([r["acc_norm"] for r in pooled]))
    protocol = {"reference": "EleutherAI/lm-evaluation-harness v0.4.13, zero-shot multiple_choice "
                             "(wmdp / mmlu default templates" + (", mmlu continuation" if cfg.format == "text" else "")
                             + ")", "format": cfg.format, "target_delimiter": TARGET_DELIMITER,
                "max_length": max_length}
    return {"task": "mcq", "data": os.path.abspath(data_path), "world_size": world_size(), "protocol": protocol,
            "config": {**asdict(cfg), "sets": list(cfg.sets) if cfg.sets else None}, "sets": sets,
            "summary": summary}
